"""The run config: YAML + overrides, refusals that name the field and the fix."""

from __future__ import annotations

import pytest

from hs_scale.config import ConfigError, dump_config, load_config, parse_overrides

SYNTHETIC = "configs/synthetic.yaml"


def test_yaml_and_overrides_resolve():
    cfg = load_config(SYNTHETIC, ["--selection.strategy", "subset", "--train.lr=3e-4", "--synthetic.rules",
                                  "[copy, reverse]"])
    assert cfg.selection.strategy == "subset"
    assert cfg.train.lr == pytest.approx(3e-4)  # "3e-4" is a string to YAML 1.1; the float field accepts it
    assert cfg.synthetic.rules == ["copy", "reverse"]
    assert cfg.model.arch == "text"


def test_every_shipped_config_loads():
    import glob

    paths = sorted(glob.glob("configs/*.yaml"))
    assert paths
    for path in paths:
        cfg = load_config(path)
        reloaded = load_config(None, _flat_overrides(cfg.to_dict()))  # the dumped config round-trips
        assert reloaded == cfg, path
        assert dump_config(reloaded) == dump_config(cfg)


def _flat_overrides(tree: dict, prefix: str = "") -> list[str]:
    args = []
    for key, value in tree.items():
        if isinstance(value, dict) and value and key not in ("task_weights",):
            args += _flat_overrides(value, f"{prefix}{key}.")
        elif value is not None and value != {}:
            import json

            args.append(f"--{prefix}{key}={json.dumps(value)}")
    return args


def test_parse_overrides_nested_and_typed():
    tree = parse_overrides(["--a.b.c", "3", "--a.d=true", "--e.f", "x"])
    assert tree == {"a": {"b": {"c": 3}, "d": True}, "e": {"f": "x"}}
    with pytest.raises(ConfigError, match="missing value"):
        parse_overrides(["--a.b"])
    with pytest.raises(ConfigError, match="expected --section.field"):
        parse_overrides(["a.b=1"])


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["--model.d_modle", "64"], r"model\.d_modle: unknown field; did you mean model\.d_model\?"),
        (["--selection.pool_heads", "3"], r"pool_heads=3 is not a multiple of model\.num_heads=2.*pool_heads=4"),
        (["--selection.strategy", "topk"], r"selection\.strategy='topk' is unknown"),
        (["--selection.task_key", "language"], r"selection\.task_key='language' is unknown"),
        (["--train.lr", "abc"], r"train\.lr: expected a number"),
        (["--train.steps", "1.5"], r"train\.steps: expected an integer"),
        (["--model.num_heads", "3"], r"d_model.*num_heads|num_heads.*d_model"),
        (["--parallel.tensor_parallel", "4"], r"not divisible by tensor_parallel=4.*use tensor_parallel in"),
        (["--parallel.pipeline_parallel", "3"], r"pipeline"),
        (["--synthetic.rules", "[copy, sing]"], r"synthetic\.rules: unknown rule"),
        (["--model.arch", "s2t"], r"synthetic task is text-to-text; set model\.arch=text"),
        (["--bogus.x", "1"], r"bogus: unknown field"),
    ],
)
def test_refusals_name_field_and_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(SYNTHETIC, overrides)


def test_exactly_one_data_source():
    with pytest.raises(ConfigError, match="exactly one of the sections `data:`"):
        load_config(None)
    with pytest.raises(ConfigError, match="exactly one"):
        load_config(SYNTHETIC, ["--data.manifest", "x"])


def test_data_section_must_agree_with_selection_and_model(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {arch: s2t}\nselection: {task_key: lang}\n"
                    "data: {manifest: /nonexistent, task_key: domain, modality: speech}\n")
    with pytest.raises(ConfigError, match="data.task_key='domain' differs from selection.task_key='lang'"):
        load_config(path)
    path.write_text("model: {arch: s2t}\ndata: {manifest: /nonexistent, modality: text}\n")
    with pytest.raises(ConfigError, match="data.modality='text' does not fit model.arch='s2t'"):
        load_config(path)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_configs_of_older_checkpoints_still_load():
    """A checkpoint written before parallel.num_microbatches became train.grad_accum must still evaluate/export:
    the retired field is dropped when it agrees with its successor, refused with the new name otherwise."""
    from hs_scale.config import config_from_dict

    def saved(microbatches):
        return {"synthetic": {}, "model": {"arch": "text"}, "parallel": {"num_microbatches": microbatches},
                "train": {"grad_accum": 2}}

    assert config_from_dict(saved(2)).train.grad_accum == 2
    with pytest.raises(ConfigError, match=r"replaced by train.grad_accum.*--train.grad_accum 3"):
        config_from_dict(saved(3))
