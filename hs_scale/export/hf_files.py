"""The non-weight files of an HF directory: tokenizer, feature extractor (processor) and generation config.

Tokenizer. hs_scale's tokenizer is a SentencePiece model whose piece ids *are* the model's token ids (pad, unk,
bos, eos, then the ``<lang>``/``<asr>``... tags as user-defined pieces, then the pieces). transformers'
``Speech2TextTokenizer`` is exactly "spm pieces -> ids through vocab.json, then append </s>", which is the
source format hs_scale uses (``encode(text) + [eos]``), so it is written for both architectures (with
``lang_codes`` unset it adds no prefix). ``M2M100Tokenizer`` cannot be used for the text model: it prepends a
``__xx__`` source-language token whose id lies past the vocabulary (fairseq's M2M100 layout), which hs_scale's
models never saw. Tags are registered as additional special tokens, so ``skip_special_tokens`` drops them.

Feature extractor (speech). ``Speech2TextFeatureExtractor`` computes the same 80-dim Kaldi filterbanks as
``hs_scale.data.features.fbank`` (25 ms / 10 ms, povey window, pre-emphasis 0.97, dither 0, int16 scale) and pads
with zeros. ``data.cmvn: utterance`` is its own per-utterance CMVN (normalise, then zero the padding, as our loader
and collate do). ``global`` is folded into the model's first convolution (``cmvn_fold``), so the extractor hands
over raw features, zero-padded exactly as our collate pads them; ``none`` is normalisation off too.

Generation config. hs_scale decodes from the target task's start token (``<tgt_lang>`` tag, or BOS / </s>) and
never generates <pad>; ``decoder_start_token_id`` and ``suppress_tokens=[pad]`` make plain ``generate()`` do the
same. Beam settings follow ``hs_scale.evaluation.search``: score = sum of log-probs / (tokens + </s>) ** length_penalty
(HF's normalisation), k best closed hypotheses kept, a row stops when no open beam can beat them by HF's
``early_stopping=False`` estimate; after ``max_len_b`` tokens </s> is forced with score 0 (HF's forced_eos_token_id).
"""

from __future__ import annotations

import json
import os
import re
import shutil

from hs_scale.models.config import ModelConfig

SAMPLE_RATE = 16_000
_TAG = re.compile(r"^<[^<>\s]+>$")


def check_tokenizer_ids(model_cfg: ModelConfig, tok) -> None:
    """Refuse a tokenizer whose special ids or size disagree with the model (the export would decode garbage)."""
    pairs = [("pad", tok.pad_id, model_cfg.pad_token_id), ("eos", tok.eos_id, model_cfg.eos_token_id)]
    for name, tok_id, model_id in pairs:
        if tok_id != model_id:
            raise ValueError(
                f"tokenizer {tok.model_path} has {name} id {tok_id}, the model's {name}_token_id is {model_id}; "
                f"the exported model would not stop or pad correctly (export without --tokenizer, or retrain with "
                f"matching ids)"
            )
    if tok.vocab_size > model_cfg.vocab_size:
        raise ValueError(
            f"tokenizer {tok.model_path} has {tok.vocab_size} pieces, more than model.vocab_size={model_cfg.vocab_size}"
        )


def write_tokenizer(out_dir: str, tokenizer_path: str, model_cfg: ModelConfig):
    """vocab.json + sentencepiece.bpe.model + tokenizer_config.json for ``Speech2TextTokenizer``; returns it."""
    from transformers import Speech2TextTokenizer

    from hs_scale.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    check_tokenizer_ids(model_cfg, tok)
    sp = tok._sp
    pieces = [sp.id_to_piece(i) for i in range(tok.vocab_size)]
    os.makedirs(out_dir, exist_ok=True)
    vocab_file = os.path.join(out_dir, "vocab.json")
    spm_file = os.path.join(out_dir, "sentencepiece.bpe.model")
    with open(vocab_file, "w", encoding="utf-8") as fh:
        json.dump({piece: i for i, piece in enumerate(pieces)}, fh, ensure_ascii=False, indent=1)
    shutil.copyfile(tok.model_path, spm_file)
    specials = {tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id}
    tags = [p for i, p in enumerate(pieces) if i not in specials and _TAG.match(p)]
    hf_tok = Speech2TextTokenizer(
        vocab_file,
        spm_file,
        bos_token=pieces[tok.bos_id],
        eos_token=pieces[tok.eos_id],
        pad_token=pieces[tok.pad_id],
        unk_token=pieces[tok.unk_id],
        additional_special_tokens=tags,
    )
    hf_tok.save_pretrained(out_dir)
    return hf_tok


def write_feature_extractor(out_dir: str, model_cfg: ModelConfig, cmvn: str = "utterance"):
    """preprocessor_config.json for ``Speech2TextFeatureExtractor`` matching hs_scale's filterbanks and CMVN
    (global CMVN lives in the exported weights: normalisation off)."""
    from transformers import Speech2TextFeatureExtractor

    if cmvn not in ("utterance", "global", "none"):
        raise ValueError(f"cmvn={cmvn!r}: use utterance, global or none")
    bins = model_cfg.input_feat_per_channel
    extractor = Speech2TextFeatureExtractor(
        feature_size=bins,
        num_mel_bins=bins,
        sampling_rate=SAMPLE_RATE,
        padding_value=0.0,
        dither=0.0,
        do_ceptral_normalize=cmvn == "utterance",
        normalize_means=True,
        normalize_vars=True,
    )
    extractor.save_pretrained(out_dir)
    return extractor


def write_processor(out_dir: str, extractor, tokenizer) -> None:
    """processor files so that ``AutoProcessor.from_pretrained`` gives a ``Speech2TextProcessor``."""
    from transformers import Speech2TextProcessor

    Speech2TextProcessor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(out_dir)


def generation_config(model_cfg: ModelConfig, decoder_start_token_id: int, search=None):
    """GenerationConfig that makes plain ``generate()`` decode like ``hs_scale.evaluation.search``."""
    from transformers import GenerationConfig

    beam, max_len_b, length_penalty = 5, 200, 1.0
    if search is not None:
        beam, max_len_b, length_penalty = search.beam, search.max_len_b, search.length_penalty
    return GenerationConfig(
        decoder_start_token_id=decoder_start_token_id,
        bos_token_id=model_cfg.bos_token_id,
        eos_token_id=model_cfg.eos_token_id,
        pad_token_id=model_cfg.pad_token_id,
        suppress_tokens=[model_cfg.pad_token_id],
        num_beams=beam,
        length_penalty=length_penalty,
        # search.py keeps the k best closed hypotheses and stops a row once its best open beam, scored as if it
        # closed now, cannot beat the worst of them: HF's early_stopping=False criterion.
        early_stopping=False,
        # hs_scale forces </s> (scored 0) after max_len_b tokens: HF's ForcedEOSTokenLogitsProcessor at the last of
        # max_len_b + 1 new tokens does exactly that.
        max_new_tokens=max_len_b + 1,
        forced_eos_token_id=model_cfg.eos_token_id,
    )


def write_support_files(out_dir: str, model_cfg: ModelConfig, tokenizer_dir: str | None, cmvn: str) -> list[str]:
    """Tokenizer (when given) and, for speech, feature extractor / processor. Returns notes for the caller."""
    notes = []
    tokenizer = write_tokenizer(out_dir, tokenizer_dir, model_cfg) if tokenizer_dir else None
    if tokenizer is None:
        notes.append("no tokenizer given: the directory has model and generation files only")
    if model_cfg.arch == "s2t":
        extractor = write_feature_extractor(out_dir, model_cfg, cmvn)
        if tokenizer is not None:
            write_processor(out_dir, extractor, tokenizer)
        if cmvn == "global":
            notes.append("global CMVN is folded into the first convolution: feed raw audio to the processor")
    return notes
