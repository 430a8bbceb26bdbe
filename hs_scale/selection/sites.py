"""Where head selection happens in a model: its attention sites, declared once.

A site is one kind of attention layer with its own selector phi[K, layers, H'] (docs/method.md): its name (the
`selection:` flag, the selector's key, the checkpoint key `selectors.<name>.logits`), the stack and layer
attribute holding its modules, the ModelConfig field counting its layers, and the *side* whose task keys it.
In the encoder-decoder, the encoder reads the source and the decoder writes the target, so

    encoder_self -> source task (src_task_B);  decoder_self and cross -> target task (tgt_task_B).

Every place that maps a site to its layers, its state-dict prefix or its task reads this table: the models,
their pipeline stages, the checkpoint layout, dense export and upcycling. (The exported remote code keeps its
own copy, pinned to this one by tests/export/test_export_remote_pins.py, because it must import nothing of ours.)
"""

from __future__ import annotations

from dataclasses import dataclass

SOURCE, TARGET = "source", "target"


@dataclass(frozen=True)
class AttentionSite:
    name: str
    """Selection flag, selector key and checkpoint key of the site: "encoder_self", "decoder_self", "cross"."""

    stack: str
    """Module holding the layers: "encoder" or "decoder" (state-dict prefix `<stack>.layers.<l>`)."""

    attr: str
    """Attribute of a layer holding the attention module: "self_attn" or "encoder_attn" (HF's names)."""

    layers_field: str
    """ModelConfig field giving the number of layers: "encoder_layers" or "decoder_layers"."""

    side: str
    """Whose task keys the selection: SOURCE (src_task_B) or TARGET (tgt_task_B)."""

    def num_layers(self, model_cfg) -> int:
        return getattr(model_cfg, self.layers_field)

    def prefix(self, layer: int) -> str:
        """State-dict prefix of the attention module of `layer`: e.g. "decoder.layers.3.encoder_attn"."""
        return f"{self.stack}.layers.{layer}.{self.attr}"

    def task(self, src_task, tgt_task):
        """The task ids keying this site, given the source and the target ones (tensors, ints or None)."""
        return src_task if self.side == SOURCE else tgt_task


ENCODER_DECODER_SITES = (
    AttentionSite("encoder_self", "encoder", "self_attn", "encoder_layers", SOURCE),
    AttentionSite("decoder_self", "decoder", "self_attn", "decoder_layers", TARGET),
    AttentionSite("cross", "decoder", "encoder_attn", "decoder_layers", TARGET),
)
SITES = {site.name: site for site in ENCODER_DECODER_SITES}
SITE_NAMES = tuple(SITES)


def sites_of(stack: str) -> tuple[str, ...]:
    """Names of the sites whose layers live in `stack` ("encoder" or "decoder"), in declaration order."""
    return tuple(site.name for site in ENCODER_DECODER_SITES if site.stack == stack)
