"""Configs are checked at the door: every leaf coerced to its field's type and range-checked on load,
with an error naming the key, the value and what is allowed (exit code 2 from the CLI, no traceback).

The bad values are derived from each section's LIMITS, and the cases from the dataclass fields, so a
new field is covered (or, without limits, reported) without editing this file."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import torch
import yaml
from click.testing import CliRunner

from hgad_edge.cli import main
from hgad_edge.training.config import (
    HEAD_MODES,
    ConfigError,
    HeadConfig,
    HGADConfig,
    Limit,
    OneOf,
    load_config,
    save_config,
    section_fields,
)

SECTIONS = {prefix: type(section) for prefix, section in HGADConfig().sections().items()}


def _base(hint):
    """The scalar type of a field: int for `tuple[int, ...]`, str for `str | None`."""
    args = [a for a in typing.get_args(hint) if a is not type(None) and a is not Ellipsis]
    return _base(args[0]) if args else hint


def _is_tuple(hint) -> bool:
    return typing.get_origin(hint) is tuple


def bad_values(hint, limit) -> list:
    """Values `limit` must refuse: outside each bound, off the multiple, the wrong type, too few items."""
    if isinstance(limit, OneOf):
        return ["no-such-choice", 3]
    base, out = _base(hint), ["abc"]
    if limit is not None:
        step = 1 if base is int else 0.5
        if limit.lo is not None:
            out.append(limit.lo if limit.lo_open else limit.lo - step)
        if limit.hi is not None:
            out.append(limit.hi if limit.hi_open else limit.hi + step)
        if limit.multiple_of is not None:
            lo = limit.lo if limit.lo is not None else 0
            out.append(int(lo) + limit.multiple_of + 1)
        if limit.odd:
            out.append(int(limit.lo or 0) // 2 * 2 + 2)  # the first even number above lo
        if base is int:
            lo = limit.lo if limit.lo is not None else 0
            out.append(lo + 1.5)  # not an integer
    if _is_tuple(hint):
        items = [[v] * (len(typing.get_args(hint)) if Ellipsis not in typing.get_args(hint) else 1) for v in out]
        empty_ok = isinstance(limit, Limit) and limit.min_items == 0 and Ellipsis in typing.get_args(hint)
        return items if empty_ok else [[]] + items
    return out


def _cases():
    for prefix, cls in SECTIONS.items():
        for name, (hint, limit) in section_fields(cls).items():
            if _base(hint) in (int, float) or isinstance(limit, OneOf):
                for value in bad_values(hint, limit):
                    yield pytest.param(prefix + name, value, id=f"{prefix}{name}={value!r}")


def _nested(key: str, value) -> dict:
    *sections, leaf = key.split(".")
    data = {leaf: value}
    for section in reversed(sections):
        data = {section: data}
    return data


@pytest.mark.parametrize("key,value", list(_cases()))
def test_cli_refuses_bad_value_before_reading_data(key, value, tmp_path):
    """An empty data folder: had the config been checked after opening the data, the error would be
    the data's (exit code 1)."""
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_nested(key, value)))
    data = tmp_path / "data"
    data.mkdir()
    res = CliRunner().invoke(
        main, ["train", "--config", str(path), "--data", str(data), "--out", str(tmp_path / "run")]
    )
    assert res.exit_code == 2, res.output
    assert isinstance(res.exception, SystemExit) and "Traceback" not in res.output
    assert f"{key}=" in res.output and "give " in res.output  # the key, the value and what is allowed
    assert not (tmp_path / "run").exists()


def test_every_numeric_field_has_limits():
    """A new int/float field without an entry in its section's LIMITS would go unchecked."""
    for prefix, cls in SECTIONS.items():
        fields = section_fields(cls)
        missing = [n for n, (hint, limit) in fields.items() if _base(hint) in (int, float) and limit is None]
        assert not missing, f"add {', '.join(prefix + n for n in missing)} to {cls.__name__}.LIMITS"
        assert set(getattr(cls, "LIMITS", {})) <= set(fields), f"{cls.__name__}.LIMITS names no field"


def test_defaults_pass_their_own_limits():
    cfg = HGADConfig().validate()
    assert cfg == HGADConfig()
    for prefix, section in cfg.sections().items():
        for name, (hint, limit) in section_fields(type(section)).items():
            value = getattr(section, name)
            values = value if _is_tuple(hint) else (value,)
            assert limit is None or all(limit.allows(v) for v in values if v is not None), prefix + name


def test_yaml_strings_and_lists_are_coerced(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "train: {lr: 1e-3, epochs: 3.0}\nbackbone: {stages: 3, pool: 3, pyramid: [1, 0.5]}\ninput_size: [128, 96]\n"
    )
    cfg = load_config(path)
    assert yaml.safe_load(path.read_text())["train"]["lr"] == "1e-3"  # what PyYAML hands over
    assert cfg.train.lr == 0.001 and isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.backbone.stages == (3,) and cfg.backbone.pyramid == (1.0, 0.5) and cfg.input_size == (128, 96)
    assert all(isinstance(v, float) for v in cfg.backbone.pyramid)
    save_config(cfg, tmp_path / "again.yaml")
    assert load_config(tmp_path / "again.yaml") == cfg


def test_config_errors_name_key_value_and_allowed(tmp_path):
    with pytest.raises(ConfigError, match=r"score\.threshold_quantile=1\.5 .* <= 1"):
        HGADConfig.from_dict({"score": {"threshold_quantile": 1.5}})
    with pytest.raises(ConfigError, match=r"input_size=\[100, 100\] .* multiple of 32"):
        HGADConfig.from_dict({"input_size": [100, 100]})
    with pytest.raises(ConfigError, match="head.mode='nonsense' .* one of single, fixed, gmm, mi, full"):
        HGADConfig.from_dict({"head": {"mode": "nonsense"}})
    with pytest.raises(ConfigError, match="unknown config key"):
        HGADConfig.from_dict({"train": {"epoch": 3}})
    with pytest.raises(ConfigError, match=r"score.level_weights=\[1.0\]: give 3 non-negative weights"):
        HGADConfig.from_dict({"score": {"level_weights": [1]}})  # the default: stage 2, stage 3 at 3x3 and 5x5
    assert HGADConfig.from_dict({"score": {"level_weights": [1, 3, 3]}}).score.level_weights == (1.0, 3.0, 3.0)
    two = {"stages": [2, 3]}
    assert HGADConfig.from_dict({"backbone": {**two, "pool": 5}}).backbone.pool == (5,)  # one int: every stage
    assert HGADConfig.from_dict({"backbone": {**two, "pool": [3, 5]}}).backbone.pool == (3, 5)
    with pytest.raises(ConfigError, match=r"backbone.pool=\[3, 3, 5\]: give 1 or 2 windows .*stages=\[2, 3\]"):
        HGADConfig.from_dict({"backbone": two})  # fewer stages than the default's windows: says which
    with pytest.raises(ConfigError, match="merge fuse pools the fused map"):
        HGADConfig.from_dict({"backbone": {**two, "pool": [3, 5], "merge": "fuse"}})
    assert HGADConfig.from_dict({"backbone": {"stages": [2, 3, 3], "pool": [3, 3, 5]}}).backbone.stages == (2, 3, 3)
    with pytest.raises(ConfigError, match="stage 3 twice with the same 3x3 window"):
        HGADConfig.from_dict({"backbone": {"stages": [2, 3, 3], "pool": 3}})
    with pytest.raises(ConfigError, match=r"merge fuse takes each stage once .*stages \[2, 3\] with pool 3"):
        HGADConfig.from_dict({"backbone": {"merge": "fuse"}})  # the default repeats stage 3
    with pytest.raises(ConfigError, match=r"backbone.pool=\[3, 4\] .* odd"):
        HGADConfig.from_dict({"backbone": {"pool": [3, 4]}})
    with pytest.raises(ConfigError, match="calib_max"):
        HGADConfig.from_dict({"train": {"calib_min": 5, "calib_max": 4}})
    with pytest.raises(ConfigError, match="must be a mapping"):
        HGADConfig.from_dict({"train": [1, 2]})
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("train: {lr: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")


def test_validate_checks_configs_built_in_code():
    cfg = HGADConfig()
    cfg.train.lr = -1.0
    with pytest.raises(ConfigError, match="train.lr=-1.0"):
        cfg.validate()


def test_limit_describes_and_allows():
    lim = Limit(0, 1, hi_open=True)
    assert lim.allows(0) and lim.allows(0.99) and not lim.allows(1) and not lim.allows(-0.1)
    assert lim.describe() == ">= 0 and < 1"
    assert Limit(64, multiple_of=32).allows(96) and not Limit(64, multiple_of=32).allows(100)


@pytest.mark.parametrize("mode", HeadConfig.MODES)
def test_head_mode_registry_drives_the_switches(mode):
    head = HeadConfig(mode=mode)
    switches = HEAD_MODES[mode]
    assert (head.per_class, head.learn_centers, head.mutual_info, head.intra) == tuple(switches)
    # each mode adds to the one before (Tab. 3a is a ladder): learnt centres need per-class centres, ...
    assert switches.per_class >= switches.learn_centers >= switches.mutual_info >= switches.intra


def test_smooth_sigma_zero_means_no_smoothing():
    from hgad_edge.training.scoring import gaussian_blur, gaussian_kernel1d

    maps = torch.randn(2, 16, 16)
    assert torch.equal(gaussian_blur(maps, gaussian_kernel1d(0.0)), maps)
    kernel = gaussian_kernel1d(2.0)
    assert kernel.numel() == 17 and abs(float(kernel.sum()) - 1) < 1e-6
    assert HGADConfig.from_dict({"score": {"smooth_sigma": 0, "topk": 0}}).score.smooth_sigma == 0.0


def test_fields_are_dataclass_fields():
    """sections() covers every dataclass section (so the parametrised cases above cover every leaf)."""
    nested = [f.name for f in dataclasses.fields(HGADConfig) if dataclasses.is_dataclass(getattr(HGADConfig(), f.name))]
    assert sorted(SECTIONS) == sorted(["", *(n + "." for n in nested)])
