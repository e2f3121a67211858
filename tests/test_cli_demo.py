"""`lowrank demo` end to end on a tiny model directory and tiny text files."""

from __future__ import annotations

import json

import pytest
from _tiny import save_tiny_model_dir, tiny_text

from lowrank.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def assets(tmp_path):
    save_tiny_model_dir(tmp_path / "tiny", "llama")
    (tmp_path / "text.txt").write_text(tiny_text(6000))
    return tmp_path


def _demo_args(assets, *extra: str) -> list[str]:
    text = str(assets / "text.txt")
    return [
        "demo",
        "--model",
        str(assets / "tiny"),
        "--calib-data",
        text,
        "--data",
        text,
        "--calib-samples",
        "16",
        "--calib-seq-len",
        "48",
        "--seq-len",
        "32",
        "--max-windows",
        "4",
        "--repeats",
        "1",
        "--oversample",
        "4",
        "--power-iters",
        "1",
        "--out",
        str(assets / "out"),
        "--device",
        "cpu",
        *extra,
    ]


def test_demo_compresses_saves_reloads_and_compares(assets, capsys):
    summary = assets / "demo.json"
    assert main(_demo_args(assets, "--json", str(summary))) == 0
    report = json.loads(summary.read_text())
    before, after, comp = report["before"], report["after"], report["compression"]
    # the after column is measured on the model reloaded from disk, with 20 % of the linear params gone
    assert (assets / "out" / "lowrank.json").exists()
    assert after["decoder_linear_parameters"] == comp["linear_parameters_after"]
    assert 0.78 <= after["decoder_linear_parameters"] / before["decoder_linear_parameters"] <= 0.81
    assert after["parameters"] == before["parameters"] - (
        before["decoder_linear_parameters"] - after["decoder_linear_parameters"]
    )
    assert before["tokens_evaluated"] == after["tokens_evaluated"] > 0
    assert after["perplexity"] != before["perplexity"]
    out = capsys.readouterr().out
    assert "compressed / original" in out and "fraction of decoder linear parameters REMOVED" in out


def test_demo_rejects_a_bad_ratio_before_loading_anything(assets, capsys):
    assert main(_demo_args(assets, "--ratio", "1.5")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1.5" in err[0] and "[0, 1)" in err[0]
    assert not (assets / "out").exists()
