"""Parallel text from human translations available offline: gettext catalogs and LibreOffice l10n packages.

Sources (see docs/data.md):
- ``installed``: the ``.mo`` catalogs under /usr/share/locale (what is installed varies by machine).
- ``debian``: a fixed list of Debian packages fetched with ``apt-get download`` and unpacked with ``dpkg -x`` into a
  cache dir; the ``.deb`` file names (with versions) are recorded in the corpus info for reproducibility.
- ``babel``: CLDR display names from the Babel wheel, the pip-only fallback (short phrases, domain ``cldr``).
- LibreOffice ``libreoffice-l10n-XX`` packages (always via ``apt-get download``): the ``office`` domain and the
  multi-way test set (English strings translated into every requested language).
- ``help``: LibreOffice help pages (``libreoffice-help-XX``, via ``apt-get download``), long-form text aligned by
  paragraph id: the ``docs`` domain (data_pipelines.libreoffice_help), split by page.

Every pair is (english, foreign, domain, catalog). Cleaning follows data.md: 3-16 words on both sides; no
placeholders, paths, code-like tokens or digits.
"""

from __future__ import annotations

import gettext
import glob
import hashlib
import logging
import os
import re
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

log = logging.getLogger(__name__)

# Package -> domain. Fixed list so a `debian` build is reproducible on any Debian 12 machine.
DEBIAN_PACKAGES = {
    "cli": ["coreutils", "grep", "sed", "tar", "findutils", "diffutils", "bash", "apt", "dpkg", "util-linux-locales",
            "wget", "libc-l10n", "e2fsprogs", "procps", "gettext", "cpio", "gawk"],
    "ui": ["libgtk-3-common", "libgtk2.0-common", "libglib2.0-data", "libgdk-pixbuf2.0-common", "at-spi2-core",
           "packagekit", "xdg-user-dirs", "gsettings-desktop-schemas", "shared-mime-info", "appstream", "nautilus",
           "gedit", "evince"],
    "db": ["postgresql-15", "postgresql-client-15", "libpq5"],
}
# Catalog (gettext text domain) name patterns -> domain, for catalogs found on the machine.
_DOMAIN_PATTERNS = [
    ("db", r"^(postgres|psql|pg_|libpq|ecpg|initdb|plpgsql|pgscripts)"),
    ("cli", r"^(coreutils|grep|sed|tar|findutils|diffutils|bash|apt|libapt|dpkg|util-linux|wget|libc|e2fsprogs|"
            r"procps|gettext|cpio|gawk|Linux-PAM|shadow|sharutils|gzip|bzip2|xz|make|binutils|debconf|adduser|"
            r"sudo|kmod|man-db|iso-codes)"),
    ("ui", r"^(gtk|glib|gdk|atk|at-spi|PackageKit|software-properties|xdg-user-dirs|gsettings|gnome|nautilus|"
           r"gedit|evince|shared-mime-info|appstream|xkeyboard|gstreamer|avahi|gvfs|pulseaudio|NetworkManager|"
           r"libnotify|dconf|python-apt|xfce|kde)"),
]
# Locale directory names tried for each language (first match wins per catalog).
LOCALE_DIRS = {"pt": ["pt_BR", "pt"], "ar": ["ar"], "el": ["el"]}
LIBREOFFICE_PKG = {"pt": "pt-br"}  # LibreOffice package suffix when it is not the language code
LIBREOFFICE_DIR = {"pt": ["pt-BR", "pt_BR", "pt"]}

_BAD = re.compile(
    r"%[-+ #0-9.*]*[a-zA-Z]|%\(|\{[^}]*\}|\$\d|\$\{|[/\\][\w.]|\w[/\\]|[<>=_|`@#^]|::|--|\d|\bhttps?\b|\w\.\w"
)
_ACCEL = re.compile(r"[_~&](?=\w)")


@dataclass(frozen=True)
class Pair:
    en: str
    xx: str
    domain: str
    catalog: str


def domain_of(catalog: str, default: str = "misc") -> str:
    for dom, pat in _DOMAIN_PATTERNS:
        if re.match(pat, catalog):
            return dom
    return default


def clean(text: str, min_words: int = 3) -> str | None:
    """Cleaned sentence or None. Strips accelerators (_File, ~Open, &Save), keeps min_words-16 words."""
    text = _ACCEL.sub("", text.replace("\u00a0", " ")).strip()
    if "\n" in text or "\t" in text or _BAD.search(text):
        return None
    text = re.sub(r"\s+", " ", text)
    if not min_words <= len(text.split()) <= 16:
        return None
    return text


def clean_pair(en: str, xx: str, min_words: int = 3) -> tuple[str, str] | None:
    en_c, xx_c = clean(en, min_words), clean(xx, min_words)
    if en_c is None or xx_c is None or en_c == xx_c:
        return None
    return en_c, xx_c


def split_of_pair(p: Pair) -> str:
    """The split of a pair: by its page for the ``docs`` domain (no page crosses splits), else by its English."""
    return split_of(p.catalog if p.domain == "docs" else p.en)


def split_of(en: str, dev_frac: float = 0.05, test_frac: float = 0.05) -> str:
    """train/dev/test from a hash of the (normalized) English side: no English sentence crosses splits."""
    h = int.from_bytes(hashlib.sha1(en.lower().encode()).digest()[:8], "big") / 2**64
    return "test" if h < test_frac else "dev" if h < test_frac + dev_frac else "train"


def read_mo(path: str) -> Iterable[tuple[str, str]]:
    """(msgid, msgstr) singular entries of one .mo file; msgctxt prefixes removed, plurals skipped."""
    try:
        with open(path, "rb") as fh:
            cat = gettext.GNUTranslations(fh)._catalog
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        log.warning("unreadable catalog %s: %s", path, exc)
        return
    for k, v in cat.items():
        if isinstance(k, str) and k and isinstance(v, str) and v:
            yield k.split("\x04", 1)[-1], v


def pairs_from_tree(
    root: str, lang: str, domain: str | None = None, subdir: str = "usr/share/locale", locales: list | None = None
) -> list[Pair]:
    """Cleaned pairs from every catalog of `lang` under root/subdir/<locale>/LC_MESSAGES/*.mo."""
    out, seen = [], set()
    for loc in locales or LOCALE_DIRS.get(lang, [lang]):
        for path in sorted(glob.glob(os.path.join(root, subdir, loc, "LC_MESSAGES", "*.mo"))):
            cat = os.path.basename(path)[:-3]
            if cat in seen:  # pt_BR preferred over pt for the same catalog
                continue
            seen.add(cat)
            dom = domain or domain_of(cat)
            for en, xx in read_mo(path):
                c = clean_pair(en, xx)
                if c:
                    out.append(Pair(c[0], c[1], dom, cat))
    return out


def apt_download(packages: list[str], cache_dir: str) -> list[str]:
    """`apt-get download` each package into cache_dir (skipped if a .deb is already there) and `dpkg -x` it.

    Returns the .deb file names (name_version_arch), recorded in the corpus info for reproducibility.
    """
    os.makedirs(cache_dir, exist_ok=True)
    debs = []
    for pkg in packages:
        have = glob.glob(os.path.join(cache_dir, f"{pkg}_*.deb"))
        if not have:
            r = subprocess.run(["apt-get", "download", pkg], cwd=cache_dir, capture_output=True, text=True)
            have = glob.glob(os.path.join(cache_dir, f"{pkg}_*.deb"))
            if not have:
                raise RuntimeError(f"`apt-get download {pkg}` failed: {r.stderr.strip()[-400:]} "
                                   "(run `apt-get update`, or use --text-source installed)")
        deb = sorted(have)[-1]
        unpacked = os.path.join(cache_dir, "root")
        stamp = os.path.join(cache_dir, os.path.basename(deb) + ".unpacked")
        if not os.path.exists(stamp):
            subprocess.run(["dpkg", "-x", deb, unpacked], check=True)
            open(stamp, "w").close()
        debs.append(os.path.basename(deb))
    return debs


def debian_pairs(lang: str, cache_dir: str) -> tuple[list[Pair], list[str]]:
    """Pairs from the fixed DEBIAN_PACKAGES list (domains from the list, not from catalog names)."""
    pairs, debs = [], []
    for dom, pkgs in DEBIAN_PACKAGES.items():
        d = os.path.join(cache_dir, dom)
        debs += apt_download(pkgs, d)
        pairs += pairs_from_tree(os.path.join(d, "root"), lang, domain=dom)
    return pairs, debs


def libreoffice_pairs(lang: str, cache_dir: str) -> tuple[list[Pair], list[str]]:
    """Pairs from libreoffice-l10n-<lang> (domain ``office``)."""
    pkg = f"libreoffice-l10n-{LIBREOFFICE_PKG.get(lang, lang)}"
    d = os.path.join(cache_dir, "office")
    debs = apt_download([pkg], d)
    pairs = pairs_from_tree(os.path.join(d, "root"), lang, domain="office",
                            subdir="usr/lib/libreoffice/program/resource", locales=LIBREOFFICE_DIR.get(lang, [lang]))
    return pairs, debs


def babel_pairs(lang: str) -> list[Pair]:
    """pip-only fallback: CLDR display names (territories, languages, scripts, currencies) from Babel.

    Real translations but short (mostly 1-3 words), so the 3-word minimum is lifted; domain ``cldr``.
    """
    try:
        from babel import Locale
    except ImportError:
        raise RuntimeError("--text-source babel needs `pip install babel`") from None
    en, xx = Locale("en"), Locale.parse(lang)
    out = []
    for attr in ("territories", "languages", "scripts", "currencies"):
        e, x = getattr(en, attr), getattr(xx, attr)
        for k in sorted(e):
            c = clean_pair(e[k], x.get(k, ""), min_words=1) if k in x else None
            if c:
                out.append(Pair(c[0], c[1], "cldr", attr))
    return out


def multiway(per_lang: dict[str, list[Pair]]) -> list[str]:
    """English sentences translated in every language of per_lang (sorted, deterministic)."""
    sets = [{p.en for p in pairs} for pairs in per_lang.values()]
    return sorted(set.intersection(*sets)) if sets else []


def dedupe(pairs: list[Pair]) -> list[Pair]:
    """One pair per English sentence (first in catalog order) and per foreign sentence, ordered by hash.

    NOTE: ordering by a hash (not catalog order) makes "take the first N" a random-looking but reproducible
    sample that does not depend on which other catalogs are installed.
    """
    seen_en, seen_xx, out = set(), set(), []
    for p in pairs:
        if p.en in seen_en or p.xx in seen_xx:
            continue
        seen_en.add(p.en)
        seen_xx.add(p.xx)
        out.append(p)
    return sorted(out, key=lambda p: hashlib.sha1((p.en + "\0" + p.xx).encode()).digest())


def collect(lang: str, source: str, cache_dir: str, domains: tuple[str, ...] | None = None) -> tuple[list[Pair], list]:
    """All cleaned, deduplicated pairs for one language from `source` (installed|debian|libreoffice|help|babel|all)."""
    pairs: list[Pair] = []
    debs: list[str] = []
    if source in ("installed", "all"):
        pairs += pairs_from_tree("/", lang)
    if source in ("debian", "all"):
        p, d = debian_pairs(lang, cache_dir)
        pairs, debs = pairs + p, debs + d
    if source == "babel":
        pairs += babel_pairs(lang)
    if source in ("libreoffice", "all") or (domains and "office" in domains):
        p, d = libreoffice_pairs(lang, cache_dir)
        pairs, debs = pairs + p, debs + d
    if source == "help" or (domains and "docs" in domains):
        from data_pipelines.libreoffice_help import help_pairs

        p, d = help_pairs(lang, cache_dir)
        pairs, debs = pairs + p, debs + d
    if domains:
        pairs = [p for p in pairs if p.domain in domains]
    if not pairs:
        raise RuntimeError(f"no parallel text for {lang!r} from source {source!r}; try --text-source debian")
    return dedupe(pairs), debs
