"""`python -m benchmarks.paper --smoke --experiment asr`: the whole harness (tiny corpus build with a low-resource
derivative, 4 variants trained and decoded in 2 concurrent cell processes, summary, JSON, report, figures)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_smoke_run_writes_results_report_and_figures(tmp_path):
    out, result_json = tmp_path / "run", tmp_path / "paper_smoke.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "benchmarks.paper", "--smoke", "--experiment", "asr", "--out", str(out), "--json",
           str(result_json)]
    # Own session: on a timeout the whole tree (benchmark, cell processes, corpus builders) is killed, not only
    # the benchmark. ~30 s on an idle 2-core machine; the limit only catches hangs on a busy one.
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"the smoke run hung for 600 s:\n{output[-3000:]}")
    assert proc.returncode == 0, output[-3000:]

    results = json.loads(result_json.read_text())
    assert results["preset"] == "smoke" and results["failed"] == []
    cells = results["experiments"]["asr"]["cells"]
    assert sorted((c["variant"], c["pool_heads"], c["active_heads"]) for c in cells) == [
        ("allheads", 4, 4), ("group", 4, 2), ("shared", 2, 2), ("subset", 4, 2)]
    langs = ["ar", "de", "el", "es", "fr", "it", "pt", "ru"]
    for c in cells:
        assert c["experiment"] == "asr" and c["seed"] == 1 and c["metric"] == "wer"
        assert sorted(c["scores"]) == langs
        assert all(math.isfinite(v) and v >= 0 for v in c["scores"].values())
        assert c["average"] == pytest.approx(sum(c["scores"].values()) / len(langs))
        assert all(n == 2 for n in c["num_sentences"].values())  # 16 test utterances over 8 languages
        # selection tables: one row per task, one layer, H = 2 pool heads of H' = 4 per slot
        if c["variant"] in ("group", "subset"):
            assert set(c["selection"]) == {"encoder_self", "decoder_self", "cross"}
            table = c["selection"]["encoder_self"]
            assert len(table) == 8 and all(len(layer) == 2 and max(layer) < 4 for (layer,) in table)
        else:
            assert c["selection"] == {}

    summary = results["summary"]["asr"]
    assert set(summary) == {"shared", "group", "subset", "allheads"}
    for row in summary.values():
        assert row["direction"] == "lower" and row["metric"] == "wer" and row["n"] == 1
        assert math.isfinite(row["mean"]) and row["std"] is None  # one seed: no std
    exp = results["experiments"]["asr"]
    assert exp["low_resource"] == ["ar", "el"]
    assert exp["train_sizes"]["el"] == 2 and exp["train_sizes"]["de"] == 4  # subsample 0.5 of 4
    assert "one seed only" in exp["summary"]["verdict"]["text"]

    report = result_json.with_suffix(".md").read_text()
    assert "| shared | 2 | 2 | 1 |" in report and "**Verdict:**" in report
    figures = sorted(p.name for p in result_json.with_suffix("").glob("*.png"))
    assert figures == ["asr_bars.png", "asr_group_shared_heads.png", "asr_head_load.png",
                       "asr_subset_shared_heads.png"]
