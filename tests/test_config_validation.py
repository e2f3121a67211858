"""One validation path for every config: choices, ranges, types and exclusive groups declared on the fields
and checked once by ``lowrank.core.config.Config``, alike from the Python API, ``from_dict``/JSON and the
CLI; the versioned dict form and its migrations, down to saved models written before versions existed.

The cases are generated from the dataclass fields of every registered method config and of the configs
nested in them, so a new field or method is covered without touching this file.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest
import torch
from conftest import make_tiny_model, random_tokens

from lowrank.cli import build_parser, main
from lowrank.cli.compress import build_config
from lowrank.core.config import Config, field_problem, nested_fields
from lowrank.loading.serialization import MANIFEST, load_compressed, save_compressed
from lowrank.methods import (
    KVProjectionConfig,
    MethodConfig,
    SVDConfig,
    SVDLLMConfig,
    SVDLLMV2Config,
    applied_methods,
    compress,
    config_class,
    config_from_dict,
    method_names,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- the configs and their declared fields


def _all_config_classes() -> list[type]:
    """Every registered method config and every config nested in one (transitively)."""
    out: list[type] = []
    todo = [config_class(m) for m in method_names()]
    while todo:
        cls = todo.pop(0)
        if cls not in out:
            out.append(cls)
            todo += list(nested_fields(cls).values())
    return out


CLASSES = _all_config_classes()


def _kwargs(cls: type) -> dict[str, Any]:
    """Keyword arguments of a small valid instance (a method's ``example``; defaults for nested configs)."""
    return dict(getattr(cls, "example", {}))


def _without_partners(cls: type, kwargs: dict[str, Any], name: str) -> dict[str, Any]:
    """``kwargs`` less the other members of ``name``'s exclusive groups (so they do not refuse first)."""
    partners = {n for group in getattr(cls, "exclusive", ()) if name in group for n in group if n != name}
    return {k: v for k, v in kwargs.items() if k not in partners}


def _declared(key: str) -> list[tuple[type, dataclasses.Field]]:
    return [(cls, f) for cls in CLASSES for f in dataclasses.fields(cls) if key in f.metadata]


def _id(case) -> str:
    cls, f, *rest = case
    return "-".join([getattr(cls, "config_label", lambda: cls.__name__)(), f.name, *map(repr, rest)])


def _choices(f: dataclasses.Field) -> tuple[Any, ...]:
    choices = f.metadata["choices"]
    return tuple(choices() if callable(choices) else choices)


def _bad_choice(f: dataclasses.Field) -> Any:
    choices = _choices(f)
    return max(choices) + 1 if all(isinstance(c, int) for c in choices) else "typo-" + str(choices[0])


CHOICE_CASES = _declared("choices")


def test_the_generated_cases_cover_every_method_and_the_nested_configs():
    names = {c.__name__ for c in CLASSES}
    assert {"CalibrationConfig", "DecomposerConfig", "HealConfig", "KVProjectionConfig"} <= names
    nested = {"CalibrationConfig", "DecomposerConfig", "LossAllocationConfig"}
    assert nested <= names and len(CLASSES) == len(method_names()) + len(nested)
    assert ("kv-projection", "rank_allocation") in {(c.config_label(), f.name) for c, f in CHOICE_CASES}


def _assert_names(message: str, cls: type, name: str, value: Any) -> None:
    assert "\n" not in message
    assert f"{cls.config_label()} field {name!r}" in message, message
    assert repr(value) in message, message


@pytest.mark.parametrize(("cls", "f"), CHOICE_CASES, ids=list(map(_id, CHOICE_CASES)))
def test_a_bad_choice_is_refused_from_the_api_and_from_dict(cls, f):
    bad = _bad_choice(f)
    kwargs = _kwargs(cls)
    with pytest.raises(ValueError, match="must be one of") as api:
        cls(**{**kwargs, f.name: bad})
    _assert_names(str(api.value), cls, f.name, bad)
    assert all(repr(c) in str(api.value) for c in _choices(f))  # says what is valid
    data = {**cls(**kwargs).to_dict(), f.name: bad}
    with pytest.raises(ValueError, match="must be one of") as loaded:
        cls.from_dict(json.loads(json.dumps(data)))
    _assert_names(str(loaded.value), cls, f.name, bad)


@pytest.mark.parametrize(("cls", "f"), CHOICE_CASES, ids=list(map(_id, CHOICE_CASES)))
def test_every_declared_choice_is_accepted(cls, f):
    for choice in _choices(f):
        assert getattr(cls(**{**_kwargs(cls), f.name: choice}), f.name) == choice


def _nested_choice_cases():
    for method in method_names():
        outer = config_class(method)
        for name, inner in nested_fields(outer).items():
            for f in dataclasses.fields(inner):
                if "choices" in f.metadata:
                    yield outer, name, inner, f


NESTED_CASES = list(_nested_choice_cases())


@pytest.mark.parametrize(
    ("outer", "name", "inner", "f"),
    NESTED_CASES,
    ids=[f"{o.method}-{n}-{f.name}" for o, n, _, f in NESTED_CASES],
)
def test_a_bad_choice_inside_a_nested_config_is_refused_naming_it(outer, name, inner, f):
    bad = _bad_choice(f)
    data = outer(**_kwargs(outer)).to_dict()
    data[name] = {**data[name], f.name: bad}
    with pytest.raises(ValueError) as info:
        config_from_dict(data)
    _assert_names(str(info.value), inner, f.name, bad)


# ---------------------------------------------------------------- ranges


def _interval(f: dataclasses.Field):
    from lowrank.core.config import _interval

    return _interval(f.metadata["range"])


def _is_int(cls: type, f: dataclasses.Field) -> bool:
    hint = typing.get_type_hints(cls)[f.name]
    return int in (hint, *typing.get_args(hint)) and float not in (hint, *typing.get_args(hint))


def _outside(cls: type, f: dataclasses.Field) -> list[Any]:
    """Values just outside the declared interval (and the non-finite ones for a float field)."""
    iv = _interval(f)
    integer = _is_int(cls, f)
    step = 1 if integer else 1e-9 * max(1.0, abs(iv.low), abs(iv.high) if iv.high != math.inf else 1.0)
    out = []
    if iv.low != -math.inf:
        out.append(iv.low if not iv.low_closed else iv.low - step)
    if iv.high != math.inf:
        out.append(iv.high if not iv.high_closed else iv.high + step)
    if not integer:
        out += [math.nan, math.inf, -math.inf]
    return [int(v) if integer else float(v) for v in out]


def _edges(cls: type, f: dataclasses.Field) -> list[Any]:
    """Closed bounds (inside) and a value strictly inside."""
    iv = _interval(f)
    integer = _is_int(cls, f)
    out = [v for v, closed in ((iv.low, iv.low_closed), (iv.high, iv.high_closed)) if closed]
    low = iv.low if iv.low != -math.inf else iv.high - 2
    high = iv.high if iv.high != math.inf else low + 2
    out.append((low + high) / 2)
    return [math.ceil(v) if integer else float(v) for v in out]


RANGE_CASES = [(cls, f, v) for cls, f in _declared("range") for v in _outside(cls, f)]


@pytest.mark.parametrize(("cls", "f", "value"), RANGE_CASES, ids=list(map(_id, RANGE_CASES)))
def test_a_value_out_of_range_is_refused_from_the_api_and_from_dict(cls, f, value):
    kwargs = _without_partners(cls, _kwargs(cls), f.name)
    with pytest.raises(ValueError) as api:
        cls(**{**kwargs, f.name: value})
    _assert_names(str(api.value), cls, f.name, value)
    data = {**cls(**_kwargs(cls)).to_dict(), **{k: None for k in _kwargs(cls) if k not in kwargs}}
    with pytest.raises(ValueError) as loaded:
        cls.from_dict({**data, f.name: value})
    _assert_names(str(loaded.value), cls, f.name, value)


@pytest.mark.parametrize(("cls", "f"), _declared("range"), ids=list(map(_id, _declared("range"))))
def test_the_closed_bounds_and_the_inside_of_a_range_pass_the_field_check(cls, f):
    hint = typing.get_type_hints(cls)[f.name]
    for value in _edges(cls, f):
        assert field_problem(value, hint, f.metadata) is None, (f.name, value)
    for value in _outside(cls, f):
        assert field_problem(value, hint, f.metadata) is not None, (f.name, value)


def test_range_messages_say_the_interval():
    with pytest.raises(
        ValueError, match=r"^kv-projection field 'rank_fraction' must be in \(0, 1\]; got 1.5$"
    ):
        KVProjectionConfig(rank_fraction=1.5)
    with pytest.raises(ValueError, match=r"^calibration field 'samples' must be a positive integer; got 0$"):
        SVDLLMConfig(ratio=0.2, calibration={"samples": 0})
    with pytest.raises(ValueError, match=r"^heal field 'temperature' must be > 0; got inf$"):
        config_class("heal")(teacher="self", temperature=math.inf)


def test_types_are_checked_from_the_api_too():
    with pytest.raises(
        ValueError, match=r"^kv-projection field 'keys_only' must be true or false; got 'yes'"
    ):
        KVProjectionConfig(keys_only="yes")
    with pytest.raises(ValueError, match=r"field 'samples' must be an integer; got True \(bool\)"):
        SVDLLMConfig(ratio=0.2, calibration={"samples": True})


# ---------------------------------------------------------------- exclusive groups


def _inside_value(cls: type, f: dataclasses.Field) -> Any:
    """A valid value other than the default (the middle of the field's range)."""
    return _edges(cls, f)[-1] if "range" in f.metadata else 1


EXCLUSIVE_CASES = [(cls, group) for cls in CLASSES for group in getattr(cls, "exclusive", ())]


@pytest.mark.parametrize(
    ("cls", "group"), EXCLUSIVE_CASES, ids=[f"{c.config_label()}" for c, _ in EXCLUSIVE_CASES]
)
def test_two_fields_of_an_exclusive_group_are_refused(cls, group):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {name: _inside_value(cls, fields[name]) for name in group}
    kwargs = {k: v for k, v in _kwargs(cls).items() if k not in group}
    for name, value in values.items():  # one of them alone is fine
        assert getattr(cls(**{**kwargs, name: value}), name) == value
    with pytest.raises(ValueError, match="are exclusive") as info:
        cls(**{**kwargs, **values})
    assert all(repr(name) in str(info.value) for name in group) and "\n" not in str(info.value)
    with pytest.raises(ValueError, match="are exclusive"):
        cls.from_dict({**cls(**_kwargs(cls)).to_dict(), **values})


# ---------------------------------------------------------------- versions


def _strip_versions(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_versions(v) for k, v in value.items() if k != "version"}
    if isinstance(value, list):
        return [_strip_versions(v) for v in value]
    return value


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_round_trip_with_the_version_key(cls):
    config = cls(**_kwargs(cls))
    data = config.to_dict()
    assert data["version"] == cls.version >= 1
    for name in nested_fields(cls):
        assert data[name]["version"] == type(getattr(config, name)).version
    assert cls.from_dict(json.loads(json.dumps(data))) == config
    assert cls.from_dict(_strip_versions(data)) == config  # written before versions: version 0
    newer = {**data, "version": cls.version + 2}
    with pytest.raises(ValueError) as info:
        cls.from_dict(newer)
    assert str(info.value) == (
        f"{cls.config_label()} config saved by a newer lowrank "
        f"(version {cls.version + 2}; this one reads up to {cls.version})"
    )
    with pytest.raises(ValueError, match="field 'version' must be an integer >= 0; got '1'"):
        cls.from_dict({**data, "version": "1"})


def _rename_size(data: dict[str, Any]) -> dict[str, Any]:
    data = dict(data)
    if "size" in data:
        data["width"] = data.pop("size")
    return data


@dataclass(kw_only=True)
class _Resized(Config):
    """Version 1 called the field ``size``; version 2 calls it ``width``."""

    label: ClassVar[str] = "resized"
    version: ClassVar[int] = 2
    migrations: ClassVar[dict] = {**Config.migrations, 1: _rename_size}
    width: int = field(default=4, metadata={"range": "[1, inf)"})


@dataclass(kw_only=True)
class _ResizedMethod(MethodConfig):
    """The same migration on a method config (not registered), nesting the migrated config."""

    method: ClassVar[str] = "resized-method"
    version: ClassVar[int] = 2
    migrations: ClassVar[dict] = {**MethodConfig.migrations, 1: _rename_size}
    width: int = 4
    inner: _Resized = field(default_factory=_Resized)


def test_a_real_migration_renames_a_field_and_checks_the_result():
    assert _Resized.from_dict({"version": 1, "size": 8}) == _Resized(width=8)
    assert _Resized.from_dict({"size": 8}) == _Resized(width=8)  # version 0 → 1 → 2
    assert _Resized.from_dict({"version": 2, "width": 8}) == _Resized(width=8)
    assert _Resized(width=8).to_dict() == {"version": 2, "width": 8}
    with pytest.raises(ValueError, match=r"unknown resized field\(s\) \['size'\]"):
        _Resized.from_dict({"version": 2, "size": 8})  # not migrated again: version 2 has no 'size'
    with pytest.raises(ValueError, match="^resized field 'width' must be a positive integer; got 0$"):
        _Resized.from_dict({"version": 1, "size": 0})  # the migrated dict is validated
    with pytest.raises(ValueError, match=r"newer lowrank \(version 3; this one reads up to 2\)"):
        _Resized.from_dict({"version": 3, "width": 8})
    old = {"method": "resized-method", "version": 1, "size": 3, "inner": {"version": 1, "size": 5}}
    assert _ResizedMethod.from_dict(old) == _ResizedMethod(width=3, inner=_Resized(width=5))
    assert _ResizedMethod.from_dict(_ResizedMethod(width=3).to_dict()) == _ResizedMethod(width=3)


def test_what_a_user_writes_without_a_version_gets_todays_defaults(tmp_path):
    """Flags, a command's recipe, a hand-written config file and ``config_from_dict`` carry no version: they
    are read in the current form, so ``svd-llm-v2`` allocates ``auto`` and ``mla`` takes the rorope
    defaults chosen on calibration text; a saved config keeps the meaning of its version."""
    parse = build_parser("compress").parse_args
    v2 = build_config(parse(["compress", "--method", "svd-llm-v2", "--ratio", "0.2", "--out", "o"]))
    assert v2.allocation == "auto"
    mla = build_config(parse(["compress", "--method", "mla", "--rope-dim", "32", "--kv-lora-rank", "88"]))
    assert (mla.freqfold, mla.latent_objective) == (None, "attention")  # None: the resolved default
    assert build_config(parse(["compress", "--out", "o"]), {"ratio": 0.2}).allocation == "auto"
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"method": "mla", "rope_dim": 32, "kv_lora_rank": 88}))
    assert build_config(parse(["compress", "--config", str(cfg)])).latent_objective == "attention"
    cfg.write_text(json.dumps({"method": "mla", "version": 1, "rope_dim": 32, "kv_lora_rank": 88}))
    saved = build_config(parse(["compress", "--config", str(cfg)]))
    assert (saved.freqfold, saved.latent_objective) == (1, "kv")  # version 1 meant TransMLA's settings
    assert config_from_dict({"method": "svd-llm-v2", "ratio": 0.2}).allocation == "auto"
    assert config_from_dict({"method": "svd-llm-v2", "version": 1, "ratio": 0.2}).allocation == "uniform"
    assert config_from_dict({"method": "mla", "rope_dim": 32, "kv_lora_rank": 88}).latent_objective == (
        "attention"
    )


def test_svd_llm_v2_configs_from_before_auto_keep_their_uniform_allocation():
    """Version 2 made ``auto`` the default: an older config that left ``allocation`` out meant uniform."""
    assert SVDLLMV2Config.from_dict({"version": 1, "ratio": 0.2}).allocation == "uniform"
    assert SVDLLMV2Config.from_dict({"ratio": 0.2}).allocation == "uniform"  # version 0, same meaning
    assert SVDLLMV2Config.from_dict({"version": 1, "ratio": 0.2, "allocation": "auto"}).allocation == "auto"
    assert SVDLLMV2Config.from_dict({"version": 2, "ratio": 0.2}).allocation == "auto"


def test_a_version_without_its_migration_is_refused_when_the_class_is_defined():
    with pytest.raises(TypeError, match="needs migrations from versions \\[1\\]"):

        class _Broken(Config):
            version: ClassVar[int] = 2


def test_a_saved_model_whose_manifest_has_no_versions_loads_and_stacks(tmp_path):
    model = make_tiny_model("llama")
    first = SVDLLMConfig(
        ratio=0.3, targets=("re:.*mlp\\..*_proj",), calibration={"samples": 8, "seq_len": 16}
    )
    compress(model, first, calibration=random_tokens(8, 16))
    save_compressed(model, tmp_path / "old")
    path = tmp_path / "old" / MANIFEST
    manifest = json.loads(path.read_text())
    assert manifest["methods"][0]["version"] == 1 and manifest["methods"][0]["calibration"]["version"] == 1
    old = copy.deepcopy(manifest)
    old["methods"] = _strip_versions(old["methods"])
    for summary in old["summaries"]:
        summary["config"] = _strip_versions(summary["config"])
    assert "version" not in json.dumps(old["methods"])
    path.write_text(json.dumps(old))  # as written before configs were versioned

    loaded, _ = load_compressed(tmp_path / "old")
    ids = random_tokens(1, 12, seed=3)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    (record,) = applied_methods(loaded)
    assert "version" not in record and config_from_dict(record) == first
    compress(loaded, SVDConfig(ratio=0.2))  # stacks on the old record
    save_compressed(loaded, tmp_path / "new")
    again, _ = load_compressed(tmp_path / "new")
    assert [config_from_dict(m) for m in applied_methods(again)] == [first, SVDConfig(ratio=0.2)]


# ---------------------------------------------------------------- the command line


def test_the_cli_refuses_a_bad_choice_as_a_flag_and_from_a_config_file(tmp_path, capsys):
    args = ["compress", "--model", str(tmp_path / "none"), "--method", "kv-projection"]
    with pytest.raises(SystemExit) as flag:
        main([*args, "--rank-allocation", "typo"])
    assert flag.value.code == 2
    assert "--rank-allocation" in (err := capsys.readouterr().err) and "'typo'" in err
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"method": "kv-projection", "rank_allocation": "typo"}))
    assert main(["compress", "--model", str(tmp_path / "none"), "--config", str(cfg)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (
        "lowrank compress: error: kv-projection field 'rank_allocation' must be one of "
        "('uniform', 'budget'); got 'typo'"
    )


METHOD_CHOICE_CASES = [(cls, f) for cls, f in CHOICE_CASES if issubclass(cls, MethodConfig)]


@pytest.mark.parametrize(("cls", "f"), METHOD_CHOICE_CASES, ids=list(map(_id, METHOD_CHOICE_CASES)))
def test_every_bad_choice_in_a_config_file_is_refused_by_the_cli_path(tmp_path, cls, f):
    bad = _bad_choice(f)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({**cls(**_kwargs(cls)).to_dict(), f.name: bad}))
    args = build_parser("compress").parse_args(["compress", "--config", str(cfg)])
    with pytest.raises(ValueError) as info:
        build_config(args)
    _assert_names(str(info.value), cls, f.name, bad)


def test_a_method_flag_over_another_methods_config_keeps_the_shared_fields(tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(SVDLLMConfig(ratio=0.25, calibration={"samples": 8}).to_dict()))
    args = build_parser("compress").parse_args(["compress", "--config", str(cfg), "--method", "svd-llm-v2"])
    config = build_config(args)
    assert config.method == "svd-llm-v2" and config.ratio == 0.25 and config.calibration.samples == 8
