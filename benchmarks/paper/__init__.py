"""The paper's experiments in direction: head selection (group, subset) against shared attention at equal active
heads, on offline corpora, with seeds, tables, plots and a verdict. Entry point: `python -m benchmarks.paper`
(see __main__.py); plans and run configs in configs/; usage and outputs in README.md.

    plan.py     presets (YAML) -> experiments -> cells (variant, H', seed) with their config overrides
    corpora.py  build corpora with data_pipelines recipes; low-resource languages by subsampling a manifest
    cell.py     one cell: hs_scale.training.run.train(cfg), then decode and score per task (own process)
    runner.py   cells N at a time in subprocesses, resumable
    summary.py  mean +- std over seeds, per task and averaged; group vs shared verdict
    plots.py / report.py   figures (bars, shared heads, head load) and the markdown report
"""
