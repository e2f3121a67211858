"""load_model: local directories, saved compressed models, the built-in model, clear errors."""

from __future__ import annotations

import os
import sys
import types

import pytest
import torch
from conftest import random_tokens

import lowrank.io.gguf as lowrank_gguf
from lowrank.loading.models import load_model, resolve_dtype


def test_local_hf_directory_round_trips(tmp_path):
    from _tiny import save_tiny_model_dir

    original = save_tiny_model_dir(tmp_path / "m", "llama")
    model, tokenizer = load_model(str(tmp_path / "m"))
    assert not model.training
    ids = random_tokens(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits, rtol=0, atol=1e-6)
    assert tokenizer("w5 w6", add_special_tokens=False)["input_ids"] == [6, 7]


def test_dtype_is_applied(tmp_path):
    from _tiny import save_tiny_model_dir

    save_tiny_model_dir(tmp_path / "m")
    model, _ = load_model(tmp_path / "m", dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_toolkit_directory_delegates_to_load_compressed(tmp_path, monkeypatch):
    (tmp_path / "lowrank.json").write_text("{}")
    calls = []
    fake = types.ModuleType("lowrank.loading.serialization")
    fake.load_compressed = lambda path, **kw: calls.append((path, kw)) or ("model", "tokenizer")
    monkeypatch.setitem(sys.modules, "lowrank.loading.serialization", fake)
    assert load_model(str(tmp_path), device="cpu", dtype=torch.float16) == ("model", "tokenizer")
    assert calls == [(tmp_path, {"device": "cpu", "dtype": torch.float16})]


@pytest.mark.parametrize("name", ["gpt-17", "no/such/thing/here", "./nothing"])
def test_unknown_name_lists_the_builtins(name):
    with pytest.raises(ValueError, match="built-in models: smollm2-135m"):
        load_model(name)


def test_directory_that_is_not_a_model(tmp_path):
    with pytest.raises(ValueError, match="without config.json or lowrank.json"):
        load_model(str(tmp_path))


def test_resolve_dtype():
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype(torch.float16) is torch.float16
    assert resolve_dtype("float32") is torch.float32
    for bad in ("float64", torch.float64, "fp16", torch.int8):
        with pytest.raises(
            ValueError, match=r"^dtype must be one of float32, bfloat16, float16; got "
        ) as info:
            resolve_dtype(bad)
        assert "\n" not in str(info.value)


@pytest.mark.integration
def test_builtin_model_loads_from_the_cache_with_tied_embeddings(monkeypatch):
    load_model("smollm2-135m")  # converts on a cold cache; the load below must reuse that conversion

    def convert_again(*args, **kwargs):
        raise AssertionError("a cached built-in model was converted again")

    monkeypatch.setattr(lowrank_gguf, "convert_gguf_file", convert_again)
    model, tokenizer = load_model("smollm2-135m")
    assert not model.training
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert getattr(model.config, "quantization_config", None) is None
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert head.data_ptr() == emb.data_ptr(), "lm_head must stay tied to embed_tokens"
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])


_EVIL = """
from pathlib import Path
Path({marker!r}).write_text("custom code ran")
from transformers import LlamaConfig, LlamaForCausalLM
class EvilConfig(LlamaConfig):
    model_type = "evil"
class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
"""


def _custom_code_dir(path, model_type):
    """A tiny model directory whose config's ``auto_map`` points at its own ``evil.py``."""
    import json

    from _tiny import save_tiny_model_dir

    save_tiny_model_dir(path)
    marker = path.parent / "marker.txt"
    (path / "evil.py").write_text(_EVIL.format(marker=str(marker)))
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (path / "config.json").write_text(json.dumps(config))
    tok = json.loads((path / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}
    (path / "tokenizer_config.json").write_text(json.dumps(tok))
    return marker


def test_custom_code_is_refused_without_trust_remote_code(tmp_path):
    """Run with stdin closed, as a user's script would: no prompt, no code run, a one-line error."""
    import subprocess

    model_dir = tmp_path / "m"
    marker = _custom_code_dir(model_dir, "evil")
    code = (
        "from lowrank.loading.models import load_model\n"
        "try:\n"
        f"    load_model({str(model_dir)!r})\n"
        "except ValueError as exc:\n"
        "    print('REFUSED', exc)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(tmp_path / "nowhere")}
    result = subprocess.run(
        [sys.executable, "-c", code],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert not marker.exists(), "custom code was executed"
    refused = [line for line in result.stdout.splitlines() if line.startswith("REFUSED")]
    assert refused, result.stdout + result.stderr
    assert str(model_dir) in refused[0] and "trust_remote_code=True" in refused[0]
    assert "[y/N]" not in result.stdout + result.stderr


def test_known_architecture_ignores_auto_map_without_trust(tmp_path):
    model_dir = tmp_path / "m"
    marker = _custom_code_dir(model_dir, "llama")
    model, _ = load_model(model_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not marker.exists()


@pytest.mark.parametrize(
    "damage, reason",
    [
        ("empty", "shorter than a safetensors header"),
        ("truncate", "data ends at byte"),
        ("garbage", "header length"),
        ("bad_json", "unreadable safetensors header"),
    ],
)
def test_corrupt_weights_name_the_file(tmp_path, damage, reason):
    from _tiny import save_tiny_model_dir

    save_tiny_model_dir(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    raw = weights.read_bytes()
    content = {
        "empty": b"",
        "truncate": raw[: len(raw) // 2],
        "garbage": b"\x89PNG\r\n\x1a\n" + raw[8:],
        "bad_json": raw[:8] + b"!" + raw[9:],
    }[damage]
    weights.write_bytes(content)
    with pytest.raises(
        ValueError, match=f"{weights}: corrupt or truncated safetensors file.*{reason}"
    ) as info:
        load_model(tmp_path / "m")
    assert "\n" not in str(info.value)


def test_gguf_path_goes_through_the_converter(tmp_path, monkeypatch):
    from _tiny import save_tiny_model_dir

    from lowrank.io import gguf

    converted = tmp_path / "converted"
    original = save_tiny_model_dir(converted)
    calls = []
    monkeypatch.setattr(gguf, "gguf_model_dir", lambda path: calls.append(path) or converted)
    model, _ = load_model(str(tmp_path / "weights.Q4_1.gguf"))
    assert calls == [tmp_path / "weights.Q4_1.gguf"]
    ids = random_tokens(1, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits, rtol=0, atol=1e-6)


def test_bad_gguf_files_name_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWRANK_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="missing.gguf: no such GGUF file"):
        load_model(str(tmp_path / "missing.gguf"))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(ValueError, match="fake.gguf: not a GGUF file"):
        load_model(str(fake))
