"""Import corpora prepared for other toolkits into an hs_scale corpus (`hs-scale prepare-data --from FORMAT`).

Formats (each reader yields rows {split, lang, tgt_lang, domain, text, translation, source_id[, speaker],
audio}; `audio` is a picklable reference that `load_audio` reads in the build workers):

- fairseq  S2T TSV (`id, audio, n_frames, tgt_text, speaker, src_lang, tgt_lang`, optional `src_text`); `audio`
           is a path or fairseq's `<file.zip>:<offset>:<length>` (bytes of a WAV/FLAC member stored uncompressed
           in the zip), relative to --audio-root (default: the TSV's folder).
- nemo     NeMo JSON lines (`audio_filepath, duration, text`, optional `lang` / `source_lang`, `target_lang`
           and a translation field); NeMo's tarred layout (--audio-tars: the tars whose members the manifest's
           `audio_filepath` names).
- hf       a Hugging Face dataset saved with `save_to_disk` (`datasets.load_from_disk`), optionally a
           DatasetDict of splits; an `Audio` column and text columns named by --audio-column, --text-column,
           --translation-column, --lang-column. Audio is read undecoded (`Audio(decode=False)`) and decoded
           with soundfile, so no extra audio backend is needed.
- text     plain parallel text for MT: one sentence per line in --src and --tgt.
- lhotse   Lhotse CutSet manifests (`cuts_train.jsonl.gz`, anything `CutSet.from_file` reads; the split is the
           file name after its last "_", or FILE=SPLIT): one row per cut, its supervisions' texts joined, language
           and speaker from the first supervision, a translation from the supervisions' `custom` field named by
           --translation-column (default "translation"; a {lang: text} dict is indexed by --tgt-lang). Audio is
           read by Lhotse itself (`cut.load_audio()`: recordings of any source type it supports, cut offsets and
           durations honoured). A Lhotse Shar directory (written by `CutSet.to_shar`: cuts.NNNNNN.jsonl.gz with
           the cuts' audio in recording.NNNNNN.tar) is read shard by shard; the audio stays in its tar until a build
           worker reads that member (one index of the tar per worker process) and hands it to Lhotse to decode.

Audio is resampled to 16 kHz with scipy's `resample_poly` (what the synthesizer uses too) and down-mixed to mono.
Bad inputs are counted per kind and skipped, or refused with on_error="raise": unreadable audio ("bad_audio"),
empty text ("empty_text"), utterances longer than max_seconds ("too_long").
"""

from __future__ import annotations

import csv
import functools
import glob
import io
import json
import logging
import math
import os
import tarfile
from collections import Counter
from collections.abc import Iterator

import numpy as np

log = logging.getLogger(__name__)
FORMATS = ("fairseq", "nemo", "hf", "text", "lhotse")


class ImportError_(ValueError):
    """A bad input row under on_error="raise" (named so it does not shadow the builtin ImportError)."""


# ---- audio --------------------------------------------------------------------------------------------------
def load_audio(ref: dict) -> np.ndarray:
    """A row's audio reference -> float32 mono [N] at 16 kHz. ref: {"path"} | {"zip", "offset", "length"} |
    {"tar", "member"} | {"bytes"} | {"lhotse": a cut as a dict}. Raises ValueError with the reason if it cannot be
    read."""
    import soundfile as sf

    try:
        if "lhotse" in ref:
            from lhotse import CutSet

            cut = ref["lhotse"]
            if "shar" in ref:  # a Shar cut: its audio is a member of the shard's tar, decoded by Lhotse from memory
                rec = cut["recording"]
                sources = [{"type": "memory", "channels": rec["sources"][0]["channels"],
                            "source": _shar_audio(ref["shar"], cut["id"])}]
                cut = {**cut, "recording": {**rec, "sources": sources}}
            cut = next(iter(CutSet.from_dicts([cut])))
            wav, sr = cut.load_audio().T.astype(np.float32), cut.sampling_rate  # [C, N] -> [N, C]
        elif "bytes" in ref:
            data = ref["bytes"]
        elif "zip" in ref:
            with open(ref["zip"], "rb") as fh:
                fh.seek(ref["offset"])
                data = fh.read(ref["length"])
        elif "tar" in ref:
            with tarfile.open(ref["tar"]) as tf:
                data = tf.extractfile(ref["member"]).read()
        else:
            with open(ref["path"], "rb") as fh:
                data = fh.read()
        if "lhotse" not in ref:
            wav, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile / zip / tar / OS errors all mean "unreadable"
        raise ValueError(f"unreadable audio {_describe(ref)}: {type(exc).__name__}: {exc}") from None
    wav = wav.mean(axis=1) if wav.shape[1] > 1 else wav[:, 0]
    if sr != 16_000:
        from scipy.signal import resample_poly

        g = math.gcd(16_000, sr)
        wav = resample_poly(wav, 16_000 // g, sr // g).astype(np.float32)
    if len(wav) == 0:
        raise ValueError(f"empty audio {_describe(ref)}")
    return np.clip(wav, -1.0, 32767 / 32768).astype(np.float32)


@functools.lru_cache(maxsize=64)
def _tar_index(tar: str) -> dict[str, tuple[int, int]]:
    """{member name without its last extension: (data offset, size)} of the non-.json members of a tar: one scan per
    tar and build worker, not one per member (~100 KB per 1000 members; 64 tars kept, as a worker's rows may
    come from any of them)."""
    with tarfile.open(tar, mode="r:") as tf:
        return {m.name.rsplit(".", 1)[0]: (m.offset_data, m.size) for m in tf if m.isfile()
                and not m.name.endswith(".json")}


def _shar_audio(tar: str, cut_id: str) -> bytes:
    """The encoded audio of cut `cut_id` in a Shar recording tar (member `<cut_id>.<format>`, as Lhotse writes)."""
    where = _tar_index(tar).get(cut_id)
    if where is None:
        raise ValueError(f"no audio member for cut {cut_id!r} in {tar}")
    with open(tar, "rb") as fh:
        fh.seek(where[0])
        return fh.read(where[1])


def _describe(ref: dict) -> str:
    if "lhotse" in ref:
        return f"of Lhotse cut {ref['lhotse'].get('id')}"
    if "zip" in ref:
        return f"{ref['zip']}:{ref['offset']}:{ref['length']}"
    if "tar" in ref:
        return f"{ref['tar']}:{ref['member']}"
    return ref.get("path", "<bytes>")


# ---- readers --------------------------------------------------------------------------------------------------
def _split_of(path: str, split: str | None) -> str:
    """--input FILE=SPLIT, else the file name up to the first '_' or '.' (train_st.tsv -> train)."""
    return split or os.path.basename(path).split("_")[0].split(".")[0]


def read_fairseq(path: str, split: str | None, audio_root: str | None, domain: str) -> Iterator[dict]:
    root = audio_root or os.path.dirname(os.path.abspath(path))
    with open(path, newline="", encoding="utf-8") as fh:
        # fairseq writes these with csv.QUOTE_NONE and tab delimiters (examples/speech_to_text/data_utils.py).
        for r in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE):
            src, tgt = r.get("src_lang") or "", r.get("tgt_lang") or r.get("src_lang") or ""
            audio = r["audio"]
            parts = audio.split(":")
            if len(parts) == 3 and parts[0].endswith(".zip"):
                ref = {"zip": os.path.join(root, parts[0]), "offset": int(parts[1]), "length": int(parts[2])}
            else:
                ref = {"path": os.path.join(root, audio)}
            st = src and tgt and src != tgt
            yield {"split": _split_of(path, split), "lang": src, "tgt_lang": tgt, "domain": domain,
                   "text": (r.get("src_text") or "") if st else r["tgt_text"],
                   "translation": r["tgt_text"] if st else "", "source_id": r["id"],
                   "speaker": r.get("speaker") or "", "audio": ref}


def read_nemo(path: str, split: str | None, audio_root: str | None, domain: str, audio_tars: list[str],
              translation_field: str) -> Iterator[dict]:
    root = audio_root or os.path.dirname(os.path.abspath(path))
    in_tar = {}
    for t in audio_tars:  # NeMo tarred audio: manifest audio_filepath = member name in one of the tars
        with tarfile.open(t) as tf:
            in_tar.update({m.name: t for m in tf.getmembers() if m.isfile()})
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh):
            if not line.strip():
                continue
            r = json.loads(line)
            lang = r.get("lang") or r.get("source_lang") or ""
            tgt = r.get("target_lang") or lang
            a = r["audio_filepath"]
            ref = {"tar": in_tar[a], "member": a} if a in in_tar else {"path": os.path.join(root, a)}
            yield {"split": _split_of(path, split), "lang": lang, "tgt_lang": tgt, "domain": domain,
                   "text": r.get("text") or "", "translation": r.get(translation_field) or "",
                   "source_id": r.get("id") or os.path.splitext(os.path.basename(a))[0] or str(n),
                   "speaker": str(r.get("speaker", "")), "audio": ref}


def read_hf(path: str, split: str | None, domain: str, audio_column: str, text_column: str,
            translation_column: str | None, lang_column: str | None, tgt_lang_column: str | None,
            lang: str, tgt_lang: str | None) -> Iterator[dict]:
    import datasets

    loaded = datasets.load_from_disk(path)
    parts = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [(split or "train", loaded)]
    for name, ds in parts:
        if audio_column in ds.column_names:
            ds = ds.cast_column(audio_column, datasets.Audio(decode=False))
        for n, r in enumerate(ds):
            src = (r[lang_column] if lang_column else lang) or ""
            tgt = (r[tgt_lang_column] if tgt_lang_column else tgt_lang) or src
            a = r.get(audio_column)
            ref = None
            if a is not None:
                ref = {"bytes": a["bytes"]} if a.get("bytes") else {"path": os.path.join(path, a.get("path") or "")}
            yield {"split": name if split is None or len(parts) > 1 else split, "lang": src, "tgt_lang": tgt,
                   "domain": domain, "text": r.get(text_column) or "",
                   "translation": (r.get(translation_column) or "") if translation_column else "",
                   "source_id": str(r.get("id", n)), "audio": ref}


def read_lhotse(path: str, split: str | None, domain: str, translation_field: str,
                tgt_lang: str | None) -> Iterator[dict]:
    try:
        from lhotse import CutSet
    except ImportError:
        raise ImportError("--from lhotse needs Lhotse: pip install 'hs_scale[import]' (or: pip install lhotse)") \
            from None

    name = os.path.basename(os.path.normpath(path))
    for ext in (".gz", ".jsonl", ".json", ".yaml"):
        name = name.removesuffix(ext)
    cuts = _shar_cuts(path) if os.path.isdir(path) else ((cut, None) for cut in CutSet.from_file(path))
    for n, (cut, tar) in enumerate(cuts):
        sups = list(cut.supervisions)
        first = sups[0] if sups else None
        lang = (first.language if first else None) or ""
        tr = ((first.custom or {}).get(translation_field) if first else None) or ""
        if isinstance(tr, dict):  # {lang: text}, as some Lhotse ST recipes store translations
            tr = tr.get(tgt_lang or "", "")
        yield {"split": split or name.rsplit("_", 1)[-1], "lang": lang, "tgt_lang": tgt_lang if tr else lang,
               "domain": domain, "text": " ".join(s.text.strip() for s in sups if s.text), "translation": tr,
               "source_id": first.id if len(sups) == 1 else cut.id or str(n),
               "speaker": (first.speaker if first else None) or "",
               "audio": {"lhotse": cut.to_dict(), **({"shar": tar} if tar else {})}}


def _shar_cuts(path: str):
    """(cut, the tar holding its audio or None) of a Lhotse Shar directory, shard by shard. The cuts are read with
    Lhotse (`CutSet.from_file` on each cuts.NNNNNN.jsonl.gz), not `CutSet.from_shar`, which would load every
    cut's audio here in the main process; a cut's audio is read from recording.NNNNNN.tar when it is built.
    Without a recording field the cuts keep their own recording sources."""
    from lhotse import CutSet

    cut_files = sorted(glob.glob(os.path.join(path, "cuts.*.jsonl*")))
    if not cut_files:
        raise ValueError(f"--input {path}: a directory, but not a Lhotse Shar directory (no cuts.NNNNNN.jsonl.gz); "
                         "give a CutSet manifest as a file")
    for cut_file in cut_files:
        tar = os.path.join(path, f"recording.{os.path.basename(cut_file).split('.')[1]}.tar")
        for cut in CutSet.from_file(cut_file):
            shar = cut.has_recording and any(s.type == "shar" for s in cut.recording.sources)
            if shar and not os.path.exists(tar):
                raise ValueError(f"--input {path}: {os.path.basename(tar)} (the audio of {cut_file}) is missing "
                                 "(Lhotse writes it with fields={'recording': ...}; a compressed .tar.gz is not read)")
            yield cut, tar if shar else None


def read_text(src: str, tgt: str, split: str, lang: str, tgt_lang: str, domain: str) -> Iterator[dict]:
    with open(src, encoding="utf-8") as fs, open(tgt, encoding="utf-8") as ft:
        for n, (a, b) in enumerate(zip(fs, ft, strict=True)):
            yield {"split": split, "lang": lang, "tgt_lang": tgt_lang, "domain": domain, "text": a.strip(),
                   "translation": b.strip(), "source_id": str(n)}


# ---- import -------------------------------------------------------------------------------------------------
def filter_rows(rows, on_error: str, counts: Counter) -> list[dict]:
    """Drop rows with empty text (or, for MT/ST, empty translation), counting them; raise under "raise"."""
    keep = []
    for r in rows:
        st = r["lang"] != r["tgt_lang"]
        missing = [f for f in ("lang", "tgt_lang") if not r[f]]
        if missing:
            raise ImportError_(f"row {r['source_id']}: no {missing[0]}: give --lang (and --tgt-lang) or a column")
        if not r["text"].strip() or (st and not r["translation"].strip()):
            if on_error == "raise":
                raise ImportError_(f"empty_text: row {r['source_id']} ({r['split']}) has empty text")
            counts["empty_text"] += 1
            log.warning("skipping row %s: empty text", r["source_id"])
            continue
        keep.append(r)
    return keep


def import_corpus(fmt: str, inputs: list[str], out: str, *, lang: str | None = None, tgt_lang: str | None = None,
                  domain: str = "main", audio_root: str | None = None, audio_tars: list[str] | None = None,
                  audio_column: str = "audio", text_column: str = "text", translation_column: str | None = None,
                  lang_column: str | None = None, tgt_lang_column: str | None = None, src: str | None = None,
                  tgt: str | None = None, split: str = "train", max_seconds: float = 30.0, on_error: str = "skip",
                  features: bool = False, shard_size: int = 200, workers: int = 1, vocab_size: int = 4000,
                  seed: int = 0) -> dict:
    """Read `inputs` (FILE or FILE=SPLIT) in format `fmt`, then build the corpus with build_from_rows."""
    from data_pipelines.build import build_from_rows

    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use one of {list(FORMATS)}")
    rows: list[dict] = []
    if fmt == "text":
        if not (src and tgt and lang and tgt_lang):
            raise ValueError("--from text needs --src, --tgt, --lang and --tgt-lang")
        rows += read_text(src, tgt, split, lang, tgt_lang, domain)
    for item in inputs:
        path, _, sp = item.partition("=")
        if not os.path.exists(path):
            raise FileNotFoundError(f"--input {path} does not exist")
        if fmt == "fairseq":
            rows += read_fairseq(path, sp or None, audio_root, domain)
        elif fmt == "nemo":
            rows += read_nemo(path, sp or None, audio_root, domain, audio_tars or [], translation_column or
                              "translation")
        elif fmt == "lhotse":
            rows += read_lhotse(path, sp or None, domain, translation_column or "translation", tgt_lang)
        elif fmt == "hf":
            rows += read_hf(path, sp or None, domain, audio_column, text_column, translation_column, lang_column,
                            tgt_lang_column, lang or "", tgt_lang)
    for r in rows:  # --lang / --tgt-lang fill in what the source does not say
        r["lang"] = r["lang"] or (lang or "")
        r["tgt_lang"] = r["tgt_lang"] or tgt_lang or r["lang"]
    counts: Counter = Counter()
    rows = filter_rows(rows, on_error, counts)
    speech = fmt != "text" and any(r.get("audio") for r in rows)
    if not rows:
        raise ValueError(f"nothing to import from {inputs or [src]}: every row was empty ({dict(counts)})")
    info = build_from_rows(rows, out, modality="speech" if speech else "text", features=features,
                           shard_size=shard_size, workers=workers, seed=seed, vocab_size=vocab_size,
                           info={"recipe": f"import:{fmt}", "inputs": inputs or [src, tgt]},
                           audio_policy={"max_seconds": max_seconds, "on_error": on_error},
                           skipped=counts)
    return info
