"""Global CMVN inside the model and folded into the export; the padding-invariant subsampler.

Legend: B batch, T frames, F features, S encoder positions, L target length, V vocabulary.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from _configs import tiny_model_config  # noqa: E402
from _hf_speech import hf_logits_alone  # noqa: E402

from hs_scale.export import export_all_tasks_from_model, export_task_from_model  # noqa: E402
from hs_scale.export.cmvn_fold import fold_global_cmvn  # noqa: E402
from hs_scale.export.materialize import ExportError  # noqa: E402
from hs_scale.models import build_model  # noqa: E402
from hs_scale.selection.config import SelectionConfig  # noqa: E402

F_ = 8
LENGTHS = torch.tensor([37, 30, 9])


def _model(cmvn: bool = True, seed: int = 0):
    """Two convolutions (kernels 5, 3: the padding case), 2 tasks, group selection, raw features ~ N(10, 3^2)."""
    torch.manual_seed(seed)
    cfg = tiny_model_config("s2t", conv_kernel_sizes=[5, 3], input_feat_per_channel=F_, init_std=0.3)
    model = build_model(cfg, SelectionConfig(strategy="group", pool_heads=8), num_tasks=2).eval()
    with torch.no_grad():
        model.selectors["encoder_self"].logits.normal_(0, 3)
    if cmvn:
        g = np.random.default_rng(seed)
        model.encoder.conv.set_global_cmvn(10 + g.normal(size=F_), 3 + g.uniform(size=F_))
    return model


def _raw_batch(seed: int = 1):
    """Raw (unnormalised) features with garbage in the padding, decoder inputs with a pad tail, task ids."""
    g = torch.Generator().manual_seed(seed)
    feats_BTF = 10 + 3 * torch.randn(3, 37, F_, generator=g)
    dec_BL = torch.randint(3, 41, (3, 6), generator=g)
    dec_BL[:, 0], dec_BL[2, 4:] = 2, 1
    return feats_BTF, dec_BL, torch.tensor([1, 1, 1])


@pytest.mark.parametrize("cmvn", [True, False])
def test_each_utterance_gives_in_a_batch_what_it_gives_alone(cmvn):
    model = _model(cmvn)
    feats_BTF, dec_BL, task_B = _raw_batch()
    with torch.no_grad():
        batched_BLV = model(feats_BTF, LENGTHS, dec_BL, task_B, task_B)
        for i, n in enumerate(LENGTHS.tolist()):
            alone_LV = model(feats_BTF[i : i + 1, :n], None, dec_BL[i : i + 1], task_B[:1], task_B[:1])[0]
            torch.testing.assert_close(batched_BLV[i], alone_LV, atol=1e-5, rtol=1e-5)


def test_folded_convolution_is_normalise_then_convolve_inside_the_signal():
    """fold_cmvn is the affine identity: on windows that stay inside the utterance, conv(W', b')(raw) equals the
    unfolded subsampler on (raw - mean) / std; only the zero padding at the ends differs (raw zeros)."""
    folded = _model(cmvn=True).encoder.conv
    plain = _model(cmvn=False).encoder.conv
    feats_BTF = _raw_batch()[0]
    normalised_BTF = (feats_BTF - folded.cmvn_mean_F) / folded.cmvn_std_F
    with torch.no_grad():
        a_BSD, b_BSD = folded(feats_BTF), plain(normalised_BTF)
    # kernels 5 then 3, stride 2 each: output u reads layer-1 outputs 2u-1..2u+1, which read frames 4u-4..4u+4.
    inside = slice(1, (37 - 5) // 4 + 1)
    torch.testing.assert_close(a_BSD[:, inside], b_BSD[:, inside], atol=1e-5, rtol=1e-5)
    assert (a_BSD[:, 0] - b_BSD[:, 0]).abs().max() > 1e-3  # the first frame's padding is raw zeros: it differs


def test_global_cmvn_export_folds_the_stats_and_reads_raw_features(tmp_path):
    model = _model(cmvn=True)
    feats_BTF, dec_BL, task_B = _raw_batch()
    summary = export_task_from_model(model, ["de", "fr"], "fr", str(tmp_path / "fr"))  # the model's own stats
    assert any("folded into the first convolution" in n for n in summary["notes"])
    config = json.loads((tmp_path / "fr" / "preprocessor_config.json").read_text())
    assert config["do_ceptral_normalize"] is False and not (tmp_path / "fr" / "cmvn.json").exists()
    hf = transformers.Speech2TextForConditionalGeneration.from_pretrained(str(tmp_path / "fr")).eval()
    with torch.no_grad():
        ours_BLV = model(feats_BTF, LENGTHS, dec_BL, task_B, task_B)
    torch.testing.assert_close(hf_logits_alone(hf, feats_BTF, LENGTHS, dec_BL), ours_BLV, atol=1e-4, rtol=1e-4)
    # The all-tasks (remote code) export holds the same folded convolution.
    export_all_tasks_from_model(model, ["de", "fr"], str(tmp_path / "all"))
    remote = transformers.AutoModelForSpeechSeq2Seq.from_pretrained(str(tmp_path / "all"),
                                                                    trust_remote_code=True).eval()
    with torch.no_grad(), remote.use_task("fr"):
        theirs_LV = remote(input_features=feats_BTF[:1], decoder_input_ids=dec_BL[:1]).logits[0]
    torch.testing.assert_close(theirs_LV, ours_BLV[0], atol=1e-4, rtol=1e-4)


def test_fold_refuses_missing_or_misshapen_stats(tmp_path):
    model = _model(cmvn=False)
    state = model.state_dict()
    with pytest.raises(ExportError, match="not found .* pass --cmvn-stats"):
        fold_global_cmvn(model.config, state, "global", str(tmp_path / "cmvn.json"))
    (tmp_path / "cmvn.json").write_text(json.dumps({"mean": [0.0] * 80, "std": [1.0] * 80}))
    with pytest.raises(ExportError, match="80,.* 8 input features"):
        fold_global_cmvn(model.config, state, "global", str(tmp_path / "cmvn.json"))
    assert fold_global_cmvn(model.config, state, "utterance", None) is state  # nothing to fold


def test_spec_augment_masks_raw_features_with_the_mean():
    from hs_scale.data.features import spec_augment

    mean_F = np.arange(80, dtype=np.float32)
    x = np.full((200, 80), -50.0, np.float32)
    y = spec_augment(x, np.random.default_rng(0), fill=mean_F)
    masked = y != -50.0
    assert masked.any()
    np.testing.assert_array_equal(y[masked], np.broadcast_to(mean_F, y.shape)[masked])  # 0 once normalised


def test_import_keeps_the_exports_normalisation(tmp_path):
    """A global-CMVN export holds its stats in the weights: import-hf's config trains it on raw features (cmvn none),
    not normalised twice; an utterance-CMVN export stays utterance."""
    import yaml

    from hs_scale.export.cli import main_import

    model = _model(cmvn=True)
    export_task_from_model(model, ["de", "fr"], "fr", str(tmp_path / "global"))
    export_task_from_model(model, ["de", "fr"], "fr", str(tmp_path / "utt"), cmvn="utterance")
    for name, want in (("global", "none"), ("utt", "utterance")):
        assert main_import(["--model", str(tmp_path / name), "--pool-size", "8", "--tasks", "de,fr",
                            "--out", str(tmp_path / f"up_{name}")]) == 0
        assert yaml.safe_load((tmp_path / f"up_{name}" / "config.yaml").read_text())["data"]["cmvn"] == want


def test_cli_help_is_user_facing():
    from hs_scale.export.cli import export_parser, import_parser

    for parser in (export_parser(), import_parser()):
        text = parser.format_help()
        assert "hs-scale export-hf writes a checkpoint" in text and "the lead" not in text and "wires" not in text
