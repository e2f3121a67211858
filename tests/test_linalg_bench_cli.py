"""``lowrank bench rsvd`` launches ``python -m benchmarks.rsvd_table`` from the source checkout: end to end
on a tiny size it writes its outputs; bad flags and a missing checkout are one-line errors."""

from __future__ import annotations

import json

import pytest

from lowrank.cli import main


def test_bench_rsvd_tiny_run(tmp_path, capfd):
    out = tmp_path / "rsvd"
    args = ["bench", "rsvd", "--device", "cpu", "--sizes", "48:6", "--families", "gaussian", "--no-targets"]
    assert main([*args, "--repeats", "1", "--out", str(out)]) == 0
    payload = json.loads(out.with_suffix(".json").read_text())
    methods = {row["method"] for row in payload["rows"]}
    assert {"SVD (torch.linalg.svd)", "lowrank rsvd (p=10, q=2)", "torch.svd_lowrank (p=10, q=2)"} <= methods
    for row in payload["rows"]:
        assert row["rel_error"] >= payload["rows"][0]["rel_error"] - 1e-6  # nothing beats the exact SVD
    assert "| Matrix | Rank | Method |" in out.with_suffix(".md").read_text()
    last = capfd.readouterr().out.strip().splitlines()[-1]  # the child process writes to the fd
    assert json.loads(last)["device"] == "cpu" and "torch" in json.loads(last)


@pytest.mark.parametrize(
    ("flag", "value", "needle"), [("--sizes", "100", "100"), ("--families", "gauss", "gauss")]
)
def test_bench_rsvd_bad_flags(flag, value, needle, tmp_path, capfd):
    assert main(["bench", "rsvd", "--device", "cpu", flag, value, "--out", str(tmp_path / "x")]) == 2
    assert needle in capfd.readouterr().err


def test_bench_without_the_source_checkout_is_one_line(monkeypatch, capsys):
    from lowrank.cli import bench

    monkeypatch.setattr(bench, "source_checkout", lambda: None)
    assert main(["bench", "rsvd", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "source checkout" in err[0], err
