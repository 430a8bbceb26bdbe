"""Global CMVN folded into the first convolution of an exported speech model.

A run with ``data.cmvn: global`` normalises raw filterbanks inside its subsampler: the first convolution is applied
to (x - mean) / std with the conv's weights folded at every forward (``hs_scale.models.s2t.fold_cmvn``; the
subsampler's docstring says why padding makes this the only exact place). ``Speech2TextFeatureExtractor`` cannot
apply global stats, so the export writes the folded weights W' = W / std, b' = b - sum W * mean / std (the same
function, the same floats) and an extractor with normalisation off: stock transformers then computes what
``hs-scale evaluate`` does from the same audio, padding included.
"""

from __future__ import annotations

import json

from torch import Tensor

from hs_scale.export.materialize import ExportError
from hs_scale.models.config import ModelConfig

FIRST_CONV = "encoder.conv.conv_layers.0"
CMVN_MODES = ("utterance", "global", "none")


def read_cmvn_stats(path) -> tuple[list[float], list[float]]:
    """(mean, std) of a corpus's cmvn.json (a path or URL, hs_scale.data.urls), or ``path`` itself when it is a
    (mean, std) pair already; ExportError names the fix."""
    from hs_scale.data import urls

    if isinstance(path, (tuple, list)):
        return path[0], path[1]
    if not path:
        raise ExportError("data.cmvn=global: the export folds the corpus's cmvn.json into the first convolution, "
                          "and no corpus is known; pass --cmvn-stats CORPUS/cmvn.json")
    try:
        stats = json.loads(urls.read_bytes(path))
    except FileNotFoundError:
        raise ExportError(f"data.cmvn=global: {path} not found (the corpus's CMVN stats, folded into the first "
                          "convolution); pass --cmvn-stats CORPUS/cmvn.json") from None
    return stats["mean"], stats["std"]


def fold_global_cmvn(model_cfg: ModelConfig, state: dict[str, Tensor], cmvn: str,
                     cmvn_stats) -> dict[str, Tensor]:
    """``state`` with the first convolution folded when ``cmvn`` is "global" (s2t); otherwise ``state`` itself.

    cmvn: the run's data.cmvn; cmvn_stats: its corpus's cmvn.json (or a (mean, std) pair). Only the two first-conv
    tensors are replaced (a new dict; the caller's state is not modified).
    """
    from hs_scale.models.s2t import cmvn_tensors, fold_cmvn

    if cmvn not in CMVN_MODES:
        raise ExportError(f"cmvn={cmvn!r}: use one of {CMVN_MODES} (the run's data.cmvn)")
    if model_cfg.arch != "s2t" or cmvn != "global":
        return state
    mean, std = read_cmvn_stats(cmvn_stats)
    weight, bias = state[f"{FIRST_CONV}.weight"], state[f"{FIRST_CONV}.bias"]
    try:
        mean_F, inv_std_F = cmvn_tensors(mean, std, weight)
    except ValueError as err:
        raise ExportError(f"CMVN stats {cmvn_stats if isinstance(cmvn_stats, str) else ''}: {err}") from None
    folded_w, folded_b = fold_cmvn(weight, bias, mean_F, inv_std_F)
    return {**state, f"{FIRST_CONV}.weight": folded_w, f"{FIRST_CONV}.bias": folded_b}


def model_cmvn(model) -> dict:
    """``cmvn`` / ``cmvn_stats`` keywords for exporting a model in memory: its own global stats, if it has them."""
    conv = getattr(getattr(model, "encoder", None), "conv", None)
    if getattr(conv, "cmvn_mean_F", None) is None:
        return {}
    return {"cmvn": "global", "cmvn_stats": (conv.cmvn_mean_F.cpu(), conv.cmvn_std_F.cpu())}
