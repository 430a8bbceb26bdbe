"""Hugging Face bridge of the decoder-only LM: names, config, import + upcycling of a dense checkpoint, export.

Legend: H query-head slots, G KV heads, r candidates per slot, P = H * r, d head dim, D width, K tasks.

* Names: ours are transformers' ``LlamaForCausalLM`` names without the ``model.`` prefix (``lm_head`` keeps its
  name); the selector's ``selector.logits`` has no HF counterpart.
* Import (``import_hf``): a dense Llama / Mistral / Qwen2 checkpoint from a local folder (config.json +
  safetensors, or a weights_only torch .bin) becomes an LMModel whose pool holds r copies of every query head
  (``upcycle``): candidate p = h*r + j copies head h's Q rows (and bias) and o_proj columns. Every candidate of a
  slot is identical, so the model computes exactly the dense model's function at step 0 for every task under any
  group selection (and under any subset selection that takes one copy of each head, which the initial
  deterministic selection below always does); training then lets the copies diverge per task.
* Selector warm start (``selector_logits``): from per-task head-importance scores (e.g. LAHIS) [K, layers, H]
  or, without scores, at random; see its docstring for the rule.
* Export (``export_task``): one task's sub-network is an ordinary GQA model: gather its selected Q rows and o_proj
  columns (K/V unchanged) and write a ``LlamaForCausalLM`` folder (config.json, generation_config.json,
  safetensors only) that stock transformers loads with from_pretrained.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from torch import Tensor

from hs_scale.models.lm.config import LMConfig
from hs_scale.models.lm.model import LMModel
from hs_scale.selection.config import SelectionConfig

IMPORTABLE = ("llama", "mistral", "qwen2")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt")


# --- names ----------------------------------------------------------------------------------------------------------


def hf_name(name: str) -> str:
    """Our parameter name -> LlamaForCausalLM's."""
    return name if name.startswith("lm_head.") else f"model.{name}"


def our_name(name: str) -> str:
    """LlamaForCausalLM's parameter name -> ours."""
    return name.removeprefix("model.")


def dense_state_dict(model: LMModel) -> dict[str, Tensor]:
    """HF-named weights of a dense (r = 1) model; tied embeddings have no lm_head entry."""
    if model.candidates != 1:
        raise ValueError("dense_state_dict needs a dense model (r = 1); use export_task for a pooled one")
    return {hf_name(k): v for k, v in model.state_dict().items() if not k.startswith("selector.")}


# --- config -----------------------------------------------------------------------------------------------------


def _rope(hf_config) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) of a transformers config (v5: rope_parameters; v4: rope_theta + rope_scaling).
    Refuses every scaling but Llama 3's."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    params.update(getattr(hf_config, "rope_scaling", None) or {})
    theta = float(params.pop("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        return theta, {"rope_type": "llama3", **{k: params[k] for k in keys}}
    raise ValueError(f"config.json: RoPE type {rope_type!r} is not supported (default and llama3 are); "
                     f"import a checkpoint with one of those")


def lm_config_from_hf(hf_config, **overrides) -> LMConfig:
    """LMConfig of a transformers Llama / Mistral / Qwen2 config (refuses what our model would compute wrongly)."""
    kind = hf_config.model_type
    if kind not in IMPORTABLE:
        raise ValueError(f"config.json: model_type {kind!r} cannot be imported; supported: {IMPORTABLE}")
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act={hf_config.hidden_act!r}; the LM implements SwiGLU with silu")
    if getattr(hf_config, "mlp_bias", False):
        raise ValueError("config.json: mlp_bias=true is not supported (Llama's MLP has no biases)")
    rope_theta, rope_scaling = _rope(hf_config)
    sliding = None
    if kind == "mistral" or (kind == "qwen2" and getattr(hf_config, "use_sliding_window", False)):
        sliding = getattr(hf_config, "sliding_window", None)
    if kind == "llama":
        qkv_bias = out_bias = bool(getattr(hf_config, "attention_bias", False))
    else:  # Qwen2: q/k/v biases, none on o_proj; Mistral: none
        qkv_bias, out_bias = kind == "qwen2", False
    kwargs = dict(
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=hf_config.num_attention_heads,
        num_kv_heads=hf_config.num_key_value_heads or hf_config.num_attention_heads,
        head_dim=getattr(hf_config, "head_dim", None),
        rms_norm_eps=hf_config.rms_norm_eps,
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=hf_config.max_position_embeddings,
        tie_embeddings=bool(hf_config.tie_word_embeddings),
        attention_bias=qkv_bias,
        output_bias=out_bias,
        sliding_window=sliding,
        init_std=getattr(hf_config, "initializer_range", 0.02),
        bos_token_id=hf_config.bos_token_id,
        eos_token_id=_first(hf_config.eos_token_id),
        pad_token_id=hf_config.pad_token_id,
    )
    kwargs.update(overrides)
    return LMConfig(**kwargs)


def _first(token_id):
    return token_id[0] if isinstance(token_id, list) else token_id


def hf_config_from_lm(cfg: LMConfig):
    """A transformers LlamaConfig of our dense (or exported) model."""
    from transformers import LlamaConfig

    if cfg.attention_bias != cfg.output_bias and not cfg.attention_bias:
        raise ValueError("model.output_bias without model.attention_bias has no LlamaConfig equivalent")
    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {})},
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_embeddings,
        # Llama puts one flag on all four projections; a Qwen2-style model (q/k/v biases only) is exported with
        # a zero o_proj bias, which computes the same thing.
        attention_bias=cfg.attention_bias,
        mlp_bias=False,
        initializer_range=cfg.init_std,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
    )


# --- import and upcycling -------------------------------------------------------------------------------------------


def load_hf_folder(folder: str | Path):
    """(transformers config, HF-named state dict) of a local model folder; safetensors, else a weights_only .bin."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}/config.json not found: pass a local Hugging Face model folder "
                                f"(the save_pretrained layout)")
    hf_config = AutoConfig.from_pretrained(folder)
    state: dict[str, Tensor] = {}
    files = sorted(folder.glob("*.safetensors"))
    for path in files:
        state.update(load_file(path))
    if not files:
        bins = sorted(folder.glob("pytorch_model*.bin"))
        if not bins:
            raise FileNotFoundError(f"{folder} holds no *.safetensors or pytorch_model*.bin weights")
        for path in bins:
            state.update(torch.load(path, map_location="cpu", weights_only=True))
    return hf_config, state


def upcycle_state(dense: dict[str, Tensor], cfg: LMConfig, candidates: int) -> dict[str, Tensor]:
    """Our-named dense weights -> pooled weights: candidate p = h*r + j copies query head h (Q rows, Q bias and
    o_proj columns); everything else (K/V, MLP, norms, embeddings) is unchanged."""
    H, d, r = cfg.num_heads, cfg.head_dim, candidates
    pooled = dict(dense)
    for name, t in dense.items():
        if name.endswith("self_attn.q_proj.weight"):
            pooled[name] = t.view(H, d, -1).repeat_interleave(r, dim=0).reshape(H * r * d, -1)
        elif name.endswith("self_attn.q_proj.bias"):
            pooled[name] = t.view(H, d).repeat_interleave(r, dim=0).reshape(-1)
        elif name.endswith("self_attn.o_proj.weight"):
            pooled[name] = t.view(-1, H, d).repeat_interleave(r, dim=1).reshape(t.shape[0], H * r * d)
    return pooled


def selector_logits(
    num_tasks: int,
    num_layers: int,
    num_heads: int,
    candidates: int,
    scores: Tensor | None = None,
    low: float = math.log(0.01),
    high: float = 0.0,
    private_quantile: float = 0.5,
    seed: int = 0,
) -> Tensor:
    """Initial selector logits [K, layers, H*r] of an upcycled pool.

    Rule: for each (task k, layer l, slot h) one *preferred* candidate c gets a logit in [(low+high)/2, high]
    and the slot's other candidates get ``low``. The deterministic selection therefore takes exactly one copy of
    every dense head (group: the argmax of each slot; subset: each KV head's n preferred copies are its n largest),
    so every task starts as the dense model; with training noise the other copies are still explored.
      * scores None: c uniform at random (seeded), logit ``high``.
      * scores [K, layers, H] (per-task head importance, e.g. LAHIS; higher = more important): q = the head's
        rank quantile among task k's layers*H scores (0 least, 1 most important). Heads with
        q >= ``private_quantile`` prefer a task-group copy c = 1 + (k mod (r-1)) (tasks that rely on the head
        train their own copy of it), the others prefer the shared copy c = 0 (tasks that hardly use the head keep
        sharing one copy). The preferred logit is low + (high - low) * (0.5 + |q - 0.5|): the clearer the rank,
        the more confident the start. With r = 1 every slot has only c = 0.
    """
    K, L, H, r = num_tasks, num_layers, num_heads, candidates
    logits_KLHr = torch.full((K, L, H, r), low)
    if scores is None:
        gen = torch.Generator().manual_seed(seed)
        preferred_KLH = torch.randint(0, r, (K, L, H), generator=gen)
        strength_KLH = torch.full((K, L, H), high)
    else:
        if tuple(scores.shape) != (K, L, H):
            raise ValueError(f"head scores have shape {tuple(scores.shape)}; expected [tasks, layers, heads] = "
                             f"[{K}, {L}, {H}]")
        flat_KN = scores.detach().double().reshape(K, L * H)
        rank_KN = flat_KN.argsort(dim=1).argsort(dim=1).double()
        q_KLH = (rank_KN / max(L * H - 1, 1)).view(K, L, H)
        private_K = 1 + torch.arange(K) % max(r - 1, 1)
        preferred_KLH = torch.where(q_KLH >= private_quantile, private_K[:, None, None], 0) if r > 1 else \
            torch.zeros(K, L, H, dtype=torch.long)
        strength_KLH = (low + (high - low) * (0.5 + (q_KLH - 0.5).abs())).float()
    logits_KLHr.scatter_(3, preferred_KLH[..., None], strength_KLH[..., None])
    return logits_KLHr.view(K, L, H * r)


def import_hf(
    folder: str | Path,
    selection: SelectionConfig | None = None,
    num_tasks: int = 1,
    scores: Tensor | None = None,
    **config_overrides,
) -> LMModel:
    """An LMModel from a dense HF Llama / Mistral / Qwen2 folder, upcycled into selection.pool_heads / H
    candidates per slot, selector logits from ``selector_logits`` (``scores``: [K, layers, H] or None).

    config_overrides: LMConfig fields to change (e.g. attention_backend="flash").
    """
    hf_config, hf_state = load_hf_folder(folder)
    cfg = lm_config_from_hf(hf_config, **config_overrides)
    model = LMModel(cfg, selection, num_tasks)
    state = {our_name(k): v for k, v in hf_state.items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    if model.candidates > 1:
        state = upcycle_state(state, cfg, model.candidates)
    if model.selector is not None:
        sel = model.selection_config
        state["selector.logits"] = selector_logits(num_tasks, cfg.num_layers, cfg.num_heads, model.candidates,
                                                   scores, sel.init_low, sel.init_high, seed=sel.seed)
    elif scores is not None:
        raise ValueError("head scores were given but selection is off; enable selection to warm-start it")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "selector.draws" and k != "selector.temperature"]
    if missing or unexpected:
        raise ValueError(f"{folder}: weights do not match the {hf_config.model_type} layout "
                         f"(missing {missing[:4]}, unexpected {unexpected[:4]})")
    return model


# --- export ---------------------------------------------------------------------------------------------------------


def task_state_dict(model: LMModel, task: int) -> dict[str, Tensor]:
    """HF-named weights of one task's sub-network (deterministic selection): an ordinary dense GQA model."""
    cfg = model.config
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("selector.")}
    if model.selector is not None:
        if not 0 <= task < model.num_tasks:
            raise ValueError(f"task={task} is out of range: the model has num_tasks={model.num_tasks}")
        table = model.head_selection_table()[task]
        P, d = model.pool_heads, cfg.head_dim
        for layer, heads in enumerate(table):
            heads_H = torch.tensor(heads)
            prefix = f"layers.{layer}.self_attn."
            state[prefix + "q_proj.weight"] = state[prefix + "q_proj.weight"].view(P, d, -1)[heads_H].reshape(
                len(heads) * d, -1)
            if prefix + "q_proj.bias" in state:
                state[prefix + "q_proj.bias"] = state[prefix + "q_proj.bias"].view(P, d)[heads_H].reshape(-1)
            o = state[prefix + "o_proj.weight"]
            state[prefix + "o_proj.weight"] = o.view(o.shape[0], P, d)[:, heads_H].reshape(o.shape[0], -1)
    if cfg.attention_bias and not cfg.output_bias:  # LlamaConfig's attention_bias also puts a bias on o_proj
        for layer in range(cfg.num_layers):
            state[f"layers.{layer}.self_attn.o_proj.bias"] = torch.zeros(cfg.hidden_size)
    return {hf_name(k): v.contiguous() for k, v in state.items()}


def export_task(
    model: LMModel,
    task: int,
    folder: str | Path,
    tokenizer_from: str | Path | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write task ``task``'s sub-network as a LlamaForCausalLM folder (safetensors only); returns the folder.

    tokenizer_from: a folder whose tokenizer files are copied alongside (e.g. the imported HF checkpoint).
    dtype: cast the weights (default: the model's).
    """
    from huggingface_hub import save_torch_state_dict
    from transformers import GenerationConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = task_state_dict(model, task)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    hf_config = hf_config_from_lm(model.config)
    hf_config.architectures = ["LlamaForCausalLM"]
    hf_config.dtype = next(iter(state.values())).dtype
    hf_config.save_pretrained(folder)
    GenerationConfig.from_model_config(hf_config).save_pretrained(folder)
    save_torch_state_dict(state, folder, safe_serialization=True)
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_from) / name).is_file():
                shutil.copy(Path(tokenizer_from) / name, folder / name)
    provenance = {"task": task, "heads": None if model.selector is None else model.head_selection_table()[task]}
    (folder / "hs_scale_export.json").write_text(json.dumps(provenance, indent=1) + "\n")
    return folder
