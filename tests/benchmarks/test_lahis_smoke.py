"""benchmarks/lahis.py --smoke end to end: synthetic languages, a tiny Llama trained here, every output written."""

from __future__ import annotations

import json
import math


def test_lahis_benchmark_smoke(tmp_path):
    import torch

    from benchmarks import lahis as bench

    out = tmp_path / "r.json"
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--smoke", "--json", str(out), "--figures", str(tmp_path / "figs")]) == 0
    finally:
        torch.set_num_threads(threads)  # main() sets one thread
    r = json.loads(out.read_text())
    assert len(r["languages"]) == 4 and r["training"]["steps"] == 20
    for v in r["languages"].values():
        assert -1.0 <= v["spearman"] <= 1.0
        assert len(v["lahis"]) == 2 and len(v["lahis"][0]) == 4
    ab = r["ablation"]["0.8"]
    assert len(ab["ratio"]) == 4 and all(x > 0 for row in ab["ratio"] for x in row)
    assert math.isfinite(ab["diag_over_offdiag"])
    a = r["adaptation"][0]
    assert len(a["heads"]) == 1 and a["heldout_loss_after"] != a["heldout_loss_before"]
    assert (tmp_path / "figs" / "all_languages.png").exists() and (tmp_path / "figs" / "ablation_q0.8.png").exists()
