"""Renamed flags keep working for one release: same parse as the new flag, one warning line naming it."""

from __future__ import annotations

import json

import pytest
from _tiny import save_tiny_model_dir, tiny_text

from lowrank.cli import build_parser, main
from lowrank.cli._renamed import RENAMED, rewrite_renamed

VALUES = {"--seq-len": ["48"], "--gram-dtype": ["float32"], "--non-sequential": []}
CASES = [(command, entry) for command, entries in RENAMED.items() for entry in entries]


def _options(command: str) -> set[str]:
    parser = build_parser(command)
    sub = next(a for a in parser._subparsers._group_actions if a.dest == "command").choices[command]
    return {option for action in sub._actions for option in action.option_strings}


@pytest.mark.parametrize(("command", "entry"), CASES, ids=lambda x: getattr(x, "old", x))
def test_an_old_flag_parses_as_the_new_one_and_warns_once(command, entry, capsys):
    options = _options(command)
    assert entry.new in options and entry.old not in options  # the table is current
    base = [command, "--model", "m", "--method", "svd-llm"]
    value = VALUES[entry.old]
    old = rewrite_renamed([*base, entry.old, *value], command)
    assert old == [*base, entry.new, *value]
    if value:
        assert rewrite_renamed([*base, f"{entry.old}={value[0]}"], command) == [
            *base,
            f"{entry.new}={value[0]}",
        ]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == (2 if value else 1)
    assert f"{entry.old} is deprecated" in err[0] and f"use {entry.new}" in err[0]
    parser = build_parser(command)
    assert vars(parser.parse_args(old)) == vars(parser.parse_args([*base, entry.new, *value]))


def test_values_and_other_commands_are_left_alone():
    argv = ["evaluate", "--seq-len", "64"]
    assert rewrite_renamed(argv, "evaluate") == argv
    # after '--' nothing is a flag
    assert rewrite_renamed(["compress", "--", "--seq-len"], "compress") == ["compress", "--", "--seq-len"]


def test_a_script_with_the_old_flag_still_compresses(tmp_path, capsys):
    save_tiny_model_dir(tmp_path / "tiny", "llama")
    (tmp_path / "calib.txt").write_text(tiny_text(2000))
    common = ["--model", str(tmp_path / "tiny"), "--method", "svd-llm", "--ratio", "0.2"]
    common += ["--calib-data", str(tmp_path / "calib.txt"), "--calib-samples", "8", "--device", "cpu"]
    assert main(["compress", *common, "--seq-len", "32", "--json", str(tmp_path / "old.json")]) == 0
    assert "--seq-len is deprecated" in capsys.readouterr().err
    assert main(["compress", *common, "--calib-seq-len", "32", "--json", str(tmp_path / "new.json")]) == 0
    old, new = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("old", "new"))
    assert old["ranks"] == new["ranks"] and old["parameters_after"] == new["parameters_after"]
    assert old["calibration_tokens"] == new["calibration_tokens"] == 8 * 32
