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

One forward: a chunk is the single-device model with the modules it does not own removed (torchtitan's
pipeline split), and it runs that model's own `forward_stack`; this file only decides what a chunk owns, packs
the hidden states into the p2p tensor and computes the last chunk's vocab-parallel loss.

Head selection: each chunk owns the rows of phi for its layers (`selector.part(layers)`, which keeps the global
`first_layer`), so its Gumbel draws are those of a single process (noise is a pure function of (seed, draw,
global layer)).

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
from hs_scale.models.layers import LayerDict
from hs_scale.models.seq2seq import Hidden
from hs_scale.parallel.layout import ParallelGroups, padded_vocab_size
from hs_scale.parallel.vocab import (
    VocabParallelLMHead,
    local_logits,
    vocab_parallel_embedding,
    vocab_parallel_label_smoothed_ce,
)
from hs_scale.selection.sites import SITES


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


def source_length(model_cfg, batch) -> int:
    """S, the encoder length of the (padded) batch."""
    if model_cfg.arch == "text":
        return batch.source_tokens.shape[1]
    return model_cfg.subsampled_lengths(batch.features.shape[1])


def _shallow_copy(module: nn.Module) -> nn.Module:
    """The same module object's state with its own child/parameter tables: removing a child from the copy leaves
    the original whole (the interleaved schedule cuts several chunks from one model)."""
    new = copy.copy(module)
    new._modules, new._parameters, new._buffers = dict(module._modules), dict(module._parameters), dict(module._buffers)
    return new


class ModelChunk(nn.Module):
    """What every model family's pipeline chunk shares: megatron's hooks and the stage model's registration.

    A subclass builds `stage` (a shallow copy of the model holding only the chunk's modules) and calls `_adopt`;
    it sets `embedding_chunks` (the chunks holding a copy of the token embedding), `embedding_shape` (this TP
    rank's [Vl, D] shard of it) and defines `token_embedding` and `p2p_extent(batch)` (the (B, N) of the p2p
    tensor a fixed-shape schedule pads to), which hs_scale.parallel.api reads.
    """

    chunk: int
    num_chunks: int
    embedding_chunks: set[int]
    embedding_shape: tuple[int, int]

    def __init__(self, full: nn.Module, chunk: int, num_chunks: int, groups: ParallelGroups, tconfig, vp_stage=None):
        super().__init__()
        from megatron.core.enums import ModelType

        self.model_config, self.config, self.vp_stage = full.config, tconfig, vp_stage
        self.model_type = ModelType.encoder_or_decoder
        self.chunk, self.num_chunks, self.groups = chunk, num_chunks, groups
        self.first, self.last = chunk == 0, chunk == num_chunks - 1
        self.input_tensor: Tensor | None = None
        self.p2p_shape: tuple[int, int] | None = None  # fixed p2p shape, or None for variable lengths
        self.label_smoothing = 0.0

    def _adopt(self, stage: nn.Module, full: nn.Module) -> None:
        # NOTE: the stage model itself is kept out of the module tree (object.__setattr__) and its children are
        # registered here instead: the keys stay `encoder.layers.3...`, not `model.encoder.layers.3...`.
        object.__setattr__(self, "model", stage)
        for name, child in stage.named_children():
            self.add_module(name, child)
        self.train(full.training)

    @property
    def token_embedding(self) -> nn.Module | None:
        raise NotImplementedError

    def p2p_extent(self, batch) -> tuple[int, int]:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ megatron hooks
    def set_input_tensor(self, tensor) -> None:
        """Called by megatron's schedules with the received p2p tensor (a one-element list; None on chunk 0)."""
        self.input_tensor = tensor[0] if isinstance(tensor, (list, tuple)) else tensor

    def set_selection_temperature(self, tau: float) -> None:
        self.model.set_selection_temperature(tau)

    def train(self, mode: bool = True):
        self.model.training = mode  # the model object is not a registered child (see _adopt)
        return super().train(mode)


class PipelineChunk(ModelChunk):
    """One model chunk: forward(batch) -> the p2p tensor, or (last chunk) a dict of loss sums.

    `self.model` is the single-device model (already TP-sharded by `parallelize_tensor`) with the modules this
    chunk does not own set to None and its layer lists cut to a `LayerDict` of the chunk's global layers, and
    every forward runs that model's own `forward_stack`. The chunk registers the model's children under their own
    names, so its state-dict keys are the single-device ones. What it adds is megatron's: `config` (a megatron
    TransformerConfig), `model_type`, `vp_stage`, `set_input_tensor`, the p2p packing and the vocab-parallel loss
    of the last chunk. The hs_scale ModelConfig is `model_config`.
    """

    def __init__(self, full: nn.Module, chunk: int, num_chunks: int, groups: ParallelGroups, tconfig, vp_stage=None):
        super().__init__(full, chunk, num_chunks, groups, tconfig, vp_stage)  # p2p_shape: (B, N)
        cfg = full.config
        self.enc_range, self.dec_range = chunk_layers(cfg.encoder_layers, cfg.decoder_layers, num_chunks, chunk)
        self.starts_decoder = 0 in self.dec_range
        self.embedding_chunks = embedding_chunks(cfg.arch, cfg.tie_embeddings, cfg.encoder_layers,
                                                 cfg.decoder_layers, num_chunks)
        self.embedding_shape = (padded_vocab_size(cfg.vocab_size, groups.tp_size) // groups.tp_size, cfg.d_model)
        self._adopt(self._stage_model(full), full)

    def _stage_model(self, full: nn.Module) -> nn.Module:
        """A shallow copy of `full` holding only this chunk's modules (the others None, torchtitan style)."""
        cfg, groups = full.config, self.groups
        stage, encoder, decoder = _shallow_copy(full), _shallow_copy(full.encoder), _shallow_copy(full.decoder)
        stage.encoder, stage.decoder = encoder, decoder
        encoder.layers = LayerDict({str(i): full.encoder.layers[i] for i in self.enc_range})
        decoder.layers = LayerDict({str(i): full.decoder.layers[i] for i in self.dec_range})
        if not self.first:  # the source embedding: speech subsampler (text: the shared table, below) + positions
            encoder.embed_positions = None
            if hasattr(encoder, "conv"):
                encoder.conv = None
        if cfg.encoder_layers - 1 not in self.enc_range:
            encoder.layer_norm = None
        if not self.starts_decoder:
            decoder.embed_positions = None
        padded = padded_vocab_size(cfg.vocab_size, groups.tp_size)
        held = self.embedding_chunks
        decoder.embed_tokens = None
        if self.chunk in held:
            emb = vocab_parallel_embedding(cfg.vocab_size, padded, cfg.d_model, cfg.pad_token_id, groups.tp)
            emb.load_dense_(full.decoder.embed_tokens.weight)
            emb.weight.shared_embedding = len(held) > 1  # gradient summed over the chunks holding a copy
            decoder.embed_tokens = emb
        stage.lm_head = None
        if not self.last:
            decoder.layer_norm = None
            stage.ctc_head = None  # the CTC head (replicated over TP) sits on the last stage with the memory
        elif not cfg.tie_embeddings:
            stage.lm_head = VocabParallelLMHead(cfg.vocab_size, padded, cfg.d_model, groups.tp)
            stage.lm_head.load_dense_(full.lm_head.weight)
        layers = {"encoder": self.enc_range, "decoder": self.dec_range}
        stage.selectors = nn.ModuleDict(
            {
                name: selector.part(layers[SITES[name].stack])
                for name, selector in full.selectors.items()
                if len(layers[SITES[name].stack])
            }
        )
        return stage

    @property
    def token_embedding(self) -> nn.Module | None:
        return self.model.decoder.embed_tokens

    def p2p_extent(self, batch) -> tuple[int, int]:
        """(B, S + L): the largest p2p tensor of this batch (the decoder's cat([memory, y], 1))."""
        return batch.decoder_input.shape[0], source_length(self.model_config, batch) + batch.decoder_input.shape[1]

    # ------------------------------------------------------------------------------------------ forward
    def _unpack(self, x: Tensor | None, S: int) -> Hidden | None:
        """The received p2p tensor as the model's Hidden: encoder states, the memory, or cat([memory, y], 1)."""
        if x is None:
            return None
        if len(self.enc_range):
            return Hidden(encoder_BSD=x)
        if self.starts_decoder:
            return Hidden(memory_BSD=x)
        return Hidden(memory_BSD=x[:, :S], decoder_BLD=x[:, S:])

    @staticmethod
    def _pack(hidden: Hidden) -> Tensor:
        if hidden.decoder_BLD is not None:
            return torch.cat([hidden.memory_BSD, hidden.decoder_BLD], dim=1)
        return hidden.encoder_BSD if hidden.encoder_BSD is not None else hidden.memory_BSD

    def forward(self, batch):
        """Non-last chunk: the p2p tensor (x_BSD, memory_BSD or cat([memory_BSD, y_BLD], 1)).
        Last chunk: {"loss_sum": smoothed CE sum (scalar, differentiable), "nll_BL" (per token), "tokens"}."""
        S, L = source_length(self.model_config, batch), batch.decoder_input.shape[1]
        x = self.input_tensor
        if x is not None and self.p2p_shape is not None:  # fixed-shape p2p: drop the padding
            B, n = batch.decoder_input.shape[0], S if len(self.enc_range) or self.starts_decoder else S + L
            x = x[:B, :n]
        hidden, mask_BS = self.model.forward_stack(
            self.model.batch_source(batch), batch.decoder_input, batch.src_task, batch.tgt_task, self._unpack(x, S)
        )
        if not self.last:
            out = self._pack(hidden)
            if self.p2p_shape is not None:
                B, N = self.p2p_shape
                out = F.pad(out, (0, 0, 0, N - out.shape[1], 0, B - out.shape[0]))
            return out
        assert hidden.decoder_BLD.shape[1] == L
        out = self.loss(hidden.decoder_BLD, batch.target)
        if self.model.ctc_head is not None:
            ctc_sum = ctc_loss_sum(self.model.ctc_head(hidden.memory_BSD), (~mask_BS).sum(1), batch.target,
                                   batch.target_lengths, blank=self.model_config.pad_token_id)
            out["loss_sum"] = hybrid_loss(out["loss_sum"], ctc_sum, self.model_config.ctc_weight)
            out["ctc_sum"] = ctc_sum.detach()
        return out

    def loss(self, h_BLD: Tensor, target_BL: Tensor) -> dict:
        """Vocab-parallel label-smoothed CE sums over the non-pad targets of this micro-batch."""
        cfg, head = self.model_config, self.model.lm_head or self.model.decoder.embed_tokens
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
    """{state-dict key: (global shape, this rank's offsets)} for every tensor of a chunk (or a DDP-wrapped one;
    encoder-decoder or LM).

    TP-sharded tensors: the global shape multiplies `partition_dim` by t and the offset is tp_rank * local size
    (the vocabulary dim is the *padded* Vp; rows >= model_config.vocab_size are padding). Selector logits
    [K, layers, P/t]: the layer dim's global size is the attention type's layer count and its offset the
    parameter's `layer_offset`. Layer indices in keys are already global. Everything else is replicated.
    """
    chunk = getattr(chunk, "module", chunk)
    params = dict(chunk.named_parameters())
    tp_rank, tp_size = chunk.groups.tp_rank, chunk.groups.tp_size
    cfg = chunk.model_config
    layout = {}
    for name, tensor in chunk.state_dict().items():
        if not isinstance(tensor, Tensor):  # megatron linears' `_extra_state` (None): nothing to reshard
            continue
        shape, offsets = list(tensor.shape), [0] * tensor.dim()
        p = params.get(name)
        if p is not None and getattr(p, "tensor_model_parallel", False):
            dim = p.partition_dim
            offsets[dim], shape[dim] = tp_rank * shape[dim], shape[dim] * tp_size
        if p is not None and hasattr(p, "layer_offset"):  # the LM's one selector ("selector.logits") spans its layers
            layers = cfg.num_layers if cfg.arch == "lm" else SITES[name.split(".")[1]].num_layers(cfg)
            offsets[1], shape[1] = p.layer_offset, layers
        layout[name] = (tuple(shape), tuple(offsets))
    return layout
