"""Fault injection, memory: a model is measured from its config before it is built, and one that cannot fit
in the available memory is refused in one line (a config claiming 100,000 layers of width 4096 once ran
for 150 s and ended in a traceback)."""

from __future__ import annotations

import json
import time

import pytest
from _tiny import save_tiny_model_dir
from conftest import ARCHITECTURES, make_tiny_model

import lowrank.io.memory as memory
from lowrank.cli import main
from lowrank.loading.models import load_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("tied", [True, False])
def test_the_estimate_counts_the_parameters_built(arch, tied):
    model = make_tiny_model(arch, tie_word_embeddings=tied)
    built = sum(p.numel() for p in model.parameters())
    estimate = memory.config_parameters(model.config)
    assert built <= estimate <= built * 1.02


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("mem") / "tiny"
    save_tiny_model_dir(path, "llama")
    return path


def _claim(tiny_dir, tmp_path, **sizes):
    """A copy of the tiny model directory whose config.json claims other sizes."""
    out = tmp_path / "claims"
    out.mkdir()
    for f in tiny_dir.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    config = json.loads((out / "config.json").read_text())
    config.update(sizes)
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize(
    "sizes",
    [
        {"num_hidden_layers": 100_000, "hidden_size": 4096, "intermediate_size": 11008},
        {"num_hidden_layers": 80, "hidden_size": 65536, "num_attention_heads": 512, "head_dim": 128},
        {"vocab_size": 10**11},
        {"num_hidden_layers": 2, "intermediate_size": 10**12},
    ],
)
def test_a_config_that_cannot_fit_is_refused_in_one_line_at_once(tiny_dir, tmp_path, capsys, sizes):
    model_dir = _claim(tiny_dir, tmp_path, **sizes)
    start = time.perf_counter()
    argv = ["--data", "wiki", "--seq-len", "8", "--max-windows", "1"]
    rc = main(["evaluate", "--model", str(model_dir), *argv])
    err = capsys.readouterr().err.strip()
    assert time.perf_counter() - start < 30
    assert rc == 2, err
    assert err.startswith("lowrank evaluate: error:") and "\n" not in err and "Traceback" not in err
    assert str(model_dir) in err and "GiB" in err and memory.OVERRIDE in err


@pytest.mark.parametrize("available", [1, 10**5, 10**6])
def test_refused_exactly_when_the_estimate_exceeds_what_is_available(tiny_dir, monkeypatch, available):
    monkeypatch.setattr(memory, "available_bytes", lambda: available)
    needed = memory.config_parameters(json.loads((tiny_dir / "config.json").read_text())) * 4
    if needed > available:
        with pytest.raises(memory.OutOfMemoryError, match=f"{tiny_dir}: the model its config describes"):
            load_model(str(tiny_dir))
        monkeypatch.setenv(memory.OVERRIDE, "1")  # the explicit override loads it anyway
    model, _ = load_model(str(tiny_dir))
    assert sum(p.numel() for p in model.parameters()) * 4 <= needed


def test_bfloat16_halves_the_estimate(tiny_dir, monkeypatch):
    needed = memory.config_parameters(json.loads((tiny_dir / "config.json").read_text())) * 4
    monkeypatch.setattr(memory, "available_bytes", lambda: needed * 3 // 4)
    with pytest.raises(memory.OutOfMemoryError):
        load_model(str(tiny_dir))
    load_model(str(tiny_dir), dtype="bfloat16")
