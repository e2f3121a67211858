"""A new weight format and a new KV codec, each defined only in this file, plug in through the registries:
accounting, saving, loading, healing and the KV-bytes measurement need no edit anywhere else."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest
import torch
from conftest import make_tiny_model, random_tokens
from torch import nn

import lowrank.attention.codecs as codecs
import lowrank.methods.base as base
import lowrank.nn.registry as replacements
from lowrank.attention.cache import install_cache, kv_bytes_per_token, make_cache
from lowrank.attention.codecs import KVCodec, register_codec
from lowrank.attention.wrapper import ProjectedAttention, ProjectedKVCache
from lowrank.evaluation import memory_report
from lowrank.loading.serialization import load_compressed, save_compressed
from lowrank.methods import (
    CompressionResult,
    MethodConfig,
    ModuleKind,
    ModuleRecord,
    compress,
    register_method,
)
from lowrank.nn import register_replacement
from lowrank.nn.architectures import get_arch_spec
from lowrank.nn.attention_layout import attention_info
from lowrank.nn.surgery import get_module, replace_module
from lowrank.training.trainable import LEARNING_RATE, default_learning_rate, resolve_trainable
from lowrank.training.trainable import trainable_parameters as healing_parameters

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def registries(monkeypatch):
    """Registries restored after each test, so the toys never leak into other tests."""
    monkeypatch.setattr(base, "_METHODS", dict(base._METHODS))
    monkeypatch.setattr(replacements, "_REPLACEMENTS", dict(replacements._REPLACEMENTS))
    monkeypatch.setattr(codecs, "_CODECS", dict(codecs._CODECS))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# ---------------------------------------------------------------- a weight format: int8 rows + scales


def _int8_format():
    @register_replacement
    class Int8RowLinear(nn.Module):
        """Weights stored as int8 with one float scale per output row (buffers, not parameters)."""

        def __init__(self, out_features: int, in_features: int, bias: bool, device=None, dtype=None):
            super().__init__()
            self.out_features, self.in_features = out_features, in_features
            self.register_buffer(
                "codes", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
            )
            self.register_buffer("scales", torch.ones(out_features, 1, dtype=dtype, device=device))
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

        @classmethod
        def quantize(cls, linear: nn.Linear):
            module = cls(
                linear.out_features, linear.in_features, linear.bias is not None, dtype=torch.float32
            )
            w = linear.weight.detach().float()
            scales = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
            module.codes.copy_(torch.round(w / scales).to(torch.int8))
            module.scales.copy_(scales)
            if linear.bias is not None:
                module.bias.data.copy_(linear.bias.detach())
            return module

        def forward(self, x):
            return nn.functional.linear(x, self.codes.to(x.dtype) * self.scales.to(x.dtype), self.bias)

        def stored_bytes(self) -> int:
            return self.codes.numel() + self.scales.numel() * self.scales.element_size()

        def represented_parameters(self) -> int:
            return self.out_features * self.in_features

        def replacement_spec(self) -> dict[str, Any]:
            return {"out": self.out_features, "in": self.in_features, "bias": self.bias is not None}

        @classmethod
        def from_spec(cls, spec, *, original=None, model_config=None, device=None, dtype=None):
            return cls(spec["out"], spec["in"], spec["bias"], device=device, dtype=dtype)

    @dataclass(kw_only=True)
    class Int8Config(MethodConfig):
        method: ClassVar[str] = "toy-int8"
        example: ClassVar[dict[str, Any]] = {}
        targets: tuple[str, ...] = field(default=("mlp.down_proj",))

    @register_method(Int8Config)
    def compress_int8(model, config, ctx) -> CompressionResult:
        modules = {}

        def process(index, layer, stats):
            for target in config.targets:
                built = Int8RowLinear.quantize(get_module(layer, target))
                replace_module(layer, target, built)
                name = f"model.layers.{index}.{target}"
                modules[name] = ModuleRecord(
                    kind=ModuleKind.QUANTIZED, shape=(built.out_features, built.in_features)
                )
            return {}

        ctx.layer_pass(None, process, desc="toy-int8")
        return CompressionResult(method=config.method, config=config.to_dict(), modules=modules)

    return Int8Config, Int8RowLinear


def test_a_weight_format_defined_here_is_counted_saved_loaded_and_healed(registries, tmp_path):
    Int8Config, Int8RowLinear = _int8_format()
    model = make_tiny_model("llama")
    ids = random_tokens(2, 12, seed=3)
    before = _logits(model, ids)
    result = compress(model, Int8Config())
    built = [m for m in model.modules() if isinstance(m, Int8RowLinear)]
    assert len(built) == model.config.num_hidden_layers
    # accounting asks the module: the parameter count is unchanged, the bytes are what it stores
    assert result.parameters_after == result.parameters_before
    saved = sum(4 * m.out_features * m.in_features - m.stored_bytes() for m in built)
    assert result.weight_bytes_before - result.weight_bytes_after == saved > 0
    assert memory_report(model, tokens=4).weight_bytes == result.weight_bytes_after
    after = _logits(model, ids)
    assert (after - before).abs().max() < 0.05 and not torch.equal(after, before)
    save_compressed(model, tmp_path / "m")
    loaded, _ = load_compressed(tmp_path / "m")
    assert torch.equal(_logits(loaded, ids), after)
    # healing trains what the module holds as parameters (its biases: none here) and nothing else
    assert healing_parameters(model, "replaced") == {}
    assert default_learning_rate(model) == LEARNING_RATE and resolve_trainable(model) == "replaced"


# ---------------------------------------------------------------- a KV codec: keys on a fixed sub-basis


def _half_keys_codec():
    @register_codec
    class SubspaceKeys(KVCodec):
        """Caches each KV head's keys as their coordinates on R orthonormal directions, values in full."""

        def __init__(self, num_heads, num_kv_heads, head_dim, rank, device=None, dtype=None):
            super().__init__()
            self.num_heads, self.num_kv_heads, self.head_dim, self.rank = (
                num_heads,
                num_kv_heads,
                head_dim,
                rank,
            )
            self.basis = nn.Parameter(torch.zeros(num_kv_heads, head_dim, rank, device=device, dtype=dtype))

        def encode(self, keys, values, rope_tables):
            return torch.einsum("bhtd,hdr->bhtr", keys, self.basis.to(keys.dtype)), values

        def attend(self, queries, key_codes, value_codes, rope_tables, *, keys_decoded=False):
            per_query = self.basis.repeat_interleave(self.num_heads // self.num_kv_heads, dim=0)
            return (
                torch.einsum("bhtd,hdr->bhtr", queries, per_query.to(queries.dtype)),
                key_codes,
                value_codes,
            )

        def decode(self, outputs):
            return outputs

        def cached_numbers(self) -> int:
            return self.num_kv_heads * (self.rank + self.head_dim)

        def codec_spec(self) -> dict[str, Any]:
            return {"shape": [self.num_heads, self.num_kv_heads, self.head_dim, self.rank]}

        @classmethod
        def from_codec_spec(cls, spec, *, device=None, dtype=None):
            return cls(*spec["shape"], device=device, dtype=dtype)

    @dataclass(kw_only=True)
    class SubspaceConfig(MethodConfig):
        method: ClassVar[str] = "toy-subspace-keys"
        example: ClassVar[dict[str, Any]] = {}
        rank_fraction: float = 0.5

    @register_method(SubspaceConfig)
    def compress_subspace(model, config, ctx) -> CompressionResult:
        spec, shape = get_arch_spec(model), attention_info(model).shape
        rank = max(1, round(config.rank_fraction * shape.head_dim))
        generator = torch.Generator().manual_seed(0)

        def process(index, layer, stats):
            codec = SubspaceKeys(shape.num_heads, shape.num_kv_heads, shape.head_dim, rank)
            for h in range(shape.num_kv_heads):
                q, _ = torch.linalg.qr(torch.randn(shape.head_dim, shape.head_dim, generator=generator))
                codec.basis.data[h] = q[:, :rank]
            replace_module(
                layer, spec.attention, ProjectedAttention(get_module(layer, spec.attention), codec)
            )
            return {}

        ctx.layer_pass(None, process, desc="toy-subspace-keys")
        install_cache(model, ProjectedKVCache, {})
        return CompressionResult(method=config.method, config=config.to_dict())

    return SubspaceConfig, SubspaceKeys


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_codec_defined_here_is_exact_at_full_rank_and_decodes_as_it_forwards(registries, arch):
    SubspaceConfig, _ = _half_keys_codec()
    model = make_tiny_model(arch)
    ids = random_tokens(1, 10, seed=5)
    before = _logits(model, ids)
    compress(model, SubspaceConfig(rank_fraction=1.0))  # an orthonormal basis of every key: exact
    torch.testing.assert_close(_logits(model, ids), before, rtol=1e-4, atol=1e-4)
    model = make_tiny_model(arch)
    compress(model, SubspaceConfig(rank_fraction=0.5))
    full = _logits(model, ids)
    with torch.no_grad():  # prefill 6 tokens into the codec's cache, then decode one at a time
        cache = make_cache(model)  # the installed class
        assert isinstance(cache, ProjectedKVCache)
        steps = [model(ids[:, :6], cache=cache, use_cache=True).logits]
        for t in range(6, ids.shape[1]):
            out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)


def test_a_codec_defined_here_stores_the_bytes_it_predicts_saves_and_heals(registries, tmp_path):
    SubspaceConfig, SubspaceKeys = _half_keys_codec()
    model = make_tiny_model("llama")
    shape = attention_info(model).shape
    original_bytes = kv_bytes_per_token(model)
    result = compress(model, SubspaceConfig(rank_fraction=0.5))
    layers = model.config.num_hidden_layers
    predicted = layers * shape.num_kv_heads * (shape.head_dim // 2 + shape.head_dim) * 4
    assert kv_bytes_per_token(model) == predicted == result.kv_bytes_per_token_after < original_bytes
    assert memory_report(model, tokens=8, batch_size=2).kv_cache_bytes_per_token == predicted  # measured
    ids = random_tokens(2, 12, seed=9)
    save_compressed(model, tmp_path / "m")
    loaded, _ = load_compressed(tmp_path / "m")  # the codec is found by its registered name
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    assert sum(isinstance(m.kv, SubspaceKeys) for m in loaded.modules() if isinstance(m, ProjectedAttention))
    # healing: the codec's own parameters under 'replaced', at the general learning rate
    trained = healing_parameters(model, "replaced")
    assert trained and all(name.endswith(".kv.basis") for name in trained)
    assert default_learning_rate(model) == LEARNING_RATE and resolve_trainable(model) == "replaced"
    with pytest.raises(ValueError, match=r"unknown KV codec 'Nope'; known: .*SubspaceKeys"):
        codecs.codec_class("Nope")


def test_a_codec_must_take_the_base_class_that_holds_the_optional_contract(registries):
    class Bare(nn.Module):  # every required method, but not a KVCodec
        encode = attend = decode = cached_numbers = codec_spec = from_codec_spec = lambda *a, **k: None

    with pytest.raises(TypeError, match=r"must subclass lowrank\.attention\.codecs\.KVCodec.*KVCodec base"):
        register_codec(Bare)

    class Partial(KVCodec):
        encode = attend = decode = lambda *a, **k: None

    with pytest.raises(TypeError, match=r"lacks cached_numbers, codec_spec, from_codec_spec"):
        register_codec(Partial)
    assert "Bare" not in codecs.codec_names() and "Partial" not in codecs.codec_names()
    # the defaults a minimal codec inherits: nothing folded, no positions kept, healing as 'replaced'
    plain = KVCodec()
    defaults = (plain.folded, plain.needs_positions, plain.fused_keys, plain.key_width)
    assert defaults == ((), False, False, None)
    assert plain.fold_into({}, None) == {} and plain.healing_scope() == "replaced"
