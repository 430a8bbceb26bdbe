"""The rest of a save_pretrained directory (tokenizer, feature extractor, processor) and the checkpoint CLI path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from _configs import micro_model_config  # noqa: E402
from export_helpers import SYNTH, TASKS, eval_batch, forward, hf_inputs, model_cfg, selection_cfg  # noqa: E402

from hs_scale.export import export_task_from_model  # noqa: E402
from hs_scale.export.cli import main_export  # noqa: E402
from hs_scale.models import build_model  # noqa: E402

TEXTS = ["the quick brown fox jumps over the lazy dog", "a small test of the tokenizer export", "hello world again"]


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
    from hs_scale.data.tokenizer import build_tokenizer

    prefix = str(tmp_path_factory.mktemp("tok") / "tokenizer")
    return build_tokenizer(TEXTS * 20, prefix, langs=["de", "en"], vocab_size=60).model_path


def test_tokenizer_files_reproduce_our_ids(spm_path, tmp_path):
    from hs_scale.data.tokenizer import load_tokenizer

    ours = load_tokenizer(spm_path)
    cfg = micro_model_config("text", vocab_size=ours.vocab_size, pad_token_id=ours.pad_id, bos_token_id=ours.bos_id,
                             eos_token_id=ours.eos_id, decoder_start_token_id=ours.eos_id)
    export_task_from_model(build_model(cfg, None, 1), ["en"], "en", str(tmp_path), tokenizer_dir=spm_path,
                           decoder_start_token_id=ours.lang_tag_id("en"))
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS:
        ids = tok(text).input_ids
        assert ids == ours.encode(text) + [ours.eos_id]  # hs_scale's source format: pieces + </s>
        assert tok.decode([ours.lang_tag_id("en")] + ids, skip_special_tokens=True) == ours.decode(ids)
    assert tok.convert_tokens_to_ids("<de>") == ours.lang_tag_id("de")
    assert transformers.M2M100ForConditionalGeneration.from_pretrained(str(tmp_path)).generation_config \
        .decoder_start_token_id == ours.lang_tag_id("en")


def test_tokenizer_with_other_special_ids_is_refused(spm_path, tmp_path):
    from hs_scale.data.tokenizer import load_tokenizer

    # The spm follows fairseq (bos 0, pad 1, eos 2); a model trained with pad 5 cannot use it.
    cfg = micro_model_config("text", vocab_size=load_tokenizer(spm_path).vocab_size, pad_token_id=5)
    with pytest.raises(ValueError, match="pad id 1, the model's pad_token_id is 5"):
        export_task_from_model(build_model(cfg, None, 1), ["en"], "en", str(tmp_path), tokenizer_dir=spm_path)


def test_feature_extractor_matches_hs_scale_fbank(tmp_path):
    from hs_scale.data.features import CMVN, fbank

    cfg = micro_model_config("s2t")
    export_task_from_model(build_model(cfg, None, 1), ["en"], "en", str(tmp_path), cmvn="utterance")
    extractor = transformers.AutoFeatureExtractor.from_pretrained(str(tmp_path))
    wav = np.random.default_rng(0).uniform(-0.5, 0.5, 16_000).astype(np.float32)
    theirs = extractor(wav, sampling_rate=16_000, return_tensors="np").input_features[0]
    ours = CMVN("utterance")(fbank(wav))
    assert theirs.shape == ours.shape == (98, 80)
    np.testing.assert_allclose(theirs, ours, atol=2e-3)


def test_export_from_a_checkpoint_directory(trained, tmp_path):
    """hs-scale export-hf --checkpoint: load_full_model_state -> per-task and all-tasks directories."""
    from hs_scale.checkpoint import CheckpointManager
    from hs_scale.config import Config

    model = trained["text"]
    run = Config(model=model_cfg("text"), selection=selection_cfg(), synthetic=SYNTH).to_dict()
    CheckpointManager(tmp_path / "ckpt").save(40, model, config=run)
    assert main_export(["--checkpoint", str(tmp_path / "ckpt"), "--task", "shift", "--out", str(tmp_path / "s")]) == 0
    hf = transformers.M2M100ForConditionalGeneration.from_pretrained(str(tmp_path / "s")).eval()
    assert hf.generation_config.decoder_start_token_id == 6  # the synthetic task's tag
    b = eval_batch("text", 2)
    with torch.no_grad():
        torch.testing.assert_close(hf(**hf_inputs("text", b), decoder_input_ids=b.decoder_input).logits,
                                   forward(model, "text", b), atol=1e-4, rtol=1e-4)
    assert main_export(["--checkpoint", str(tmp_path / "ckpt"), "--all-tasks", "--out", str(tmp_path / "a")]) == 0
    assert main_export(["--checkpoint", str(tmp_path / "ckpt"), "--task", "nope", "--out", str(tmp_path / "n")]) == 2
    assert TASKS == ["copy", "reverse", "shift"]
