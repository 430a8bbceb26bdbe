"""Writing and reading LAHIS results on disk.

    <out>/scores.safetensors   per language: "<lang>" fp64 [L, H] scores, "<lang>.mean_abs", "<lang>.frac_negative"
    <out>/scores.json          {"languages": {lang: {"scores": [[...]], "documents": N}}, "meta": {...}}
    <out>/heads.json           quantile, min_languages, top / specific per language, general (lists of [layer, head])
    <out>/ablation.json        the cross-language ablation matrix (hs_scale.analysis.lahis.ablation_matrix)
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file


def write_scores(out_dir: str, results: dict[str, dict], meta: dict | None = None) -> None:
    """results[lang] = what lahis_scores returned."""
    os.makedirs(out_dir, exist_ok=True)
    tensors = {}
    for lang, r in results.items():
        tensors[lang] = r["scores"].contiguous()
        tensors[f"{lang}.mean_abs"] = r["mean_abs"].contiguous()
        tensors[f"{lang}.frac_negative"] = r["frac_negative"].contiguous()
    save_file(tensors, os.path.join(out_dir, "scores.safetensors"), metadata={"format": "hs_scale.lahis"})
    doc = {"languages": {lang: {"scores": r["scores"].tolist(), "documents": r["documents"]}
                         for lang, r in results.items()},
           "meta": meta or {}}
    with open(os.path.join(out_dir, "scores.json"), "w") as fh:
        json.dump(doc, fh, indent=1)


def read_scores(path: str) -> dict[str, torch.Tensor]:
    """lang -> fp64 [L, H] from a scores.safetensors file (or the folder holding it)."""
    if os.path.isdir(path):
        path = os.path.join(path, "scores.safetensors")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no LAHIS scores; write them with `hs-scale heads importance`")
    return {k: v for k, v in load_file(path).items() if "." not in k}


def write_json(path: str, obj: dict) -> None:
    """JSON with (layer, head) tuples written as lists."""
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=1, default=list)
