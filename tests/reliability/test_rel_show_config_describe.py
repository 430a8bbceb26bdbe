"""`hs-scale show-config --describe`: the resolved config with every field's description and default, as YAML
that still loads to the same config; and `train --help` tells how to override fields."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from hs_scale.config import load_config
from hs_scale.config_help import describe, field_docs
from hs_scale.models.config import ModelConfig

REPO = Path(__file__).resolve().parents[2]


def test_describe_is_the_same_config_with_comments():
    cfg = load_config(REPO / "configs/demo_asr.yaml", ["--train.steps", "7"])
    text = describe(cfg)
    resolved = {section: value for section, value in cfg.to_dict().items() if value is not None}
    assert yaml.safe_load(text) == resolved  # comments only: the YAML is the resolved config
    lines = text.splitlines()
    steps = next(i for i, line in enumerate(lines) if line.strip().startswith("steps:"))
    assert lines[steps].strip() == "steps: 7  # default: 1000"
    assert lines[steps - 1].strip().startswith("#")  # its description sits above it
    assert "  # H, the number of *active* heads per attention layer" in text


def test_field_docs_reads_the_attribute_docstrings():
    docs = field_docs(ModelConfig)
    assert docs["num_heads"].startswith("H, the number of *active* heads")
    assert set(docs) >= {"arch", "d_model", "ctc_weight"}


def test_cli_describe_and_help_mention_overrides():
    run = [sys.executable, "-m", "hs_scale.cli"]
    out = subprocess.run([*run, "show-config", "--describe", "--config", "configs/synthetic.yaml"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "synthetic:  # SyntheticConfig" in out.stdout and "data:" not in out.stdout.split("synthetic:")[0]
    helped = subprocess.run([*run, "train", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    help_text = " ".join(helped.stdout.split())  # argparse wraps lines
    assert "--section.field VALUE" in help_text and "show-config --describe" in help_text
