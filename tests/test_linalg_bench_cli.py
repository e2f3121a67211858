"""``lowrank bench rsvd`` runs the benchmark code end to end on a tiny size and writes its outputs."""

from __future__ import annotations

import json

import pytest

from lowrank.cli import main


def test_bench_rsvd_tiny_run(tmp_path, capsys):
    out = tmp_path / "rsvd"
    args = ["bench", "rsvd", "--device", "cpu", "--sizes", "48:6", "--families", "gaussian", "--no-targets"]
    assert main([*args, "--repeats", "1", "--out", str(out)]) == 0
    payload = json.loads(out.with_suffix(".json").read_text())
    methods = {row["method"] for row in payload["rows"]}
    assert {"SVD (torch.linalg.svd)", "lowrank rsvd (p=10, q=2)", "torch.svd_lowrank (p=10, q=2)"} <= methods
    for row in payload["rows"]:
        assert row["rel_error"] >= payload["rows"][0]["rel_error"] - 1e-6  # nothing beats the exact SVD
    assert "| Matrix | Rank | Method |" in out.with_suffix(".md").read_text()
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last)["device"] == "cpu" and "torch" in json.loads(last)


@pytest.mark.parametrize(
    ("flag", "value", "needle"), [("--sizes", "100", "100"), ("--families", "gauss", "gauss")]
)
def test_bench_rsvd_bad_flags(flag, value, needle, tmp_path, capsys):
    assert main(["bench", "rsvd", "--device", "cpu", flag, value, "--out", str(tmp_path / "x")]) == 2
    assert needle in capsys.readouterr().err
