"""Pipeline stages of the encoder-decoder: contiguous cuts of the encoder-then-decoder layer list.

Legend: B batch, T feature frames, S encoder positions, L target length, D width, E / Dl encoder / decoder layer
counts, C = pp * vp model chunks, n = (E + Dl) / C layers per chunk, t TP size.

Chunk c (megatron's interleaved convention: chunk v of pipeline rank r is c = v * pp + r) holds global layers
[c*n, (c+1)*n) of the list enc0..enc(E-1), dec0..dec(Dl-1), plus whatever the layers around it need:
  * the chunk holding layer 0: the conv subsampler (s2t) or the token embedding (text), source positions;
  * the chunk holding the last encoder layer: the encoder's final LayerNorm (it outputs the *memory*);
  * the chunk holding decoder layer 0: the (vocab-parallel) token embedding and target positions;
  * the last chunk: the decoder's final LayerNorm, the LM head (tied: the same embedding shard) and the loss.

What travels between stages (one p2p tensor, so megatron's schedules and `variable_seq_lengths` apply as is):
  * inside the encoder: x_BSD (encoder hidden states);
  * after the encoder:  cat([memory_BSD, y_BLD], dim=1), i.e. [B, S+L, D]; every decoder stage splits it with
    S and L read from the batch (all pipeline ranks get the same batch), uses memory for cross-attention and
    passes it on. Its gradient accumulates the cross-attention contributions of every later stage on the way back.
Task ids, padding masks and lengths are recomputed on every stage from the batch: only hidden states travel.

Head selection: each chunk owns the rows of phi for its layers (`HeadSelector(first_layer=...)` semantics), so
its Gumbel draws are those of a single process (noise is a pure function of (seed, draw, global layer)).

Checkpoint contract (docs/parallelism.md): chunk state-dict keys are the single-device keys with GLOBAL layer
indices (`encoder.layers.3...`); TP shards carry megatron's `tensor_model_parallel` / `partition_dim`;
`global_state_dict_layout(chunk)` gives each key's global shape and this rank's offsets.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hs_scale.models.ctc import ctc_loss_sum, hybrid_loss
from hs_scale.parallel.layout import ParallelGroups, padded_vocab_size
from hs_scale.parallel.vocab import (
    VocabParallelLMHead,
    local_logits,
    vocab_parallel_embedding,
    vocab_parallel_label_smoothed_ce,
)
from hs_scale.selection.attention import TaskSegments

SELECTOR_TYPES = {"encoder_self": "encoder", "decoder_self": "decoder", "cross": "decoder"}


class LayerDict(nn.ModuleDict):
    """Layers keyed by their GLOBAL index (state-dict keys `decoder.layers.3...`); iterates over the layers.

    NOTE: iteration yields modules, not keys, because megatron's schedules do `for layer in model.decoder.layers`
    (to tag the current micro-batch) and expect a ModuleList-like container.
    """

    def __iter__(self):
        return iter(self.values())


def chunk_layers(encoder_layers: int, decoder_layers: int, num_chunks: int, chunk: int) -> tuple[range, range]:
    """(encoder layer indices, decoder layer indices) of `chunk`, both global within their stack."""
    total = encoder_layers + decoder_layers
    n = total // num_chunks
    a, b = chunk * n, (chunk + 1) * n
    return range(a, min(b, encoder_layers)), range(max(a - encoder_layers, 0), max(b - encoder_layers, 0))


def embedding_chunks(arch: str, tied: bool, encoder_layers: int, decoder_layers: int, num_chunks: int) -> set[int]:
    """Chunks holding a copy of the token embedding table (their gradients are summed every step)."""
    held = {c for c in range(num_chunks) if 0 in chunk_layers(encoder_layers, decoder_layers, num_chunks, c)[1]}
    if arch == "text":
        held.add(0)  # the text encoder embeds its source tokens with the same table
    if tied:
        held.add(num_chunks - 1)
    return held


def _slice_selector(selector: nn.Module, layers: range) -> nn.Module:
    """A copy of `selector` (HeadSelector or TPHeadSelector) holding only `layers`' rows of phi."""
    part = copy.deepcopy(selector)
    old = selector.logits
    part.logits = nn.Parameter(old.detach()[:, layers.start : layers.stop].clone())
    for attr in ("tensor_model_parallel", "partition_dim", "partition_stride"):
        if hasattr(old, attr):
            setattr(part.logits, attr, getattr(old, attr))
    part.first_layer = selector.first_layer + layers.start
    part.num_layers = len(layers)
    part.logits.layer_offset = part.first_layer  # global index of row 0 along the layer dim (checkpoints)
    return part


def source_length(model_cfg, batch) -> int:
    """S, the encoder length of the (padded) batch."""
    if model_cfg.arch == "text":
        return batch.source_tokens.shape[1]
    S = batch.features.shape[1]
    for _ in model_cfg.conv_kernel_sizes:
        S = (S - 1) // 2 + 1
    return S


def source_padding_mask(model_cfg, batch) -> Tensor:
    """bool [B, S], True = padded source position (same rule as the single-device encoders)."""
    if model_cfg.arch == "text":
        return batch.source_tokens.eq(model_cfg.pad_token_id)
    S, B = source_length(model_cfg, batch), batch.features.shape[0]
    if batch.feature_lengths is None:
        return torch.zeros(B, S, dtype=torch.bool, device=batch.features.device)
    lengths = batch.feature_lengths
    for _ in model_cfg.conv_kernel_sizes:
        lengths = torch.div(lengths - 1, 2, rounding_mode="floor") + 1
    return torch.arange(S, device=lengths.device)[None, :] >= lengths[:, None]


class PipelineChunk(nn.Module):
    """One model chunk: forward(batch) -> the p2p tensor, or (last chunk) a dict of loss sums.

    Built from a full single-device model (already TP-sharded by `parallelize_tensor`) by keeping this chunk's
    modules. Attributes megatron's schedules read: `config` (a megatron TransformerConfig), `model_type`,
    `vp_stage`, `set_input_tensor`. The hs_scale ModelConfig is `model_config`.
    """

    def __init__(self, full: nn.Module, chunk: int, num_chunks: int, groups: ParallelGroups, tconfig, vp_stage=None):
        super().__init__()
        from megatron.core.enums import ModelType

        cfg = full.config
        self.model_config, self.config, self.vp_stage = cfg, tconfig, vp_stage
        self.model_type = ModelType.encoder_or_decoder
        self.chunk, self.num_chunks, self.groups = chunk, num_chunks, groups
        self.enc_range, self.dec_range = chunk_layers(cfg.encoder_layers, cfg.decoder_layers, num_chunks, chunk)
        self.first, self.last = chunk == 0, chunk == num_chunks - 1
        self.ends_encoder = cfg.encoder_layers - 1 in self.enc_range
        self.starts_decoder = 0 in self.dec_range
        self.padded_vocab = padded_vocab_size(cfg.vocab_size, groups.tp_size)
        self.embed_scale = cfg.d_model**0.5 if cfg.scale_embedding else 1.0
        self.input_tensor: Tensor | None = None
        self.p2p_shape: tuple[int, int] | None = None  # (B, N) fixed p2p shape, or None for variable lengths

        self.encoder, self.decoder = nn.Module(), nn.Module()
        self.encoder.layers = LayerDict({str(i): full.encoder.layers[i] for i in self.enc_range})
        self.decoder.layers = LayerDict({str(i): full.decoder.layers[i] for i in self.dec_range})
        if self.first:
            self.encoder.embed_positions = full.encoder.embed_positions
            if cfg.arch == "s2t":
                self.encoder.conv = full.encoder.conv
        if self.ends_encoder:
            self.encoder.layer_norm = full.encoder.layer_norm
        if self.starts_decoder:
            self.decoder.embed_positions = full.decoder.embed_positions
        held = embedding_chunks(cfg.arch, cfg.tie_embeddings, cfg.encoder_layers, cfg.decoder_layers, num_chunks)
        if chunk in held:
            emb = vocab_parallel_embedding(cfg.vocab_size, self.padded_vocab, cfg.d_model, cfg.pad_token_id, groups.tp)
            emb.load_dense_(full.decoder.embed_tokens.weight)
            emb.weight.shared_embedding = len(held) > 1  # gradient summed over the chunks holding a copy
            self.decoder.embed_tokens = emb
        if self.last:
            self.decoder.layer_norm = full.decoder.layer_norm
            # The CTC head (replicated over TP: it reads the full-width encoder output every TP rank holds) sits on
            # the last stage, where the encoder output arrives with the decoder states anyway.
            if getattr(full, "ctc_head", None) is not None:
                self.ctc_head = full.ctc_head
            if not cfg.tie_embeddings:
                self.lm_head = VocabParallelLMHead(cfg.vocab_size, self.padded_vocab, cfg.d_model, groups.tp)
                self.lm_head.load_dense_(full.lm_head.weight)
        self.selectors = nn.ModuleDict()
        for name, selector in full.selectors.items():
            layers = self.enc_range if SELECTOR_TYPES[name] == "encoder" else self.dec_range
            if len(layers):
                self.selectors[name] = _slice_selector(selector, layers)
        self.label_smoothing = 0.0
        self.train(full.training)

    # ------------------------------------------------------------------------------------------ megatron hooks
    def set_input_tensor(self, tensor) -> None:
        """Called by megatron's schedules with the received p2p tensor (a one-element list; None on chunk 0)."""
        self.input_tensor = tensor[0] if isinstance(tensor, (list, tuple)) else tensor

    def set_selection_temperature(self, tau: float) -> None:
        for selector in self.selectors.values():
            selector.set_temperature(tau)

    # ------------------------------------------------------------------------------------------ forward
    def _choices(self, name: str):
        return self.selectors[name]() if name in self.selectors else None

    def _segments(self, task_B: Tensor, names: tuple[str, ...]) -> TaskSegments | None:
        return TaskSegments(task_B) if any(n in self.selectors for n in names) else None

    def _embed_source(self, batch, mask_BS: Tensor) -> Tensor:
        """Encoder input x_BSD: subsampled speech or scaled tokens, plus positions, then dropout."""
        cfg = self.model_config
        if cfg.arch == "s2t":
            x_BSD = self.encoder.conv(batch.features) * self.embed_scale
        else:
            x_BSD = self.decoder.embed_tokens(batch.source_tokens) * self.embed_scale
        x_BSD = x_BSD + self.encoder.embed_positions(~mask_BS).to(x_BSD.dtype)
        return F.dropout(x_BSD, p=cfg.dropout, training=self.training)

    def _embed_target(self, decoder_input_BL: Tensor) -> Tensor:
        cfg = self.model_config
        y_BLD = self.decoder.embed_tokens(decoder_input_BL) * self.embed_scale
        y_BLD = y_BLD + self.decoder.embed_positions(decoder_input_BL.ne(cfg.pad_token_id)).to(y_BLD.dtype)
        return F.dropout(y_BLD, p=cfg.dropout, training=self.training)

    def forward(self, batch):
        """Non-last chunk: the p2p tensor (x_BSD, memory_BSD or cat([memory_BSD, y_BLD], 1)).
        Last chunk: {"loss_sum": smoothed CE sum (scalar, differentiable), "nll_BL" (per token), "tokens"}."""
        cfg = self.model_config
        mask_BS = source_padding_mask(cfg, batch)
        S, L = mask_BS.shape[1], batch.decoder_input.shape[1]
        x = self.input_tensor
        if x is not None and self.p2p_shape is not None:  # fixed-shape p2p: drop the padding
            B, n = batch.decoder_input.shape[0], S if len(self.enc_range) or self.starts_decoder else S + L
            x = x[:B, :n]
        out = self._forward(batch, x, mask_BS, S, L)
        if self.p2p_shape is not None and not isinstance(out, dict):
            B, N = self.p2p_shape
            out = F.pad(out, (0, 0, 0, N - out.shape[1], 0, B - out.shape[0]))
        return out

    def _forward(self, batch, x, mask_BS, S, L):
        attn_mask_BS = mask_BS if bool(mask_BS.any()) else None  # an all-False mask costs a masked kernel
        memory, y = None, None
        if self.first:
            x = self._embed_source(batch, mask_BS)
        elif len(self.enc_range) == 0 and not self.starts_decoder:
            memory, y = x[:, :S], x[:, S:]
        elif len(self.enc_range) == 0:
            memory = x
        if len(self.enc_range):
            choices, segments = self._choices("encoder_self"), self._segments(batch.src_task, ("encoder_self",))
            for j, i in enumerate(self.enc_range):
                x = self.encoder.layers[str(i)](x, attn_mask_BS, None if choices is None else choices[j], segments)
            if not self.ends_encoder:
                return x
            memory = self.encoder.layer_norm(x)
            if not len(self.dec_range):
                return memory
        if self.starts_decoder:
            y = self._embed_target(batch.decoder_input)
        self_choices, cross_choices = self._choices("decoder_self"), self._choices("cross")
        segments = self._segments(batch.tgt_task, ("decoder_self", "cross"))
        for j, i in enumerate(self.dec_range):
            y = self.decoder.layers[str(i)](
                y,
                memory,
                attn_mask_BS,
                None if self_choices is None else self_choices[j],
                None if cross_choices is None else cross_choices[j],
                segments,
            )
        if not self.last:
            return torch.cat([memory, y], dim=1)
        assert y.shape[1] == L
        out = self.loss(self.decoder.layer_norm(y), batch.target)
        if getattr(self, "ctc_head", None) is not None:
            ctc_sum = ctc_loss_sum(self.ctc_head(memory), (~mask_BS).sum(1), batch.target, batch.target_lengths,
                                   blank=self.model_config.pad_token_id)
            out["loss_sum"] = hybrid_loss(out["loss_sum"], ctc_sum, self.model_config.ctc_weight)
            out["ctc_sum"] = ctc_sum.detach()
        return out

    def loss(self, h_BLD: Tensor, target_BL: Tensor) -> dict:
        """Vocab-parallel label-smoothed CE sums over the non-pad targets of this micro-batch."""
        cfg, head = self.model_config, getattr(self, "lm_head", None) or self.decoder.embed_tokens
        logits_BLV = local_logits(h_BLD, head.weight, self.groups.tp)
        loss_sum, nll_N, tokens = vocab_parallel_label_smoothed_ce(
            logits_BLV.flatten(0, 1),
            target_BL.flatten(),
            vocab_start=head.vocab_start,
            vocab_size=cfg.vocab_size,
            pad_id=cfg.pad_token_id,
            label_smoothing=self.label_smoothing,
            tp_group=self.groups.tp,
        )
        return {"loss_sum": loss_sum, "nll_BL": nll_N.view_as(target_BL), "tokens": tokens}


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint metadata


def global_state_dict_layout(chunk: nn.Module) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """{state-dict key: (global shape, this rank's offsets)} for every tensor of a chunk (or a DDP-wrapped one).

    TP-sharded tensors: the global shape multiplies `partition_dim` by t and the offset is tp_rank * local size
    (the vocabulary dim is the *padded* Vp; rows >= model_config.vocab_size are padding). Selector logits
    [K, layers, P/t]: the layer dim's global size is the attention type's layer count and its offset the
    parameter's `layer_offset`. Layer indices in keys are already global. Everything else is replicated.
    """
    chunk = getattr(chunk, "module", chunk)
    params = dict(chunk.named_parameters())
    tp_rank, tp_size = chunk.groups.tp_rank, chunk.groups.tp_size
    cfg = chunk.model_config
    layers_of = {"encoder_self": cfg.encoder_layers, "decoder_self": cfg.decoder_layers, "cross": cfg.decoder_layers}
    layout = {}
    for name, tensor in chunk.state_dict().items():
        if not isinstance(tensor, Tensor):  # megatron linears' `_extra_state` (None): nothing to reshard
            continue
        shape, offsets = list(tensor.shape), [0] * tensor.dim()
        p = params.get(name)
        if p is not None and getattr(p, "tensor_model_parallel", False):
            dim = p.partition_dim
            offsets[dim], shape[dim] = tp_rank * shape[dim], shape[dim] * tp_size
        if p is not None and hasattr(p, "layer_offset"):
            offsets[1], shape[1] = p.layer_offset, layers_of[name.split(".")[1]]
        layout[name] = (tuple(shape), tuple(offsets))
    return layout
