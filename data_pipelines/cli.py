"""`hs-scale prepare-data`: build a corpus recipe, import an existing corpus, or verify a corpus.

    hs-scale prepare-data --recipe demo --out data/demo
    hs-scale prepare-data --recipe asr8 --out data/asr8 --size 4000 --features --workers 2
    hs-scale prepare-data --recipe lm_help --out data/lm --languages en,de,hi --size 200
    hs-scale prepare-data --from fairseq --input train_st.tsv --input dev_st.tsv --out data/mine
    hs-scale prepare-data --from nemo --input train.json --audio-tars audio_0.tar audio_1.tar --lang de --out data/n
    hs-scale prepare-data --from hf --input hf_dir --lang de --text-column sentence --out data/hf
    hs-scale prepare-data --from lhotse --input cuts_train.jsonl.gz --input shar_dev --out data/lh
    hs-scale prepare-data --from text --src train.de --tgt train.en --lang de --tgt-lang en --out data/mt
    hs-scale prepare-data --verify --out data/asr8 [--deep]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from data_pipelines.importers import FORMATS
from data_pipelines.lm_corpus import LM_RECIPES
from data_pipelines.recipes import RECIPES


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hs-scale prepare-data", description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", choices=sorted(RECIPES) + sorted(LM_RECIPES),
                   help="corpus recipe to build (lm_help: the LM corpus, docs/lm_data.md)")
    p.add_argument("--languages", help="lm_help: comma-separated languages (default: the recipe's 10)")
    g = p.add_argument_group("import (--from FORMAT; see docs/data.md)")
    g.add_argument("--from", dest="fmt", choices=FORMATS, help="import a corpus in this format instead of a recipe")
    g.add_argument("--input", action="append", default=[],
                   help="manifest (fairseq TSV, NeMo JSON lines, Lhotse CutSet), HF dataset dir or Lhotse Shar dir; "
                   "FILE=SPLIT names its split "
                   "(default: the file name up to '_', e.g. train_st.tsv -> train); repeat for several")
    g.add_argument("--lang", help="source language when the input has none")
    g.add_argument("--tgt-lang", help="target language when the input has none (default: --lang)")
    g.add_argument("--domain", default="main", help="domain label of the imported rows")
    g.add_argument("--audio-root", help="fairseq/NeMo: folder audio paths are relative to (default: the manifest's)")
    g.add_argument("--audio-tars", nargs="*", default=[], help="NeMo tarred audio: the tar files")
    g.add_argument("--audio-column", default="audio", help="hf: the Audio column")
    g.add_argument("--text-column", default="text", help="hf: transcript / source text column")
    g.add_argument("--translation-column", help="hf: translation column; nemo: translation field")
    g.add_argument("--lang-column", help="hf: source language column")
    g.add_argument("--tgt-lang-column", help="hf: target language column")
    g.add_argument("--src", help="text: source sentences, one per line")
    g.add_argument("--tgt", help="text: target sentences, one per line")
    g.add_argument("--split", default="train", help="text: the split of --src/--tgt")
    g.add_argument("--max-seconds", type=float, default=30.0, help="longer utterances count as too_long")
    g.add_argument("--on-error", choices=["skip", "raise"], default="skip",
                   help="unreadable audio, empty text, over-long utterances: count and skip, or stop")
    p.add_argument("--out", required=True, help="corpus dir (created)")
    p.add_argument("--size", type=int, help="train samples in all (recipe default otherwise)")
    p.add_argument("--dev-size", type=int)
    p.add_argument("--test-size", type=int)
    p.add_argument("--features", action="store_true", default=None,
                   help="also store precomputed fp16 filterbanks in the shards")
    p.add_argument("--text-source", choices=["installed", "debian", "libreoffice", "help", "babel", "all"],
                   help="installed catalogs (default), a fixed Debian package list via apt-get download, "
                   "LibreOffice packages, LibreOffice help pages (the long-form `docs` domain), or Babel/CLDR "
                   "(pip only)")
    p.add_argument("--domain-from", choices=["text", "condition"],
                   help="domain label: text domain (default) or acoustic condition")
    p.add_argument("--conditions", help="comma-separated acoustic conditions: clean,noisy,fast")
    p.add_argument("--vocab-size", type=int)
    p.add_argument("--shard-size", type=int, help="samples per shard")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--cache-dir", help="where downloaded .deb files are kept (default ~/.cache/hs_scale/debs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verify", action="store_true", help="only verify the corpus in --out against its manifest")
    p.add_argument("--deep", action="store_true", help="verify: also decode audio and check duration/frames")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.verify:
        from data_pipelines.shards import verify

        problems = verify(args.out, deep=args.deep)
        for p in problems[:50]:
            print(p, file=sys.stderr)
        print(f"verify {args.out}: {'OK' if not problems else f'{len(problems)} problems'}")
        return 0 if not problems else 1
    if args.fmt:
        from data_pipelines.importers import import_corpus

        info = import_corpus(
            args.fmt, args.input, args.out, lang=args.lang, tgt_lang=args.tgt_lang, domain=args.domain,
            audio_root=args.audio_root, audio_tars=args.audio_tars, audio_column=args.audio_column,
            text_column=args.text_column, translation_column=args.translation_column, lang_column=args.lang_column,
            tgt_lang_column=args.tgt_lang_column, src=args.src, tgt=args.tgt, split=args.split,
            max_seconds=args.max_seconds, on_error=args.on_error, features=bool(args.features),
            shard_size=args.shard_size or 200, workers=args.workers, vocab_size=args.vocab_size or 4000,
            seed=args.seed)
        print(json.dumps({k: info[k] for k in ("recipe", "num_samples", "num_shards", "splits", "hours", "bytes",
                                               "build_seconds", "verify_problems", "import_errors")}))
        return 0
    if not args.recipe:
        print("prepare-data: --recipe or --from is required unless --verify is given", file=sys.stderr)
        return 2
    if args.recipe in LM_RECIPES:
        from data_pipelines.lm_corpus import build_lm_corpus

        info = build_lm_corpus(args.recipe, args.out, cache_dir=args.cache_dir, seed=args.seed, size=args.size,
                               dev_size=args.dev_size, test_size=args.test_size, vocab_size=args.vocab_size,
                               shard_size=args.shard_size,
                               langs=tuple(args.languages.split(",")) if args.languages else None)
        print(json.dumps({k: info[k] for k in ("recipe", "num_samples", "num_shards", "splits", "bytes",
                                               "build_seconds", "verify_problems", "lm_stats")}))
        return 0
    from data_pipelines.recipes import build_recipe

    info = build_recipe(
        args.recipe, args.out, cache_dir=args.cache_dir, workers=args.workers, seed=args.seed, size=args.size,
        dev_size=args.dev_size, test_size=args.test_size, features=args.features, text_source=args.text_source,
        domain_from=args.domain_from, vocab_size=args.vocab_size, shard_size=args.shard_size,
        conditions=tuple(args.conditions.split(",")) if args.conditions else None,
    )
    print(json.dumps({k: info[k] for k in ("recipe", "num_samples", "num_shards", "splits", "hours", "bytes",
                                           "build_seconds", "verify_problems")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
