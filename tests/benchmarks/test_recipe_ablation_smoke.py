"""The recipe ablation harness end to end on a tiny corpus (benchmarks/recipe_ablation.py --smoke)."""

from __future__ import annotations

import json
import math

import pytest


@pytest.mark.slow
def test_smoke_runs_two_variants_and_writes_their_rows(tmp_path):
    from benchmarks import recipe_ablation

    out = tmp_path / "rows.json"
    assert recipe_ablation.main(["--smoke", "--variant", "demo", "--variant", "no_ctc", "--out", str(tmp_path / "run"),
                                 "--json", str(out)]) == 0
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"demo", "no_ctc"}
    assert rows["no_ctc"]["overrides"] == ["--model.ctc_weight=0"]
    for r in rows.values():
        assert set(r["dev_wer"]) == {"de", "es", "fr"} and r["steps"] == 6
        assert math.isfinite(r["dev_wer_average"]) and r["dev_wer_average"] >= 0
    # the CTC head exists only where the variant asks for it
    assert "ctc_weight: 0.0" in (tmp_path / "run" / "no_ctc" / "config.yaml").read_text()
    assert "ctc_weight: 0.3" in (tmp_path / "run" / "demo" / "config.yaml").read_text()
