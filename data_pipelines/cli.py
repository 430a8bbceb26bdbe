"""`hs-scale prepare-data`: build a corpus recipe, or verify an existing corpus.

    hs-scale prepare-data --recipe demo --out data/demo
    hs-scale prepare-data --recipe asr8 --out data/asr8 --size 4000 --features --workers 2
    hs-scale prepare-data --verify --out data/asr8 [--deep]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from data_pipelines.recipes import RECIPES


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hs-scale prepare-data", description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", choices=sorted(RECIPES), help="corpus recipe to build")
    p.add_argument("--out", required=True, help="corpus dir (created)")
    p.add_argument("--size", type=int, help="train samples in all (recipe default otherwise)")
    p.add_argument("--dev-size", type=int)
    p.add_argument("--test-size", type=int)
    p.add_argument("--features", action="store_true", default=None,
                   help="also store precomputed fp16 filterbanks in the shards")
    p.add_argument("--text-source", choices=["installed", "debian", "libreoffice", "babel", "all"],
                   help="installed catalogs (default), a fixed Debian package list via apt-get download, "
                   "LibreOffice packages, or Babel/CLDR (pip only)")
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
    if not args.recipe:
        print("prepare-data: --recipe is required unless --verify is given", file=sys.stderr)
        return 2
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
