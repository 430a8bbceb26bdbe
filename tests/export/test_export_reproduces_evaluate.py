"""An exported speech model reproduces `hs-scale evaluate` with stock transformers and nothing done by hand.

A tiny S2T model is trained through the real CLI (global CMVN, the default) on a tiny espeak corpus, decoded by
`hs-scale evaluate` (greedy, beam 3, and beam 3 with a length limit that some hypotheses hit), and exported per task
with `hs-scale export-hf`. Each test utterance's FLAC is read from its shard with soundfile (what the loader uses),
given alone to the exported AutoProcessor and decoded with AutoModelForSpeechSeq2Seq.generate(): the transcripts
equal evaluate's, and the logits equal our model's on evaluate's (padded, mixed-task) batches.

Legend: B batch, T frames, L target length, V vocabulary.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")

LANGS = ("de", "fr")
WORDS = {"de": "eins zwei drei vier fünf sechs sieben acht neun null".split(),
         "fr": "un deux trois quatre cinq six sept huit neuf zéro".split()}
BEAM, SHORT = 3, 4


def _rows(n_train: int = 12, n_test: int = 4) -> list[dict]:
    """Spoken digit strings: train, dev (training's final evaluation) and test rows per language."""
    rnd = np.random.default_rng(0)
    rows = []
    for lang in LANGS:
        for split, n in (("train", n_train), ("dev", 1), ("test", n_test)):
            for _ in range(n):
                text = " ".join(rnd.choice(WORDS[lang], size=int(rnd.integers(2, 5))))
                rows.append(dict(split=split, lang=lang, tgt_lang=lang, domain="num", text=text, translation=text))
    return rows


def _config(corpus: str, out: str, vocab_size: int) -> dict:
    """A tiny S2T with two convolutions (the padding case), global CMVN (the default), spec_augment off."""
    return {
        "model": dict(arch="s2t", d_model=32, encoder_layers=1, decoder_layers=1, num_heads=2, ffn_dim=64,
                      conv_channels=32, vocab_size=vocab_size, dropout=0.0, init_std=0.1),
        "selection": dict(strategy="group", pool_heads=4, task_key="lang"),
        "data": dict(manifest=corpus, task_key="lang", modality="speech", target="transcript", cmvn="global",
                     batch_mode="mixed", max_frames_per_batch=4000, num_workers=0, spec_augment=False,
                     sampling_temperature=1.0),
        "train": dict(output_dir=out, steps=30, lr=5e-3, warmup_steps=5, schedule="inverse_sqrt",
                      label_smoothing=0.0, log_every=10, eval_every=0, save_every=30, threads=1, device="cpu",
                      progress_bar=False),
    }


def _evaluate(ckpt: Path, out: Path, *extra: str) -> dict[str, dict]:
    """{key: {hyp, ref}} of `hs-scale evaluate --split test --keep-outputs`."""
    from hs_scale.evaluation.cli import main as evaluate

    assert evaluate(["--checkpoint", str(ckpt), "--split", "test", "--keep-outputs", "--quiet", "--device", "cpu",
                     "--out", str(out), *extra]) == 0
    outputs = json.loads(out.read_text())["outputs"]
    return {o["key"]: {**o, "task": task} for task, rows in outputs.items() for o in rows}


def _test_audio(corpus: Path) -> dict[str, np.ndarray]:
    """{key: float32 waveform} of every test utterance, read from the shards' FLAC with soundfile."""
    import soundfile as sf

    audio = {}
    for shard in sorted((corpus / "shards" / "test").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".flac"):
                    wav, sr = sf.read(io.BytesIO(tar.extractfile(member).read()), dtype="float32")
                    assert sr == 16_000
                    audio[member.name.rsplit(".", 1)[0]] = wav
    return audio


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from data_pipelines.build import build_from_rows
    from hs_scale.cli import main as cli_main
    from hs_scale.data.tokenizer import load_tokenizer
    from hs_scale.export.cli import main_export

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("reproduce")
    corpus = root / "corpus"
    build_from_rows(_rows(), str(corpus), modality="speech", features=False, shard_size=4, workers=1, vocab_size=60)
    cfg = _config(str(corpus), str(root / "train"), load_tokenizer(str(corpus)).vocab_size)
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert cli_main(["train", "--config", str(root / "config.yaml")]) == 0
    ckpt = root / "train" / "checkpoints"
    evals = {"greedy": _evaluate(ckpt, root / "greedy.json", "--beam", "1"),
             "beam": _evaluate(ckpt, root / "beam.json", "--beam", str(BEAM)),
             "short": _evaluate(ckpt, root / "short.json", "--beam", str(BEAM), "--max-len-b", str(SHORT))}
    exports = {}
    for lang in LANGS:
        exports[lang] = root / "export" / lang
        assert main_export(["--checkpoint", str(ckpt), "--task", lang, "--out", str(exports[lang]),
                            "--beam", str(BEAM)]) == 0
    yield dict(root=root, corpus=corpus, ckpt=ckpt, evals=evals, exports=exports, audio=_test_audio(corpus))
    torch.set_num_threads(threads)


def _hf(export: Path):
    model = transformers.AutoModelForSpeechSeq2Seq.from_pretrained(str(export)).eval()
    processor = transformers.AutoProcessor.from_pretrained(str(export))
    return model, processor


def test_hf_transcripts_equal_evaluate_greedy_and_beam(run):
    """The README's snippet, one utterance at a time: every test utterance, greedy, beam, and length-capped beam."""
    evals, audio = run["evals"], run["audio"]
    assert set(evals["greedy"]) == set(audio) and len(audio) == 4 * len(LANGS)
    capped = 0
    for lang in LANGS:
        model, processor = _hf(run["exports"][lang])
        assert not processor.feature_extractor.do_ceptral_normalize  # global CMVN lives in the weights
        keys = sorted(k for k in audio if evals["greedy"][k]["task"] == lang)
        for key in keys:
            inputs = processor(audio[key], sampling_rate=16_000, return_tensors="pt")
            with torch.no_grad():
                runs = {"greedy": model.generate(**inputs, num_beams=1),
                        "beam": model.generate(**inputs),  # generation_config.json: num_beams 3
                        "short": model.generate(**inputs, max_new_tokens=SHORT + 1)}
            for name, ids in runs.items():
                text = processor.batch_decode(ids, skip_special_tokens=True)[0]
                assert text == evals[name][key]["hyp"], (name, key)
            capped += len(runs["short"][0]) - 1 == SHORT + 1  # start token + SHORT tokens + forced </s>
    assert capped > 0  # the forced-</s> path was compared too


def test_hf_logits_equal_ours_on_evaluates_padded_batches(run):
    """Teacher-forced logits of our model on evaluate's batches (mixed tasks, padded, raw features normalised in
    the model) equal the HF export's on each utterance alone, fed from the FLAC by the stock processor."""
    from hs_scale.data.loader import build_loader
    from hs_scale.data.tokenizer import load_tokenizer
    from hs_scale.evaluation.cli import load_model, resolve_checkpoints

    cfg, model, task_names = load_model(resolve_checkpoints([str(run["ckpt"])], None, 1))
    batches = list(build_loader(cfg.data, "test", 0, 1, load_tokenizer(str(run["corpus"])), train=False))
    assert any(int(b.feature_lengths.min()) < b.features.shape[1] for b in batches)  # padding is exercised
    hf = {lang: _hf(run["exports"][lang]) for lang in LANGS}
    worst = 0.0
    for b in batches:
        with torch.no_grad():
            ours_BLV = model(b.features, b.feature_lengths, b.decoder_input, b.src_task, b.tgt_task)
        for i, key in enumerate(b.keys):
            hf_model, processor = hf[task_names[int(b.tgt_task[i])]]
            L = int(b.target_lengths[i])
            inputs = processor(run["audio"][key], sampling_rate=16_000, return_tensors="pt")
            with torch.no_grad():
                hf_LV = hf_model(**inputs, decoder_input_ids=b.decoder_input[i : i + 1, :L]).logits[0]
            worst = max(worst, float((hf_LV - ours_BLV[i, :L]).abs().max()))
    # Features: HF's numpy filterbank vs ours in torch (1e-3 apart, test_export_files); everything else is exact.
    assert worst < 2e-3, worst


def test_loader_hands_raw_filterbanks_and_the_model_holds_the_corpus_stats(run):
    """Where the global CMVN happens: not in the loader (raw fbank of the FLAC), in the evaluated model (cmvn.json)."""
    from hs_scale.data.features import fbank
    from hs_scale.data.loader import build_loader
    from hs_scale.data.tokenizer import load_tokenizer
    from hs_scale.evaluation.cli import load_model, resolve_checkpoints

    cfg, model, _ = load_model(resolve_checkpoints([str(run["ckpt"])], None, 1))
    stats = json.loads((run["corpus"] / "cmvn.json").read_text())
    assert torch.equal(model.encoder.conv.cmvn_mean_F, torch.tensor(stats["mean"], dtype=torch.float32))
    assert torch.equal(model.encoder.conv.cmvn_std_F, torch.tensor(stats["std"], dtype=torch.float32))
    b = next(iter(build_loader(cfg.data, "test", 0, 1, load_tokenizer(str(run["corpus"])), train=False)))
    for i, key in enumerate(b.keys):
        np.testing.assert_array_equal(b.features[i, : int(b.feature_lengths[i])].numpy(), fbank(run["audio"][key]))
