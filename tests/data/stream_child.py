"""Child process of the SIGKILL test: streams train batches and appends one JSON line per batch (keys, a digest
of the features and targets, and the loader state after it) to `out`, fsync'ed, so a kill loses nothing written.

    python stream_child.py MANIFEST OUT N_BATCHES [STATE_JSON]
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import torch


def digest(b) -> str:
    h = hashlib.sha1(b.features.numpy().tobytes())
    h.update(b.target.numpy().tobytes())
    return h.hexdigest()


def make_loader(manifest: str):
    from hs_scale.data import DataConfig, build_loader, load_tokenizer

    cfg = DataConfig(manifest=manifest, num_workers=2, max_frames_per_batch=3000, max_tokens_per_batch=400,
                     bucket_pool=64, shuffle_window=4, sampling_temperature=1.0, precomputed_features=True)
    return build_loader(cfg, "train", 0, 1, load_tokenizer(manifest), train=True)


def run(loader, out: str, n: int) -> None:
    with open(out, "a") as fh:
        for b in loader:
            fh.write(json.dumps({"keys": b.keys, "digest": digest(b), "state": loader.state_dict()}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
            if loader.state_dict()["consumed"] >= n:
                break


def main() -> None:
    manifest, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(1)
    loader = make_loader(manifest)
    if len(sys.argv) > 4:
        loader.load_state_dict(json.loads(sys.argv[4]))
    run(loader, out, n)


if __name__ == "__main__":
    main()
