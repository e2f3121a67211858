"""Layer-wise compression of half-precision models whose weights stay on the host (the 7B-scale setup)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model, random_tokens

from lowrank.methods import SVDLLMConfig, compress
from lowrank.nn import LowRankLinear

pytestmark = pytest.mark.usefixtures("one_thread")


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def _calibration():
    return random_tokens(16, 48, seed=0)  # 768 tokens ≥ 4 × the largest input dimension (160)


@pytest.mark.parametrize("decomposer", ["svd", "rsvd"])
def test_bfloat16_model_compresses_in_its_dtype(decomposer):
    model = make_tiny_model("llama").to(torch.bfloat16)
    result = compress(model, SVDLLMConfig(ratio=0.3, decomposer=decomposer), calibration=_calibration())
    factors = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert len(factors) == 14 and result.fallbacks == 0
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.isfinite(_logits(model, random_tokens(2, 16, seed=9))).all()


def test_bfloat16_full_rank_error_is_bfloat16_rounding():
    ids = random_tokens(2, 16, seed=9)
    reference = make_tiny_model("llama")
    exact = _logits(reference, ids)
    model = make_tiny_model("llama").to(torch.bfloat16)
    rounding = (_logits(model, ids) - exact).abs().max()  # what storing the weights in bf16 costs
    compress(model, SVDLLMConfig(keep_singular_fraction=1.0, factorize_all=True), calibration=_calibration())
    # two bf16 factors instead of one bf16 matrix: a few times the rounding of the dense bf16 model
    assert (_logits(model, ids) - exact).abs().max() <= 4 * rounding


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_host_weights_with_cuda_compute_match_a_host_run():
    ids = random_tokens(2, 16, seed=9)
    config = SVDLLMConfig(ratio=0.3, decomposer="svd", compute_dtype="float64")
    on_host = make_tiny_model("llama")
    compress(on_host, config, calibration=_calibration())
    visiting = make_tiny_model("llama")
    compress(visiting, config, calibration=_calibration(), device="cuda")
    assert all(p.device.type == "cpu" for p in visiting.parameters())
    assert all(b.device.type == "cpu" for b in visiting.buffers())
    torch.testing.assert_close(_logits(visiting, ids), _logits(on_host, ids), rtol=1e-3, atol=1e-4)
