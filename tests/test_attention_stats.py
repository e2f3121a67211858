"""Per-head attention Grams: equal to a brute-force float64 recomputation, invisible to the layer's outputs,
and always undone."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import make_tiny_model, random_tokens

from lowrank.calibration.attention_stats import _TAPS, AttentionGrams, attention_request
from lowrank.calibration.capture import capture_layer_inputs, collect_layer_statistics
from lowrank.calibration.statistics import InputGram, Statistic, StatRequest
from lowrank.nn.architectures import decoder_layers
from lowrank.nn.attention_layout import attention_info

pytestmark = pytest.mark.usefixtures("one_thread")

EPS = torch.finfo(torch.float64).eps
#: eager attention takes the softmax in float32 whatever the model's dtype (``softmax(..., dtype=float32)``)
SOFTMAX_EPS = torch.finfo(torch.float32).eps

#: (family, overrides): sliding windows shorter than the sequence and a soft cap that bites, so the
#: brute-force reference has to get masks, caps and scales right too.
FAMILIES = {
    "llama": {},
    "qwen2": {},  # q/k/v biases (randomized below: the initializer zeroes them)
    "mistral": {"sliding_window": 4},
    "gemma2": {"sliding_window": 4, "attn_logit_softcapping": 0.5},
    "qwen3": {},  # per-head q/k norms
    "gemma3_text": {"sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"]},
    "olmo2": {},  # q/k norms over the whole projection
}


def _model(family: str, kv_heads: int, dtype=torch.float64):
    model = make_tiny_model(family, num_key_value_heads=kv_heads, **FAMILIES[family]).to(dtype)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:  # make biases and norm gains non-trivial
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _layer_statistic(model, ids, requests, batch_size=2, index=0):
    inputs = capture_layer_inputs(model, ids, batch_size=batch_size)
    layer = decoder_layers(model)[index]
    return collect_layer_statistics(layer, index, inputs, requests, device="cpu", write_outputs=True), inputs


def _reference(model, ids, index=0):
    """Q/K/V before and after RoPE and each head's attention output, by hand from the attention input."""
    info = attention_info(model)
    H, Hkv, d = info.shape.num_heads, info.shape.num_kv_heads, info.shape.head_dim
    attn = decoder_layers(model)[index].get_submodule(info.attention)
    calls = []
    handle = attn.register_forward_pre_hook(lambda m, a, kw: calls.append(kw), with_kwargs=True)
    with torch.no_grad():
        model(ids)
    handle.remove()
    x, (cos, sin) = calls[0]["hidden_states"], calls[0]["position_embeddings"]
    B, T = x.shape[:2]
    with torch.no_grad():
        q, k, v = (
            x @ m.weight.T + (0 if m.bias is None else m.bias)
            for m in (attn.q_proj, attn.k_proj, attn.v_proj)
        )
        if info.qk_norm_layout == "b t (h d)":
            q, k = attn.get_submodule(info.q_norm)(q), attn.get_submodule(info.k_norm)(k)
        q, k, v = q.view(B, T, H, d), k.view(B, T, Hkv, d), v.view(B, T, Hkv, d)
        if info.qk_norm_layout in ("b t h d", "b h t d"):  # per-head norms: same on either layout
            q, k = attn.get_submodule(info.q_norm)(q), attn.get_submodule(info.k_norm)(k)
        q_pre, k_pre, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, d)
        apply_rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        q_post, k_post = apply_rotary(q_pre, k_pre, cos, sin)
        G = H // Hkv
        scores = q_post @ k_post.repeat_interleave(G, 1).mT * info.scaling
        if info.attn_logit_softcapping is not None:
            cap = info.attn_logit_softcapping
            scores = cap * torch.tanh(scores / cap)
        i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
        visible = j <= i
        if info.sliding_window[index] is not None:
            visible &= i - j < info.sliding_window[index]
        P = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        o = P @ v.repeat_interleave(G, 1)
    return {"q_pre": q_pre, "k_pre": k_pre, "q_post": q_post, "k_post": k_post, "v": v, "o": o}


def _flat(x):
    """(B, heads, T, d) -> (heads, B·T, d)."""
    return x.transpose(0, 1).reshape(x.shape[1], -1, x.shape[-1])


def _assert_gram(actual, X, Y, depth, eps=EPS, magnitude=None):
    """|actual - XᵀY| ≤ 16·(n + depth)·u·‖X_a‖‖Y_b‖ entrywise: the forward-error bound of an n-term inner
    product of operands that were themselves computed by ``depth``-term sums (Cauchy–Schwarz scaled), with
    u the unit roundoff of the least precise step. ``magnitude``: (|X|, |Y|) bounds entrywise to use in
    place of X, Y when they are sums whose terms may cancel (the rounding scales with the terms)."""
    X, Y = _flat(X), _flat(Y)
    X_abs, Y_abs = (X, Y) if magnitude is None else map(_flat, magnitude)
    expected = X.mT @ Y
    bound = X_abs.norm(dim=1)[:, :, None] * Y_abs.norm(dim=1)[:, None, :]
    assert actual.shape == expected.shape and actual.dtype == torch.float64
    excess = (actual - expected).abs() - 16 * (X.shape[1] + depth) * eps * bound
    assert excess.max() <= 0, f"Gram off by {float(excess.max()):.3g} beyond the rounding bound"


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
@pytest.mark.parametrize("family", FAMILIES)
def test_grams_match_brute_force(family, kv_heads):
    model = _model(family, kv_heads)
    ids = random_tokens(3, 10)
    stats, _ = _layer_statistic(model, ids, {"attn": attention_request(model)})
    stat, ref = stats["attn"], _reference(model, ids)
    G = stat.group_size
    assert stat.tokens == 30 and 4 // kv_heads == G
    depth = model.config.hidden_size
    for stage in ("pre", "post"):
        Q, K = ref[f"q_{stage}"], ref[f"k_{stage}"]
        _assert_gram(getattr(stat, f"qq_{stage}"), Q, Q, depth)
        _assert_gram(getattr(stat, f"kk_{stage}"), K, K, depth)
        _assert_gram(getattr(stat, f"kq_{stage}"), K.repeat_interleave(G, 1), Q, depth)
        group = getattr(stat, f"qq_group_{stage}")
        torch.testing.assert_close(group, getattr(stat, f"qq_{stage}").unflatten(0, (kv_heads, G)).sum(1))
        # Gram of the group's summed queries (Σ_i Q_i)ᵀ(Σ_i Q_i): the G-term sum adds G to the depth
        Q_group = Q.unflatten(1, (kv_heads, G))  # (B, H_kv, G, T, d)
        Q_sum, Q_abs = Q_group.sum(2), Q_group.abs().sum(2)
        qsum = getattr(stat, f"qsum_{stage}")
        _assert_gram(qsum, Q_sum, Q_sum, depth + G, magnitude=(Q_abs, Q_abs))
        if G == 1:  # one head per group: nothing to sum
            torch.testing.assert_close(qsum, group)
        else:  # the cross terms Σ_{i≠j} Q_iᵀQ_j are what the per-head Grams miss
            assert not torch.allclose(qsum, group)
    _assert_gram(stat.vv, ref["v"], ref["v"], depth)
    # + the T-term sums of softmax and P·V; the probabilities themselves are rounded to float32
    _assert_gram(stat.oo, ref["o"], ref["o"], depth + 10, eps=SOFTMAX_EPS)
    # RoPE rotates each token by its own angle: the Grams change, their traces (Σ‖q_t‖²) do not
    assert not torch.allclose(stat.qq_pre, stat.qq_post)
    torch.testing.assert_close(stat.qq_pre.diagonal(0, 1, 2).sum(-1), stat.qq_post.diagonal(0, 1, 2).sum(-1))


@pytest.mark.parametrize("family", FAMILIES)
def test_outputs_are_bit_identical_and_everything_is_restored(family):
    model = _model(family, 2, dtype=torch.float32)
    ids = random_tokens(3, 10)
    _, plain = _layer_statistic(model, ids, {"x": StatRequest("self_attn.q_proj", InputGram)})
    stats, observed = _layer_statistic(model, ids, {"attn": attention_request(model, dtype=torch.float32)})
    assert all(torch.equal(a, b) for a, b in zip(plain.hidden, observed.hidden, strict=True))
    attn = decoder_layers(model)[0].self_attn
    assert attn.config is model.config and model.config._attn_implementation == "eager" and not _TAPS
    assert all(not m._forward_hooks for m in model.modules())
    # memory does not grow with the tokens: only d × d blocks are kept
    stat = stats["attn"]
    kept = [v for v in vars(stat).values() if isinstance(v, torch.Tensor)]
    assert len(kept) == 10 and all(t.shape[-2:] == (16, 16) and t.dtype == torch.float32 for t in kept)
    assert not stat._seen


class _Fails(Statistic):
    def update(self, module, inputs, output, kwargs):
        raise RuntimeError("statistic failed")


@pytest.mark.parametrize("where", ["inside_attention", "after_attention"])
def test_implementation_is_restored_after_an_exception(where):
    model = _model("qwen3", 2, dtype=torch.float32)
    module = "self_attn.o_proj" if where == "inside_attention" else "mlp.down_proj"
    requests = {"attn": attention_request(model), "boom": StatRequest(module, _Fails)}
    with pytest.raises(RuntimeError, match="statistic failed"):
        _layer_statistic(model, random_tokens(2, 8), requests)
    attn = decoder_layers(model)[0].self_attn
    assert attn.config is model.config and model.config._attn_implementation == "eager" and not _TAPS
    assert all(not m._forward_hooks for m in model.modules())


def test_one_statistic_per_attention_module():
    model = _model("llama", 2, dtype=torch.float32)
    requests = {"a": attention_request(model), "b": attention_request(model)}
    with pytest.raises(ValueError, match="already observed"):
        _layer_statistic(model, random_tokens(2, 8), requests)
    assert decoder_layers(model)[0].self_attn.config is model.config and not _TAPS


def test_delegates_to_the_configured_implementation():
    """Under sdpa the capture wraps sdpa, not eager: its float64 softmax meets the float64 bound."""
    model = _model("gemma3_text", 2)
    model.config._attn_implementation = "sdpa"
    ids = random_tokens(2, 10)
    stats, _ = _layer_statistic(model, ids, {"attn": attention_request(model)})
    ref = _reference(model, ids)
    _assert_gram(stats["attn"].oo, ref["o"], ref["o"], model.config.hidden_size + 10)
    assert model.config._attn_implementation == "sdpa" and not _TAPS


def test_chunks_accumulate_and_to_moves():
    model = _model("mistral", 2)
    ids = random_tokens(5, 7)
    whole, _ = _layer_statistic(model, ids, {"attn": attention_request(model)}, batch_size=5)
    chunked, _ = _layer_statistic(model, ids, {"attn": attention_request(model)}, batch_size=2)
    assert whole["attn"].tokens == chunked["attn"].tokens == 35
    torch.testing.assert_close(whole["attn"].kq_post, chunked["attn"].kq_post)
    torch.testing.assert_close(whole["attn"].qsum_post, chunked["attn"].qsum_post)
    moved = chunked["attn"].to("meta")
    assert moved is chunked["attn"] and moved.oo.device.type == "meta" and moved.vv.device.type == "meta"
    assert moved.qsum_pre.device.type == moved.qsum_post.device.type == "meta"


def test_bad_geometry_is_a_value_error():
    with pytest.raises(ValueError, match="num_heads=6, num_kv_heads=4"):
        AttentionGrams(num_heads=6, num_kv_heads=4, head_dim=8)
