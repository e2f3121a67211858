"""The built-in model: activation-aware whitening must beat plain SVD by orders of magnitude."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def builtin():
    import lowrank

    model, tokenizer = lowrank.load_model("smollm2-135m")
    calibration = lowrank.calibration_batches(tokenizer, lowrank.load_text("wiki", "calibration"), 32, 256)
    test = lowrank.load_text("wiki", "test")
    return model, tokenizer, calibration, test


def test_svd_llm_is_far_better_than_plain_svd_at_20_percent(builtin, tmp_path):
    import copy

    from lowrank.evaluation import perplexity
    from lowrank.loading.serialization import load_compressed, save_compressed
    from lowrank.methods import SVDConfig, SVDLLMConfig, collect_gram_statistics, compress

    model, tokenizer, calibration, test = builtin

    def ppl(m):
        return perplexity(
            m, tokenizer, test, seq_len=256, max_windows=4, batch_size=4, progress=False
        ).perplexity

    stats = collect_gram_statistics(model, calibration)  # 8192 tokens, reused by the non-sequential run
    results = {}
    for name, config, calib in (
        ("svd", SVDConfig(ratio=0.2, compute_dtype="float32"), None),
        (
            "svd-llm",
            SVDLLMConfig(ratio=0.2, calibration={"sequential": False}, compute_dtype="float32"),
            stats,
        ),
    ):
        compressed = copy.deepcopy(model)
        result = compress(compressed, config, calibration=calib)
        assert 0.2 <= result.details["ratio_params_removed"] < 0.21
        results[name] = (ppl(compressed), compressed, result)
    original = ppl(model)
    assert original < results["svd-llm"][0] < results["svd"][0] / 20
    # the saved directory reproduces the compressed model exactly, tied embeddings included
    _, compressed, result = results["svd-llm"]
    save_compressed(compressed, tmp_path / "m", tokenizer=tokenizer, result=result)
    loaded, _ = load_compressed(tmp_path / "m")
    ids = calibration[:1, :64]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, compressed(ids).logits)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
