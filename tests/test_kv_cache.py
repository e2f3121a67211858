"""The cache hook: registry, install/uninstall, what generate, throughput and memory_report fill, KV bytes."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from conftest import ARCHITECTURES, make_tiny_model, random_tokens
from transformers import DynamicCache
from transformers.cache_utils import get_layer_types_and_kwargs

from lowrank.attention.cache import (
    cache_argument,
    default_kv_bytes_per_token,
    install_cache,
    installed_cache,
    kv_bytes_per_token,
    make_cache,
    register_cache,
    registered_caches,
    uninstall_cache,
    unregister_cache,
)
from lowrank.evaluation import memory_report, tensor_bytes, throughput

_MARKER_DTYPES = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class PositionLogCache(DynamicCache):
    """A ``DynamicCache`` that counts its updates and also keeps the position of every cached token.

    The extra ``(batch, tokens)`` tensor of ``marker_bytes``-byte integers makes its footprint differ from
    the default by exactly ``marker_bytes`` per token, which :meth:`bytes_per_token` reports analytically.
    """

    built = 0

    def __init__(self, config=None, *, marker_bytes: int = 8):
        if marker_bytes not in _MARKER_DTYPES:
            raise TypeError(f"marker_bytes must be one of {sorted(_MARKER_DTYPES)}; got {marker_bytes}")
        super().__init__(config=config)
        self.updates = 0
        self.positions = torch.empty(0, 0, dtype=_MARKER_DTYPES[marker_bytes])
        type(self).built += 1

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.updates += 1
        if layer_idx == 0:
            batch, _, new, _ = key_states.shape
            start = self.positions.shape[1]
            step = torch.arange(start, start + new, dtype=self.positions.dtype).expand(batch, new)
            self.positions = torch.cat([self.positions.reshape(batch, start), step], dim=1)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    @classmethod
    def bytes_per_token(cls, model, *, marker_bytes: int = 8) -> float:
        return default_kv_bytes_per_token(model) + marker_bytes


@pytest.fixture
def position_cache():
    register_cache(PositionLogCache)
    PositionLogCache.built = 0
    yield PositionLogCache
    unregister_cache("PositionLogCache")


@pytest.fixture
def strict_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        yield


# ----------------------------------------------------------------------------- registry


def test_install_describe_uninstall(position_cache):
    model = make_tiny_model("llama")
    assert installed_cache(model) is None and type(make_cache(model)) is DynamicCache
    install_cache(model, "PositionLogCache", {"marker_bytes": 2})
    desc = installed_cache(model)
    assert desc == {"class": "PositionLogCache", "spec": {"marker_bytes": 2}}
    json.dumps(desc)
    cache = make_cache(model)
    assert type(cache) is PositionLogCache and cache.positions.dtype == torch.int16
    assert make_cache(model) is not cache  # a fresh cache each time
    install_cache(model, PositionLogCache)  # by class; replaces the previous spec
    assert installed_cache(model) == {"class": "PositionLogCache", "spec": {}}
    uninstall_cache(model)
    assert installed_cache(model) is None and type(make_cache(model)) is DynamicCache
    assert "generate" not in vars(model)
    uninstall_cache(model)  # a no-op the second time


def test_bad_names_specs_and_classes(position_cache):
    model = make_tiny_model("llama")
    with pytest.raises(
        ValueError, match=r"unknown cache class 'Nope'; registered: .*PositionLogCache"
    ) as info:
        install_cache(model, "Nope")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="rejected spec"):
        install_cache(model, "PositionLogCache", {"marker_bytes": 3})
    with pytest.raises(ValueError, match="JSON-able"):
        install_cache(model, "PositionLogCache", {"marker_bytes": torch.tensor(8)})
    with pytest.raises(ValueError, match="not registered"):
        install_cache(model, type("Unregistered", (DynamicCache,), {}))
    with pytest.raises(ValueError, match="Cache subclass"):
        register_cache(dict)
    with pytest.raises(ValueError, match="already registered"):
        register_cache(type("Other", (DynamicCache,), {}), name="PositionLogCache")
    assert installed_cache(model) is None
    assert registered_caches()["PositionLogCache"] is PositionLogCache


# ----------------------------------------------------------------------------- what fills the cache


def test_generate_fills_the_installed_cache_and_matches_the_default(position_cache, strict_warnings):
    model = make_tiny_model("llama")
    prompt = random_tokens(2, 7, seed=5)
    kw = dict(max_new_tokens=4, do_sample=False, attention_mask=torch.ones_like(prompt))
    default = model.generate(prompt, **kw)
    install_cache(model, "PositionLogCache")
    out = model.generate(prompt, **kw)
    assert torch.equal(out, default)  # the extra tensor changes nothing in the attention
    assert PositionLogCache.built == 1 + 1  # one built by install_cache to check the spec, one by generate
    result = model.generate(prompt, return_dict_in_generate=True, **kw)
    cache = result.cache
    assert type(cache) is PositionLogCache
    layers = model.config.num_hidden_layers
    assert cache.updates == layers * 4  # prefill + 3 decode steps (the 4th token needs no forward)
    assert cache.positions.shape == (2, 7 + 3) and torch.equal(cache.positions[0], torch.arange(10))
    # a cache chosen by the caller wins; use_cache=False builds none
    mine = DynamicCache(config=model.config)
    model.generate(prompt, cache=mine, **kw)
    assert mine.get_seq_length() == 7 + 3
    built = PositionLogCache.built
    model.generate(prompt, use_cache=False, **kw)
    assert PositionLogCache.built == built
    uninstall_cache(model)
    again = model.generate(prompt, return_dict_in_generate=True, **kw)
    assert type(again.cache) is DynamicCache and torch.equal(again.sequences, default)


def test_copies_keep_their_own_installed_cache(position_cache):
    model = make_tiny_model("llama")
    install_cache(model, "PositionLogCache")
    clone = copy.deepcopy(model)
    assert installed_cache(clone) == installed_cache(model)
    uninstall_cache(model)
    out = clone.generate(random_tokens(1, 5), max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    assert type(out.cache) is PositionLogCache


def test_throughput_and_memory_report_use_the_installed_cache(position_cache, strict_warnings):
    model = make_tiny_model("llama")
    install_cache(model, "PositionLogCache", {"marker_bytes": 4})
    seen = []
    model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(type(kw[cache_argument(m)]).__name__), with_kwargs=True
    )
    result = throughput(model, prompt_len=6, gen_len=3, warmup=0, repeats=1, progress=False)
    assert result.cache_class == "PositionLogCache" and seen == ["PositionLogCache"] * 4
    report = memory_report(model, tokens=16, batch_size=2)
    assert report.kv_cache_class == "PositionLogCache"
    default = default_kv_bytes_per_token(model)
    assert report.kv_cache_bytes_per_token == default + 4 == kv_bytes_per_token(model)
    uninstall_cache(model)
    assert memory_report(model, tokens=16).kv_cache_bytes_per_token == default


def test_harness_passes_the_cache_under_its_new_name(strict_warnings):
    model = make_tiny_model("llama")
    assert cache_argument(model) == "cache"
    names = []
    model.register_forward_pre_hook(lambda m, a, kw: names.append(sorted(kw)), with_kwargs=True)
    throughput(model, prompt_len=4, gen_len=2, warmup=0, repeats=1, progress=False)
    memory_report(model, tokens=4)
    assert all("cache" in n and "past_key_values" not in n for n in names)


# ----------------------------------------------------------------------------- analytic bytes


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_analytic_kv_bytes_equal_the_measured_cache(arch, dtype):
    model = make_tiny_model(arch).to(dtype)
    cfg = model.config
    assert kv_bytes_per_token(model) == cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * (
        dtype.itemsize
    )
    assert memory_report(model, tokens=24).kv_cache_bytes_per_token == kv_bytes_per_token(model)


@pytest.mark.parametrize("arch", ["mistral", "gemma2"])
def test_sliding_window_layers_after_prefill_and_while_decoding(arch):
    # mistral: every layer slides; gemma2: sliding and full layers alternate
    window, prompt, steps = 8, 40, 3
    model = make_tiny_model(arch, sliding_window=window)
    sliding = [t == "sliding_attention" for t in get_layer_types_and_kwargs(model.config)[0]]
    assert any(sliding)
    per_layer = kv_bytes_per_token(model) / len(sliding)
    # right after a prefill every layer holds the whole prompt (the window is a view into its storage)
    assert memory_report(model, tokens=prompt).kv_cache_bytes_per_token == kv_bytes_per_token(model)
    cache = make_cache(model)
    with torch.no_grad():
        model(input_ids=random_tokens(1, prompt), cache=cache, use_cache=True)
        for _ in range(steps):
            model(input_ids=random_tokens(1, 1), cache=cache, use_cache=True)
    # past the window, a sliding layer's storage settles at `window` tokens: the figure is an upper bound
    held = sum(window if s else prompt + steps for s in sliding) * per_layer
    assert tensor_bytes(cache) == held < kv_bytes_per_token(model) * (prompt + steps)
