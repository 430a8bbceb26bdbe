"""`prepare-data --from {fairseq,nemo,hf,text,lhotse}` (Lhotse: CutSet manifests and Shar directories): tiny
corpora in each format, made from the speech of the test corpus (no downloads), imported and compared sample for
sample (audio, text, translation, languages, split), with bad rows counted per kind; one model trains a few steps
from an imported corpus through the CLI."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from scipy.signal import resample_poly

from data_pipelines.cli import main as prepare_data
from hs_scale.data.shards import iter_samples


@pytest.fixture(scope="module")
def source(tiny_corpus):
    """12 utterances (8 train, 4 dev; de and fr) of the test corpus: {id: dict(wav 16 kHz float32, text, ...)}."""
    rows = pq.read_table(f"{tiny_corpus}/manifest.parquet").to_pylist()
    picked = [r for r in rows if r["split"] == "train"][::8] + [r for r in rows if r["split"] == "dev"][::4]
    out = {}
    for r in picked:
        with open(os.path.join(tiny_corpus, r["shard"]), "rb") as fh:
            members = dict(iter_samples(fh, r["shard"]))[r["key"]]
        wav, sr = sf.read(io.BytesIO(members["flac"]), dtype="float32")
        out[f"utt{len(out):02d}"] = dict(wav=wav, text=r["text"], translation=r["translation"], lang=r["lang"],
                                         split=r["split"])
    assert len(out) == 12 and sr == 16000
    return out


def imported(corpus: str) -> dict:
    """{source_id: dict(wav, text, translation, lang, tgt_lang, split)} read back from the corpus's shards."""
    out = {}
    for r in pq.read_table(f"{corpus}/manifest.parquet").to_pylist():
        with open(os.path.join(corpus, r["shard"]), "rb") as fh:
            m = dict(iter_samples(fh, r["shard"]))[r["key"]]
        meta = json.loads(m["json"])
        wav = sf.read(io.BytesIO(m["flac"]), dtype="float32")[0] if "flac" in m else None
        out[meta["source_id"]] = dict(wav=wav, text=m["txt"].decode(), translation=m["translation.txt"].decode(),
                                      lang=r["lang"], tgt_lang=r["tgt_lang"], split=r["split"])
        assert r["text"] == out[meta["source_id"]]["text"]
    return out


def write_wav(path, wav, sr=16000):
    sf.write(path, wav, sr, format="WAV", subtype="PCM_16")


def check_equal(got: dict, src: dict, translation: bool, audio=lambda w: w):
    assert sorted(got) == sorted(src)
    for i, s in src.items():
        g = got[i]
        assert (g["text"], g["lang"], g["split"]) == (s["text"], s["lang"], s["split"]), i
        assert g["translation"] == (s["translation"] if translation else "")
        assert g["tgt_lang"] == ("en" if translation else s["lang"])
        if g["wav"] is not None:
            np.testing.assert_array_equal(g["wav"], audio(s["wav"]))


def test_fairseq_tsv_with_paths_and_zip(source, tmp_path):
    src = tmp_path / "fairseq"
    src.mkdir()
    ids = sorted(source)
    # Half the audio as WAV files, half inside a stored zip addressed as zip:offset:length (fairseq's layout).
    with zipfile.ZipFile(src / "fbank.zip", "w", zipfile.ZIP_STORED) as zf:
        for i in ids[6:]:
            buf = io.BytesIO()
            write_wav(buf, source[i]["wav"])
            zf.writestr(f"{i}.wav", buf.getvalue())
    with zipfile.ZipFile(src / "fbank.zip") as zf:
        refs = {}
        for info in zf.infolist():
            with open(src / "fbank.zip", "rb") as fh:  # offset of the data: local header (30 bytes) + name + extra
                fh.seek(info.header_offset + 26)
                n, e = (int(v) for v in np.frombuffer(fh.read(4), "<u2"))
            refs[info.filename[:-4]] = f"fbank.zip:{info.header_offset + 30 + n + e}:{info.file_size}"
    for i in ids[:6]:
        write_wav(src / f"{i}.wav", source[i]["wav"])
    (src / "broken.wav").write_bytes(b"RIFF not really a wav file" * 20)
    write_wav(src / "long.wav", np.zeros(16000 * 10, np.float32))
    head = "id\taudio\tn_frames\ttgt_text\tspeaker\tsrc_lang\ttgt_lang\tsrc_text\n"
    for split in ("train", "dev"):
        lines = [f"{i}\t{refs.get(i, f'{i}.wav')}\t0\t{s['translation']}\tspk1\t{s['lang']}\ten\t{s['text']}\n"
                 for i, s in source.items() if s["split"] == split]
        if split == "train":
            lines += ["bad1\tbroken.wav\t0\thello\tspk\tde\ten\thallo\n",
                      "bad2\tlong.wav\t0\thello\tspk\tde\ten\thallo\n",
                      f"bad3\t{ids[0]}.wav\t0\t\tspk\tde\ten\thallo\n"]
        (src / f"{split}_st.tsv").write_text(head + "".join(lines))
    out = str(tmp_path / "corpus")
    assert prepare_data(["--from", "fairseq", "--input", str(src / "train_st.tsv"), "--input",
                         str(src / "dev_st.tsv"), "--out", out, "--max-seconds", "8", "--vocab-size", "120",
                         "--shard-size", "4", "--workers", "1"]) == 0
    check_equal(imported(out), source, translation=True)
    info = json.loads(open(f"{out}/info.json").read())
    assert info["import_errors"] == {"bad_audio": 1, "too_long": 1, "empty_text": 1}
    assert info["verify_problems"] == 0
    with pytest.raises(ValueError, match="empty_text: row bad3"):
        prepare_data(["--from", "fairseq", "--input", str(src / "train_st.tsv"), "--out", str(tmp_path / "c2"),
                      "--on-error", "raise", "--workers", "1"])
    (src / "bad_st.tsv").write_text(head + "bad1\tbroken.wav\t0\thello\tspk\tde\ten\thallo\n")
    with pytest.raises(ValueError, match="bad_audio: row bad1 .*broken.wav"):
        prepare_data(["--from", "fairseq", "--input", f"{src}/bad_st.tsv=train", "--out", str(tmp_path / "c3"),
                      "--on-error", "raise", "--workers", "1"])


def test_nemo_jsonl_with_tarred_audio_resampled(source, tmp_path):
    src = tmp_path / "nemo"
    src.mkdir()
    # Audio at 48 kHz: the importer resamples to 16 kHz (scipy resample_poly) - compared against the same op.
    with tarfile.open(src / "audio_0.tar", "w") as tf:
        for i, s in source.items():
            buf = io.BytesIO()
            write_wav(buf, resample_poly(s["wav"], 3, 1).clip(-1, 32767 / 32768), 48000)
            ti = tarfile.TarInfo(f"{i}.wav")
            ti.size = len(buf.getvalue())
            tf.addfile(ti, io.BytesIO(buf.getvalue()))
    for split in ("train", "dev"):
        with open(src / f"{split}.json", "w") as fh:
            for i, s in source.items():
                if s["split"] == split:
                    fh.write(json.dumps({"audio_filepath": f"{i}.wav", "duration": len(s["wav"]) / 16000,
                                         "text": s["text"], "lang": s["lang"]}) + "\n")
    out = str(tmp_path / "corpus")
    assert prepare_data(["--from", "nemo", "--input", f"{src}/train.json", "--input", f"{src}/dev.json",
                         "--audio-tars", f"{src}/audio_0.tar", "--out", out, "--vocab-size", "120", "--workers",
                         "1"]) == 0

    def expected(wav):
        x = sf.read(io.BytesIO(_wav_bytes(resample_poly(wav, 3, 1).clip(-1, 32767 / 32768), 48000)),
                    dtype="float32")[0]
        y = resample_poly(x, 1, 3).astype(np.float32).clip(-1, 32767 / 32768)
        return (np.clip(np.round(y * 32768.0), -32768, 32767) / 32768.0).astype(np.float32)

    check_equal(imported(out), source, translation=False, audio=expected)


def _wav_bytes(wav, sr):
    buf = io.BytesIO()
    write_wav(buf, wav, sr)
    return buf.getvalue()


def test_hf_saved_dataset(source, tmp_path):
    datasets = pytest.importorskip("datasets")
    parts = {}
    for split in ("train", "dev"):
        items = [(i, s) for i, s in source.items() if s["split"] == split]
        ds = datasets.Dataset.from_dict(
            {"id": [i for i, _ in items], "audio": [{"bytes": _wav_bytes(s["wav"], 16000), "path": f"{i}.wav"}
                                                    for i, s in items],
             "sentence": [s["text"] for _, s in items], "english": [s["translation"] for _, s in items],
             "locale": [s["lang"] for _, s in items]})
        # A decoding Audio column, as in real datasets (cast at the storage level: no audio backend needed).
        parts[split] = ds.cast_column("audio", datasets.Audio(sampling_rate=16000))
    datasets.DatasetDict(parts).save_to_disk(str(tmp_path / "hf"))
    out = str(tmp_path / "corpus")
    assert prepare_data(["--from", "hf", "--input", str(tmp_path / "hf"), "--text-column", "sentence",
                         "--translation-column", "english", "--lang-column", "locale", "--tgt-lang", "en",
                         "--out", out, "--vocab-size", "120", "--workers", "1"]) == 0
    check_equal(imported(out), source, translation=True)


def test_lhotse_cutset_with_segments(source, tmp_path):
    """Train: one recording per utterance (a 48 kHz one among them, resampled); dev: one recording holding two
    utterances, cut into two segments by trim_to_supervisions. Translations in the supervisions' custom field."""
    lhotse = pytest.importorskip("lhotse")
    src = tmp_path / "lhotse"
    src.mkdir()
    ids = sorted(source)
    train = [i for i in ids if source[i]["split"] == "train"]
    dev = [i for i in ids if source[i]["split"] == "dev"]

    def sup(i, rec, start, wav, text=None):
        s = source[i]
        return lhotse.SupervisionSegment(id=i, recording_id=rec, start=start, duration=len(wav) / 16000,
                                         text=s["text"] if text is None else text, language=s["lang"],
                                         speaker="spk", custom={"translation": s["translation"]})

    recs, sups = [], []
    for n, i in enumerate(train):
        wav, sr = (resample_poly(source[i]["wav"], 3, 1).clip(-1, 32767 / 32768), 48000) if n == 0 else \
            (source[i]["wav"], 16000)
        write_wav(src / f"{i}.wav", wav, sr)
        recs.append(lhotse.Recording.from_file(src / f"{i}.wav", recording_id=i))
        sups.append(sup(i, i, 0.0, source[i]["wav"]))
    write_wav(src / "empty.wav", source[train[0]]["wav"])  # a cut with empty text: counted, skipped
    recs.append(lhotse.Recording.from_file(src / "empty.wav", recording_id="empty"))
    sups.append(sup(train[0], "empty", 0.0, source[train[0]]["wav"], text=" "))
    sups[-1].id = "empty"
    lhotse.CutSet.from_manifests(lhotse.RecordingSet.from_recordings(recs),
                                 lhotse.SupervisionSet.from_segments(sups)).to_file(src / "cuts_train.jsonl.gz")
    dev_recs, dev_sups = [], []
    for a, b in zip(dev[::2], dev[1::2], strict=True):
        wa, wb = source[a]["wav"], source[b]["wav"]
        write_wav(src / f"{a}+{b}.wav", np.concatenate([wa, wb]))
        dev_recs.append(lhotse.Recording.from_file(src / f"{a}+{b}.wav", recording_id=f"{a}+{b}"))
        dev_sups += [sup(a, f"{a}+{b}", 0.0, wa), sup(b, f"{a}+{b}", len(wa) / 16000, wb)]
    cuts = lhotse.CutSet.from_manifests(lhotse.RecordingSet.from_recordings(dev_recs),
                                        lhotse.SupervisionSet.from_segments(dev_sups)).trim_to_supervisions()
    cuts.to_file(src / "cuts_dev.jsonl.gz")
    out = str(tmp_path / "corpus")
    assert prepare_data(["--from", "lhotse", "--input", f"{src}/cuts_train.jsonl.gz", "--input",
                         f"{src}/cuts_dev.jsonl.gz", "--tgt-lang", "en", "--out", out, "--vocab-size", "120",
                         "--workers", "1"]) == 0

    def expected(i):
        if i != train[0]:
            return source[i]["wav"]
        y = resample_poly(sf.read(io.BytesIO(_wav_bytes(resample_poly(source[i]["wav"], 3, 1).clip(
            -1, 32767 / 32768), 48000)), dtype="float32")[0], 1, 3).astype(np.float32).clip(-1, 32767 / 32768)
        return (np.clip(np.round(y * 32768.0), -32768, 32767) / 32768.0).astype(np.float32)

    got = imported(out)
    assert sorted(got) == ids
    for i in ids:
        s, g = source[i], got[i]
        assert (g["text"], g["translation"], g["lang"], g["tgt_lang"], g["split"]) == \
            (s["text"], s["translation"], s["lang"], "en", s["split"]), i
        np.testing.assert_array_equal(g["wav"], expected(i))
    assert json.loads(open(f"{out}/info.json").read())["import_errors"] == {"empty_text": 1}


def test_lhotse_shar_written_by_lhotse(source, tmp_path):
    """Shar directories written by Lhotse's own writer (`CutSet.to_shar`, FLAC recordings, 3 cuts per shard): train
    from one recording per utterance, dev from recordings cut into segments; imported sample for sample."""
    lhotse = pytest.importorskip("lhotse")
    ids = sorted(source)
    recs, sups = [], []
    for i in ids:  # train: a recording per utterance; dev: pairs of utterances in one recording
        s = source[i]
        if s["split"] == "train":
            write_wav(tmp_path / f"{i}.wav", s["wav"])
            recs.append(lhotse.Recording.from_file(tmp_path / f"{i}.wav", recording_id=i))
            sups.append((i, i, 0.0, s))
    dev = [i for i in ids if source[i]["split"] == "dev"]
    for a, b in zip(dev[::2], dev[1::2], strict=True):
        write_wav(tmp_path / f"{a}+{b}.wav", np.concatenate([source[a]["wav"], source[b]["wav"]]))
        recs.append(lhotse.Recording.from_file(tmp_path / f"{a}+{b}.wav", recording_id=f"{a}+{b}"))
        sups += [(a, f"{a}+{b}", 0.0, source[a]), (b, f"{a}+{b}", len(source[a]["wav"]) / 16000, source[b])]
    segments = [lhotse.SupervisionSegment(id=i, recording_id=rec, start=start, duration=len(s["wav"]) / 16000,
                                          text=s["text"], language=s["lang"], speaker="spk",
                                          custom={"translation": s["translation"]}) for i, rec, start, s in sups]
    cuts = lhotse.CutSet.from_manifests(lhotse.RecordingSet.from_recordings(recs),
                                        lhotse.SupervisionSet.from_segments(segments)).trim_to_supervisions()
    for split in ("train", "dev"):
        (tmp_path / f"shar_{split}").mkdir()
        written = cuts.filter(lambda c, split=split: source[c.supervisions[0].id]["split"] == split).to_shar(
            tmp_path / f"shar_{split}", fields={"recording": "flac"}, shard_size=3)
        assert len(written["recording"]) == (3 if split == "train" else 2)
    out = str(tmp_path / "corpus")
    assert prepare_data(["--from", "lhotse", "--input", str(tmp_path / "shar_train"), "--input",
                         f"{tmp_path}/shar_dev", "--tgt-lang", "en", "--out", out, "--vocab-size", "120",
                         "--workers", "1"]) == 0
    check_equal(imported(out), source, translation=True)
    with pytest.raises(ValueError, match="not a Lhotse Shar directory"):
        prepare_data(["--from", "lhotse", "--input", str(tmp_path / "corpus"), "--out", str(tmp_path / "x")])


@pytest.mark.slow
def test_parallel_text_then_train_through_cli(source, tmp_path):
    src = tmp_path / "mt"
    src.mkdir()
    items = [s for s in source.values() if s["lang"] == "de"]
    (src / "train.de").write_text("".join(s["text"] + "\n" for s in items) + "\n")  # last line empty: skipped
    (src / "train.en").write_text("".join(s["translation"] + "\n" for s in items) + "\n")
    (src / "dev.de").write_text("".join(s["text"] + "\n" for s in items[:2]))
    (src / "dev.en").write_text("".join(s["translation"] + "\n" for s in items[:2]))
    out = str(tmp_path / "corpus")
    for split in ("train", "dev"):
        assert prepare_data(["--from", "text", "--src", f"{src}/{split}.de", "--tgt", f"{src}/{split}.en",
                             "--lang", "de", "--tgt-lang", "en", "--split", split, "--out", f"{out}-{split}",
                             "--vocab-size", "100"]) == 0
    got = imported(f"{out}-train")
    assert [(g["text"], g["translation"], g["lang"], g["tgt_lang"]) for _, g in sorted(got.items(), key=lambda x:
            int(x[0]))] == [(s["text"], s["translation"], "de", "en") for s in items]
    assert json.loads(open(f"{out}-train/info.json").read())["import_errors"] == {"empty_text": 1}

    # A speech model trains a few steps from an imported speech corpus (fairseq-free: the HF-less nemo layout).
    speech = tmp_path / "nemo"
    speech.mkdir()
    for split in ("train", "dev"):
        with open(speech / f"{split}.json", "w") as fh:
            for i, s in source.items():
                if s["split"] == split:
                    write_wav(speech / f"{i}.wav", s["wav"])
                    fh.write(json.dumps({"audio_filepath": f"{i}.wav", "text": s["text"], "lang": s["lang"]}) + "\n")
    corpus = str(tmp_path / "speech")
    assert prepare_data(["--from", "nemo", "--input", f"{speech}/train.json", "--input", f"{speech}/dev.json",
                         "--out", corpus, "--vocab-size", "120", "--shard-size", "2", "--workers", "1"]) == 0
    from hs_scale.data import load_tokenizer

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "hs_scale.cli", "train", "--config", "configs/demo_asr.yaml",
           f"--data.manifest={corpus}", f"--model.vocab_size={load_tokenizer(corpus).vocab_size}",
           "--data.precomputed_features=false", "--data.num_workers=0", "--model.d_model=32",
           "--model.encoder_layers=1", "--model.decoder_layers=1", "--model.ffn_dim=64", "--model.conv_channels=32",
           "--train.steps=3", "--train.warmup_steps=1", "--train.eval_every=3", "--train.save_every=3",
           "--train.log_every=1", "--train.progress_bar=false", f"--train.output_dir={run}"]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    losses = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in losses if r["kind"] == "train"]
    assert len(train) == 3 and all(np.isfinite(train))
