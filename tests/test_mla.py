"""mla end to end on tiny models: exact at full size, a latent cache that really shrinks, cached decode
equal to the uncached forward, pair selection, whitening, save/load and stacking, one-line errors."""

from __future__ import annotations

import pytest
import torch
from _decoding import decoded, logits
from conftest import ARCHITECTURES, make_tiny_model, random_tokens

from lowrank.attention.wrapper import ProjectedAttention, ProjectedKVCache
from lowrank.evaluation.memory import memory_report
from lowrank.linalg import get_decomposer
from lowrank.linalg.whitening import whiten
from lowrank.loading.serialization import load_compressed, save_compressed
from lowrank.methods import MLAConfig, SVDLLMConfig, compress
from lowrank.methods.mla import latent_basis, select_pairs

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = random_tokens(2, 24, seed=5)
SUPPORTED = [a for a in ARCHITECTURES if a not in ("qwen3", "gemma3_text")]  # no q/k norms


@pytest.mark.parametrize("kv_heads", [2, 4])  # GQA and MHA
@pytest.mark.parametrize("arch", SUPPORTED)
def test_every_pair_kept_and_a_full_latent_reproduce_the_original(arch, kv_heads):
    model = make_tiny_model(arch, num_key_value_heads=kv_heads)
    reference = logits(model, IDS)
    result = compress(
        model, MLAConfig(partial_rope="mha2mla", rope_dim=16, kv_rank=16), calibration=random_tokens(16, 48)
    )
    torch.testing.assert_close(logits(model, IDS), reference, rtol=1e-4, atol=1e-4)
    assert result.kv_bytes_per_token_after == result.kv_bytes_per_token_before


@pytest.mark.parametrize("latent", ["joint", "split"])
@pytest.mark.parametrize("arch", SUPPORTED)
def test_cached_decode_equals_the_uncached_forward_and_bytes_are_as_predicted(arch, latent):
    model = make_tiny_model(arch)
    config = MLAConfig(partial_rope="mha2mla", rope_dim=4, kv_rank=8, latent=latent, whiten=latent == "split")
    result = compress(model, config, calibration=random_tokens(16, 48))
    stepwise, cache = decoded(model, IDS)
    assert isinstance(cache, ProjectedKVCache)
    torch.testing.assert_close(stepwise, logits(model, IDS), rtol=1e-4, atol=1e-4)
    expected = 2 * 2 * (4 + 8) * 4  # layers × KV heads × (rope dims + latent) × float32
    assert result.kv_bytes_per_token_after == memory_report(model).kv_cache_bytes_per_token == expected
    assert result.details["kv_fraction"] == 12 / 32


def test_generate_fills_the_latent_cache_and_the_model_reloads_bit_for_bit(tmp_path):
    model = make_tiny_model("llama")
    compress(
        model, SVDLLMConfig(ratio=0.3, targets=("re:.*mlp\\..*_proj",)), calibration=random_tokens(16, 48)
    )
    compress(
        model,
        MLAConfig(partial_rope="mha2mla", rope_dim=4, kv_fraction=0.5),
        calibration=random_tokens(16, 48),
    )
    out = model.generate(IDS[:1, :8], max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    assert isinstance(out.cache, ProjectedKVCache) and out.cache.layers[0].keys.shape[-1] == 16
    assert out.cache.layers[0].values.shape[-1] == 0  # joint latent: nothing else stored
    save_compressed(model, tmp_path / "m")
    loaded, _ = load_compressed(tmp_path / "m")
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))
    assert memory_report(loaded).kv_cache_bytes_per_token == 2 * 2 * 16 * 4


def test_pair_selection_strategies():
    assert select_pairs("high", 2, 8, None, None).tolist() == [[0, 1]]
    assert select_pairs("low", 2, 8, None, None).tolist() == [[6, 7]]
    assert select_pairs("uniform", 3, 8, None, None).tolist() == [[0, 4, 7]]
    d = 16
    kk = torch.eye(d).expand(2, d, d).clone()
    qq = torch.eye(d).expand(2, d, d).clone()
    kk[0, 3, 3] = kk[0, 11, 11] = 9.0  # pair 3 of head 0 carries the energy (features 3 and 3 + 8)
    qq[1, 5, 5] = 9.0
    assert select_pairs("2-norm", 1, 8, kk, qq).tolist() == [[3], [5]]


def test_whitened_basis_minimises_the_error_of_the_produced_outputs():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(24, 32, generator=g, dtype=torch.float64)
    X = torch.randn(400, 32, generator=g, dtype=torch.float64) * torch.logspace(
        0, -3, 32, dtype=torch.float64
    )
    decompose = get_decomposer("svd")
    plain, _ = latent_basis(W, 6, decompose)
    whitened, loss = latent_basis(W, 6, decompose, whiten(X.T @ X, "eigh"))

    def error(U):
        Y = X @ W.T
        return float((Y - Y @ U @ U.T).square().sum() / Y.square().sum())

    assert error(whitened) < error(plain) and error(whitened) == pytest.approx(loss, rel=1e-8)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rope_dim": 3}, "'rope_dim' must be even"),
        ({"rope_dim": -2}, "field 'rope_dim' must be an integer >= 0; got -2"),
        ({"kv_rank": 0}, "field 'kv_rank' must be a positive integer; got 0"),
        ({"kv_fraction": 1.5}, "kv_fraction"),
        ({"kv_rank": 8, "kv_fraction": 0.5}, "not both"),
        ({"rope_selection": "random"}, "'random'"),
    ],
)
def test_bad_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        MLAConfig(partial_rope="mha2mla", **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rope_dim": 18, "kv_rank": 4}, r"rope_dim must be in \[0, head_dim\] = \[0, 16\]; got 18"),
        ({"rope_dim": 4, "kv_rank": 29}, r"kv_rank must be in \[1, 28\]"),
        ({"rope_dim": 8, "kv_fraction": 0.2}, "no more than rope_dim"),
    ],
)
def test_sizes_that_do_not_fit_the_model_are_refused_before_any_work(kwargs, message):
    model = make_tiny_model("llama")
    with pytest.raises(ValueError, match=message):
        compress(model, MLAConfig(partial_rope="mha2mla", **kwargs), calibration=random_tokens(16, 48))
    assert not any(isinstance(m, ProjectedAttention) for m in model.modules())


def test_families_with_qk_norms_are_refused_with_one_line():
    with pytest.raises(ValueError, match="normalised .* use kv-projection") as info:
        compress(
            make_tiny_model("qwen3"),
            MLAConfig(partial_rope="mha2mla", rope_dim=4, kv_rank=8),
            calibration=random_tokens(16, 48),
        )
    assert "\n" not in str(info.value)
