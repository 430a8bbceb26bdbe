"""Task keys: which language / domain a sample's encoder and decoder heads are selected for.

A *task* is a language (``lang``), a domain (``domain``) or both (``lang+domain``, the composite key the paper
names as future work). The encoder is keyed on the source side, the decoder on the target side:

    key_type   encoder task            decoder task
    lang       src_lang                tgt_lang
    domain     domain                  domain
    lang+domain  f"{src_lang}+{domain}"  f"{tgt_lang}+{domain}"

The data pipeline and the model both go through this module, so the two can never disagree.
"""

from __future__ import annotations

TASK_KEY_TYPES = ("lang", "domain", "lang+domain")


def task_name(key_type: str, lang: str, domain: str | None) -> str:
    """Name of the task of one side of a sample. ``lang`` is that side's language."""
    if key_type == "lang":
        return lang
    if key_type == "domain":
        if not domain:
            raise ValueError("task key 'domain' needs a domain on every sample; this sample has none")
        return domain
    if key_type == "lang+domain":
        if not domain:
            raise ValueError("task key 'lang+domain' needs a domain on every sample; this sample has none")
        return f"{lang}+{domain}"
    raise ValueError(f"unknown task key type {key_type!r}; use one of {TASK_KEY_TYPES}")


def encoder_task(key_type: str, src_lang: str, domain: str | None = None) -> str:
    return task_name(key_type, src_lang, domain)


def decoder_task(key_type: str, tgt_lang: str, domain: str | None = None) -> str:
    return task_name(key_type, tgt_lang, domain)


class TaskVocab:
    """Fixed, ordered list of task names -> integer ids (the first axis of the selector logits phi)."""

    def __init__(self, names: list[str]):
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate task names in {names}")
        if not names:
            raise ValueError("at least one task is needed")
        self.names = list(names)
        self._ids = {n: i for i, n in enumerate(self.names)}

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: str) -> bool:
        return name in self._ids

    def id(self, name: str) -> int:
        try:
            return self._ids[name]
        except KeyError:
            raise KeyError(f"unknown task {name!r}; known tasks: {self.names}") from None
