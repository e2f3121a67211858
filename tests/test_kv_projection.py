"""kv-projection end to end on tiny models: exactness at full rank, a cache that really shrinks, cached
decode equal to the uncached forward, save/load, stacking, and one-line errors."""

from __future__ import annotations

import pytest
import torch
from _decoding import decoded, logits
from conftest import ARCHITECTURES, make_tiny_model, random_tokens

from lowrank.attention.cache import installed_cache, kv_bytes_per_token
from lowrank.attention.wrapper import ProjectedAttention, ProjectedKVCache
from lowrank.evaluation.memory import memory_report
from lowrank.loading.serialization import load_compressed, save_compressed
from lowrank.methods import KVProjectionConfig, SVDLLMConfig, compress, count_parameters
from lowrank.methods.kv_projection import allocate_ranks

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = random_tokens(2, 24, seed=5)
SLIDING = ("mistral", "gemma2", "gemma3_text")  # tiny configs with sliding-window layers


def _calibration():
    return random_tokens(16, 48)


def _ropes(arch):
    return ("post",) if arch in SLIDING else ("post", "pre")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_full_rank_reproduces_the_original_logits(arch):
    for rope in _ropes(arch):
        model = make_tiny_model(arch)
        reference = logits(model, IDS)
        config = KVProjectionConfig(rank_fraction=1.0, kv_method="k-svd", value_method="v-svd", rope=rope)
        compress(model, config, calibration=_calibration())
        # orthogonal maps at R = d: A Aᵀ = I up to float32 rounding of the factors
        torch.testing.assert_close(logits(model, IDS), reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cached_decode_equals_the_uncached_forward_and_the_cache_shrinks(arch):
    for rope in _ropes(arch):
        model = make_tiny_model(arch)
        result = compress(model, KVProjectionConfig(rank_fraction=0.5, rope=rope), calibration=_calibration())
        stepwise, cache = decoded(model, IDS)
        assert isinstance(cache, ProjectedKVCache)
        torch.testing.assert_close(stepwise, logits(model, IDS), rtol=1e-4, atol=1e-4)
        # 2 layers × 2 KV heads × (8 + 8) float32 numbers per token (+ an int32 position per layer for pre)
        expected = 2 * 2 * (8 + 8) * 4 + (2 * 4 if rope == "pre" else 0)
        assert result.kv_bytes_per_token_after == kv_bytes_per_token(model) == expected
        assert memory_report(model).kv_cache_bytes_per_token == expected
        assert result.kv_bytes_per_token_before == 2 * 2 * 2 * 16 * 4


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_folding_deletes_exactly_the_redundant_rows_and_changes_no_output(arch):
    for rope in _ropes(arch):
        runs = {}
        for fold in (False, True):
            model = make_tiny_model(arch)
            attention = model.model.layers[0].self_attn
            bias = attention.v_proj.bias is not None  # qwen2: the bias rows go too
            key_norm = getattr(attention, "k_norm", None) is not None  # qwen3, gemma3: keys cannot fold
            config = KVProjectionConfig(rank_fraction=0.5, rope=rope, fold=fold)
            result = compress(model, config, calibration=_calibration())
            runs[fold] = (count_parameters(model), logits(model, IDS), decoded(model, IDS)[0], result)
        c, d = model.config, model.model.layers[0].self_attn.head_dim
        hidden, H, H_kv, layers = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, 2
        R = d // 2
        folds_keys = rope == "pre" and not key_norm
        keys = H_kv * (d - R) * (hidden + bias) + H_kv * d * R if folds_keys else 0  # k_proj rows + A
        values = H_kv * (d - R) * (hidden + bias) + 2 * H_kv * d * R  # v_proj rows + C and D
        outputs = H * (d - R) * hidden  # o_proj's input columns (D folded in)
        assert runs[False][0] - runs[True][0] == layers * (keys + values + outputs), (arch, rope)
        folded = {tuple(r.metrics["folded"]) for r in runs[True][3].modules.values()}
        assert folded == {("k_proj", "o_proj", "v_proj") if folds_keys else ("o_proj", "v_proj")}
        assert runs[True][3].kv_bytes_per_token_after == runs[False][3].kv_bytes_per_token_after
        for got, want in zip(runs[True][1:3], runs[False][1:3], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        attention = model.model.layers[0].self_attn
        assert attention.v_proj.out_features == H_kv * R and attention.o_proj.in_features == H * R
        assert attention.k_proj.out_features == H_kv * (R if folds_keys else d)


def test_keys_only_keeps_values_at_full_width_and_generate_fills_the_projected_cache():
    model = make_tiny_model("llama")
    compress(model, KVProjectionConfig(rank_fraction=0.25, keys_only=True), calibration=_calibration())
    assert memory_report(model).kv_cache_bytes_per_token == 2 * 2 * (4 + 16) * 4
    out = model.generate(IDS[:1, :8], max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    assert isinstance(out.cache, ProjectedKVCache) and out.sequences.shape == (1, 13)
    assert out.cache.layers[0].keys.shape[-1] == 4 and out.cache.layers[0].values.shape[-1] == 16


def test_attention_optimal_keys_beat_k_svd_on_the_calibration_objective():
    errors = {}
    for method in ("k-svd", "eigen", "kq"):
        result = compress(
            make_tiny_model("qwen2"),
            KVProjectionConfig(rank_fraction=0.25, kv_method=method),
            calibration=_calibration(),
        )
        errors[method] = [
            e for m in result.modules.values() for e in m.metrics["logit_error_squared_relative"]
        ]
    for kq, k_svd, eigen in zip(errors["kq"], errors["k-svd"], errors["eigen"], strict=True):
        assert kq <= k_svd + 1e-9 and kq <= eigen + 1e-9
    gaps = [g for m in result.modules.values() for g in m.metrics["epsilon_gap_relative"]]
    assert all(g >= -1e-9 for g in gaps)


def test_save_load_and_stacking_with_weight_compression(tmp_path):
    model = make_tiny_model("qwen3")
    compress(model, SVDLLMConfig(ratio=0.3, targets=("re:.*mlp\\..*_proj",)), calibration=_calibration())
    compress(model, KVProjectionConfig(rank_fraction=0.5, kv_method="kq-sum"), calibration=_calibration())
    compress(
        model, SVDLLMConfig(ratio=0.2, targets=("q_proj",)), calibration=_calibration()
    )  # inside the wrapper
    save_compressed(model, tmp_path / "m")
    loaded, _ = load_compressed(tmp_path / "m")
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))
    assert installed_cache(loaded) == {"class": "ProjectedKVCache", "spec": {}}
    assert isinstance(loaded.model.layers[1].self_attn, ProjectedAttention)
    stepwise, _ = decoded(loaded, IDS)
    torch.testing.assert_close(stepwise, logits(loaded, IDS), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank_fraction": 0.0}, "rank_fraction"),
        ({"rank_fraction": 1.5}, "1.5"),
        ({"kv_method": "pca"}, "'pca'"),
        ({"rope": "both"}, "'both'"),
    ],
)
def test_bad_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        KVProjectionConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_pre_rope_on_sliding_windows_is_refused_before_any_work():
    model = make_tiny_model("mistral")
    with pytest.raises(ValueError, match="sliding-window layers"):
        compress(model, KVProjectionConfig(rope="pre"), calibration=_calibration())
    assert not any(isinstance(m, ProjectedAttention) for m in model.modules())
    compress(model, KVProjectionConfig(rank_fraction=0.5), calibration=_calibration())
    with pytest.raises(ValueError, match="cannot be applied after 'kv-projection'"):
        compress(model, KVProjectionConfig(rank_fraction=0.5), calibration=_calibration())


def test_budget_allocation_keeps_the_total_and_lowers_the_calibration_error():
    ids = random_tokens(16, 48)
    common = dict(rank_fraction=0.25, calibration={"sequential": False})
    uniform = compress(
        make_tiny_model("llama", num_hidden_layers=4), KVProjectionConfig(**common), calibration=ids
    )
    budget_model = make_tiny_model("llama", num_hidden_layers=4)
    budget = compress(budget_model, KVProjectionConfig(rank_allocation="budget", **common), calibration=ids)
    assert sum(budget.details["key_ranks"]) == sum(uniform.details["key_ranks"]) == 4 * 4
    assert sum(budget.details["value_ranks"]) == 16

    def total(result):
        return sum(e for m in result.modules.values() for e in m.metrics["logit_error_squared_relative"])

    assert total(budget) <= total(uniform) + 1e-9
    assert memory_report(budget_model).kv_cache_bytes_per_token == budget.kv_bytes_per_token_after


def test_greedy_rank_allocation_takes_the_largest_error_drops():
    steep, flat = [1.0, 0.2, 0.1, 0.05], [1.0, 0.9, 0.8, 0.7]
    assert allocate_ranks([steep, flat], 3) == [2, 1]  # steep's first drop (0.8) is the largest
    assert allocate_ranks([steep, flat], 2) == [1, 1]
    assert allocate_ranks([steep, flat], 8) == [4, 4]
    with pytest.raises(ValueError, match="budget of 9"):
        allocate_ranks([steep, flat], 9)
