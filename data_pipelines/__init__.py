"""Offline corpus builders for hs_scale: human-translated parallel text + espeak-ng speech -> WebDataset shards.

Entry point: `data_pipelines.cli.main(argv)` (wired as `hs-scale prepare-data`). Recipes: asr8, st8, domains, mt,
demo (see data_pipelines.recipes and docs/data.md).
"""
