"""SentencePiece tokenizer with language and task tags, trained by the corpus builder.

Tags are user-defined symbols, so they are single ids that never appear split: ``<de>``, ``<en>``, ... for
target languages (the decoder's first input token) and ``<asr>``, ``<st>``, ``<mt>`` for tasks.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

TASK_TAGS = ("asr", "st", "mt")


def lang_tag(lang: str) -> str:
    return f"<{lang}>"


class Tokenizer:
    """Thin wrapper around a SentencePiece model. Picklable (spawned DataLoader workers get a copy)."""

    def __init__(self, model_path: str):
        import sentencepiece as spm

        self.model_path = os.path.abspath(model_path)
        with open(self.model_path, "rb") as fh:
            self._proto = fh.read()
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        self.pad_id = self._sp.pad_id()
        self.bos_id = self._sp.bos_id()
        self.eos_id = self._sp.eos_id()
        self.unk_id = self._sp.unk_id()
        self.vocab_size = self._sp.get_piece_size()

    def __getstate__(self):
        return {"model_path": self.model_path, "proto": self._proto}

    def __setstate__(self, state):
        import sentencepiece as spm

        self.model_path, self._proto = state["model_path"], state["proto"]
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        self.pad_id, self.bos_id, self.eos_id = self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id()
        self.unk_id, self.vocab_size = self._sp.unk_id(), self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts)

    def decode(self, ids: Iterable[int]) -> str:
        special = {self.pad_id, self.bos_id, self.eos_id}
        return self._sp.decode([int(i) for i in ids if int(i) not in special])

    def tag_id(self, tag: str) -> int:
        i = self._sp.piece_to_id(tag)
        if i == self.unk_id:
            raise KeyError(f"tokenizer {self.model_path} has no tag {tag!r}; rebuild it with that language/task")
        return i

    def lang_tag_id(self, lang: str) -> int:
        """Id of the target-language tag ``<lang>`` (the decoder's first input token)."""
        return self.tag_id(lang_tag(lang))

    def task_tag_id(self, task: str) -> int:
        return self.tag_id(f"<{task}>")


def build_tokenizer(
    texts: Iterable[str], out_prefix: str, langs: Iterable[str], vocab_size: int = 4000,
    tasks: Iterable[str] = TASK_TAGS, character_coverage: float = 0.9995, seed: int = 0,
) -> Tokenizer:
    """Train a unigram SentencePiece model on `texts`; writes out_prefix.model/.vocab and returns it.

    Ids: bos=0, pad=1, eos=2, unk=3 (fairseq's and transformers' Speech2Text/M2M100 convention, which the S2T
    model's positions rely on: pad must be 1), then the tags, then the pieces. `vocab_size` is lowered
    automatically when the text is too small for it (SentencePiece refuses otherwise).
    """
    import sentencepiece as spm

    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError("build_tokenizer got no text")
    tags = [lang_tag(lg) for lg in sorted(set(langs))] + [f"<{t}>" for t in tasks]
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    kw = dict(
        sentence_iterator=iter(texts), model_prefix=out_prefix, model_type="unigram",
        character_coverage=character_coverage, bos_id=0, pad_id=1, eos_id=2, unk_id=3,
        user_defined_symbols=tags, input_sentence_size=2_000_000, shuffle_input_sentence=False,
        num_threads=1, minloglevel=2, hard_vocab_limit=False,
    )
    try:
        spm.SentencePieceTrainer.train(vocab_size=vocab_size, **kw)
    except RuntimeError as exc:  # tiny corpora: "Vocabulary size is smaller than required_chars" and similar
        if "vocab" not in str(exc).lower():
            raise
        kw["sentence_iterator"] = iter(texts)
        spm.SentencePieceTrainer.train(vocab_size=max(len(tags) + 64, vocab_size // 4), **kw)
    return Tokenizer(out_prefix + ".model")


def load_tokenizer(path: str) -> Tokenizer:
    """Load a tokenizer from a .model file or from a corpus location (dir or URL) holding tokenizer.model."""
    from hs_scale.data import urls

    if urls.local_path(path) is None or path.startswith("file://"):  # a URL: fetch the model into a local file
        if not path.endswith(".model"):
            path = urls.join(path, "tokenizer.model")
        try:
            return Tokenizer(urls.local_copy(path))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"no tokenizer at {path}; the corpus builder writes <corpus>/tokenizer.model") from None
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.model")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no tokenizer at {path}; the corpus builder writes <corpus>/tokenizer.model")
    return Tokenizer(path)
