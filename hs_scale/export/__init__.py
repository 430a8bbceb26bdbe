"""Export to and import from transformers (see docs/export.md).

    export_task(model_cfg, selection_cfg, state_dict, task_names, "de", out_dir)       # plain Speech2Text / M2M100
    export_all_tasks(model_cfg, selection_cfg, state_dict, task_names, out_dir)        # remote code, task= in generate
    model_cfg, selection_cfg, model = import_dense(hf_dir, pool_heads=8, task_names=[...])   # upcycling

CLI: ``hs_scale.export.cli.main_export`` (hs-scale export-hf) and ``main_import`` (hs-scale import-hf).
transformers is imported lazily inside the functions: training never needs it.
"""

from hs_scale.export.all_tasks import export_all_tasks, export_all_tasks_from_model
from hs_scale.export.materialize import ExportError, dense_task_state, parse_task, selection_tables
from hs_scale.export.per_task import export_task, export_task_from_model, resolve_decoder_start
from hs_scale.export.upcycle import import_dense, model_config_from_hf, upcycle_state

__all__ = [
    "ExportError",
    "dense_task_state",
    "export_all_tasks",
    "export_all_tasks_from_model",
    "export_task",
    "export_task_from_model",
    "import_dense",
    "model_config_from_hf",
    "parse_task",
    "resolve_decoder_start",
    "selection_tables",
    "upcycle_state",
]
