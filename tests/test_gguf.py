"""GGUF input: a ``.gguf`` path is dequantized like the built-in model, cached by content, reused."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import make_tiny_model, random_tokens

import lowrank.io.gguf as lowrank_gguf
from lowrank.io import assets, builtin
from lowrank.loading.models import load_model


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row order for q/k projections (transformers undoes it when reading a GGUF)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, model) -> None:
    """Write a tiny float32 Llama as a GGUF file with the ``gguf`` package's writer (offline, no tokenizer
    merges: the byte-level tokenizer only needs to load)."""
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(c.vocab_size - 3)])
    w.add_token_types([3, 3, 3] + [1] * (c.vocab_size - 3))
    w.add_token_scores([0.0] * c.vocab_size)
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {
        "attn_norm": "input_layernorm",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_norm": "post_attention_layernorm",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        q = _permute(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads)
        k = _permute(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads)
        w.add_tensor(f"blk.{i}.attn_q.weight", q)
        w.add_tensor(f"blk.{i}.attn_k.weight", k)
        for ours, theirs in names.items():
            w.add_tensor(f"blk.{i}.{ours}.weight", sd[p + theirs + ".weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWRANK_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_tiny_gguf_loads_converts_once_and_reconverts_when_changed(cache, tmp_path, monkeypatch):
    original = make_tiny_model("llama", seed=0)
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, original)
    model, tokenizer = load_model(str(path))
    assert tokenizer is not None and not model.training
    assert getattr(model.config, "quantization_config", None) is None
    ids = random_tokens(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits, rtol=0, atol=1e-5)
    (entry,) = (cache / "models" / "gguf").iterdir()
    assert entry.name.startswith("tiny-") and assets.verify_entry(entry)["meta"]["source"] == str(path)

    calls = []
    real = lowrank_gguf.convert_gguf_file
    monkeypatch.setattr(lowrank_gguf, "convert_gguf_file", lambda *a, **k: calls.append(a) or real(*a, **k))
    load_model(str(path))
    assert calls == []  # unchanged file: the cached conversion is reused
    changed = make_tiny_model("llama", seed=1)
    write_tiny_gguf(path, changed)
    model, _ = load_model(str(path))
    assert len(calls) == 1
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, changed(ids).logits, rtol=0, atol=1e-5)
    assert len(list((cache / "models" / "gguf").iterdir())) == 2


def test_unreadable_gguf_names_the_file(cache, tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ValueError, match=f"{path}: not a usable GGUF file") as info:
        load_model(str(path))
    assert "\n" not in str(info.value)


def test_assets_does_not_import_the_converter():
    """``lowrank.io.gguf`` builds on ``lowrank.io.assets`` (never the reverse) and imports transformers
    late."""
    code = (
        "import sys, lowrank.io.assets; assert 'lowrank.io.gguf' not in sys.modules\n"
        "import lowrank.io.gguf; assert 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.integration
def test_builtin_gguf_path_matches_the_builtin_model(tmp_path, monkeypatch):
    """The built-in's own GGUF, given as a path, converts to the very same model (identical logits)."""
    original, tokenizer = load_model("smollm2-135m")  # from the real cache
    source = builtin.gguf_path()
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = original(ids).logits
    del original
    monkeypatch.setenv("LOWRANK_CACHE", str(tmp_path / "cache"))  # the conversion goes to a scratch cache
    model, _ = load_model(str(source))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)
