"""The run configuration: one typed dataclass per component, loaded from YAML plus command-line overrides.

    cfg = load_config("configs/demo_asr.yaml", ["--selection.strategy", "subset", "--train.steps=200"])

Every section is a dataclass owned by its component (model, selection, data, parallel, train, synthetic) and
validates itself in ``__post_init__``; `Config.__post_init__` adds the checks that need two sections at once
(pool vs active heads vs tensor parallelism, the parallel layout, task keys), each stated once (the head rule is
`hs_scale.selection.config.head_problems`, the layout rules `hs_scale.parallel.layout`); the build-time code
does not re-check them. Any refusal is a `ConfigError` that names the field
(``selection.pool_heads``) and says what to change - at load time, never deep inside a reshape.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hs_scale.data.config import DataConfig
from hs_scale.data.synthetic import SyntheticConfig
from hs_scale.models.config import ModelConfig
from hs_scale.models.lm.config import LMConfig
from hs_scale.models.lm.tp_plan import check_tensor_parallel
from hs_scale.models.registry import MODEL_SPECS
from hs_scale.parallel.layout import ParallelConfig, padded_vocab_size, validate_layout
from hs_scale.selection.config import SelectionConfig
from hs_scale.training.config import TrainConfig


class ConfigError(ValueError):
    """An invalid configuration; the message names the field and the fix."""


# Integer fields of parallel: whose ranges the layout arithmetic assumes (0 would divide by zero).
_PARALLEL_MINIMUM = {"tensor_parallel": 1, "pipeline_parallel": 1, "data_parallel": 1, "virtual_pipeline": 1,
                     "zero_stage": 0, "timeout_minutes": 1}


@dataclass
class Config:
    model: ModelConfig | LMConfig = field(default_factory=ModelConfig)
    """Architecture (the `model:` section); `arch: lm` makes it the decoder-only LM's LMConfig."""

    selection: SelectionConfig = field(default_factory=SelectionConfig)
    """Head selection (the `selection:` section)."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor / pipeline / data parallel layout and data-parallel engine (the `parallel:` section)."""

    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimiser, schedule, logging (the `train:` section)."""

    data: DataConfig | None = None
    """Sharded corpus to train on (the `data:` section). Exactly one of `data` and `synthetic` is set."""

    synthetic: SyntheticConfig | None = None
    """In-process synthetic multilingual task instead of a corpus (the `synthetic:` section)."""

    def __post_init__(self) -> None:
        if (self.data is None) == (self.synthetic is None):
            raise ConfigError("set exactly one of the sections `data:` (a corpus) and `synthetic:` (built-in task)")
        if self.synthetic is not None and self.model.arch != "text":
            raise ConfigError("the synthetic task is text-to-text; set model.arch=text")
        if self.data is not None:
            if self.data.task_key != self.selection.task_key:
                raise ConfigError(
                    f"data.task_key={self.data.task_key!r} differs from selection.task_key="
                    f"{self.selection.task_key!r}; set both to the same key"
                )
            if self.data.modality != MODEL_SPECS[self.model.arch].modality:
                raise ConfigError(
                    f"data.modality={self.data.modality!r} does not fit model.arch={self.model.arch!r}; "
                    "use speech with s2t, text with text and lm with lm"
                )
        p = self.parallel
        for name, minimum in _PARALLEL_MINIMUM.items():
            value = getattr(p, name)
            if value is not None and value < minimum:
                raise ConfigError(f"parallel.{name}={value} is out of range: must be >= {minimum}"
                                  + (" (or unset: one per process)" if name == "data_parallel" else ""))
        if p.model_parallel > 1:
            if p.engine != "megatron_ddp":
                raise ConfigError(f"parallel.engine={p.engine!r} with tensor/pipeline parallelism is not supported "
                                  "by the trainer; use parallel.engine=megatron_ddp (ZeRO runs with tp=pp=1)")
        lm = self.model.arch == "lm"
        if lm:  # the LM's TP plan: a rank owns whole KV heads (hs_scale/models/lm/tp_plan.py)
            problems = check_tensor_parallel(self.model, p.tensor_parallel)
            if problems:
                raise ConfigError("; ".join(problems))
        try:
            validate_layout(
                p,
                world_size=p.model_parallel * (p.data_parallel or 1),
                num_heads=self.model.num_heads,
                pool_heads=self.selection.pool_heads if self.selection.enabled else self.model.num_heads,
                encoder_layers=0 if lm else self.model.encoder_layers,
                decoder_layers=self.model.num_layers if lm else self.model.decoder_layers,
                ffn_dim=None if lm else self.model.ffn_dim,  # the LM's intermediate_size: check_tensor_parallel
                vocab_size=padded_vocab_size(self.model.vocab_size, p.tensor_parallel),
                strategy=self.selection.strategy,
                num_microbatches=self.train.grad_accum,
            )
        except ValueError as err:  # heads vs pool vs TP (selection.config.head_problems), layers, ranks, engine
            raise ConfigError(str(err)) from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------------------
# dict -> dataclass with field names and types checked


def _check_value(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if LMConfig in options and isinstance(value, dict) and value.get("arch") == "lm":
            options = (LMConfig,)  # model: an `arch: lm` section is an LMConfig (its own errors, not ModelConfig's)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_value(value, option, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint) or (Any,)
        return [_check_value(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string; accept what float() accepts
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):  # .nan would pass every `x < 0` check and silently disable what it sets
            raise ConfigError(f"{where}={value}: must be a finite number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def build_dataclass(cls: type, raw: Any, where: str) -> Any:
    """Instantiate `cls` from a mapping, refusing unknown fields and wrong types with the field's full name."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of fields, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {_join(where, close[0])}?" if close else f"; known fields: {', '.join(names)}"
            raise ConfigError(f"{_join(where, key)}: unknown field{hint}")
        kwargs[key] = _check_value(value, hints[key], _join(where, key))
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        message = str(err)
        raise ConfigError(message if not where or f"{where}." in message else f"{where}: {message}") from None


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else str(key)


# ---------------------------------------------------------------------------------------------------------------
# YAML + overrides


class _StrictLoader(yaml.SafeLoader):
    """safe_load that refuses duplicate keys (YAML would silently keep the last `train:` section)."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if isinstance(key, (str, int, float)) and key != "<<" and key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key] + 1}); keep one", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def parse_overrides(args: list[str]) -> dict:
    """["--a.b", "1", "--c.d=x"] -> {"a": {"b": 1}, "c": {"d": "x"}}; values are parsed as YAML scalars."""
    tree: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"override {arg!r}: expected --section.field VALUE or --section.field=VALUE")
        if "=" in arg:
            dotted, text = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg}: missing value")
            dotted, text = arg[2:], args[i + 1]
            i += 2
        parts = dotted.split(".")
        if not all(part.replace("_", "").isalnum() for part in parts):
            raise ConfigError(f"override {arg!r}: {dotted!r} is not a field name; expected --section.field VALUE")
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override --{dotted}: {part} was already given a value; set its fields only")
        try:
            node[parts[-1]] = yaml.load(text, Loader=_StrictLoader)
        except yaml.YAMLError as err:  # a tag (!!python/...), an unclosed bracket...
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"override --{dotted}: cannot read the value {text!r} ({problem}); give a plain "
                              "number, string, true/false or [list]") from None
    return tree


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def config_from_dict(raw: dict) -> Config:
    return build_dataclass(Config, _upgrade_retired_fields(raw), "")


def _upgrade_retired_fields(raw: dict) -> dict:
    """Drop fields an earlier hs_scale wrote but this one no longer has, when their meaning lives on elsewhere.

    Checkpoints keep the config they were trained with, so evaluate / export / init_from on an older run read
    these fields; refusing them as unknown would strand every old checkpoint. A value the old version itself
    refused is refused here too, naming the successor field.
    """
    parallel = raw.get("parallel")
    if isinstance(parallel, dict) and "num_microbatches" in parallel:
        parallel = dict(parallel)
        microbatches = parallel.pop("num_microbatches")  # was a copy of train.grad_accum (1 or equal to it)
        grad_accum = (raw.get("train") or {}).get("grad_accum", 1)
        if microbatches not in (1, grad_accum):
            raise ConfigError(f"parallel.num_microbatches={microbatches} was replaced by train.grad_accum "
                              f"(micro-batches per optimizer step): set --train.grad_accum {microbatches}")
        raw = {**raw, "parallel": parallel}
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML file (or start from defaults), apply `--section.field value` overrides, validate."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {path} is a directory; pass a YAML file (e.g. configs/synthetic.yaml)")
        try:
            raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except UnicodeDecodeError as err:
            raise ConfigError(f"config file {path} is not UTF-8 text (byte {err.start}): is it a YAML file?") from None
        except OSError as err:
            raise ConfigError(f"config file {path} cannot be read: {err.strerror}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(err).split())}") from None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} holds a {type(raw).__name__}, not a mapping of sections "
                              "(model:, selection:, train:, ...)")
    raw = _merge(raw, parse_overrides(overrides or []))
    return config_from_dict(raw)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
