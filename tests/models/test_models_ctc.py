"""CTC on the speech encoder: the loss against a brute-force sum over alignments, and the joint objective."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from _configs import tiny_model_config
from _hf_speech import hf_logits_alone

from hs_scale.models import ModelConfig, build_model
from hs_scale.models.ctc import ctc_loss_sum
from hs_scale.selection.config import SelectionConfig
from hs_scale.training.loss import token_losses
from hs_scale.training.objective import joint_loss_sum

BLANK = 1


def _ctc_config(**overrides) -> ModelConfig:
    """Two default (kernel-5) subsampling convolutions: enough encoder positions for CTC on short targets."""
    return tiny_model_config("s2t", decoder_layers=1, num_heads=2, conv_channels=32, conv_kernel_sizes=[5, 5],
                             input_feat_per_channel=16, **overrides)


def _brute_force_ctc(log_probs_SV: torch.Tensor, labels: list[int]) -> float:
    """-log sum over every path of length S that collapses (merge repeats, drop blanks) to `labels`."""
    S, V = log_probs_SV.shape
    total = 0.0
    for path in itertools.product(range(V), repeat=S):
        collapsed = [c for i, c in enumerate(path) if c != BLANK and (i == 0 or c != path[i - 1])]
        if collapsed == labels:
            total += math.exp(sum(float(log_probs_SV[s, c]) for s, c in enumerate(path)))
    return -math.log(total)


def test_ctc_loss_sum_equals_brute_force_over_alignments():
    torch.manual_seed(0)
    V, S = 4, 5
    logits_BSV = torch.randn(2, S, V, dtype=torch.float64)
    # targets as the decoder sees them: tokens, then EOS (2), then padding (1)
    target_BL = torch.tensor([[0, 3, 3, 2], [3, 2, 1, 1]])
    target_lengths_B = torch.tensor([4, 2])
    enc_lengths_B = torch.tensor([5, 4])
    got = ctc_loss_sum(logits_BSV, enc_lengths_B, target_BL, target_lengths_B, blank=BLANK)
    log_probs = torch.log_softmax(logits_BSV, -1)
    want = _brute_force_ctc(log_probs[0, :5], [0, 3, 3]) + _brute_force_ctc(log_probs[1, :4], [3])
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_impossible_alignment_counts_zero_not_inf():
    logits = torch.randn(1, 2, 5)
    target = torch.tensor([[3, 4, 3, 2]])  # 3 labels need >= 3 positions (4 with the repeat); only 2 here
    loss = ctc_loss_sum(logits, torch.tensor([2]), target, torch.tensor([4]), blank=BLANK)
    assert loss.item() == 0.0


def _speech_batch(V: int):
    from types import SimpleNamespace

    torch.manual_seed(1)
    feats = torch.randn(3, 40, 16)
    lengths = torch.tensor([40, 33, 25])
    target = torch.tensor([[5, 6, 7, 2], [8, 9, 2, 1], [5, 2, 1, 1]])
    dec_in = torch.tensor([[3, 5, 6, 7], [4, 8, 9, 1], [3, 5, 1, 1]])
    tasks = torch.tensor([0, 1, 0])
    return SimpleNamespace(features=feats, feature_lengths=lengths, decoder_input=dec_in, target=target,
                           target_lengths=target.ne(1).sum(1), src_task=tasks, tgt_task=tasks)


@pytest.mark.parametrize("selection", [False, True])
def test_joint_objective_is_the_weighted_sum_and_trains_the_ctc_head(selection):
    V, w = 12, 0.3
    cfg = _ctc_config(vocab_size=V, ctc_weight=w)
    sel = SelectionConfig(strategy="group", pool_heads=4) if selection else None
    model = build_model(cfg, sel, num_tasks=2).eval()
    batch = _speech_batch(V)
    loss, _, ctc = joint_loss_sum(model, batch, pad_id=1, label_smoothing=0.1, ctc_weight=w)
    logits, ctc_logits, enc_len = model(batch.features, batch.feature_lengths, batch.decoder_input,
                                        batch.src_task, batch.tgt_task, return_ctc=True)
    assert enc_len.tolist() == model.config.subsampled_lengths(batch.feature_lengths).tolist()
    ce, _ = token_losses(logits, batch.target, 1, 0.1)
    want_ctc = ctc_loss_sum(ctc_logits, enc_len, batch.target, batch.target_lengths, blank=1)
    torch.testing.assert_close(ctc, want_ctc)
    torch.testing.assert_close(loss, (1 - w) * ce + w * want_ctc)
    loss.backward()
    assert model.ctc_head.weight.grad.abs().sum() > 0
    assert model.encoder.conv.conv_layers[0].weight.grad.abs().sum() > 0


def test_ctc_weight_is_validated():
    with pytest.raises(ValueError, match="ctc_weight"):
        ModelConfig(arch="s2t", ctc_weight=1.5)
    with pytest.raises(ValueError, match="arch 'text'"):
        ModelConfig(arch="text", ctc_weight=0.3)
    with pytest.raises(ValueError, match="ctc_weight"):
        ModelConfig(arch="s2t", ctc_weight=float("nan"))


def test_export_drops_the_ctc_head_and_keeps_the_logits(tmp_path):
    """The CTC head is train-only: a per-task HF Speech2Text export has no place for it and reproduces our logits."""
    transformers = pytest.importorskip("transformers")
    from hs_scale.export import export_task_from_model

    cfg = _ctc_config(vocab_size=12, ctc_weight=0.3)
    model = build_model(cfg, SelectionConfig(strategy="group", pool_heads=4), num_tasks=2).eval()
    with torch.no_grad():  # make the two tasks pick different heads
        model.selectors["encoder_self"].logits.normal_(0, 3)
    export_task_from_model(model, ["de", "fr"], "fr", str(tmp_path), decoder_start_token_id=4)
    hf = transformers.Speech2TextForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    b = _speech_batch(12)
    fr = torch.ones(3, dtype=torch.long)
    with torch.no_grad():
        ours = model(b.features, b.feature_lengths, b.decoder_input, fr, fr)
    theirs = hf_logits_alone(hf, b.features, b.feature_lengths, b.decoder_input)  # padding-invariant: per utterance
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    assert not any("ctc" in k for k in hf.state_dict())
