"""`lowrank compress` end to end on a tiny model directory and a tiny text file."""

from __future__ import annotations

import json

import pytest
from _tiny import save_tiny_model_dir, tiny_text

from lowrank.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def assets(tmp_path):
    save_tiny_model_dir(tmp_path / "tiny", "llama")
    (tmp_path / "calib.txt").write_text(tiny_text(4000))
    return tmp_path


def test_compress_writes_a_loadable_model_and_a_summary(assets, capsys):
    out, summary = assets / "out", assets / "summary.json"
    rc = main(
        [
            "compress",
            "--model",
            str(assets / "tiny"),
            "--method",
            "svd-llm-v2",
            "--decomposer",
            "rsvd",
            "--oversample",
            "4",
            "--power-iters",
            "1",
            "--ratio",
            "0.2",
            "--calib-data",
            str(assets / "calib.txt"),
            "--calib-samples",
            "16",
            "--calib-seq-len",
            "48",
            "--out",
            str(out),
            "--json",
            str(summary),
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert (
        "fraction of targeted linear params REMOVED" in printed
        and "fraction of singular values KEPT" in printed
    )
    data = json.loads(summary.read_text())
    for key in (
        "method",
        "decomposer",
        "ratio_params_removed",
        "keep_singular_fraction",
        "parameters_before",
        "parameters_after",
        "time_total_s",
        "time_decomposition_s",
        "fallbacks",
    ):
        assert key in data, key
    assert data["method"] == "svd-llm-v2" and data["decomposer"]["name"] == "rsvd"
    assert data["decomposer"]["oversample"] == 4 and data["ratio_params_removed"] >= 0.2
    import lowrank

    model, tokenizer = lowrank.load_model(str(out))
    assert tokenizer is not None and model.model.layers[0].self_attn.q_proj.rank > 0


def test_config_file_and_flag_override(assets, tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"method": "svd", "keep_singular_fraction": 0.25, "targets": ["q_proj"]}))
    summary = tmp_path / "s.json"
    assert (
        main(["compress", "--model", str(assets / "tiny"), "--config", str(cfg), "--json", str(summary)]) == 0
    )
    data = json.loads(summary.read_text())
    assert data["method"] == "svd" and data["keep_singular_fraction_target"] == 0.25
    assert list(data["ranks"]) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert (
        main(
            [
                "compress",
                "--model",
                str(assets / "tiny"),
                "--config",
                str(cfg),
                "--ratio",
                "0.5",
                "--json",
                str(summary),
            ]
        )
        == 0
    )
    assert json.loads(summary.read_text())["ratio_target"] == 0.5


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--ratio", "1.5"], "1.5"),
        (["--ratio", "0.2", "--targets", "nothing_here"], "select no module"),
        (["--ratio", "0.2", "--targets", "mlp"], "LlamaMLP"),
        (["--ratio", "0.2", "--allocation", "greedy"], "--allocation is not an option of method 'svd'"),
        (["--ratio", "0.2", "--config", "/no/such/cfg.json"], "no such file"),
    ],
)
def test_bad_input_is_a_one_line_error(assets, capsys, flags, message):
    rc = main(["compress", "--model", str(assets / "tiny"), "--method", "svd", *flags])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("lowrank compress: error:")]
    assert rc == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in err


def test_config_file_of_the_wrong_json_type_is_one_line(assets, tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text("[1, 2]")
    rc = main(["compress", "--model", str(assets / "tiny"), "--config", str(cfg)])
    err = capsys.readouterr().err
    assert rc == 2 and "expected a JSON object" in err and "Traceback" not in err


def test_python_dash_m_works_like_the_script():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "lowrank", "--help"], capture_output=True, text=True, check=True
    )
    assert "compress" in out.stdout and "--debug" in out.stdout
