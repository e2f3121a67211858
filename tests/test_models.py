"""load_model: local directories, saved compressed models, the built-in model, clear errors."""

from __future__ import annotations

import sys
import time
import types

import pytest
import torch
from conftest import random_tokens

from lowrank.models import load_model, resolve_dtype


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
    fake = types.ModuleType("lowrank.serialization")
    fake.load_compressed = lambda path, **kw: calls.append((path, kw)) or ("model", "tokenizer")
    monkeypatch.setitem(sys.modules, "lowrank.serialization", fake)
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
    with pytest.raises(ValueError, match="float64"):
        resolve_dtype("float64")


@pytest.mark.integration
def test_builtin_model_loads_fast_with_tied_embeddings():
    load_model("smollm2-135m")  # converts on a cold cache; the timed load below is a cached one
    start = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m")
    seconds = time.perf_counter() - start
    assert seconds < 30, f"cached load took {seconds:.1f} s"
    assert not model.training
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert getattr(model.config, "quantization_config", None) is None
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert head.data_ptr() == emb.data_ptr(), "lm_head must stay tied to embed_tokens"
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])
