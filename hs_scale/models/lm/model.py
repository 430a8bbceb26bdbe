"""Llama-style decoder-only LM with per-task (per-document) query-head selection over grouped-query attention.

Legend: B batch, L new tokens, S all keys (cached + new), D model width, V vocabulary, K tasks, H query-head
slots, P = H * r candidate query heads per layer.

    model = LMModel(LMConfig(...), SelectionConfig(pool_heads=2 * H, ...), num_tasks=K)
    logits_BLV = model(input_ids_BL, task_BL=None, position_ids_BL=None, doc_ids_BL=None, cache=None)

* ``task_BL``: long task id (language) of every token [B, L], or one per row [B]; may be None for a dense model
  or a single-task model. A packed row may mix documents of several tasks: each token uses its task's heads.
* ``doc_ids_BL``: document id of every token. A document is a maximal run of equal ids in a row; attention is
  causal and within-document. None: one document per row (or, with a cache, the row's last document continues).
* ``position_ids_BL``: RoPE positions; None: positions inside each document (0 at every document start,
  continuing across cached calls), which is what packing wants.
* ``cache``: an ``LMCache`` (``model.new_cache()``) for incremental decoding: pass the prompt, then the new
  tokens only; keys/values are the dense GQA model's, and the head selection is drawn once per cache.

With selection off (or pool == H) the parameters and their names are those of transformers' LlamaForCausalLM minus
its ``model.`` prefix (``hs_scale.models.lm.hf`` converts both ways); the selector adds ``selector.logits``
[K, layers, P]. Attention and the selection are in ``hs_scale.selection.gqa``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from hs_scale.models.lm.config import LMConfig
from hs_scale.selection.attention import TaskSegments
from hs_scale.selection.backends import resolve_backend
from hs_scale.selection.config import SelectionConfig
from hs_scale.selection.gqa import DocumentLayout, GQASelectedAttention, positions_in_documents
from hs_scale.selection.selector import HeadChoice, HeadSelector


class RMSNorm(nn.Module):
    """Llama's RMSNorm. Hand-written rather than nn.RMSNorm because HF normalises in fp32 and casts back before
    the weight, which bf16 parity with transformers needs."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None, device=None) -> Tensor:
    """Inverse frequencies [d/2] of Llama's RoPE, with Llama 3's scaling when ``scaling`` is given (as
    transformers' _compute_llama3_parameters: wavelengths longer than the original context divided by ``factor``,
    shorter than original/high_freq_factor kept, a linear blend in between)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    if scaling is None:
        return inv_freq
    factor, old_len = scaling["factor"], scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


def rope_tables(
    position_ids_BL: Tensor, head_dim: int, theta: float, dtype: torch.dtype, scaling: dict | None = None
) -> tuple[Tensor, Tensor]:
    """cos, sin [B, L, d] of Llama's RoPE, computed in fp32 (as transformers does) and cast to dtype.

    The inverse frequencies are recomputed each forward (d/2 values) rather than kept in a buffer, so that
    ``model.to(bfloat16)`` cannot round them.
    """
    inv_freq = rope_inv_freq(head_dim, theta, scaling, position_ids_BL.device)
    freqs_BLh = position_ids_BL[..., None].float() * inv_freq
    emb_BLd = torch.cat((freqs_BLh, freqs_BLh), dim=-1)
    return emb_BLd.cos().to(dtype), emb_BLd.sin().to(dtype)


class SwiGLU(nn.Module):
    """down_proj(silu(gate_proj(x)) * up_proj(x)), LlamaMLP's names."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LMDecoderLayer(nn.Module):
    """x + attn(input_layernorm(x)), then x + mlp(post_attention_layernorm(x)) (LlamaDecoderLayer)."""

    def __init__(self, cfg: LMConfig, candidates: int):
        super().__init__()
        self.self_attn = GQASelectedAttention(
            cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, candidates,
            qkv_bias=cfg.attention_bias, o_bias=cfg.output_bias,
        )
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x_BLD, cos_BLd, sin_BLd, layout, choice, tokens, cache) -> Tensor:
        x_BLD = x_BLD + self.self_attn(self.input_layernorm(x_BLD), cos_BLd, sin_BLd, layout, choice, tokens, cache)
        return x_BLD + self.mlp(self.post_attention_layernorm(x_BLD))


@dataclass
class LMCache:
    """State of one incremental decoding run: per-layer k/v [B, G, S, d], the doc ids of the S cached tokens,
    and the head selection drawn on the first call (reused by every later step)."""

    layers: list[dict]
    doc_ids_BS: Tensor | None = None
    choices: list[HeadChoice] | None = field(default=None)

    @property
    def length(self) -> int:
        return 0 if self.doc_ids_BS is None else self.doc_ids_BS.shape[1]


class LMModel(nn.Module):
    """Decoder-only LM (module docstring). ``selection`` None or disabled: a dense Llama-layout model."""

    def __init__(self, cfg: LMConfig, selection: SelectionConfig | None = None, num_tasks: int = 1):
        super().__init__()
        selection = selection if selection is not None else SelectionConfig(enabled=False)
        if num_tasks < 1:
            raise ValueError(f"num_tasks={num_tasks} must be >= 1 (the size of the task vocabulary)")
        self.config, self.selection_config, self.num_tasks = cfg, selection, num_tasks
        selected = selection.enabled and selection.decoder_self
        if selected and selection.pool_heads % cfg.num_heads:
            raise ValueError(
                f"selection.pool_heads={selection.pool_heads} is not a multiple of model.num_heads={cfg.num_heads}: "
                f"an LM's pool is r candidates per query-head slot (all reading the slot's KV head); "
                f"use pool_heads={2 * cfg.num_heads} for r = 2"
            )
        self.candidates = selection.pool_heads // cfg.num_heads if selected else 1
        self.selector = None
        if selected:
            # partitions = KV heads: subset picks H/G heads among each KV head's candidates (gqa.py docstring);
            # for the group strategy the partitions change nothing.
            self.selector = HeadSelector(
                num_tasks, cfg.num_layers, selection.pool_heads, cfg.num_heads,
                strategy=selection.strategy, temperature=selection.temperature, seed=selection.seed,
                init_range=(selection.init_low, selection.init_high), partitions=cfg.num_kv_heads,
                noise_scale=selection.noise_scale,
            )
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LMDecoderLayer(cfg, self.candidates) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.checkpoint_activations = False
        """Recompute each layer in backward (training without a cache); set by the trainer."""
        self.apply(self._init_weights)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """HF's Llama init: normal(0, init_std) weights, zero biases; RMSNorm weights stay 1, selector its own."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, self.config.init_std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()

    # ------------------------------------------------------------------------------------------------ selection
    @property
    def pool_heads(self) -> int:
        return self.config.num_heads * self.candidates

    def enable_activation_checkpointing(self) -> None:
        """Recompute each decoder layer in backward instead of keeping its activations."""
        self.checkpoint_activations = True

    @property
    def selectors(self) -> dict[str, HeadSelector]:
        """{site name: selector}, as the encoder-decoders have: {"decoder_self": ...}, or {} for a dense model
        (what the step engine gathers the selection table from)."""
        return {} if self.selector is None else {"decoder_self": self.selector}

    def head_selection_table(self) -> list[list[list[int]]] | None:
        """Deterministic selection: table[task][layer] = pool candidates in slot order (None: dense model)."""
        return None if self.selector is None else self.selector.table()

    def selection_kl(self, task_ids: Tensor | None = None) -> Tensor:
        """KL(q(z) || Bernoulli(H/P)) of the selector, unweighted; zero for a dense model."""
        if self.selector is None:
            return torch.zeros((), device=next(self.parameters()).device)
        return self.selector.kl(task_ids)

    def set_selection_temperature(self, tau: float) -> None:
        if self.selector is not None:
            self.selector.set_temperature(tau)

    def new_cache(self) -> LMCache:
        return LMCache(layers=[{} for _ in self.layers])

    def _tokens(self, task_BL: Tensor | None, B: int, L: int) -> TaskSegments | None:
        """Tokens grouped by task, once per forward (None: no selection, or every token is task 0)."""
        if self.selector is None:
            return None
        if task_BL is None:
            if self.num_tasks == 1:
                return None
            raise ValueError("task_BL is required: this LM selects heads per task (long tensor [B, L] or [B])")
        if task_BL.dim() == 1:
            task_BL = task_BL[:, None].expand(B, L)
        if task_BL.shape != (B, L):
            raise ValueError(f"task_BL has shape {tuple(task_BL.shape)}; expected [B, L] = [{B}, {L}] or [B]")
        tokens = TaskSegments(task_BL.reshape(-1))
        if min(tokens.tasks) < 0 or max(tokens.tasks) >= self.num_tasks:
            raise ValueError(f"task ids {tokens.tasks} out of range: the model has num_tasks={self.num_tasks}")
        return tokens

    # ------------------------------------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids_BL: Tensor,
        task_BL: Tensor | None = None,
        position_ids_BL: Tensor | None = None,
        doc_ids_BL: Tensor | None = None,
        cache: LMCache | None = None,
    ) -> Tensor:
        """logits_BLV of the next token after each input token (module docstring for the arguments)."""
        return self.logits(self.hidden_states(input_ids_BL, task_BL, position_ids_BL, doc_ids_BL, cache))

    def hidden_states(self, input_ids_BL, task_BL=None, position_ids_BL=None, doc_ids_BL=None, cache=None,
                      hidden_BLD: Tensor | None = None) -> Tensor:
        """Final normed hidden states [B, L, D] (``forward`` without the LM head).

        Pipeline stages (hs_scale/parallel/lm_pipeline.py) are this model with the modules a stage does not own
        set to None: ``hidden_BLD`` given means "continue from a previous stage's states" instead of embedding
        ``input_ids_BL`` (still needed for the shapes), ``layers`` may hold only some global layers (a LayerDict;
        the selector then holds the same layers), and no ``norm`` returns the last held layer's states. Tasks,
        documents and positions are recomputed from the batch on every stage: only hidden states travel.
        """
        cfg = self.config
        B, L = input_ids_BL.shape
        device = input_ids_BL.device
        past_docs_BS = None if cache is None else cache.doc_ids_BS
        if doc_ids_BL is None:
            doc_ids_BL = (torch.zeros_like(input_ids_BL) if past_docs_BS is None
                          else past_docs_BS[:, -1:].expand(B, L))
        docs_BS = doc_ids_BL if past_docs_BS is None else torch.cat([past_docs_BS, doc_ids_BL], dim=1)
        if position_ids_BL is None:
            position_ids_BL = positions_in_documents(docs_BS)[:, -L:]
        if cfg.sliding_window is not None and int(position_ids_BL.max()) >= cfg.sliding_window:
            raise ValueError(
                f"a document reaches position {int(position_ids_BL.max())} but sliding-window attention "
                f"(model.sliding_window={cfg.sliding_window}) is not implemented; use shorter documents"
            )

        x_BLD = self.embed_tokens(input_ids_BL) if hidden_BLD is None else hidden_BLD
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else x_BLD.dtype
        layout = DocumentLayout.build(docs_BS, L, resolve_backend(cfg.attention_backend, device, dtype))
        cos_BLd, sin_BLd = rope_tables(position_ids_BL, cfg.head_dim, cfg.rope_theta, x_BLD.dtype,
                                       cfg.rope_scaling)
        tokens = self._tokens(task_BL, B, L)  # before the draw: a refused input must not consume one
        choices = None
        if self.selector is not None:
            choices = cache.choices if cache is not None and cache.choices is not None else self.selector()
            if cache is not None:
                cache.choices = choices
        recompute = self.checkpoint_activations and self.training and cache is None and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            args = (x_BLD, cos_BLd, sin_BLd, layout, None if choices is None else choices[i], tokens,
                    None if cache is None else cache.layers[i])
            # Non-reentrant checkpointing: the choice (drawn once above) and the layout are reused as they are.
            x_BLD = torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False) if recompute else layer(*args)
        if cache is not None:
            cache.doc_ids_BS = docs_BS
        return x_BLD if self.norm is None else self.norm(x_BLD)

    def logits(self, h_BLD: Tensor) -> Tensor:
        """logits_BLV; with tied embeddings the embedding matrix is the LM head."""
        return F.linear(h_BLD, self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight)
