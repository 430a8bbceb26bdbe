"""Configuration of the encoder-decoder models (the ``model:`` section of a run's YAML).

One dataclass for both architectures; every field is a plain type so that ``ModelConfig(**yaml["model"])`` works.
The defaults are the paper's ASR/ST S2T Transformer (Gong et al. 2021, section 4: 12+6 layers, d 256, FFN 2048,
H 4, conv subsampler with 1024 channels). ``hs_scale.models.hf_names.hf_config_kwargs`` translates a config into
HF ``Speech2TextConfig`` / ``M2M100Config`` arguments (one ``num_heads`` -> encoder/decoder_attention_heads, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hs_scale.selection.backends import BACKENDS as ATTENTION_BACKENDS

ARCHS = ("s2t", "text")


@dataclass
class ModelConfig:
    arch: str = "s2t"
    """"s2t": speech-to-text Transformer (Conv1d subsampler on filterbanks, HF Speech2Text layout).
    "text": text encoder-decoder with one embedding table for encoder, decoder and LM head (HF M2M100 layout)."""

    d_model: int = 256
    """Model width d. Every attention head has width d / num_heads, whatever the pool size H'."""

    encoder_layers: int = 12
    """Number of encoder layers."""

    decoder_layers: int = 6
    """Number of decoder layers."""

    num_heads: int = 4
    """H, the number of *active* heads per attention layer (the pool size H' is selection.pool_heads)."""

    ffn_dim: int = 2048
    """Hidden width of the ReLU feed-forward block (encoder and decoder)."""

    vocab_size: int = 10000
    """Target vocabulary size (and source vocabulary for arch "text", which shares one table)."""

    dropout: float = 0.1
    """Dropout on embeddings and on every residual branch (paper recipe: 0.3 for ASR/ST, 0.1-0.3 for MT)."""

    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""

    activation_dropout: float = 0.0
    """Dropout after the FFN's ReLU."""

    conv_channels: int = 1024
    """s2t only: output channels of the inner subsampler convolutions (halved by each GLU)."""

    conv_kernel_sizes: list[int] = field(default_factory=lambda: [5, 5])
    """s2t only: one odd kernel size per Conv1d layer; each layer has stride 2, so time shrinks by 2**len."""

    input_feat_per_channel: int = 80
    """s2t only: filterbank features per frame (F of features_BTF)."""

    max_source_positions: int = 6000
    """Initial size of the encoder's sinusoidal table (it grows on demand; nothing is learned)."""

    max_target_positions: int = 1024
    """Initial size of the decoder's sinusoidal table (it grows on demand; nothing is learned)."""

    pad_token_id: int = 1
    """Padding token; its embedding row is zero and it gets no position (fairseq convention: 1)."""

    bos_token_id: int = 0
    """Beginning-of-sentence token (fairseq convention: 0)."""

    eos_token_id: int = 2
    """End-of-sentence token (fairseq convention: 2)."""

    decoder_start_token_id: int = 2
    """First decoder input of every target (fairseq and HF S2T/M2M100 start from </s>)."""

    scale_embedding: bool = True
    """Multiply token (and subsampled speech) embeddings by sqrt(d_model) before adding positions."""

    tie_embeddings: bool = True
    """LM head reuses the decoder's embedding matrix (arch "text": the one table shared with the encoder)."""

    attention_backend: str = "sdpa"
    """Kernel of the H-head attention: "sdpa" (PyTorch, CPU or GPU), "eager" (reference), "flash" (flash-attn),
    "torch_varlen" (PyTorch's variable-length flash kernel, CUDA) or "auto" (the best available, chosen once and
    logged; docs/gpu.md)."""

    init_std: float = 0.02
    """Std of the normal init of linear, conv and embedding weights (HF's init_std)."""

    ctc_weight: float = 0.0
    """s2t only: weight lambda of a CTC loss on the encoder output in the joint objective
    (1 - lambda) * attention + lambda * CTC (hybrid CTC/attention ASR, Watanabe et al. 2017; ESPnet uses 0.3).
    It teaches the encoder monotonic alignments early, which small speech corpora need. 0 = no CTC head.
    The CTC head is a training aid: HF Speech2Text has no place for it, so export drops it."""

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"model.arch={self.arch!r} is unknown; use one of {ARCHS}")
        for name in (
            "d_model",
            "encoder_layers",
            "decoder_layers",
            "num_heads",
            "ffn_dim",
            "vocab_size",
            "max_source_positions",
            "max_target_positions",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"model.{name}={getattr(self, name)} must be >= 1")
        if self.d_model % self.num_heads:
            raise ValueError(
                f"model.d_model={self.d_model} is not divisible by model.num_heads={self.num_heads}; "
                f"head width is d_model / num_heads, so pick num_heads among the divisors of d_model"
            )
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ValueError(f"model.{name}={p} must be in [0, 1)")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
            tok = getattr(self, name)
            if not 0 <= tok < self.vocab_size:
                raise ValueError(
                    f"model.{name}={tok} is outside the vocabulary [0, {self.vocab_size}); "
                    f"raise model.vocab_size or fix the id"
                )
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"model.attention_backend={self.attention_backend!r} is unknown; use one of {ATTENTION_BACKENDS}"
            )
        if self.init_std <= 0:
            raise ValueError(f"model.init_std={self.init_std} must be > 0")
        if not 0.0 <= self.ctc_weight < 1.0:
            raise ValueError(f"model.ctc_weight={self.ctc_weight} must be in [0, 1) (0 = no CTC, ESPnet uses 0.3)")
        if self.ctc_weight > 0 and self.arch != "s2t":
            raise ValueError(f"model.ctc_weight={self.ctc_weight} needs model.arch='s2t' (CTC aligns speech frames "
                             "to tokens); set model.ctc_weight=0 for arch 'text'")
        if self.arch == "s2t":
            self._check_s2t()

    def _check_s2t(self) -> None:
        # YAML gives a list; a tuple from Python code is fine too, but store one type.
        self.conv_kernel_sizes = [int(k) for k in self.conv_kernel_sizes]
        if not self.conv_kernel_sizes:
            raise ValueError(
                "model.conv_kernel_sizes is empty; the s2t subsampler needs at least one conv layer "
                "(the paper and HF use [5, 5])"
            )
        if any(k < 1 or k % 2 == 0 for k in self.conv_kernel_sizes):
            # NOTE: output length (L - 1) // 2 + 1 per layer (HF's formula, used to subsample the padding mask)
            # holds only for odd kernels with padding k // 2; an even kernel adds a frame and desyncs the mask.
            raise ValueError(
                f"model.conv_kernel_sizes={self.conv_kernel_sizes} must all be odd (e.g. [5, 5]); "
                f"the subsampled-length formula assumes padding k // 2 with odd k"
            )
        if len(self.conv_kernel_sizes) > 1 and self.conv_channels % 2:
            raise ValueError(
                f"model.conv_channels={self.conv_channels} must be even: GLU halves it between convolutions"
            )
        if self.input_feat_per_channel < 1:
            raise ValueError(f"model.input_feat_per_channel={self.input_feat_per_channel} must be >= 1")
        if self.pad_token_id != 1:
            # NOTE: HF Speech2Text (and fairseq) derive encoder positions from a 0/1 padding mask with the pad id
            # as padding index, which is only right when pad_token_id == 1; any other id makes an exported model
            # give every speech frame the zero position, so dense export would not be lossless.
            raise ValueError(
                f"model.pad_token_id={self.pad_token_id}: arch 's2t' needs pad_token_id=1 "
                f"(fairseq/HF Speech2Text convention); build the vocabulary with <pad> at id 1"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    def subsampled_lengths(self, frames):
        """Encoder positions of `frames` feature frames (int or long tensor): (T - 1) // 2 + 1 per stride-2 conv
        for s2t (odd kernels with padding k // 2, checked above; HF's formula), T itself for text."""
        for _ in self.conv_kernel_sizes if self.arch == "s2t" else ():
            frames = (frames - 1) // 2 + 1
        return frames

    @property
    def subsampling_factor(self) -> int:
        """Frames of features_BTF per encoder position (s2t); 1 for text."""
        return 2 ** len(self.conv_kernel_sizes) if self.arch == "s2t" else 1
