"""Fault injection, output/input collisions: every output against every input and every other output, a
user's file in an earlier output, two runs on one output, and lengths checked before any compute."""

from __future__ import annotations

import itertools

import pytest
from _tiny import save_tiny_model_dir, tiny_text

from lowrank.cli import main
from lowrank.io.files import check_output_dir
from lowrank.io.paths import check_paths, output_lock

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def assets(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWRANK_CACHE", str(tmp_path / "cache"))
    save_tiny_model_dir(tmp_path / "tiny", "llama")
    save_tiny_model_dir(tmp_path / "teacher", "llama", seed=1)
    (tmp_path / "calib.txt").write_text(tiny_text(3000))
    return tmp_path


def _snapshot(directory):
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _compress(assets, *extra, command="compress"):
    base = [command, "--model", str(assets / "tiny"), "--calib-data", str(assets / "calib.txt")]
    base += ["--calib-seq-len", "32", "--device", "cpu"]
    if command == "compress":
        base += ["--method", "svd-llm", "--ratio", "0.2", "--calib-samples", "4"]
    else:
        base += ["--tokens", "256"]
    return main([*base, *extra])


def _one_line_error(capsys, *words):
    err = capsys.readouterr().err.strip().splitlines()[-1]  # progress bars may come before it
    assert err.startswith("lowrank ") and "error:" in err and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    return err


# every output flag pointed at, inside, or above an input: refused in one line, the input untouched
_PLACES = {
    "equal": lambda d: d,
    "inside": lambda d: d / "model.safetensors",
    "above": lambda d: d.parent,
}


@pytest.mark.parametrize(
    ("flag", "place", "input_dir"),
    list(itertools.product(("--json", "--out", "--checkpoint-dir"), _PLACES, ("tiny", "teacher"))),
)
def test_every_output_against_every_input_is_refused_before_compute(assets, capsys, flag, place, input_dir):
    target = _PLACES[place](assets / input_dir)
    before = {d: _snapshot(assets / d) for d in ("tiny", "teacher")}
    command = "heal" if input_dir == "teacher" else "compress"
    extra = ["--teacher", str(assets / "teacher")] if command == "heal" else []
    rc = _compress(assets, flag, str(target), *extra, "--overwrite", command=command)
    assert rc == 2
    _one_line_error(capsys, flag, "input")
    assert {d: _snapshot(assets / d) for d in ("tiny", "teacher")} == before


@pytest.mark.parametrize(
    ("first", "second"), [("--json", "--out"), ("--checkpoint-dir", "--out"), ("--json", "--checkpoint-dir")]
)
@pytest.mark.parametrize("relation", ["equal", "inside"])
def test_outputs_that_overlap_each_other_are_refused_before_compute(assets, capsys, first, second, relation):
    outer = assets / "results"
    paths = {second: outer, first: outer if relation == "equal" else outer / "x.json"}
    rc = _compress(assets, first, str(paths[first]), second, str(paths[second]))
    assert rc == 2
    _one_line_error(capsys, first, second)
    assert not outer.exists()


def test_json_on_the_source_weights_is_refused_and_the_model_survives(assets, capsys):
    weights = assets / "tiny" / "model.safetensors"
    before = weights.read_bytes()
    rc = main(["evaluate", "--model", str(assets / "tiny"), "--json", str(weights), "--device", "cpu"])
    assert rc == 2
    _one_line_error(capsys, "--json", "--model")
    assert weights.read_bytes() == before


def test_a_users_file_in_an_earlier_output_is_never_deleted(assets, capsys):
    out = assets / "out-a"
    assert _compress(assets, "--out", str(out)) == 0
    assert check_output_dir(out) == out  # exactly what the toolkit wrote: may be replaced
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert _compress(assets, "--out", str(out)) == 2
    _one_line_error(capsys, "notes.txt", "overwrite")
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("extra", ["notes.txt", "tokenizer/extra.bin", "emptydir/"])
def test_anything_unlisted_makes_an_earlier_output_a_users_directory(tmp_path, extra):
    out = tmp_path / "out"
    out.mkdir()
    (out / "lowrank.json").write_text('{"files": {"model.safetensors": {}}}')
    (out / "model.safetensors").write_bytes(b"x")
    target = out / extra
    if extra.endswith("/"):
        target.mkdir()
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("user")
    with pytest.raises(ValueError, match="not written by lowrank"):
        check_output_dir(out)
    assert check_output_dir(out, overwrite=True) == out


def test_a_second_run_on_a_locked_output_fails_in_one_line(assets, capsys):
    out = assets / "out-b"
    with output_lock(out):
        assert _compress(assets, "--out", str(out)) == 2
        _one_line_error(capsys, "another lowrank run")
    assert not out.exists()
    assert _compress(assets, "--out", str(out)) == 0  # released: the next run goes ahead


def test_check_paths_names_both_paths(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(ValueError, match=r"--json .* is inside the input --model"):
        check_paths({"--model": tmp_path / "m"}, {"--json": tmp_path / "m" / "a.json"})
    check_paths({"--model": tmp_path / "m"}, {"--json": tmp_path / "a.json", "--out": tmp_path / "o"})


@pytest.mark.parametrize(
    ("command", "flag", "value"),
    [
        (c, f, v)
        for c in ("evaluate", "demo")
        for f, v in (("--prompt-len", "0"), ("--gen-len", "0"), ("--seq-len", "0"), ("--repeats", "0"))
    ],
)
def test_lengths_below_one_are_refused_before_loading(tmp_path, capsys, command, flag, value):
    rc = main(
        [command, "--model", str(tmp_path / "no-such-model"), flag, value, "--out", str(tmp_path / "o")]
        if command == "demo"
        else [command, "--model", str(tmp_path / "no-such-model"), flag, value]
    )
    assert rc == 2
    _one_line_error(capsys, flag)


@pytest.mark.parametrize("command", ["evaluate", "demo"])
@pytest.mark.parametrize(("flag", "value"), [("--prompt-len", "100000"), ("--seq-len", "100000")])
def test_lengths_past_the_models_positions_are_refused_before_any_compute(
    assets, capsys, monkeypatch, command, flag, value
):
    import lowrank.evaluation.report as report

    def computed(*args, **kwargs):
        raise RuntimeError("compute started before the arguments were checked")

    monkeypatch.setattr(report, "evaluate_model", computed)
    argv = [command, "--model", str(assets / "tiny"), flag, value, "--device", "cpu"]
    if command == "demo":
        argv += ["--out", str(assets / "demo-out")]
    assert main(argv) == 2
    _one_line_error(capsys, "max_position_embeddings=512")
    assert not (assets / "demo-out").exists()
