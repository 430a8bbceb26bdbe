"""Pre-LN Transformer encoder and decoder stacks over selected-head attention (HF Speech2Text / M2M100 layout).

Legend: B batch, S source length, L target length, D model width, F FFN width.

Both architectures share these stacks; they differ only in how the inputs are embedded. Parameter names and the
places of dropout, layer norms and residuals are HF's (``Speech2TextEncoderLayer`` / ``Speech2TextDecoderLayer``),
so a dense model maps onto HF by renaming only (see ``hf_names.py``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from hs_scale.models.config import ModelConfig
from hs_scale.models.positions import SinusoidalPositions
from hs_scale.selection.attention import SelectedHeadAttention, TaskSegments
from hs_scale.selection.selector import HeadChoice

# Per attention type: a HeadChoice per layer, or None where that type is dense.
LayerChoices = list[HeadChoice] | None
# Task of each batch row, grouped once per forward by the model (None: dense, or a single-task model).
Tasks = TaskSegments | None


def _choice(choices: LayerChoices, layer: int) -> HeadChoice | None:
    return None if choices is None else choices[layer]


def _clamp_fp16(x: Tensor) -> Tensor:
    # Same guard as HF's encoder layer: fp16 residual streams can overflow to inf in long inputs.
    if x.dtype == torch.float16:
        limit = torch.finfo(x.dtype).max - 1000
        x = torch.clamp(x, min=-limit, max=limit)
    return x


def _attention(cfg: ModelConfig, pool_heads: int | None) -> SelectedHeadAttention:
    """One attention sublayer: H = num_heads active heads from a pool of `pool_heads` (None: dense)."""
    return SelectedHeadAttention(
        cfg.d_model, cfg.num_heads, pool_heads=pool_heads, dropout=cfg.attention_dropout, backend=cfg.attention_backend
    )


class _FFNMixin:
    """fc2(dropout(relu(fc1(x)))): the FFN sublayer body, with HF's parameter names fc1 / fc2 on the layer."""

    def _init_ffn(self, cfg: ModelConfig) -> None:
        self.fc1 = nn.Linear(cfg.d_model, cfg.ffn_dim)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.d_model)
        self.activation_dropout = cfg.activation_dropout

    def _ffn(self, x_BLD: Tensor) -> Tensor:
        h_BLF = F.dropout(F.relu(self.fc1(x_BLD)), p=self.activation_dropout, training=self.training)
        return self.fc2(h_BLF)


class EncoderLayer(_FFNMixin, nn.Module):
    """x + drop(SelfAttn(LN(x))), then x + drop(FFN(LN(x))).

    ``pool_heads`` None: plain dense H-head attention (selection off for encoder self-attention).
    """

    def __init__(self, cfg: ModelConfig, pool_heads: int | None):
        super().__init__()
        d = cfg.d_model
        self.self_attn = _attention(cfg, pool_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self._init_ffn(cfg)
        self.final_layer_norm = nn.LayerNorm(d)
        self.dropout = cfg.dropout

    def forward(self, x_BSD: Tensor, padding_mask_BS: Tensor | None, choice: HeadChoice | None, tasks: Tasks) -> Tensor:
        h_BSD = self.self_attn(
            self.self_attn_layer_norm(x_BSD), choice=choice, task_B=tasks, key_padding_mask_BS=padding_mask_BS
        )
        x_BSD = x_BSD + F.dropout(h_BSD, p=self.dropout, training=self.training)
        h_BSD = self._ffn(self.final_layer_norm(x_BSD))
        x_BSD = x_BSD + F.dropout(h_BSD, p=self.dropout, training=self.training)
        return _clamp_fp16(x_BSD)


class DecoderLayer(_FFNMixin, nn.Module):
    """Causal self-attention, encoder-decoder attention, FFN; each pre-LN with a dropped-out residual branch."""

    def __init__(self, cfg: ModelConfig, self_pool_heads: int | None, cross_pool_heads: int | None):
        super().__init__()
        d = cfg.d_model
        self.self_attn = _attention(cfg, self_pool_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.encoder_attn = _attention(cfg, cross_pool_heads)
        self.encoder_attn_layer_norm = nn.LayerNorm(d)
        self._init_ffn(cfg)
        self.final_layer_norm = nn.LayerNorm(d)
        self.dropout = cfg.dropout

    def forward(
        self,
        x_BLD: Tensor,
        memory_BSD: Tensor,
        memory_padding_mask_BS: Tensor | None,
        self_choice: HeadChoice | None,
        cross_choice: HeadChoice | None,
        tasks: Tasks,
        self_cache: dict | None = None,
        cross_cache: dict | None = None,
    ) -> Tensor:
        # NOTE: decoder self-attention is causal only, without a key padding mask, exactly like HF and fairseq:
        # targets are right-padded, so a real query never reaches a pad key, and pad rows are ignored by the loss.
        h_BLD = self.self_attn(
            self.self_attn_layer_norm(x_BLD), choice=self_choice, task_B=tasks, causal=True, cache=self_cache
        )
        x_BLD = x_BLD + F.dropout(h_BLD, p=self.dropout, training=self.training)
        h_BLD = self.encoder_attn(
            self.encoder_attn_layer_norm(x_BLD),
            choice=cross_choice,
            task_B=tasks,
            memory_BSD=memory_BSD,
            key_padding_mask_BS=memory_padding_mask_BS,
            cache=cross_cache,
        )
        x_BLD = x_BLD + F.dropout(h_BLD, p=self.dropout, training=self.training)
        h_BLD = self._ffn(self.final_layer_norm(x_BLD))
        return x_BLD + F.dropout(h_BLD, p=self.dropout, training=self.training)


class LayerDict(nn.ModuleDict):
    """Layers keyed by their GLOBAL index (state-dict keys `decoder.layers.3...`): a pipeline stage's share of a
    stack. Iterates over the layers, like the nn.ModuleList it replaces.

    NOTE: iteration yields modules, not keys, because the stacks' forward and megatron's schedules
    (`for layer in model.decoder.layers`) expect a ModuleList-like container.
    """

    def __iter__(self):
        return iter(self.values())


def _maybe_checkpointed(stack: nn.Module, layer: nn.Module):
    """`layer`, or `layer` under activation checkpointing when the stack asks for it in training.

    Non-reentrant checkpointing recomputes the layer in backward with the same dropout RNG state; the head choice
    is an input, so the recomputation uses the same selected heads and the gradient still reaches phi.
    """
    if not (stack.checkpoint_activations and stack.training and torch.is_grad_enabled()):
        return layer
    return functools.partial(torch.utils.checkpoint.checkpoint, layer, use_reentrant=False)


class Encoder(nn.Module):
    """Positions + dropout + encoder layers + final LayerNorm, on already embedded (and scaled) inputs.

    A pipeline stage holds only some of these (hs_scale.parallel.pipeline sets the others to None, torchtitan
    style): without `embed_positions` the input is a previous stage's hidden state, without `layer_norm` the
    output is the last held layer's. `layers` may then be a `LayerDict` keyed by global layer index.
    """

    def __init__(self, cfg: ModelConfig, pool_heads: int | None):
        super().__init__()
        self.embed_positions = SinusoidalPositions(cfg.max_source_positions, cfg.d_model, cfg.pad_token_id)
        self.layers = nn.ModuleList(EncoderLayer(cfg, pool_heads) for _ in range(cfg.encoder_layers))
        self.layer_norm = nn.LayerNorm(cfg.d_model)
        self.dropout = cfg.dropout
        self.checkpoint_activations = False  # set by hs_scale.training (train.activation_checkpointing)

    def forward(self, x_BSD: Tensor, padding_mask_BS: Tensor, choices: LayerChoices, tasks: Tasks) -> Tensor:
        """padding_mask_BS: bool, True = padded position (no position embedding, never attended to).
        choices: one per *held* layer, in order."""
        if self.embed_positions is not None:
            x_BSD = x_BSD + self.embed_positions(~padding_mask_BS).to(x_BSD.dtype)
            x_BSD = F.dropout(x_BSD, p=self.dropout, training=self.training)
        # An all-False mask costs a masked kernel for nothing: drop it.
        mask_BS = padding_mask_BS if bool(padding_mask_BS.any()) else None
        for i, layer in enumerate(self.layers):
            x_BSD = _maybe_checkpointed(self, layer)(x_BSD, mask_BS, _choice(choices, i), tasks)
        return x_BSD if self.layer_norm is None else self.layer_norm(x_BSD)


@dataclass
class DecoderCache:
    """State of one incremental decoding run (one generation). Create with ``model.new_cache()``.

    self_attn / cross_attn: one dict per decoder layer, owned by that layer's attention module (self-attention
        appends the new keys/values of the H selected heads; cross-attention computes memory keys/values once).
    choices: the decoder's head selection, drawn on the first ``decode`` call and reused for every later step,
        so a generation never re-samples heads between steps.
    length: target tokens decoded so far (the position offset of the next call).
    """

    self_attn: list[dict]
    cross_attn: list[dict]
    choices: dict[str, LayerChoices] | None = None
    length: int = 0

    @classmethod
    def empty(cls, num_layers: int) -> DecoderCache:
        return cls(self_attn=[{} for _ in range(num_layers)], cross_attn=[{} for _ in range(num_layers)])

    def reorder(self, index_B: Tensor) -> None:
        """Keep batch rows ``index_B`` of every cached tensor (beam search). Cached tensors are batch-first.

        The caller reorders what it passes to ``decode`` the same way (memory, its padding mask, tgt_task_B);
        the head choice is per task, not per row, so it needs no reordering.
        """
        for per_layer in (self.self_attn, self.cross_attn):
            for cache in per_layer:
                for key, value in cache.items():
                    if isinstance(value, Tensor):
                        cache[key] = value.index_select(0, index_B.to(value.device))


class Decoder(nn.Module):
    """Token embedding (scaled) + positions + decoder layers + final LayerNorm; returns hidden states.

    The token embedding table is passed in: the text model shares one table with its encoder. As in `Encoder`,
    a pipeline stage may hold only some modules: without `embed_positions` the stage does not embed (it continues
    from `hidden_BLD`), without `layer_norm` it returns the last held layer's states.
    """

    def __init__(
        self, cfg: ModelConfig, embed_tokens: nn.Embedding, self_pool_heads: int | None, cross_pool_heads: int | None
    ):
        super().__init__()
        self.embed_tokens = embed_tokens
        self.embed_scale = cfg.d_model**0.5 if cfg.scale_embedding else 1.0
        self.pad_token_id = cfg.pad_token_id
        self.embed_positions = SinusoidalPositions(cfg.max_target_positions, cfg.d_model, cfg.pad_token_id)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, self_pool_heads, cross_pool_heads) for _ in range(cfg.decoder_layers)
        )
        self.layer_norm = nn.LayerNorm(cfg.d_model)
        self.dropout = cfg.dropout
        self.checkpoint_activations = False  # set by hs_scale.training (train.activation_checkpointing)

    def forward(
        self,
        decoder_input_BL: Tensor,
        memory_BSD: Tensor,
        memory_padding_mask_BS: Tensor | None,
        self_choices: LayerChoices,
        cross_choices: LayerChoices,
        tasks: Tasks,
        cache: DecoderCache | None = None,
        hidden_BLD: Tensor | None = None,
    ) -> Tensor:
        """Hidden states h_BLD. With ``cache``, ``decoder_input_BL`` holds only the new tokens.
        hidden_BLD: a previous pipeline stage's states (only on a stage that does not embed)."""
        if self.embed_positions is None:
            x_BLD = hidden_BLD
        else:
            past = 0 if cache is None else cache.length
            x_BLD = self.embed_tokens(decoder_input_BL) * self.embed_scale
            # Pad tokens in the target get the zero position, as in HF (positions are computed from the token ids).
            x_BLD = x_BLD + self.embed_positions(decoder_input_BL.ne(self.pad_token_id), past).to(x_BLD.dtype)
            x_BLD = F.dropout(x_BLD, p=self.dropout, training=self.training)
        if memory_padding_mask_BS is not None and not bool(memory_padding_mask_BS.any()):
            memory_padding_mask_BS = None
        for i, layer in enumerate(self.layers):
            run = layer if cache is not None else _maybe_checkpointed(self, layer)
            x_BLD = run(
                x_BLD,
                memory_BSD,
                memory_padding_mask_BS,
                _choice(self_choices, i),
                _choice(cross_choices, i),
                tasks,
                self_cache=None if cache is None else cache.self_attn[i],
                cross_cache=None if cache is None else cache.cross_attn[i],
            )
        if cache is not None:
            cache.length += decoder_input_BL.shape[1]
        return x_BLD if self.layer_norm is None else self.layer_norm(x_BLD)
