"""Tiny head-selection models trained for a few steps on the synthetic task (text, and a speech version of it).

Legend: B batch, T frames, F features per frame, S source length, L target length.
The speech variant turns each source token into 4 frames of its one-hot vector (plus noise), so the conv
subsampler (stride 4 in all) sees one token per encoder position: learnable in a few steps, no audio needed.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from _configs import tiny_model_config

from hs_scale.data.synthetic import PAD, SyntheticConfig, SyntheticTask
from hs_scale.models import ModelConfig, build_model
from hs_scale.selection.config import SelectionConfig

SYNTH = SyntheticConfig(rules=["copy", "reverse", "shift"], num_symbols=8, min_len=3, max_len=6, batch_size=16)
TASKS = SYNTH.task_names
FRAMES_PER_TOKEN = 4


def model_cfg(arch: str) -> ModelConfig:
    extra = dict(conv_kernel_sizes=[5, 3], input_feat_per_channel=SYNTH.vocab_size) if arch == "s2t" else {}
    return tiny_model_config(arch, vocab_size=SYNTH.vocab_size, **extra)


def selection_cfg(strategy: str = "group") -> SelectionConfig:
    return SelectionConfig(strategy=strategy, pool_heads=8)


def speech_features(source_BS: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(features_BTF, lengths_B): 4 noisy one-hot frames per source token, zero-padded."""
    g = torch.Generator().manual_seed(seed)
    onehot_BSF = torch.nn.functional.one_hot(source_BS, SYNTH.vocab_size).float()
    onehot_BSF[source_BS.eq(PAD)] = 0.0
    feats_BTF = onehot_BSF.repeat_interleave(FRAMES_PER_TOKEN, dim=1)
    feats_BTF = feats_BTF + 0.05 * torch.randn(feats_BTF.shape, generator=g)
    lengths_B = source_BS.ne(PAD).sum(1) * FRAMES_PER_TOKEN
    feats_BTF[torch.arange(feats_BTF.shape[1])[None] >= lengths_B[:, None]] = 0.0
    return feats_BTF, lengths_B


def as_batch(arch: str, b) -> SimpleNamespace:
    """The fields hs_scale.evaluation.search reads (features or source_tokens, tasks, decoder_input)."""
    out = SimpleNamespace(src_task=b.src_task, tgt_task=b.tgt_task, decoder_input=b.decoder_input,
                          source_tokens=None, features=None, feature_lengths=None)
    if arch == "s2t":
        out.features, out.feature_lengths = speech_features(b.source_tokens)
    else:
        out.source_tokens = b.source_tokens
    return out


def forward(model, arch: str, b: SimpleNamespace) -> torch.Tensor:
    inputs = (b.features, b.feature_lengths) if arch == "s2t" else (b.source_tokens,)
    return model(*inputs, b.decoder_input, b.src_task, b.tgt_task)


def train_tiny(arch: str, strategy: str = "group", steps: int = 40):
    torch.manual_seed(0)
    model = build_model(model_cfg(arch), selection_cfg(strategy), num_tasks=len(TASKS))
    task = SyntheticTask(SYNTH)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(steps):
        sb = task.batch(step)
        b = as_batch(arch, sb)
        logits = forward(model, arch, b)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), sb.target.flatten(), ignore_index=PAD)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def eval_batch(arch: str, task_id: int, batch_size: int = 4) -> SimpleNamespace:
    sb = SyntheticTask(SyntheticConfig(**{**SYNTH.__dict__, "batch_size": batch_size})).batch(0, "valid", task=task_id)
    return as_batch(arch, sb)


def hf_inputs(arch: str, b: SimpleNamespace) -> dict:
    """The same batch as transformers' keyword arguments (0/1 attention masks over frames or tokens)."""
    if arch == "s2t":
        mask = (torch.arange(b.features.shape[1])[None] < b.feature_lengths[:, None]).long()
        return dict(input_features=b.features, attention_mask=mask)
    return dict(input_ids=b.source_tokens, attention_mask=b.source_tokens.ne(PAD).long())


def hf_tokens(sequences: torch.Tensor, eos: int) -> list[list[int]]:
    """generate() output -> per row the tokens after the start token, up to (without) </s>."""
    out = []
    for row in sequences[:, 1:].tolist():
        out.append(row[: row.index(eos)] if eos in row else [t for t in row if t != PAD])
    return out


def train_tiny_cached(arch: str, strategy: str = "group"):
    key = (arch, strategy)
    if key not in _CACHE:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny GEMMs: threads only contend (CI has 2 cores)
        try:
            _CACHE[key] = train_tiny(arch, strategy)
        finally:
            torch.set_num_threads(threads)
    return _CACHE[key]


_CACHE: dict = {}


@pytest.fixture(scope="session")
def trained():
    """arch -> tiny model (group strategy) trained for a few steps, built once per test session."""
    return {arch: train_tiny_cached(arch) for arch in ("text", "s2t")}
