"""Layer-by-layer calibration: exact layer inputs, Grams over all tokens, hooks cleaned, resumable."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import make_tiny_model, random_tokens

from lowrank.calibration.capture import capture_layer_inputs, check_calibration_size, run_layer
from lowrank.calibration.layerwise import run_layerwise
from lowrank.calibration.statistics import InputGram, OutputGram, Statistic, StatRequest, Timings
from lowrank.nn import LowRankLinear
from lowrank.nn.architectures import decoder_layers
from lowrank.nn.surgery import replace_module

LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _grams(index, layer):
    return {name: StatRequest(name, InputGram) for name in LINEARS}


def test_capture_and_replay_reproduce_the_model(tiny_model):
    ids = random_tokens(5, 12)
    with torch.no_grad():
        expected = tiny_model(ids, output_hidden_states=True).hidden_states
    inputs = capture_layer_inputs(tiny_model, ids, batch_size=2)  # chunks of 2, 2, 1
    assert [h.shape[0] for h in inputs.hidden] == [2, 2, 1]
    torch.testing.assert_close(torch.cat(inputs.hidden), expected[0], rtol=0, atol=0)
    layers = decoder_layers(tiny_model)
    for i, layer in enumerate(layers):
        run_layer(layer, i, inputs, device="cpu", write_outputs=True)
        if i + 1 < len(layers):  # the last hidden state HF returns is after the final norm
            torch.testing.assert_close(torch.cat(inputs.hidden), expected[i + 1], rtol=0, atol=0)
    final = tiny_model.model.norm(torch.cat(inputs.hidden))
    torch.testing.assert_close(final, expected[-1], rtol=0, atol=0)


def test_grams_cover_all_tokens_and_match_explicit_inputs():
    model = make_tiny_model("qwen2")
    ids = random_tokens(5, 9)
    seen: dict[str, list[torch.Tensor]] = {}
    handles = [
        model.get_submodule(f"model.layers.{i}.{n}").register_forward_hook(
            lambda m, a, o, key=f"{i}.{n}": seen.setdefault(key, []).append(a[0].reshape(-1, a[0].shape[-1]))
        )
        for i in range(2)
        for n in LINEARS
    ]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    collected = []
    run_layerwise(
        model,
        ids,
        _grams,
        lambda i, layer, stats: collected.append(stats) or {},
        sequential=False,
        batch_size=2,
    )
    for i, stats in enumerate(collected):
        for name in LINEARS:
            X = torch.cat(seen[f"{i}.{name}"]).double()
            assert stats[name].tokens == 45  # 5 × 9: no chunk dropped
            # float32 activations computed in chunks of 2 vs one batch of 5 round differently
            torch.testing.assert_close(
                stats[name].gram, X.T @ X, rtol=1e-5, atol=1e-6 * float(X.square().sum())
            )
        assert stats["self_attn.q_proj"] is stats["self_attn.v_proj"]  # same input tensor: one Gram
        assert stats["mlp.gate_proj"] is stats["mlp.up_proj"]
        assert stats["self_attn.o_proj"] is not stats["self_attn.q_proj"]


class _AttentionInputs(Statistic):
    """Reads the keyword arguments an attention module is called with (as a per-head Q/K Gram would)."""

    def __init__(self):
        self.tokens, self.rotary_shapes = 0, set()

    def update(self, module, inputs, output, kwargs):
        self.tokens += kwargs["hidden_states"].shape[0] * kwargs["hidden_states"].shape[1]
        self.rotary_shapes.add(tuple(kwargs["position_embeddings"][0].shape[1:]))


def test_other_statistics_outputs_and_keyword_called_modules():
    model = make_tiny_model("llama")
    ids = random_tokens(3, 10)
    keys = []
    handle = model.model.layers[0].self_attn.k_proj.register_forward_hook(lambda m, a, o: keys.append(o))
    with torch.no_grad():
        model(ids)
    handle.remove()
    requests = {
        "k_out": StatRequest("self_attn.k_proj", OutputGram),
        "attn": StatRequest("self_attn", _AttentionInputs),
    }
    collected = []
    run_layerwise(
        model, ids, lambda i, layer: requests, lambda i, layer, stats: collected.append(stats) or {}
    )
    K = torch.cat(keys).reshape(-1, 32).double()
    torch.testing.assert_close(
        collected[0]["k_out"].gram, K.T @ K, rtol=1e-5, atol=1e-6 * float(K.square().sum())
    )
    assert collected[0]["attn"].tokens == 30 and collected[0]["attn"].rotary_shapes == {(10, 16)}


def test_hooks_are_removed_even_when_the_method_fails():
    model = make_tiny_model("llama")

    def boom(index, layer, stats):
        raise RuntimeError("method failed")

    with pytest.raises(RuntimeError, match="method failed"):
        run_layerwise(model, random_tokens(2, 8), _grams, boom)
    assert all(not m._forward_hooks for m in model.modules())
    assert all(type(layer).__name__ != "_Catcher" for layer in decoder_layers(model))


def _truncate_q(index, layer, stats):
    """A tiny deterministic 'method': rank-4 SVD of q_proj weighted by the input Gram's diagonal."""
    linear = layer.self_attn.q_proj
    d = stats["self_attn.q_proj"].gram.diagonal().sqrt().float()
    U, S, Vh = torch.linalg.svd(linear.weight * d, full_matrices=False)
    replace_module(layer, "self_attn.q_proj", LowRankLinear.from_linear(linear, Vh[:4] / d, U[:, :4] * S[:4]))
    return {"q_rank": 4}


@pytest.mark.parametrize("sequential", [True, False])
def test_resume_after_interruption_equals_uninterrupted_run(tmp_path, sequential):
    ids, test = random_tokens(4, 16), random_tokens(2, 16, seed=5)
    reference = make_tiny_model("llama", num_hidden_layers=3)
    run_layerwise(reference, ids, _grams, _truncate_q, sequential=sequential)
    calls = []

    def interrupted(index, layer, stats):
        calls.append(index)
        if index == 1:
            raise KeyboardInterrupt
        return _truncate_q(index, layer, stats)

    first = make_tiny_model("llama", num_hidden_layers=3)
    with pytest.raises(KeyboardInterrupt):
        run_layerwise(
            first, ids, _grams, interrupted, sequential=sequential, checkpoint_dir=tmp_path, run_key="q4"
        )
    resumed = make_tiny_model("llama", num_hidden_layers=3)
    calls.clear()
    records = run_layerwise(
        resumed,
        ids,
        _grams,
        lambda i, l, s: calls.append(i) or _truncate_q(i, l, s),
        sequential=sequential,
        checkpoint_dir=tmp_path,
        run_key="q4",
    )
    assert calls == [1, 2]  # layer 0 came from the checkpoint
    assert [r["layer"] for r in records] == [0, 1, 2] and records[0]["q_rank"] == 4
    with torch.no_grad():
        assert torch.equal(resumed(test).logits, reference(test).logits)
    with pytest.raises(ValueError, match="different configuration"):
        run_layerwise(
            make_tiny_model("llama", num_hidden_layers=3),
            ids,
            _grams,
            _truncate_q,
            sequential=sequential,
            checkpoint_dir=tmp_path,
            run_key="q8",
        )


def test_timings_and_small_calibration_warning(caplog):
    model = make_tiny_model("llama")
    timings = Timings()
    run_layerwise(model, random_tokens(2, 8), _grams, lambda i, l, s: {}, timings=timings)
    assert timings.seconds["calibration_forward"] > 0 and timings.seconds["gram_accumulation"] > 0
    with caplog.at_level(logging.WARNING, logger="lowrank.calibration.capture"):
        assert not check_calibration_size(16 * 8, 160)
        assert check_calibration_size(640, 160)
    assert "640" in caplog.text


def test_bad_calibration_shape_is_a_value_error():
    with pytest.raises(ValueError, match="samples, seq_len"):
        capture_layer_inputs(make_tiny_model("llama"), torch.arange(10))
