"""save_compressed → load_compressed rebuilds the model exactly (tied embeddings included)."""

from __future__ import annotations

import json

import pytest
import torch
from _tiny import tiny_tokenizer
from conftest import ARCHITECTURES, make_tiny_model, random_tokens

from lowrank.loading.serialization import MANIFEST, load_compressed, save_compressed
from lowrank.methods import SVDConfig, SVDLLMConfig, SVDLLMV2Config, applied_methods, compress
from lowrank.nn import LowRankLinear

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
    assert ranks == {n: e.rank for n, e in result.modules.items()}
    assert sum(p.numel() for p in loaded.parameters()) == result.parameters_after
    if tied:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_manifest_records_modules_method_and_summary(tmp_path):
    model = make_tiny_model("llama")
    result = compress(model, SVDConfig(ratio=0.2, targets=("q_proj",)))
    save_compressed(model, tmp_path / "m", tokenizer=tiny_tokenizer(), result=result)
    manifest = json.loads((tmp_path / "m" / MANIFEST).read_text())
    assert manifest["format_version"] == 2
    assert set(manifest["modules"]) == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}
    assert manifest["modules"]["model.layers.0.self_attn.q_proj"]["class"] == "LowRankLinear"
    assert [m["method"] for m in manifest["methods"]] == ["svd"]
    assert manifest["summaries"][0]["ratio_target"] == 0.2 and manifest["cache"] is None
    assert set(manifest["files"]) >= {"model.safetensors", "config.json"}
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


def test_stacked_methods_save_and_load_bit_for_bit(tmp_path):
    model = make_tiny_model("qwen2")
    mlp = SVDLLMConfig(ratio=0.3, targets=("re:.*mlp\\..*_proj",))
    compress(model, mlp, calibration=random_tokens(16, 48))
    attention = compress(model, SVDConfig(ratio=0.2))  # default targets skip the factorized MLP
    assert {e.role for e in attention.modules.values()} == {"q", "k", "v", "o"}
    assert applied_methods(model) == [mlp.to_dict(), SVDConfig(ratio=0.2).to_dict()]
    save_compressed(model, tmp_path / "stack")
    loaded, _ = load_compressed(tmp_path / "stack")
    ids = random_tokens(2, 16, seed=4)
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    assert [m["method"] for m in applied_methods(loaded)] == ["svd-llm", "svd"]
    manifest = json.loads((tmp_path / "stack" / MANIFEST).read_text())
    assert len(manifest["summaries"]) == 2 and len(manifest["modules"]) == 14
    with pytest.raises(ValueError, match="LowRankLinear"):  # an explicit target already factorized
        compress(loaded, SVDConfig(ratio=0.2, targets=("down_proj",)))


def _saved(tmp_path):
    model = make_tiny_model("llama")
    compress(model, SVDConfig(ratio=0.2))
    return save_compressed(model, tmp_path / "m")


def test_a_flipped_byte_in_the_weights_is_refused_naming_the_file(tmp_path):
    out = _saved(tmp_path)
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (out / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model.safetensors: size or SHA-256 differs"):
        load_compressed(out)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["modules"]["model.layers.0.self_attn.q_proj"]["spec"].update(rank=7), "has shape"),
        (lambda m: m["modules"]["model.layers.0.self_attn.q_proj"]["spec"].update(rank=999), "rank must be"),
        (lambda m: m["modules"]["model.layers.0.self_attn.q_proj"]["spec"].pop("rank"), "needs integer"),
        (
            lambda m: m["modules"].update({"model.nope": m["modules"]["model.layers.0.self_attn.q_proj"]}),
            "nope",
        ),
        (lambda m: m.update(modules=[1, 2]), "'modules' must be"),
    ],
)
def test_a_wrong_manifest_is_a_one_line_value_error(tmp_path, edit, message):
    out = _saved(tmp_path)
    manifest = json.loads((out / MANIFEST).read_text())
    edit(manifest)
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=message) as info:
        load_compressed(out)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("content", [b"", b"[1, 2, 3]", b"\xff\xfe"])
def test_a_manifest_that_is_not_an_object_is_refused(tmp_path, content):
    out = _saved(tmp_path)
    (out / MANIFEST).write_bytes(content)
    with pytest.raises(ValueError, match=MANIFEST):
        load_compressed(out)


def test_an_empty_weights_file_is_refused_even_unverified(tmp_path):
    out = _saved(tmp_path)
    (out / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="model.safetensors"):
        load_compressed(out)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_compressed(out, verify=False)


def test_saving_never_destroys_a_users_directory(tmp_path):
    user = tmp_path / "thesis"
    (user / "sub").mkdir(parents=True)
    (user / "thesis.tex").write_text("chapter 1")
    (user / "sub" / "data.csv").write_text("1,2")
    model = make_tiny_model("llama")
    with pytest.raises(ValueError, match="thesis"):
        save_compressed(model, user)
    assert (user / "thesis.tex").read_text() == "chapter 1" and (user / "sub" / "data.csv").exists()
    save_compressed(model, user, overwrite=True)  # asked for explicitly
    assert (user / MANIFEST).exists()
