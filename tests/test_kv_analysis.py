"""KV-projection analysis: per-head errors of every method, the gap ε, recommendations, the CLI."""

from __future__ import annotations

import json

import pytest
from _tiny import save_tiny_model_dir, tiny_text
from conftest import make_tiny_model, random_tokens

from lowrank.cli import main
from lowrank.methods.kv_analysis import analyze_kv, recommend
from lowrank.methods.kv_projection import KEY_METHODS, VALUE_METHODS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return make_tiny_model("llama")


def test_same_tokens_kq_is_optimal_and_epsilon_is_the_measured_gap(model):
    ids = random_tokens(4, 32)
    analysis = analyze_kv(model, ids, ids, rank_fraction=0.25)
    assert analysis.rank == 4 and len(analysis.rows) == 2 * 2  # 2 layers x 2 KV heads
    for row in analysis.rows:
        err = row["logit_error"]
        # kq is the Eckart–Young optimum of the per-head logits it is evaluated on
        assert all(err["kq"] <= err[m] * (1 + 1e-9) + 1e-12 for m in KEY_METHODS)
        assert row["value_error"]["wo-aware"] <= row["value_error"]["v-svd"] * (1 + 1e-9) + 1e-12
        # the seed's identity err²(k-svd) − err²(kq) = ε, exact when fitting and evaluating on one text
        assert row["epsilon"] >= -1e-12
        assert row["epsilon"] == pytest.approx(row["measured_gap"], rel=1e-8, abs=1e-12)
        assert row["epsilon"] == pytest.approx(row["epsilon_calibration"], rel=1e-12, abs=1e-15)
        assert row["logit_error"] == row["logit_error_calibration"]


def test_heldout_errors_differ_from_calibration(model):
    analysis = analyze_kv(
        model, random_tokens(4, 32, seed=0), random_tokens(4, 32, seed=1), rank_fraction=0.5
    )
    summary = analysis.summary()
    assert analysis.tokens == {"calibration": 128, "heldout": 128}
    assert any(r["logit_error"]["kq"] != r["logit_error_calibration"]["kq"] for r in analysis.rows)
    assert summary["max_abs_epsilon_minus_gap_calibration"] < 1e-10
    assert sum(summary["key_wins"].values()) == sum(summary["value_wins"].values()) == 2


def test_full_rank_is_exact(model):
    ids = random_tokens(4, 32)
    analysis = analyze_kv(model, ids, random_tokens(4, 32, seed=3), rank_fraction=1.0, rope="pre")
    for row in analysis.rows:
        assert max(row["logit_error"].values()) < 1e-6
        assert max(row["value_error"].values()) < 1e-6
        assert abs(row["epsilon"]) < 1e-10 and abs(row["measured_gap"]) < 1e-10
    # every method ties at full rank: the simplest is recommended
    assert all(la["key_method"] == "k-svd" and la["value_method"] == "v-svd" for la in analysis.layers)


@pytest.mark.parametrize("fraction", [0.0, 1.5, -0.1])
def test_bad_rank_fraction_is_a_one_line_error(model, fraction):
    with pytest.raises(ValueError, match="rank_fraction") as info:
        analyze_kv(model, random_tokens(1, 8), random_tokens(1, 8), rank_fraction=fraction)
    assert "\n" not in str(info.value)


def test_recommendation_is_the_argmin_with_ties_to_the_simplest():
    assert recommend({"k-svd": 0.3, "eigen": 0.2, "kq": 0.1, "kq-sum": 0.15}, KEY_METHODS) == "kq"
    assert recommend({"k-svd": 0.3, "eigen": 0.1, "kq": 0.2, "kq-sum": 0.4}, KEY_METHODS) == "eigen"
    assert recommend({"k-svd": 0.1, "eigen": 0.1, "kq": 0.1 - 1e-15, "kq-sum": 0.1}, KEY_METHODS) == "k-svd"
    assert recommend({"v-svd": 0.2, "wo-aware": 0.2}, VALUE_METHODS) == "v-svd"
    assert recommend({"v-svd": 0.2, "wo-aware": 0.19}, VALUE_METHODS) == "wo-aware"


def test_layer_recommendation_matches_the_rows(model):
    analysis = analyze_kv(model, random_tokens(4, 32), random_tokens(4, 32, seed=5), rank_fraction=0.25)
    for layer in analysis.layers:
        rows = [r for r in analysis.rows if r["layer"] == layer["layer"]]
        total = {m: sum(r["logit_error"][m] for r in rows) for m in KEY_METHODS}
        assert layer["key_method"] == min(KEY_METHODS, key=lambda m: (total[m], KEY_METHODS.index(m)))
        values = {m: sum(r["value_error"][m] for r in rows) for m in VALUE_METHODS}
        assert layer["value_method"] == min(VALUE_METHODS, key=values.__getitem__)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    path = tmp_path_factory.mktemp("kv")
    save_tiny_model_dir(path / "tiny", "llama")
    (path / "text.txt").write_text(tiny_text(3000))
    return path


def _cli(assets, *extra: str) -> list[str]:
    return [
        "kv-analyze",
        "--model",
        str(assets / "tiny"),
        "--data",
        str(assets / "text.txt"),
        "--calib-samples",
        "4",
        "--heldout-samples",
        "2",
        "--calib-seq-len",
        "32",
        "--device",
        "cpu",
        *extra,
    ]


def test_cli_writes_table_json_markdown_and_png(assets, capsys):
    out = assets / "out"
    args = ["--rank-fraction", "0.5", "--json", str(out / "a.json"), "--md", str(out / "a.md")]
    assert main(_cli(assets, *args, "--png", str(out / "a.png"))) == 0
    printed = capsys.readouterr().out
    assert "| layer |" in printed and "recommended (layers won)" in printed
    data = json.loads((out / "a.json").read_text())
    assert data["rank"] == 8 and data["head_dim"] == 16 and len(data["rows"]) == 4
    assert data["tokens"] == {"calibration": 128, "heldout": 64}
    assert set(data["rows"][0]["logit_error"]) == set(KEY_METHODS)
    assert "| layer |" in (out / "a.md").read_text()
    assert (out / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("fraction", ["0", "1.5"])
def test_cli_bad_rank_fraction_is_a_one_line_error(assets, capsys, fraction):
    assert main(_cli(assets, "--rank-fraction", fraction)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lowrank kv-analyze: error:") and "--rank-fraction" in err and "\n" not in err


def test_cli_checks_output_paths_before_computing(assets, capsys):
    assert main(_cli(assets, "--json", str(assets))) == 2  # a directory
    assert "existing directory" in capsys.readouterr().err


def test_cli_png_without_matplotlib_is_a_one_line_error(assets, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else find_spec(name, *a)
    )
    assert main(_cli(assets, "--png", str(assets / "x.png"))) == 2
    assert "pip install matplotlib" in capsys.readouterr().err
    assert not (assets / "x.png").exists()
