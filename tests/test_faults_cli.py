"""Fault injection, flags and configs: exclusive flags refused as the API refuses them, wrongly typed
config fields as one line for every field of every method, --debug after every command, and an
interruption message that fits the command."""

from __future__ import annotations

import dataclasses
import importlib
import json
import typing

import pytest

from lowrank.cli import INTERRUPTED, SUBCOMMANDS, build_parser, main
from lowrank.methods import config_class, method_names


def _last_line(capsys):
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("method", "first", "second"),
    [
        ("svd", ("--ratio", "0.2"), ("--keep-singular-fraction", "0.5")),
        ("svd-llm-v2", ("--ratio", "0.2"), ("--keep-singular-fraction", "0.5")),
        ("mla", ("--kv-lora-rank", "8"), ("--kv-fraction", "0.5")),
    ],
)
def test_two_exclusive_flags_are_refused_like_the_api_refuses_them(tmp_path, capsys, method, first, second):
    with pytest.raises(ValueError):  # the API's own refusal
        config_class(method).from_dict(
            {first[0][2:].replace("-", "_"): float(first[1]), second[0][2:].replace("-", "_"): 0.5}
        )
    rc = main(["compress", "--model", str(tmp_path / "none"), "--method", method, *first, *second])
    assert rc == 2
    line = _last_line(capsys)
    assert first[0] in line and second[0] in line and "exclusive" in line


def test_a_flag_still_overrides_its_exclusive_partner_from_a_config_file(tmp_path):
    from lowrank.cli.compress import build_config

    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"method": "svd", "ratio": 0.2}))
    parser = build_parser("compress")
    args = parser.parse_args(["compress", "--config", str(cfg), "--keep-singular-fraction", "0.5"])
    config = build_config(args)
    assert config.keep_singular_fraction == 0.5 and config.ratio is None


def _wrong_values(hint):
    """JSON values of the wrong type for a field annotated ``hint``."""
    args = typing.get_args(hint)
    optional = type(None) in args
    kinds = set(args) | {hint}
    out = []
    if kinds & {int, float}:
        out += ["abc", True]
    if str in kinds:
        out += [12]
    if bool in kinds:
        out += ["yes"]
    if not optional and out:
        out += [None]
    return out


def _typed_cases():
    for method in method_names():
        cls = config_class(method)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            for value in _wrong_values(hints[f.name]):
                yield method, f.name, value


@pytest.mark.parametrize(("method", "name", "value"), list(_typed_cases()))
def test_a_wrongly_typed_config_field_is_one_line(tmp_path, capsys, method, name, value):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"method": method, name: value}))
    rc = main(["compress", "--model", str(tmp_path / "none"), "--config", str(cfg)])
    assert rc == 2
    line = _last_line(capsys)
    assert "error:" in line and repr(name) in line, line


def test_the_listed_typed_fields(tmp_path, capsys):
    for method, body in (("svd", {"ratio": "abc"}), ("kv-projection", {"rank_fraction": None})):
        cfg = tmp_path / "cfg.json"
        cfg.write_text(json.dumps({"method": method, **body}))
        assert main(["compress", "--model", str(tmp_path / "none"), "--config", str(cfg)]) == 2
        assert "must be a number" in _last_line(capsys)


_MINIMAL = {"bench": ["rsvd"], "export": ["--format", "deepseek-v3", "--out", "unused"]}


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_debug_and_verbose_are_accepted_after_every_command(command):
    args = build_parser(command).parse_args([command, "--debug", "-v", *_MINIMAL.get(command, [])])
    assert args.debug is True and args.verbose is True
    args = build_parser(command).parse_args([command, *_MINIMAL.get(command, [])])
    assert args.debug is False and args.verbose is False


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_an_interruption_says_what_fits_the_command(monkeypatch, capsys, command):
    module = importlib.import_module(f"lowrank.cli.{command.replace('-', '_')}")

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "run", interrupted)
    assert main([command, *_MINIMAL.get(command, [])]) == 130
    line = _last_line(capsys)
    assert line == f"lowrank {command}: interrupted; {INTERRUPTED[command]}"
    mentions_layers = "layers" in line or "--checkpoint-dir" in line
    assert mentions_layers == (command in ("compress", "demo", "heal"))
    assert ("--checkpoint-minutes" in line) == (command == "heal")
