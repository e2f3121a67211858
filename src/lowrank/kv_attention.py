"""Attention that caches compressed keys and values: one wrapper for every family, one cache class.

:class:`ProjectedAttention` replaces a transformers attention module without forking its code: it takes
over the original's submodules, parameters and attributes (so the state-dict names do not change), runs
the family's own ``forward``, and routes the attention call through a function registered with
``transformers.AttentionInterface`` that applies the layer's *codec* around the implementation the module
used before (eager, sdpa, …). A codec (an ``nn.Module``) has three methods:

* ``encode(keys, values, rope_tables) -> (key_codes, value_codes)``: what the cache stores for new rotated
  keys and values;
* ``attend(queries, key_codes, value_codes, rope_tables, keys_decoded=...) -> (q, k, v)``: what the
  attention function computes with (queries mapped into the codes' space, up-projections absorbed);
* ``decode(outputs)``: each head's attention output back to head_dim before o_proj;

plus ``cached_numbers()`` and ``codec_spec()``/``from_codec_spec()``. Two codecs exist:
:class:`~lowrank.nn.KVProjection` (low-rank KV-cache projections, RoPE ``post`` or ``pre``) and
:class:`~lowrank.nn.LatentKV` (MHA→MLA: partial RoPE plus a latent shared by keys and values).

:class:`ProjectedKVCache` (a ``DynamicCache``) stores the codes, so the memory saving is real:
``generate``, the throughput harness and the KV-bytes measurement all use it once installed
(:func:`lowrank.kv_cache.install_cache`). With any other cache, or none, the wrapper encodes on the fly
and computes the same logits.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, DynamicCache

from lowrank.architectures import attention_function, routed_config
from lowrank.kv_cache import register_cache
from lowrank.nn import KVProjection, LatentKV, register_replacement
from lowrank.nn.rope import rotate

__all__ = ["ProjectedAttention", "ProjectedKVCache", "PROJECTED_IMPLEMENTATION", "CODECS"]

#: Name of the attention function registered with ``AttentionInterface``.
PROJECTED_IMPLEMENTATION = "lowrank_projected_kv"

#: Codec classes by name (what a saved model records).
CODECS: dict[str, type[nn.Module]] = {"KVProjection": KVProjection, "LatentKV": LatentKV}


@dataclass
class _Call:
    """What one forward call of a :class:`ProjectedAttention` needs inside the attention function."""

    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None
    cache_projects: bool


def _projected_attention(module: nn.Module, query, key, value, attention_mask, *args, **kwargs):
    """Attention function: the layer's codec around the family's own implementation."""
    call = module._call
    if call is None:
        raise RuntimeError(
            f"attention implementation {PROJECTED_IMPLEMENTATION!r} runs inside ProjectedAttention"
        )
    codec = module.kv
    if not call.cache_projects:
        key, value = codec.encode(key, value, call.position_embeddings)
    query, key, value = codec.attend(
        query, key, value, call.position_embeddings, keys_decoded=call.cache_projects
    )
    out, weights = module._inner_attention(module, query, key, value, attention_mask, *args, **kwargs)
    return codec.decode(out), weights


AttentionInterface.register(PROJECTED_IMPLEMENTATION, _projected_attention)


@register_replacement
class ProjectedAttention(nn.Module):
    """A transformers attention module whose keys and values are cached through a codec.

    Args:
        attention: the module to wrap (its submodules and parameters are taken over, not copied).
        codec: the layer's :class:`~lowrank.nn.KVProjection` or :class:`~lowrank.nn.LatentKV`.
    """

    def __init__(self, attention: nn.Module, codec: nn.Module) -> None:
        super().__init__()
        if isinstance(attention, ProjectedAttention):
            raise ValueError("this attention module already caches projected keys and values")
        for name, child in attention.named_children():
            self.add_module(name, child)
        for name, param in attention.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buf in attention.named_buffers(recurse=False):
            self.register_buffer(name, buf, persistent=name not in attention._non_persistent_buffers_set)
        for name, value in vars(attention).items():
            if not name.startswith("_") and name not in ("training", "config"):
                object.__setattr__(self, name, value)
        implementation = attention.config._attn_implementation or "eager"
        self.config = routed_config(attention.config, PROJECTED_IMPLEMENTATION)
        self.kv = codec
        self.implementation = implementation
        self._family = type(attention)
        self._inner_attention = attention_function(attention, implementation)
        self._call: _Call | None = None

    def forward(self, *args: Any, **kwargs: Any):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        positions = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
        self._call = _Call(positions, isinstance(cache, ProjectedKVCache))
        try:
            return self._family.forward(self, *args, **kwargs)
        finally:
            self._call = None

    def extra_repr(self) -> str:
        return f"family={self._family.__name__}, implementation={self.implementation}"

    # -- serialization protocol (see lowrank.nn.registry) --------------------------------------
    def replacement_spec(self) -> dict[str, Any]:
        return {"codec": type(self.kv).__name__, **self.kv.codec_spec()}

    @classmethod
    def from_spec(
        cls, spec, *, original=None, model_config=None, device=None, dtype=None
    ) -> ProjectedAttention:
        """Wrap ``original`` (the freshly built attention module) with an empty codec shaped as ``spec``."""
        if original is None:
            raise ValueError(
                "ProjectedAttention is rebuilt around the attention module it replaced; none given"
            )
        spec = dict(spec)
        name = spec.pop("codec", "KVProjection")
        if name not in CODECS:
            raise ValueError(f"unknown KV codec {name!r}; known: {', '.join(CODECS)}")
        try:
            codec = CODECS[name].from_codec_spec(spec, device=device, dtype=dtype)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"ProjectedAttention spec for {name} is incomplete: {spec!r}") from exc
        return cls(original, codec)


def _pre(module: ProjectedAttention) -> bool:
    """The layer reconstructs its keys before RoPE (the cache must keep positions)."""
    return getattr(module.kv, "rope", None) == "pre"


@register_cache
class ProjectedKVCache(DynamicCache):
    """A ``DynamicCache`` that stores K A and V C for the layers wrapped in :class:`ProjectedAttention`.

    ``rope="post"`` layers return the stored codes (the attention runs at width R). ``rope="pre"`` layers
    also store each token's position (int32, once per layer) and return the keys reconstructed and
    rotated at those positions, recomputing cos/sin with the model's rotary embedding: 4 more bytes per
    token and layer, and every cached key is reconstructed at every decoding step.
    """

    def __init__(
        self, config=None, *, layers: dict[int, ProjectedAttention] | None = None, rotary=None
    ) -> None:
        super().__init__(config=config)
        self.projected = dict(layers or {})
        self.positions: dict[int, torch.Tensor] = {}
        self._rotary = rotary

    @classmethod
    def from_model(cls, model: nn.Module) -> ProjectedKVCache:
        from lowrank.architectures import attention_info, get_arch_spec
        from lowrank.surgery import get_module

        layers = {
            int(module.layer_idx): module
            for module in model.modules()
            if isinstance(module, ProjectedAttention)
        }
        rotary = None
        pre = sorted(i for i, m in layers.items() if _pre(m))
        if pre:
            spec, info = get_arch_spec(model), attention_info(model)
            rotary = get_module(model, spec.rotary) if spec.rotary else None
            if rotary is None or info.rotary_style != "rotate_half" or info.rotary_dim != info.shape.head_dim:
                raise ValueError(
                    "rope='pre' needs a full-width rotate-half rotary embedding (this model: "
                    f"{info.rotary_style}, rotary_dim {info.rotary_dim} of {info.shape.head_dim}); "
                    "use rope='post'"
                )
            sliding = [i for i in pre if info.sliding_window[i] is not None]
            if sliding:
                raise ValueError(
                    f"rope='pre' is not supported on sliding-window layers {sliding}; use rope='post'"
                )
        return cls(config=model.config, layers=layers, rotary=rotary)

    @classmethod
    def bytes_per_token(cls, model: nn.Module) -> float:
        """Analytic bytes per token: K A and V C of the projected layers (plus positions for ``pre``)."""
        from lowrank.kv_cache import default_kv_bytes_per_token

        total = default_kv_bytes_per_token(model)
        for module in model.modules():
            if isinstance(module, ProjectedAttention):
                codec = module.kv
                size = next(codec.parameters()).element_size()
                full = 2 * codec.num_kv_heads * codec.head_dim * size
                total += codec.cached_numbers() * size - full + (4 if _pre(module) else 0)
        return float(total)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        """Store the codes of the new tokens; return what the layer's attention function expects."""
        module = self.projected.get(layer_idx)
        if module is None:
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        codes = module.kv.encode(key_states, value_states, module._call.position_embeddings)
        keys, values = super().update(*codes, layer_idx, *args, **kwargs)
        if not _pre(module):
            return keys, values
        new = self._new_positions(layer_idx, key_states.shape, kwargs, key_states.device)
        previous = self.positions.get(layer_idx)
        self.positions[layer_idx] = new if previous is None else torch.cat([previous, new], dim=-1)
        cos_all, sin_all = self._tables(module, self.positions[layer_idx], key_states)
        return rotate(module.kv.decode_keys(keys), cos_all, sin_all), values

    def _new_positions(self, layer_idx: int, shape, kwargs, device) -> torch.Tensor:
        start = 0 if layer_idx not in self.positions else self.positions[layer_idx].shape[-1]
        call_kwargs = kwargs.get("kwargs") or {}  # the attention module passes its keyword arguments along
        ids = call_kwargs.get("position_ids") if isinstance(call_kwargs, dict) else None
        if ids is None:
            ids = torch.arange(start, start + shape[-2], device=device).expand(shape[0], -1)
        return ids.to(torch.int32)

    def _tables(self, module: ProjectedAttention, positions: torch.Tensor, like: torch.Tensor):
        params = inspect.signature(self._rotary.forward).parameters
        extra = {}
        if "layer_type" in params:
            extra["layer_type"] = module.config.layer_types[module.layer_idx]
        return self._rotary(like, positions.long(), **extra)
