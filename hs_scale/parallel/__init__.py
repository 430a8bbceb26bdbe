"""Model parallelism for hs_scale: megatron-core process groups, tensor-parallel selected-head attention, the
CPU shim megatron-core needs without CUDA, and the megatron glue the step engine (hs_scale.training.engine) uses.

    layout.py        ParallelConfig, layout checks (plain functions of numbers), process groups
    cpu_shim.py      the CPU compatibility shim for megatron-core 0.16 (applied only without CUDA)
    tp_attention.py  MegatronProjections (TP projection spec), shard_attention, shard_choice
    tp_model.py      parallelize_tensor(model, groups): swap a built model's attention/selectors/FFN for TP shards
    data_parallel.py wrap_megatron_ddp / wrap_deepspeed: megatron-core DDP or DeepSpeed ZeRO 0/1/2 (one switch)
    vocab.py         vocab-parallel token embedding / LM head / label-smoothed cross-entropy (padded vocab)
    pipeline.py      ModelChunk (what every family's chunk shares); PipelineChunk: contiguous cuts of
                     encoder-then-decoder layers; global_state_dict_layout
    lm_pipeline.py   LMPipelineChunk: contiguous cuts of the decoder-only LM's layers (TP and PP)
    api.py           parallelize_model, run_pipeline_schedule, sync_shared_embedding, clip_grad_norm

Nothing here is imported by the single-device model code; megatron-core is imported lazily by the modules that
need it, so `import hs_scale.parallel` stays cheap.
"""

from hs_scale.parallel.layout import (
    ENGINES,
    LayoutError,
    ParallelConfig,
    ParallelGroups,
    check_engine,
    check_ffn,
    check_heads,
    check_pipeline,
    check_vocab,
    check_world,
    padded_vocab_size,
    validate_layout,
)

__all__ = [
    "ENGINES",
    "LayoutError",
    "ParallelConfig",
    "ParallelGroups",
    "check_engine",
    "check_ffn",
    "check_heads",
    "check_pipeline",
    "check_vocab",
    "check_world",
    "padded_vocab_size",
    "validate_layout",
]
