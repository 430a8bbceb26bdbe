"""``import_dense``: a head-selection model initialised from a dense Speech2Text / M2M100 directory ("upcycling").

The pooling itself is ``hs_scale.models.upcycle.upcycle_state`` (also what `train.init_from` uses on a dense
checkpoint of ours). Scheme (pool of H' = r*H heads, r = H'/H an integer):
  * pool: every dense head repeated r times, contiguously - pool heads [g*r, (g+1)*r) are copies of dense head g,
    so the group strategy's group g holds only copies of head g and slot g gets head g whatever it picks;
    optionally the copies after the first get N(0, perturb_std) noise on their Q/K/V rows (symmetry breaking).
  * initial selection: phi = selection.init_high on the first copy of each group, selection.init_low elsewhere;
    the deterministic selection (group: argmax per group; subset: top-H in ascending order, also balanced per
    tensor-parallel partition) then picks exactly the original heads in their original order, for every task.
  * out_proj, norms, FFN, embeddings, conv subsampler: copied unchanged.
Hence, at initialisation and in eval mode, every task computes the dense model's function (tested against the HF
model's logits). Training then draws Gumbel noise around phi, so the copies get picked and diverge.
"""

from __future__ import annotations

from hs_scale.export.materialize import ExportError
from hs_scale.models.config import ModelConfig
from hs_scale.models.hf_names import from_hf_state_dict
from hs_scale.models.upcycle import upcycle_state
from hs_scale.selection.config import SelectionConfig

_MODEL_TYPES = {"speech_to_text": "s2t", "m2m_100": "text"}


def _same(hf_cfg, a: str, b: str) -> int:
    if getattr(hf_cfg, a) != getattr(hf_cfg, b):
        raise ExportError(f"HF config has {a}={getattr(hf_cfg, a)} but {b}={getattr(hf_cfg, b)}; hs_scale models "
                          f"use one value for encoder and decoder")
    return getattr(hf_cfg, a)


def model_config_from_hf(hf_cfg) -> ModelConfig:
    """Our ModelConfig of an HF Speech2TextConfig / M2M100Config; refuses what hs_scale cannot represent."""
    arch = _MODEL_TYPES.get(hf_cfg.model_type)
    if arch is None:
        raise ExportError(f"model_type={hf_cfg.model_type!r}: import-hf reads Speech2Text or M2M100 checkpoints only")
    if hf_cfg.activation_function != "relu":
        raise ExportError(f"activation_function={hf_cfg.activation_function!r}: hs_scale's FFN is ReLU only")
    kw = dict(
        arch=arch,
        d_model=hf_cfg.d_model,
        encoder_layers=hf_cfg.encoder_layers,
        decoder_layers=hf_cfg.decoder_layers,
        num_heads=_same(hf_cfg, "encoder_attention_heads", "decoder_attention_heads"),
        ffn_dim=_same(hf_cfg, "encoder_ffn_dim", "decoder_ffn_dim"),
        vocab_size=hf_cfg.vocab_size,
        dropout=hf_cfg.dropout,
        attention_dropout=hf_cfg.attention_dropout,
        activation_dropout=hf_cfg.activation_dropout,
        init_std=hf_cfg.init_std,
        scale_embedding=hf_cfg.scale_embedding,
        tie_embeddings=bool(getattr(hf_cfg, "tie_word_embeddings", True)),
        pad_token_id=hf_cfg.pad_token_id,
        bos_token_id=hf_cfg.bos_token_id,
        eos_token_id=hf_cfg.eos_token_id,
        decoder_start_token_id=(hf_cfg.decoder_start_token_id if hf_cfg.decoder_start_token_id is not None
                                else hf_cfg.eos_token_id),
    )
    if arch == "s2t":
        if getattr(hf_cfg, "input_channels", 1) != 1:
            raise ExportError(f"input_channels={hf_cfg.input_channels}: hs_scale's subsampler takes 1 channel")
        kw.update(
            max_source_positions=hf_cfg.max_source_positions,
            max_target_positions=hf_cfg.max_target_positions,
            conv_kernel_sizes=list(hf_cfg.conv_kernel_sizes),
            conv_channels=hf_cfg.conv_channels,
            input_feat_per_channel=hf_cfg.input_feat_per_channel,
        )
    else:
        kw.update(max_source_positions=hf_cfg.max_position_embeddings,
                  max_target_positions=hf_cfg.max_position_embeddings)
    return ModelConfig(**kw)


def import_dense(model_dir: str, pool_heads: int, task_names: list[str], selection: SelectionConfig | None = None,
                 perturb_std: float = 0.0, seed: int = 0):
    """(model_cfg, selection_cfg, pooled model) from a Speech2Text / M2M100 ``save_pretrained`` directory."""
    import transformers

    hf_cfg = transformers.AutoConfig.from_pretrained(model_dir)
    model_cfg = model_config_from_hf(hf_cfg)
    cls = {"s2t": transformers.Speech2TextForConditionalGeneration,
           "text": transformers.M2M100ForConditionalGeneration}[model_cfg.arch]
    hf = cls.from_pretrained(model_dir)
    dense = from_hf_state_dict(model_cfg, hf.state_dict())
    selection = selection or SelectionConfig()
    selection = SelectionConfig(**{**selection.__dict__, "pool_heads": pool_heads})
    selection.check_heads(model_cfg.num_heads)
    if not task_names:
        raise ExportError("import-hf needs the task names (--tasks a,b,...): they fix the selector's task axis")
    try:
        model, _ = upcycle_state(model_cfg, selection, dense, len(task_names), perturb_std, seed)
    except ValueError as err:  # the pool does not fit the dense heads: an export-level refusal like the others
        raise ExportError(str(err)) from None
    return model_cfg, selection, model
