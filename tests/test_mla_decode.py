"""The DeepSeek-layout MLA's absorbed attention (W_uk folded into the queries, multi-query attention over
the cached latent) gives the expanded path's outputs, with and without the cache, and decode steps never
rebuild the cached keys and values."""

from __future__ import annotations

import pytest
import torch
from _decoding import decoded, logits
from conftest import make_tiny_model, random_tokens

from lowrank.attention.deepseek_mla import DeepseekLatentAttention, set_decode_path
from lowrank.methods import MLAConfig, compress

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = random_tokens(2, 24, seed=7)
CALIB = random_tokens(16, 48)
FAMILIES = ("llama", "qwen2", "mistral", "gemma", "gemma2")  # every family the rorope path converts


def _converted(arch: str, **config):
    model = make_tiny_model(arch)
    compress(model, MLAConfig(**{"rope_dim": 4, "kv_lora_rank": 12, **config}), calibration=CALIB)
    return model


def _layers(model) -> list[DeepseekLatentAttention]:
    return [m for m in model.modules() if isinstance(m, DeepseekLatentAttention)]


@pytest.mark.parametrize("arch", FAMILIES)
def test_absorbed_attention_equals_expanded_with_and_without_the_cache(arch):
    model = _converted(arch)
    outputs = {}
    for path in ("expanded", "absorbed", "auto"):
        assert set_decode_path(model, path) == len(_layers(model)) > 0
        outputs[path] = (logits(model, IDS), decoded(model, IDS)[0])
    absorbing = [m for m in _layers(model) if m.absorbs(1, IDS.shape[1])]
    if arch == "gemma2":  # soft-capping: every layer keeps the expanded path, even when asked to absorb
        assert not absorbing
    else:
        assert len(absorbing) == len(_layers(model))
    reference = outputs["expanded"]
    for path in ("absorbed", "auto"):
        for got, want in zip(outputs[path], reference, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_decode_steps_never_rebuild_the_cached_keys_and_values():
    model = _converted("llama")
    calls = []
    for m in _layers(model):
        m.kv_b_proj.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[-2]))
    decoded(model, IDS, prompt=16)
    assert calls == []  # auto absorbs every call at these sizes (2r ≤ d_n + d_v): no expansion at all
    set_decode_path(model, "expanded")
    decoded(model, IDS, prompt=16)
    # expanded: every layer rebuilds all cached positions at every call, prefill (16) then steps 17 … 24
    assert sorted(set(calls)) == list(range(16, IDS.shape[1] + 1))


def test_auto_absorbs_decode_and_expands_long_prefill_when_the_latent_is_wide():
    model = _converted("llama", kv_lora_rank=40)  # 2r = 80 > d_n + d_v = 12 + 16: a finite crossover
    layer = _layers(model)[0]
    r, dn, dv = layer.kv_lora_rank, layer.qk_nope_head_dim, layer.v_head_dim
    crossover = r * (dn + dv) / (2 * r - dn - dv)
    assert layer.absorbs(1, 4096) and layer.absorbs(int(crossover) - 1, 4096)
    assert not layer.absorbs(int(crossover) + 1, 4096)
    expanded = logits(model, IDS)  # 24 queries > crossover 21.5: auto expands this forward
    assert not layer.absorbs(IDS.shape[1], IDS.shape[1])
    set_decode_path(model, "absorbed")
    torch.testing.assert_close(logits(model, IDS), expanded, rtol=1e-4, atol=1e-4)


def test_generation_with_left_padding_takes_the_same_tokens_on_both_paths():
    model = _converted("llama")
    ids = IDS[:, :10].clone()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # the first prompt is 3 tokens shorter, padded on the left
    tokens = {}
    for path in ("expanded", "absorbed"):
        set_decode_path(model, path)
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0
        )
        tokens[path] = out[:, ids.shape[1] :]
    assert torch.equal(tokens["absorbed"], tokens["expanded"])


def test_bad_decode_paths_are_one_line_errors():
    with pytest.raises(ValueError, match=r"decode path must be one of \('auto', 'absorbed', 'expanded'\)"):
        set_decode_path(_converted("llama"), "fused")
    layer = _layers(_converted("gemma2"))[0]
    with pytest.raises(ValueError, match="soft-caps its scores"):
        layer.set_decode_path("absorbed")


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_a_sliding_window_shorter_than_the_context_is_kept_on_the_absorbed_path(implementation):
    model = make_tiny_model("mistral", sliding_window=8)
    model.set_attn_implementation(implementation)
    windowless = make_tiny_model("mistral", sliding_window=None)
    windowless.set_attn_implementation(implementation)
    assert not torch.allclose(logits(model, IDS), logits(windowless, IDS), atol=1e-3)  # the window matters
    compress(model, MLAConfig(rope_dim=4, kv_lora_rank=12), calibration=CALIB)
    set_decode_path(model, "expanded")
    want = (logits(model, IDS), decoded(model, IDS)[0])
    set_decode_path(model, "absorbed")
    got = (logits(model, IDS), decoded(model, IDS)[0])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
