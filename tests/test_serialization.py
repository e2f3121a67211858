"""save_compressed → load_compressed rebuilds the model exactly (tied embeddings included)."""

from __future__ import annotations

import json

import pytest
import torch
from _tiny import tiny_tokenizer
from conftest import ARCHITECTURES, make_tiny_model, random_tokens

from lowrank.methods import SVDConfig, SVDLLMV2Config, compress
from lowrank.nn import LowRankLinear
from lowrank.serialization import MANIFEST, load_compressed, save_compressed

pytestmark = pytest.mark.usefixtures("one_thread")


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("tied", [False, True])
def test_save_load_gives_identical_logits(tmp_path, arch, tied):
    model = make_tiny_model(arch, tie_word_embeddings=tied)
    result = compress(model, SVDLLMV2Config(ratio=0.3), calibration=random_tokens(16, 48))
    ids = random_tokens(2, 16, seed=4)
    save_compressed(model, tmp_path / "out", result=result)
    loaded, tokenizer = load_compressed(tmp_path / "out")
    assert tokenizer is None
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    ranks = {n: m.rank for n, m in loaded.named_modules() if isinstance(m, LowRankLinear)}
    assert ranks == {n: e["rank"] for n, e in result.modules.items()}
    assert sum(p.numel() for p in loaded.parameters()) == result.parameters_after
    if tied:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_manifest_records_modules_method_and_summary(tmp_path):
    model = make_tiny_model("llama")
    result = compress(model, SVDConfig(ratio=0.2, targets=("q_proj",)))
    save_compressed(model, tmp_path / "m", tokenizer=tiny_tokenizer(), result=result)
    manifest = json.loads((tmp_path / "m" / MANIFEST).read_text())
    assert manifest["format_version"] == 1
    assert set(manifest["modules"]) == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}
    assert manifest["modules"]["model.layers.0.self_attn.q_proj"]["class"] == "LowRankLinear"
    assert manifest["method"]["method"] == "svd" and manifest["summary"]["ratio_target"] == 0.2
    loaded, tokenizer = load_compressed(tmp_path / "m", dtype=torch.float64)
    assert tokenizer is not None and tokenizer("w1 w2")["input_ids"] == [2, 3]
    assert loaded.model.layers[0].self_attn.q_proj.down.weight.dtype == torch.float64


def test_the_generic_loader_delegates_to_load_compressed(tmp_path):
    import lowrank

    model = make_tiny_model("qwen2")
    compress(model, SVDConfig(ratio=0.2))
    save_compressed(model, tmp_path / "q", tokenizer=tiny_tokenizer())
    loaded, _ = lowrank.load_model(str(tmp_path / "q"))
    ids = random_tokens(1, 8)
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


def test_overwrites_atomically_and_rejects_bad_directories(tmp_path):
    model = make_tiny_model("llama")
    save_compressed(model, tmp_path / "x")
    save_compressed(model, tmp_path / "x")  # replacing an existing directory works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]
    with pytest.raises(FileNotFoundError, match="not a compressed model directory"):
        load_compressed(tmp_path)
    manifest = tmp_path / "x" / MANIFEST
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        load_compressed(tmp_path / "x")
    with pytest.raises(ValueError, match="config"):
        save_compressed(torch.nn.Linear(2, 2), tmp_path / "y")
