"""Model parallelism for hs_scale: megatron-core process groups, tensor-parallel selected-head attention, the
CPU shim megatron-core needs without CUDA, and a gloo multi-process test harness.

    layout.py        ParallelConfig, layout checks (plain functions of numbers), process groups
    cpu_shim.py      the CPU compatibility shim for megatron-core 0.16 (applied only without CUDA)
    tp_attention.py  MegatronProjections (TP projection spec), shard_attention, shard_choice
    tp_model.py      parallelize_tensor(model, groups): swap a built model's attention/selectors/FFN for TP shards
    data_parallel.py build_engine: megatron-core DDP + torch AdamW, or DeepSpeed ZeRO 0/1/2 (one config switch)
    vocab.py         vocab-parallel token embedding / LM head / label-smoothed cross-entropy (padded vocab)
    pipeline.py      PipelineChunk: contiguous cuts of encoder-then-decoder layers; global_state_dict_layout
    api.py           build_parallel_model, build_parallel_engine, parallel_train_step, forward_eval_loss
    collectives.py   CollectiveCounter: count collectives per step
    harness.py       run_distributed: N spawned gloo ranks with bounded timeouts (tests)

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
