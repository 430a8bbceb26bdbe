"""Configuration of the decoder-only LM (the ``model:`` section of an LM run's YAML, ``arch: lm``).

A Llama-style decoder: RMSNorm, rotary positions (Llama's default RoPE), SwiGLU, grouped-query attention. Field
names follow transformers' ``LlamaConfig`` where one exists so that ``hs_scale.models.lm.hf`` maps them 1:1
(``num_layers`` <-> num_hidden_layers, ``num_heads`` <-> num_attention_heads, ``num_kv_heads`` <->
num_key_value_heads, ``tie_embeddings`` <-> tie_word_embeddings). Head selection is configured by the shared
``SelectionConfig`` (its ``pool_heads`` is P = H * r, r candidates per query-head slot).
"""

from __future__ import annotations

from dataclasses import dataclass

from hs_scale.selection.backends import BACKENDS as ATTENTION_BACKENDS


@dataclass
class LMConfig:
    arch: str = "lm"
    """Always "lm" (lets one YAML ``model:`` section name its family)."""

    vocab_size: int = 8000
    """Vocabulary size V (embedding rows and LM-head rows)."""

    hidden_size: int = 256
    """Model width D."""

    intermediate_size: int = 688
    """SwiGLU hidden width (gate_proj / up_proj rows)."""

    num_layers: int = 4
    """Decoder layers."""

    num_heads: int = 4
    """H, query-head slots per layer (each slot picks one of r candidates when selection is on)."""

    num_kv_heads: int = 2
    """KV heads (grouped-query attention); must divide num_heads. Equal to num_heads: plain multi-head. Under
    tensor parallelism parallel.tensor_parallel must divide it (a TP rank owns whole KV heads)."""

    head_dim: int | None = None
    """Width d of every head; None means hidden_size // num_heads (Mistral-family checkpoints may set it)."""

    rms_norm_eps: float = 1e-6
    """Epsilon of every RMSNorm."""

    rope_theta: float = 10000.0
    """RoPE base (Llama 2: 1e4, Llama 3: 5e5)."""

    rope_scaling: dict | None = None
    """None: Llama's default RoPE. Llama 3.x scaling: {"rope_type": "llama3", "factor": 8.0, "low_freq_factor":
    1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192} (the only scaling implemented)."""

    max_position_embeddings: int = 2048
    """Longest position id the model is meant for (exported to HF; positions beyond it still compute)."""

    tie_embeddings: bool = False
    """Use the embedding matrix as the LM head (no lm_head parameter)."""

    attention_bias: bool = False
    """Biases on q_proj / k_proj / v_proj (Qwen2 has them; Llama's default has none)."""

    output_bias: bool = False
    """Bias on o_proj (Llama's attention_bias=True puts one there too; Qwen2 does not)."""

    sliding_window: int | None = None
    """Mistral-style sliding-window attention is not implemented: a model with a window refuses sequences longer
    than it (where the window would change the result) instead of silently attending further."""

    init_std: float = 0.02
    """Std of the normal init of every linear and embedding weight (HF's initializer_range)."""

    attention_backend: str = "sdpa"
    """Kernel: "sdpa" (CPU or GPU), "eager" (reference), "flash" / "torch_varlen" (packed varlen on CUDA in
    bf16/fp16, cu_seqlens from document boundaries) or "auto"; see hs_scale.selection.backends."""

    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None
    """Special ids: written into an exported HF config; generation stops at eos_token_id."""

    def __post_init__(self) -> None:
        if self.arch != "lm":
            raise ValueError(f"model.arch={self.arch!r}: LMConfig describes arch 'lm' only")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name}={getattr(self, name)} must be >= 1")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model.num_kv_heads={self.num_kv_heads} must divide model.num_heads={self.num_heads} "
                f"(each KV head serves num_heads / num_kv_heads query heads)"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads={self.num_heads}; "
                    f"set model.head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_heads
        if self.head_dim % 2:
            raise ValueError(f"model.head_dim={self.head_dim} must be even (RoPE rotates pairs of dimensions)")
        if self.rope_scaling is not None:
            keys = {"rope_type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
            if self.rope_scaling.get("rope_type") != "llama3" or set(self.rope_scaling) != keys:
                raise ValueError(
                    f"model.rope_scaling={self.rope_scaling!r}: only Llama 3's scaling is implemented, given as "
                    f"exactly the keys {sorted(keys)} with rope_type 'llama3' (or null for the default RoPE)"
                )
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"model.attention_backend={self.attention_backend!r} is unknown; use one of {ATTENTION_BACKENDS}"
            )
        if self.init_std <= 0:
            raise ValueError(f"model.init_std={self.init_std} must be > 0")

    @property
    def group_size(self) -> int:
        """Query heads per KV head (n_rep in transformers)."""
        return self.num_heads // self.num_kv_heads
