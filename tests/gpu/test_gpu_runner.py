"""The GPU check script on a CPU machine (normal suite, no gpu marker): its dry run plans every step and runs the
CUDA-free ones, and its summary judges the numbers against the issue's targets."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STEPS = ["env", "pytest_gpu", "attention", "attention_gqa", "train_throughput", "train_demo"]


def _runner():
    spec = importlib.util.spec_from_file_location("gpu_runner", REPO / "benchmarks" / "gpu" / "runner.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_dry_run_plans_every_step_and_runs_the_cuda_free_one(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("OUT", None)
    command = ["bash", "benchmarks/gpu/run.sh", "--dry-run", "--out", str(tmp_path / "out"), "--only", "env"]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    plan = {line.split("]")[0].removeprefix("plan ["): line for line in proc.stdout.splitlines()
            if line.startswith("plan [")}
    assert list(plan) == STEPS
    assert "--batch 16 --seq 1024 --dim 1024 --heads 16 --pool 32 --dtype bf16 --device cuda" in plan["attention"]
    assert "--case gqa" in plan["attention_gqa"] and "--kv-heads 4 --candidates 2" in plan["attention_gqa"]
    assert "--d-model 1024 --layers 24" in plan["train_throughput"] and "--compare-dense" in plan["train_throughput"]
    assert "-m gpu" in plan["pytest_gpu"] and "--train.dtype bf16" in plan["train_demo"]
    summary = json.loads((tmp_path / "out" / "gpu_results.json").read_text())
    status = {s["name"]: s["status"] for s in summary["steps"]}
    assert status == {"env": "ok", "pytest_gpu": "kept", "attention": "kept", "attention_gqa": "kept",
                      "train_throughput": "kept", "train_demo": "kept"}
    assert summary["dry_run"] and summary["results"]["env"]["torch"]
    assert (tmp_path / "out" / "gpu_results.md").read_text().startswith("# hs_scale GPU check")
    bad = subprocess.run(["bash", "benchmarks/gpu/run.sh", "--bogus"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown argument '--bogus'" in bad.stderr


def test_summary_judges_the_targets(tmp_path):
    runner = _runner()
    (tmp_path / "attention.json").write_text(json.dumps({
        "ratio_single_vs_dense": 1.15, "ratio_single_vs_dense_per_layer_draw": 1.05, "ratio_mixed_vs_dense": 1.42,
        "ratio_mixed_loop_vs_dense": 1.42, "ratio_reference_vs_single": 1.7,
        "ms_fwd_bwd": {"a_dense": 2.0}, "config": {"B": 16}}))
    (tmp_path / "attention_gqa.json").write_text(json.dumps({"ratio_single_vs_dense": 1.05,
                                                             "ratio_packed_vs_dense": 1.35}))
    (tmp_path / "train_throughput.json").write_text(json.dumps({"hs_vs_dense_tokens_per_s": 0.95, "mfu": 0.43}))
    (tmp_path / "train_demo").mkdir()
    (tmp_path / "train_demo" / "metrics.jsonl").write_text("\n".join(
        json.dumps({"kind": "train", "step": s, "loss": loss}) for s, loss in [(10, 3.0), (20, 2.5), (30, 1.0)]))
    (tmp_path / "pytest_gpu.xml").write_text(
        '<testsuites><testsuite tests="10" failures="1" errors="0" skipped="2"/></testsuites>')
    steps = runner.plan(tmp_path)
    summary = runner.summarize(steps, tmp_path, dry_run=False)
    verdict = {c["check"]: c["pass"] for c in summary["checks"]}
    assert verdict == {
        "attention.ratio_single_vs_dense": False,
        "attention.ratio_single_vs_dense_per_layer_draw": True,
        "attention.ratio_mixed_vs_dense": False,
        "attention.ratio_mixed_loop_vs_dense": False,
        "attention.ratio_mixed_grouped_vs_dense": None,  # not measured (no grouped GEMM there)
        "attention.ratio_reference_vs_single": True,
        "attention_gqa.ratio_single_vs_dense": True,
        "attention_gqa.ratio_packed_vs_dense": False,
        "train_throughput.hs_vs_dense_tokens_per_s": True,
        "train_throughput.mfu": True,
        "train_throughput.mfu (stretch)": False,
        "pytest -m gpu": False,
        "train_demo loss falls (bf16)": True,
    }
    table = runner.markdown(summary)
    assert "| attention.ratio_mixed_vs_dense | 1.420 | <= 1.3 | **no** |" in table
    assert "| pytest -m gpu | 7 passed, 1 failed, 2 skipped | all pass | **no** |" in table
    empty = runner.summarize(steps, tmp_path / "nothing", dry_run=True)
    assert all(c["pass"] is None for c in empty["checks"])
