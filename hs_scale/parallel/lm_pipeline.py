"""Pipeline stages (and the tensor-parallel stage) of the decoder-only LM: contiguous cuts of its decoder layers.

Legend: B rows, L tokens per row, D width, V vocabulary, Vp padded vocabulary, t TP size, C = pp * vp model chunks,
n = layers / C layers per chunk.

Chunk c (megatron's interleaved convention, as for the encoder-decoders in pipeline.py) holds global decoder
layers [c*n, (c+1)*n) plus
  * chunk 0: the (vocab-parallel) token embedding;
  * the last chunk: the final RMSNorm, the LM head (tied embeddings: a second copy of the embedding shard, whose
    gradient `hs_scale.parallel.api.sync_shared_embedding` sums with chunk 0's, as the encoder-decoders do) and
    the vocab-parallel next-token loss.
What travels between stages: the hidden states x_BLD, one p2p tensor. Task ids (per token: a packed row mixes
languages), document ids and positions are read from the batch on every stage (every pipeline rank gets the same
batch), so nothing else crosses the boundary.

One forward: a chunk is the single-device LMModel (already TP-sharded by `parallelize_tensor`) with the modules it
does not own set to None and its layer list cut to a LayerDict of global layers, and it runs that model's own
`hidden_states`. The selector is `selector.part(layers)` (global `first_layer`), so every stage draws the
single-process Gumbel noise of its layers. State-dict keys are the single-device ones (`layers.3.self_attn...`,
`selector.logits`), so checkpoints reshard between layouts exactly as the encoder-decoders' do.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from hs_scale.data.packing import IGNORE_INDEX
from hs_scale.models.layers import LayerDict
from hs_scale.parallel.layout import ParallelGroups, padded_vocab_size
from hs_scale.parallel.pipeline import ModelChunk, _shallow_copy
from hs_scale.parallel.vocab import (
    VocabParallelLMHead,
    local_logits,
    vocab_parallel_embedding,
    vocab_parallel_label_smoothed_ce,
)


def lm_chunk_layers(num_layers: int, num_chunks: int, chunk: int) -> range:
    """Global decoder layers of `chunk` (the config checks that num_chunks divides num_layers)."""
    n = num_layers // num_chunks
    return range(chunk * n, (chunk + 1) * n)


def lm_embedding_chunks(tied: bool, num_chunks: int) -> set[int]:
    """Chunks holding a copy of the token embedding table: the first, and the last with a tied LM head."""
    return {0, num_chunks - 1} if tied else {0}


class LMPipelineChunk(ModelChunk):
    """One LM chunk: forward(batch) -> x_BLD for the next stage, or (last chunk) a dict of loss sums.

    `batch` is a packed hs_scale.data.packing.LMBatch. `self.model` is the stage model (module docstring), its
    children registered under their own names; `config` is megatron's TransformerConfig, `model_config` the
    LMConfig.
    """

    def __init__(self, full: nn.Module, chunk: int, num_chunks: int, groups: ParallelGroups, tconfig, vp_stage=None):
        super().__init__(full, chunk, num_chunks, groups, tconfig, vp_stage)  # p2p_shape: (B, L)
        cfg = full.config
        self.layer_range = lm_chunk_layers(cfg.num_layers, num_chunks, chunk)
        self.embedding_chunks = lm_embedding_chunks(cfg.tie_embeddings, num_chunks)
        self.padded_vocab = padded_vocab_size(cfg.vocab_size, groups.tp_size)
        self.embedding_shape = (self.padded_vocab // groups.tp_size, cfg.hidden_size)
        self._adopt(self._stage_model(full), full)

    def _stage_model(self, full: nn.Module) -> nn.Module:
        """A shallow copy of `full` holding only this chunk's modules (the others None)."""
        cfg, groups = full.config, self.groups
        stage = _shallow_copy(full)
        stage.layers = LayerDict({str(i): full.layers[i] for i in self.layer_range})
        stage.embed_tokens = None
        if self.chunk in self.embedding_chunks:
            # The LM's nn.Embedding has no padding_idx: pad_id -1 (no id) keeps every lookup's gradient.
            emb = vocab_parallel_embedding(cfg.vocab_size, self.padded_vocab, cfg.hidden_size, -1, groups.tp)
            emb.load_dense_(full.embed_tokens.weight)
            emb.weight.shared_embedding = len(self.embedding_chunks) > 1  # gradient summed over the copies
            stage.embed_tokens = emb
        stage.lm_head = None
        if not self.last:
            stage.norm = None
        elif not cfg.tie_embeddings:
            stage.lm_head = VocabParallelLMHead(cfg.vocab_size, self.padded_vocab, cfg.hidden_size, groups.tp)
            stage.lm_head.load_dense_(full.lm_head.weight)
        if full.selector is not None:
            stage.selector = full.selector.part(self.layer_range)
        return stage

    @property
    def token_embedding(self) -> nn.Module | None:
        return self.model.embed_tokens

    @property
    def selectors(self) -> dict:
        return self.model.selectors

    def selection_kl(self, task_ids: Tensor | None = None) -> Tensor:
        """The KL share of this chunk's selector slice (the shares of all ranks sum to the single-device KL)."""
        return self.model.selection_kl(task_ids)

    def p2p_extent(self, batch) -> tuple[int, int]:
        return tuple(batch.input_ids.shape)

    def forward(self, batch):
        """Non-last chunk: x_BLD. Last chunk: {"loss_sum" (differentiable), "nll_BL" (per token), "tokens"}."""
        B, L = batch.input_ids.shape
        x = self.input_tensor
        if x is not None and self.p2p_shape is not None:  # fixed-shape p2p: drop the padding
            x = x[:B, :L]
        h_BLD = self.model.hidden_states(batch.input_ids, batch.task_ids, batch.position_ids, batch.doc_ids,
                                         hidden_BLD=None if self.first else x)
        if not self.last:
            if self.p2p_shape is not None:
                Bp, Lp = self.p2p_shape
                h_BLD = F.pad(h_BLD, (0, 0, 0, Lp - L, 0, Bp - B))
            return h_BLD
        return self.loss(h_BLD, batch.targets)

    def loss(self, h_BLD: Tensor, target_BL: Tensor) -> dict:
        """Vocab-parallel (label-smoothed) next-token CE sums over the tokens with a target (not IGNORE_INDEX)."""
        head = self.model.lm_head or self.model.embed_tokens
        logits_BLV = local_logits(h_BLD, head.weight, self.groups.tp)
        loss_sum, nll_N, tokens = vocab_parallel_label_smoothed_ce(
            logits_BLV.flatten(0, 1),
            target_BL.flatten(),
            vocab_start=head.vocab_start,
            vocab_size=self.model_config.vocab_size,
            pad_id=IGNORE_INDEX,
            label_smoothing=self.label_smoothing,
            tp_group=self.groups.tp,
        )
        return {"loss_sum": loss_sum, "nll_BL": nll_N.view_as(target_BL), "tokens": tokens}
