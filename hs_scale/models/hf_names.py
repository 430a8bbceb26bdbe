"""Names and configs: ours <-> transformers' Speech2TextForConditionalGeneration / M2M100ForConditionalGeneration.

Legend: V vocabulary, D model width (tensors are copied whole; nothing is reshaped).

Only *dense* attention (pool H' == H) maps onto HF. A model trained with H' > H is exported per task by first
gathering that task's selected heads into a dense H-head model (the exporter's job); then these tables apply.
The tables are the single source of truth for the names: tests check that they cover both state dicts exactly.
"""

from __future__ import annotations

from torch import Tensor

from hs_scale.models.config import ModelConfig
from hs_scale.models.registry import MODEL_SPECS

HF_CLASSES = {arch: spec.hf_class for arch, spec in MODEL_SPECS.items()}

# (our module, HF module) for modules with .weight and .bias. {e} encoder layer, {d} decoder layer, {c} conv layer.
_ENCODER_LAYER = [
    ("encoder.layers.{e}.self_attn.q_proj", "model.encoder.layers.{e}.self_attn.q_proj"),
    ("encoder.layers.{e}.self_attn.k_proj", "model.encoder.layers.{e}.self_attn.k_proj"),
    ("encoder.layers.{e}.self_attn.v_proj", "model.encoder.layers.{e}.self_attn.v_proj"),
    ("encoder.layers.{e}.self_attn.out_proj", "model.encoder.layers.{e}.self_attn.out_proj"),
    ("encoder.layers.{e}.self_attn_layer_norm", "model.encoder.layers.{e}.self_attn_layer_norm"),
    ("encoder.layers.{e}.fc1", "model.encoder.layers.{e}.fc1"),
    ("encoder.layers.{e}.fc2", "model.encoder.layers.{e}.fc2"),
    ("encoder.layers.{e}.final_layer_norm", "model.encoder.layers.{e}.final_layer_norm"),
]
_DECODER_LAYER = [
    ("decoder.layers.{d}.self_attn.q_proj", "model.decoder.layers.{d}.self_attn.q_proj"),
    ("decoder.layers.{d}.self_attn.k_proj", "model.decoder.layers.{d}.self_attn.k_proj"),
    ("decoder.layers.{d}.self_attn.v_proj", "model.decoder.layers.{d}.self_attn.v_proj"),
    ("decoder.layers.{d}.self_attn.out_proj", "model.decoder.layers.{d}.self_attn.out_proj"),
    ("decoder.layers.{d}.self_attn_layer_norm", "model.decoder.layers.{d}.self_attn_layer_norm"),
    ("decoder.layers.{d}.encoder_attn.q_proj", "model.decoder.layers.{d}.encoder_attn.q_proj"),
    ("decoder.layers.{d}.encoder_attn.k_proj", "model.decoder.layers.{d}.encoder_attn.k_proj"),
    ("decoder.layers.{d}.encoder_attn.v_proj", "model.decoder.layers.{d}.encoder_attn.v_proj"),
    ("decoder.layers.{d}.encoder_attn.out_proj", "model.decoder.layers.{d}.encoder_attn.out_proj"),
    ("decoder.layers.{d}.encoder_attn_layer_norm", "model.decoder.layers.{d}.encoder_attn_layer_norm"),
    ("decoder.layers.{d}.fc1", "model.decoder.layers.{d}.fc1"),
    ("decoder.layers.{d}.fc2", "model.decoder.layers.{d}.fc2"),
    ("decoder.layers.{d}.final_layer_norm", "model.decoder.layers.{d}.final_layer_norm"),
]
_FINAL_NORMS = [
    ("encoder.layer_norm", "model.encoder.layer_norm"),
    ("decoder.layer_norm", "model.decoder.layer_norm"),
]
_CONV = [("encoder.conv.conv_layers.{c}", "model.encoder.conv.conv_layers.{c}")]

# Single tensors (no bias). The one embedding table fans out to every HF name that holds a copy of it: HF ties
# them by pointer when tie_word_embeddings, and keeps separate (here: equal) tensors otherwise.
_EMBEDDINGS = {
    "s2t": {"decoder.embed_tokens.weight": ("model.decoder.embed_tokens.weight",)},
    "text": {
        "decoder.embed_tokens.weight": (
            "model.shared.weight",
            "model.encoder.embed_tokens.weight",
            "model.decoder.embed_tokens.weight",
        )
    },
}
_LM_HEAD = ("lm_head.weight", "lm_head.weight")

# Our tensors with no HF counterpart, absent from a dense export: the selector logits and draw counters, and the
# CTC head (a training aid of hybrid CTC/attention ASR; HF Speech2Text decodes with the attention decoder only).
OURS_WITHOUT_HF = ("selectors.", "ctc_head.")


def hf_name_map(cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
    """Every tensor of our dense model -> the HF tensor name(s) holding it, for this config."""
    modules: list[tuple[str, str]] = []
    for e in range(cfg.encoder_layers):
        modules += [(ours.format(e=e), hf.format(e=e)) for ours, hf in _ENCODER_LAYER]
    for d in range(cfg.decoder_layers):
        modules += [(ours.format(d=d), hf.format(d=d)) for ours, hf in _DECODER_LAYER]
    modules += _FINAL_NORMS
    if cfg.arch == "s2t":
        for c in range(len(cfg.conv_kernel_sizes)):
            modules += [(ours.format(c=c), hf.format(c=c)) for ours, hf in _CONV]
    names = {f"{ours}.{p}": (f"{hf}.{p}",) for ours, hf in modules for p in ("weight", "bias")}
    names.update({k: tuple(v) for k, v in _EMBEDDINGS[cfg.arch].items()})
    embed = "decoder.embed_tokens.weight"
    if cfg.tie_embeddings:
        names[embed] = names[embed] + (_LM_HEAD[1],)
    else:
        names[_LM_HEAD[0]] = (_LM_HEAD[1],)
    return names


def _check_dense(cfg: ModelConfig, state: dict[str, Tensor]) -> None:
    """Refuse pooled attention: a [H'*d, D] projection has no place in an H-head HF model."""
    width = cfg.d_model
    for name, tensor in state.items():
        if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")) and tensor.shape[0] != width:
            raise ValueError(
                f"{name} has {tensor.shape[0] // cfg.head_dim} heads, the model {cfg.num_heads}: "
                f"a pooled (H' > H) model must be reduced to one task's dense heads before HF export"
            )


def to_hf_state_dict(cfg: ModelConfig, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """HF state dict (every tied name filled) from ``our_model.state_dict()``; refuses unknown tensors."""
    _check_dense(cfg, state)
    names = hf_name_map(cfg)
    unknown = [k for k in state if k not in names and not k.startswith(OURS_WITHOUT_HF)]
    if unknown:
        raise KeyError(f"no HF name for {unknown[:5]} ({len(unknown)} tensors); add them to hf_names.py")
    missing = [k for k in names if k not in state]
    if missing:
        raise KeyError(f"state dict lacks {missing[:5]} ({len(missing)} tensors) for this config")
    return {hf: state[ours] for ours, hfs in names.items() for hf in hfs}


def from_hf_state_dict(cfg: ModelConfig, hf_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our dense state dict from an HF one. Refuses HF models whose copies of one of our tensors differ (an
    untied M2M100 with distinct encoder and decoder tables cannot be represented with one table)."""
    out = {}
    for ours, hfs in hf_name_map(cfg).items():
        missing = [h for h in hfs if h not in hf_state]
        if len(missing) == len(hfs):
            raise KeyError(f"HF state dict lacks {hfs[0]} (needed for {ours})")
        present = [hf_state[h] for h in hfs if h in hf_state]
        if any(not t.equal(present[0]) for t in present[1:]):
            raise ValueError(
                f"HF tensors {hfs} differ, but they are one tensor ({ours}) in hs_scale; "
                f"only tied (or identical) embedding tables can be imported"
            )
        out[ours] = present[0]
    return out


def hf_config_kwargs(cfg: ModelConfig) -> dict:
    """Keyword arguments of ``Speech2TextConfig`` (arch s2t) or ``M2M100Config`` (arch text) for this model."""
    kw = dict(
        vocab_size=cfg.vocab_size,
        d_model=cfg.d_model,
        encoder_layers=cfg.encoder_layers,
        decoder_layers=cfg.decoder_layers,
        encoder_attention_heads=cfg.num_heads,
        decoder_attention_heads=cfg.num_heads,
        encoder_ffn_dim=cfg.ffn_dim,
        decoder_ffn_dim=cfg.ffn_dim,
        encoder_layerdrop=0.0,
        decoder_layerdrop=0.0,
        activation_function="relu",
        dropout=cfg.dropout,
        attention_dropout=cfg.attention_dropout,
        activation_dropout=cfg.activation_dropout,
        init_std=cfg.init_std,
        scale_embedding=cfg.scale_embedding,
        tie_word_embeddings=cfg.tie_embeddings,
        pad_token_id=cfg.pad_token_id,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        decoder_start_token_id=cfg.decoder_start_token_id,
        is_encoder_decoder=True,
    )
    if cfg.arch == "s2t":
        kw.update(
            max_source_positions=cfg.max_source_positions,
            max_target_positions=cfg.max_target_positions,
            num_conv_layers=len(cfg.conv_kernel_sizes),
            conv_kernel_sizes=list(cfg.conv_kernel_sizes),
            conv_channels=cfg.conv_channels,
            input_feat_per_channel=cfg.input_feat_per_channel,
            input_channels=1,
        )
    else:
        # M2M100 has one table size for both sides; the sinusoidal tables grow on demand anyway.
        kw.update(max_position_embeddings=max(cfg.max_source_positions, cfg.max_target_positions))
    return kw


def build_hf_config(cfg: ModelConfig):
    """The transformers config object (imports transformers lazily: training does not need it)."""
    import transformers

    config_cls = {"s2t": transformers.Speech2TextConfig, "text": transformers.M2M100Config}[cfg.arch]
    return config_cls(**hf_config_kwargs(cfg))
