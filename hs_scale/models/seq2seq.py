"""What the speech and text encoder-decoders share: selectors, decoding with a KV cache, logits, init.

Legend: B batch, S source length (after subsampling), L target length, D model width, V vocabulary, K tasks.

Head selection (Gong et al. 2021): each *selected* attention type owns one ``HeadSelector`` with logits
phi[K, layers, H']. The encoder is keyed on the source task (``src_task_B``), decoder self- and cross-attention
on the target task (``tgt_task_B``). A selector is called once per forward (training: one Gumbel draw per task
and layer) and once per generation (stored in the ``DecoderCache``), never once per decoding step.
An attention type whose selection is off is an ordinary dense H-head attention and has no selector.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hs_scale.models.config import ModelConfig
from hs_scale.models.layers import Decoder, DecoderCache, LayerChoices
from hs_scale.selection.attention import TaskSegments
from hs_scale.selection.config import SelectionConfig
from hs_scale.selection.selector import HeadSelector
from hs_scale.selection.sites import SITE_NAMES, SITES, sites_of

ATTENTION_TYPES = SITE_NAMES
ENCODER_TYPES = sites_of("encoder")
DECODER_TYPES = sites_of("decoder")


@dataclass
class Hidden:
    """Hidden states between the parts of the encoder-decoder: what `forward_stack` returns and what one pipeline
    stage hands the next (hs_scale.parallel.pipeline packs it into one tensor).

    encoder_BSD: inside the encoder (before its final LayerNorm); memory_BSD: the encoder's output;
    decoder_BLD: decoder states (after the final LayerNorm when the model holds it).
    """

    encoder_BSD: Tensor | None = None
    memory_BSD: Tensor | None = None
    decoder_BLD: Tensor | None = None


class Seq2SeqModel(nn.Module):
    """Base of ``S2TTransformer`` and ``TextTransformer``: subclasses build ``self.encoder`` and implement
    ``embed_source`` / ``source_padding_mask`` / ``batch_source``; this class owns the decoder, the LM head, the
    selectors and the forward of the stacks (`forward_stack`), which pipeline stages run too."""

    def __init__(self, cfg: ModelConfig, selection: SelectionConfig | None, num_tasks: int):
        super().__init__()
        selection = selection if selection is not None else SelectionConfig(enabled=False)
        if num_tasks < 1:
            raise ValueError(f"num_tasks={num_tasks} must be >= 1 (the size of the task vocabulary)")
        self.config, self.selection_config, self.num_tasks = cfg, selection, num_tasks
        self.selected_types = selection.selected_types()
        # NOTE: each type gets its own seed so that, e.g., encoder layer 0 and cross-attention layer 0 do not
        # draw the same Gumbel noise (the noise is a pure function of (seed, draw, layer)).
        self.selectors = nn.ModuleDict(
            {
                name: HeadSelector(
                    num_tasks,
                    SITES[name].num_layers(cfg),
                    selection.pool_heads,
                    cfg.num_heads,
                    strategy=selection.strategy,
                    temperature=selection.temperature,
                    seed=selection.seed + ATTENTION_TYPES.index(name),
                    init_range=(selection.init_low, selection.init_high),
                    noise_scale=selection.noise_scale,
                )
                for name in self.selected_types
            }
        )

        embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_token_id)
        self.decoder = Decoder(cfg, embed_tokens, self.pool_heads("decoder_self"), self.pool_heads("cross"))
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.ctc_head: nn.Module | None = None  # a CTC head on the encoder output (speech models may add one)

    # ----------------------------------------------------------------------------------------------- selection
    def pool_heads(self, attention_type: str) -> int | None:
        """H' of an attention type, or None where it is dense (no selection)."""
        return self.selection_config.pool_heads if attention_type in self.selected_types else None

    def _choices(self, types: tuple[str, ...]) -> dict[str, LayerChoices]:
        """One selector call per selected type: the heads of every layer, for every task."""
        return {t: self.selectors[t]() if t in self.selectors else None for t in types}

    def _segments(self, task_B: Tensor | None, types: tuple[str, ...], arg: str) -> TaskSegments | None:
        """Group the batch by task once per forward, and only if some attention of ``types`` selects heads."""
        if not any(t in self.selectors for t in types):
            return None
        if task_B is None:
            if self.num_tasks == 1:
                return None  # single-task model: the attention uses task 0 for every row
            raise ValueError(
                f"{arg} is required: {'/'.join(t for t in types if t in self.selectors)} attention "
                f"selects heads per task (pass a long tensor [B] of task ids)"
            )
        return TaskSegments(task_B)

    def head_selection_table(self) -> dict[str, list[list[list[int]]]]:
        """Deterministic selection per selected type: table[type][task][layer] = pool heads in slot order."""
        return {name: selector.table() for name, selector in self.selectors.items()}

    def selection_kl(self, *, src_task_B: Tensor | None = None, tgt_task_B: Tensor | None = None) -> Tensor:
        """Sum of the selectors' KL(q(z) || Bernoulli(H/H')) terms, *unweighted* (the trainer multiplies by
        ``selection.kl_weight``). The encoder's term averages over ``src_task_B``'s tasks, the decoder's over
        ``tgt_task_B``'s; None means every task. Zero when nothing is selected."""
        total = torch.zeros((), device=self.decoder.layer_norm.weight.device)
        for name, selector in self.selectors.items():
            total = total + selector.kl(SITES[name].task(src_task_B, tgt_task_B))
        return total

    def set_selection_temperature(self, tau: float) -> None:
        """Set the Gumbel temperature of every selector (annealing: ``selection_config.temperature_at(step)``)."""
        for selector in self.selectors.values():
            selector.set_temperature(tau)

    def enable_activation_checkpointing(self) -> None:
        """Recompute each encoder and decoder layer in backward instead of keeping its activations."""
        for stack in (self.encoder, self.decoder):
            if stack is not None:
                stack.checkpoint_activations = True

    # ----------------------------------------------------------------------------------------------- decoding
    def new_cache(self) -> DecoderCache:
        """An empty KV cache for one incremental decoding run (generation)."""
        return DecoderCache.empty(self.config.decoder_layers)

    def decode(
        self,
        decoder_input_BL: Tensor,
        memory_BSD: Tensor,
        memory_padding_mask_BS: Tensor | None,
        tgt_task_B: Tensor | None = None,
        cache: DecoderCache | None = None,
    ) -> Tensor:
        """logits_BLV of the next token after each decoder input.

        Without ``cache``: full (teacher-forced) decoding of ``decoder_input_BL``, with a fresh head selection.
        With ``cache``: ``decoder_input_BL`` holds only the new tokens (usually L = 1); the selection made on the
        cache's first call is reused, and keys/values of the selected heads are appended to the cache.
        """
        return self.output_projection(
            self.decoder_states(decoder_input_BL, memory_BSD, memory_padding_mask_BS, tgt_task_B, cache)
        )

    def decoder_states(self, decoder_input_BL: Tensor, memory_BSD: Tensor, memory_padding_mask_BS: Tensor | None,
                       tgt_task_B: Tensor | None = None, cache: DecoderCache | None = None,
                       hidden_BLD: Tensor | None = None) -> Tensor:
        """h_BLD of the decoder (the arguments of `decode`; hidden_BLD: a previous pipeline stage's states). One
        selector call per decoder site; a cache reuses its first call's choice."""
        if cache is not None and cache.choices is None:
            cache.choices = self._choices(DECODER_TYPES)
        choices = cache.choices if cache is not None else self._choices(DECODER_TYPES)
        segments = self._segments(tgt_task_B, DECODER_TYPES, "tgt_task_B")
        return self.decoder(
            decoder_input_BL,
            memory_BSD,
            memory_padding_mask_BS,
            choices["decoder_self"],
            choices["cross"],
            segments,
            cache=cache,
            hidden_BLD=hidden_BLD,
        )

    def output_projection(self, h_BLD: Tensor) -> Tensor:
        """logits_BLV; with tied embeddings the decoder's embedding matrix is the LM head."""
        weight_VD = self.decoder.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(h_BLD, weight_VD)

    def encode_embedded(self, x_BSD: Tensor, padding_mask_BS: Tensor, src_task_B: Tensor | None) -> Tensor:
        """Encoder stack on embedded (scaled) inputs: memory_BSD."""
        choices = self._choices(ENCODER_TYPES)
        segments = self._segments(src_task_B, ENCODER_TYPES, "src_task_B")
        return self.encoder(x_BSD, padding_mask_BS, choices["encoder_self"], segments)

    def encode_source(self, source: tuple[Tensor, ...], src_task_B: Tensor | None) -> tuple[Tensor, Tensor]:
        """(memory_BSD, memory_padding_mask_BS) of the source tensors (the subclass's `encode` arguments)."""
        mask_BS = self.source_padding_mask(*source)
        return self.encode_embedded(self.embed_source(*source), mask_BS, src_task_B), mask_BS

    # ----------------------------------------------------------------------------------------------- forward
    def embed_source(self, *source: Tensor) -> Tensor:
        """Scaled source embedding x_BSD (before positions), from the subclass's source tensors."""
        raise NotImplementedError

    def source_padding_mask(self, *source: Tensor) -> Tensor:
        """bool [B, S], True = padded source position; needs no parameters (every pipeline stage computes it)."""
        raise NotImplementedError

    @staticmethod
    def batch_source(batch) -> tuple[Tensor, ...]:
        """The source tensors of a hs_scale.data.Batch, as `forward` and `embed_source` take them."""
        raise NotImplementedError

    def forward_stack(
        self,
        source: tuple[Tensor, ...],
        decoder_input_BL: Tensor,
        src_task_B: Tensor | None = None,
        tgt_task_B: Tensor | None = None,
        hidden: Hidden | None = None,
    ) -> tuple[Hidden, Tensor]:
        """The encoder-decoder over the modules this model holds: (Hidden, memory_padding_mask_BS).

        The whole model: embed, encoder, decoder (decoder_BLD after the final LayerNorm, memory_BSD kept for the
        CTC head). A pipeline stage (the same model with the modules it does not own set to None or left out of
        its layer dicts, hs_scale.parallel.pipeline) continues from `hidden`, a previous stage's output, and stops
        where its modules stop: inside the encoder (encoder_BSD), after it (memory_BSD), or in the decoder.
        """
        mask_BS = self.source_padding_mask(*source)
        hidden = hidden or Hidden()
        encoder = self.encoder
        if encoder.embed_positions is not None or len(encoder.layers) or encoder.layer_norm is not None:
            x_BSD = hidden.encoder_BSD if hidden.encoder_BSD is not None else self.embed_source(*source)
            x_BSD = self.encode_embedded(x_BSD, mask_BS, src_task_B)
            if encoder.layer_norm is None:
                return Hidden(encoder_BSD=x_BSD), mask_BS
            hidden = Hidden(memory_BSD=x_BSD)
        if self.decoder.embed_positions is None and not len(self.decoder.layers):
            return hidden, mask_BS
        h_BLD = self.decoder_states(
            decoder_input_BL, hidden.memory_BSD, mask_BS, tgt_task_B, hidden_BLD=hidden.decoder_BLD
        )
        return Hidden(memory_BSD=hidden.memory_BSD, decoder_BLD=h_BLD), mask_BS

    # ----------------------------------------------------------------------------------------------- init
    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """HF's init (normal(0, init_std) weights, zero biases, zero pad row); selector logits keep their own."""
        std = self.config.init_std
        if isinstance(module, (nn.Linear, nn.Conv1d)):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
            if module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
