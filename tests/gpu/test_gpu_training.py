"""On CUDA: bf16 training steps lower the loss, the trainer runs in bf16, and checkpoints written on the GPU load in
a process that has no GPU at all (CUDA_VISIBLE_DEVICES="") exactly."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hs_scale.checkpoint import CheckpointManager
from hs_scale.models import ModelConfig, build_model
from hs_scale.selection.config import SelectionConfig
from hs_scale.training.config import TrainConfig
from hs_scale.training.loss import sequence_loss
from hs_scale.training.optim import build_optimizer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/gpu/run.sh runs it)"),
]

REPO = Path(__file__).resolve().parents[2]
PAD = 1
MODEL = dict(arch="s2t", d_model=128, encoder_layers=2, decoder_layers=2, num_heads=4, ffn_dim=256, vocab_size=100,
             conv_channels=64, conv_kernel_sizes=[3], input_feat_per_channel=16, dropout=0.0,
             attention_backend="auto")


def small_model(device: str):
    torch.manual_seed(0)
    cfg = ModelConfig(**MODEL)
    return build_model(cfg, SelectionConfig(strategy="group", pool_heads=8), num_tasks=3).to(device)


def batch(device: str):
    """Padded features and targets, three tasks mixed in the batch (the grouped projection on CUDA)."""
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(6, 40, 16, generator=g)
    lengths = torch.tensor([40, 31, 40, 12, 25, 40])
    tgt = torch.randint(4, 100, (6, 9), generator=g)
    tgt[1, 6:] = PAD
    tgt[3, 3:] = PAD
    dec_in = torch.cat([torch.full((6, 1), 2), tgt[:, :-1]], dim=1)
    task = torch.tensor([0, 2, 1, 2, 0, 1])
    return [t.to(device) for t in (feats, lengths, dec_in, tgt, task)]


def bf16_step(model, optimizer, b) -> float:
    feats, lengths, dec_in, tgt, task = b
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(feats, lengths, dec_in, src_task_B=task, tgt_task_B=task)
    loss, _ = sequence_loss(logits.float(), tgt, pad_id=PAD, label_smoothing=0.1)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def trained(tmp_path: Path):
    model = small_model("cuda")
    optimizer, scheduler = build_optimizer(model, TrainConfig(lr=3e-3, warmup_steps=0, schedule="constant"))
    b = batch("cuda")
    losses = [bf16_step(model, optimizer, b) for _ in range(3)]
    return model, optimizer, scheduler, losses


def test_bf16_steps_lower_the_loss(tmp_path):
    """Two bf16 updates on one batch: every loss finite, and the loss after them below the first."""
    _, _, _, losses = trained(tmp_path)
    assert all(math.isfinite(v) for v in losses), losses
    assert losses[2] < losses[0], losses


CPU_LOAD = textwrap.dedent(
    """
    import json, sys, torch
    from safetensors.torch import save_file
    assert not torch.cuda.is_available()
    sys.path.insert(0, sys.argv[3])
    from test_gpu_training import small_model
    from hs_scale.checkpoint import CheckpointManager
    from hs_scale.training.config import TrainConfig
    from hs_scale.training.optim import build_optimizer
    model = small_model("cpu")
    optimizer, scheduler = build_optimizer(model, TrainConfig(lr=3e-3, warmup_steps=0, schedule="constant"))
    step, _ = CheckpointManager(sys.argv[1]).load_latest(model, optimizer, scheduler)
    state = {k: v.clone() for k, v in model.state_dict().items()}  # clone: tied weights share storage
    for i, s in enumerate(optimizer.state_dict()["state"].values()):
        state.update({f"opt.{i}.{k}": v.clone() for k, v in s.items() if torch.is_tensor(v) and v.dim()})
    save_file(state, sys.argv[2])
    print(json.dumps({"step": step}))
    """
)


def test_checkpoint_saved_on_gpu_loads_on_cpu(tmp_path):
    """Model and AdamW state saved from CUDA tensors come back bit-exact in a process that sees no GPU."""
    from safetensors.torch import load_file

    model, optimizer, scheduler, _ = trained(tmp_path)
    CheckpointManager(tmp_path / "ckpt").save(3, model, optimizer, scheduler)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "loaded.safetensors"
    command = [sys.executable, "-c", CPU_LOAD, str(tmp_path / "ckpt"), str(out), str(Path(__file__).parent)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"step": 3}
    loaded = load_file(out)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded[name], value.cpu()), name
    gpu_state = [s for s in optimizer.state_dict()["state"].values()]
    for i, s in enumerate(gpu_state):
        for k, v in s.items():
            if torch.is_tensor(v) and v.dim():
                assert torch.equal(loaded[f"opt.{i}.{k}"], v.cpu()), (i, k)


def test_trainer_runs_in_bf16_on_cuda(tmp_path):
    """The real trainer (synthetic task, auto attention backend, bf16) for a few steps: finite logged losses and a
    complete checkpoint."""
    from hs_scale.config import load_config
    from hs_scale.training.run import train

    cfg = load_config(REPO / "configs" / "synthetic.yaml", [
        "--train.device", "cuda", "--train.dtype", "bf16", "--train.steps", "4", "--train.log_every", "1",
        "--train.output_dir", str(tmp_path / "run"), "--train.progress_bar", "false", "--train.threads", "0",
        "--model.attention_backend", "auto", "--synthetic.eval_batches", "1",
    ])
    train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses), losses
    infos = CheckpointManager(tmp_path / "run" / "checkpoints").list_checkpoints()
    assert infos and infos[-1].complete and infos[-1].step == 4
