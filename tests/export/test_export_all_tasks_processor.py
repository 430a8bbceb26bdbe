"""Loading the processor of an --all-tasks (remote-code) speech export: the documented code gives the same
features and token ids as hs_scale, and never stops at transformers' interactive trust_remote_code prompt.

AutoProcessor reads config.json, whose auto_map names the remote code, so without trust_remote_code=True it asks
"[y/N]" on a terminal. The export's processor itself is stock Speech2TextProcessor (no remote code), so
docs/export.md gives two ways: AutoProcessor with trust_remote_code=True (the model needs it anyway), or the
concrete class."""

from __future__ import annotations

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

from _configs import micro_model_config  # noqa: E402

from hs_scale.data.features import CMVN, fbank  # noqa: E402
from hs_scale.data.tokenizer import build_tokenizer, load_tokenizer  # noqa: E402
from hs_scale.export import export_all_tasks_from_model  # noqa: E402
from hs_scale.models import build_model  # noqa: E402
from hs_scale.selection.config import SelectionConfig  # noqa: E402

TEXTS = ["the quick brown fox jumps over the lazy dog", "a small test of the tokenizer export", "hello world again"]


def test_all_tasks_processor_loads_without_a_prompt_and_matches_ours(tmp_path):
    build_tokenizer(TEXTS * 20, str(tmp_path / "tok" / "tokenizer"), langs=["de", "en"], vocab_size=60)
    cfg = micro_model_config("s2t", vocab_size=60)
    model = build_model(cfg, SelectionConfig(pool_heads=2 * cfg.num_heads), 2)
    out = str(tmp_path / "all")
    export_all_tasks_from_model(model, ["de", "en"], out, tokenizer_dir=str(tmp_path / "tok"), cmvn="utterance")

    wav = np.random.default_rng(0).uniform(-0.5, 0.5, 16_000).astype(np.float32)
    ours_features = CMVN("utterance")(fbank(wav))
    ours_ids = load_tokenizer(str(tmp_path / "tok")).encode(TEXTS[0])
    for processor in (transformers.AutoProcessor.from_pretrained(out, trust_remote_code=True),
                      transformers.Speech2TextProcessor.from_pretrained(out)):
        assert isinstance(processor, transformers.Speech2TextProcessor)
        features = processor(audio=wav, sampling_rate=16_000, return_tensors="np").input_features[0]
        np.testing.assert_allclose(features, ours_features, atol=2e-3)
        ids = processor.tokenizer(TEXTS[0], add_special_tokens=False).input_ids
        assert ids == list(ours_ids)
