"""The `docs` domain: LibreOffice help pages aligned by paragraph id (a small help tree written here, in the
layout of the Debian libreoffice-help-XX packages), split by page."""

from __future__ import annotations

import os

from data_pipelines import text_sources as ts
from data_pipelines.libreoffice_help import pairs_from_help_tree

PAGES = {
    "text/swriter/01/a.html": (
        ['<h1 id="hd_id1">Insert Table</h1>',
         '<p id="par_id2" class="paragraph">Inserts a table into the document. You can also click the arrow.</p>',
         '<p id="par_id3">Choose <span class="menuitem">Table - Insert</span>.<p>Click OK now.</p></p>',
         '<p id="par_id4">%PRODUCTNAME opens the dialog box</p>', '<p id="bm_id5">bookmark text here</p>'],
        ['<h1 id="hd_id1">Tabelle einfügen</h1>',
         '<p id="par_id2" class="paragraph">Fügt eine Tabelle in das Dokument ein. Sie können auch auf den Pfeil '
         'klicken.</p>',
         '<p id="par_id3">Wählen Sie <span class="menuitem">Tabelle - Einfügen</span>.<p>Klicken Sie auf OK.</p></p>',
         '<p id="par_id4">%PRODUCTNAME öffnet den Dialog</p>', '<p id="bm_id5">Lesezeichen Text hier</p>']),
    "text/scalc/01/b.html": (
        ['<p id="par_id7">Deletes date and time values.</p>', '<p id="par_id8">Only in English here.</p>'],
        ['<p id="par_id7">Löscht Datums- und Uhrzeitwerte.</p>']),
}


def write_tree(root):
    for page, sides in PAGES.items():
        for lang, paras in zip(("en-US", "de"), sides, strict=True):
            path = os.path.join(root, "usr/share/libreoffice/help", lang, page)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as fh:
                fh.write("<html><body>" + "\n".join(paras) + "</body></html>")


def test_help_pages_aligned_by_id_and_split_by_page(tmp_path):
    write_tree(str(tmp_path))
    pairs = pairs_from_help_tree(str(tmp_path), "de")
    got = [(p.en, p.xx, p.catalog) for p in pairs]
    a, b = "help:text/swriter/01/a.html", "help:text/scalc/01/b.html"
    assert got == [  # pages in path order; paragraphs with as many sentences on both sides are split
        ("Deletes date and time values.", "Löscht Datums- und Uhrzeitwerte.", b),
        ("Inserts a table into the document.", "Fügt eine Tabelle in das Dokument ein.", a),
        ("You can also click the arrow.", "Sie können auch auf den Pfeil klicken.", a),
        ("Choose Table - Insert.", "Wählen Sie Tabelle - Einfügen.", a),  # inline markup flattened
        ("Click OK now.", "Klicken Sie auf OK.", a),  # a nested block does not run into the text before it
    ]  # under 3 words (the heading), %PRODUCTNAME placeholders, bookmarks and one-sided paragraphs are left out
    assert all(p.domain == "docs" for p in pairs)
    splits = {p.catalog: {ts.split_of_pair(q) for q in pairs if q.catalog == p.catalog} for p in pairs}
    assert all(len(s) == 1 for s in splits.values())  # no page crosses splits
    assert ts.split_of_pair(pairs[1]) == ts.split_of(a) and ts.split_of_pair(pairs[0]) == ts.split_of(b)
