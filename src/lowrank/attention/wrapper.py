"""Attention that caches compressed keys and values: one module for every family, one cache class.

:class:`ProjectedAttention` replaces a transformers attention module with lowrank's own forward pass, built
from public pieces only: the original's projections and q/k norms (taken over, not copied, so state-dict
names do not change), RoPE from the (cos, sin) the model's rotary embedding passes in, the Cache API,
and the attention kernel from transformers' attention-function registry (``sdpa``, ``flash_attention_2``,
…; ``eager`` is lowrank's own). Everything family-specific (q/k norm layout, biases, score scale,
sliding windows, soft-capping, layers without RoPE) comes from
:class:`~lowrank.nn.architectures.LayerAttention`,
so no transformers ``forward`` is ever called on it. A *codec* (an ``nn.Module`` registered in
:mod:`lowrank.attention.codecs`, which states its protocol) decides what the cache stores. Two are built in:
:class:`~lowrank.attention.low_rank_kv.KVProjection` (low-rank KV-cache projections, RoPE ``post`` or
``pre``) and :class:`~lowrank.attention.latent_kv.LatentKV` (MHA→MLA: partial RoPE plus a latent shared
by keys and values).

:class:`ProjectedKVCache` (a ``DynamicCache``) stores the codes, so the memory saving is real:
``generate``, the throughput harness and the KV-bytes measurement all use it once installed
(:func:`lowrank.attention.cache.install_cache`). With any other cache, or none, the module encodes on the fly
and computes the same logits.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

import lowrank.attention.latent_kv  # noqa: F401  (registers the built-in codecs)
import lowrank.attention.low_rank_kv  # noqa: F401
from lowrank.attention.cache import register_cache
from lowrank.attention.codecs import codec_class
from lowrank.attention.rope import rotate
from lowrank.nn import register_replacement
from lowrank.nn.attention_layout import LayerAttention, attention_implementation, layer_attention
from lowrank.nn.surgery import replace_module

__all__ = [
    "ProjectedAttention",
    "ProjectedKVCache",
    "eager_attention",
    "attention_kernel",
    "ATTENTION_LEARNING_RATE",
]

ATTENTION_LEARNING_RATE = 3e-4
"""Peak healing learning rate when the converted attention's q/k/v/o train (``trainable='attention'``, the
``auto`` choice after an MLA conversion): at the seed's MLA setting and 200k tokens it wins back 0.52 of the
lost wiki log-perplexity against 0.42 at 1e-4 (benchmarks/results/heal_cpu.md)."""


def eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    scaling: float,
    dropout: float = 0.0,
    softcap: float | None = None,
    **_: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention as plain matrix products, with the signature of transformers' attention functions.

    query: (b, H, t, d_q); key: (b, H_kv, T, d_q); value: (b, H_kv, T, d_v); ``attention_mask`` additive,
    (b, 1, t, T). Scores are soft-capped (``c · tanh(s / c)``) before the mask when ``softcap`` is set and
    normalised in float32. Returns the output (b, t, H, d_v) and the weights (b, H, t, T).
    """
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        weights = torch.tanh(weights / softcap) * softcap
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def attention_kernel(implementation: str):
    """The attention function for ``implementation``: lowrank's eager one, else transformers' registry."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if implementation == "eager":
        return eager_attention
    if implementation not in ALL_ATTENTION_FUNCTIONS:
        raise ValueError(
            f"attention implementation {implementation!r} is not registered; "
            f"known: eager, {', '.join(sorted(ALL_ATTENTION_FUNCTIONS))}"
        )
    return ALL_ATTENTION_FUNCTIONS[implementation]


@register_replacement
class ProjectedAttention(nn.Module):
    """An attention layer whose keys and values are cached through a codec.

    Args:
        attention: the transformers attention module to replace (its projections and q/k norms are
            taken over, not copied).
        codec: the layer's :class:`~lowrank.nn.KVProjection` or :class:`~lowrank.nn.LatentKV`.
        layer: the layer's description (default: read from ``attention`` and its config).
        implementation: attention kernel (default: the one the model's config selects).
    """

    def __init__(
        self,
        attention: nn.Module,
        codec: nn.Module,
        *,
        layer: LayerAttention | None = None,
        implementation: str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(attention, ProjectedAttention):
            raise ValueError("this attention module already caches projected keys and values")
        self.layer = layer or layer_attention(attention)
        norms = (self.layer.q_norm, self.layer.k_norm)
        parts = [n for n in ("q_proj", "k_proj", "v_proj", "o_proj", *norms) if n]
        unknown = sorted(
            {n for n, _ in attention.named_children()} - set(parts)
            | {n for n, _ in attention.named_parameters(recurse=False)}
        )
        if unknown:
            raise ValueError(
                f"{type(attention).__name__} has parts lowrank's attention does not compute with: "
                f"{', '.join(unknown)}; register its family with register_arch_spec() if they are q/k norms"
            )
        for name in parts:
            self.add_module(name, getattr(attention, name))
        self.config = attention.config  # attention kernels read their settings from module.config
        self.layer_idx = self.layer.layer_idx
        self.head_dim = self.layer.head_dim
        self.num_key_value_groups = self.layer.num_heads // self.layer.num_kv_heads
        self.scaling = self.layer.scaling
        self.is_causal = True
        self.implementation = implementation or attention_implementation(attention.config)
        self._kernel = attention_kernel(self.implementation)
        self.kv = codec

    def _heads(self, x: torch.Tensor, norm: str | None, width: int | None = None) -> torch.Tensor:
        """(b, t, h·w) projection output → (b, h, t, w) (w: ``width``, default head_dim), through the
        layer's q/k norm where it has one."""
        shape = (*x.shape[:-1], -1, width or self.head_dim)
        layout = self.layer.qk_norm_layout
        if norm is None:
            return x.view(shape).transpose(1, 2)
        norm = getattr(self, norm)
        if layout == "b t (h d)":
            return norm(x).view(shape).transpose(1, 2)
        if layout == "b t h d":
            return norm(x.view(shape)).transpose(1, 2)
        return norm(x.view(shape).transpose(1, 2))

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        cache=None,
        position_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        cache = cache if cache is not None else past_key_values
        layer = self.layer
        codec = self.kv
        queries = self._heads(self.q_proj(hidden_states), layer.q_norm)
        keys = self._heads(self.k_proj(hidden_states), layer.k_norm, codec.key_width)
        values = self._heads(self.v_proj(hidden_states), None, codec.value_width)
        if layer.rope:
            if position_embeddings[0].shape[-1] != self.head_dim:
                raise ValueError(
                    f"layer {self.layer_idx}: RoPE tables of width {position_embeddings[0].shape[-1]} for "
                    f"heads of {self.head_dim}; only full-width rotary embeddings are supported"
                )
            queries = rotate(queries, *position_embeddings)
            if not codec.fused_keys:  # folded keys are codes of the un-rotated keys
                keys = rotate(keys, *position_embeddings)
        projects = isinstance(cache, ProjectedKVCache) and self.layer_idx in cache.projected
        if projects:
            keys, values = cache.append(self, keys, values, position_embeddings, position_ids)
        else:
            if cache is not None:
                keys, values = cache.update(keys, values, self.layer_idx)
            keys, values = self.kv.encode(keys, values, position_embeddings)
        queries, keys, values = self.kv.attend(
            queries, keys, values, position_embeddings, keys_decoded=projects
        )
        extra = {"sliding_window": layer.sliding_window} if layer.sliding_window is not None else {}
        if layer.softcap is not None:
            extra["softcap"] = layer.softcap
        if position_ids is not None:
            extra["position_ids"] = position_ids
        out, weights = self._kernel(
            self,
            queries,
            keys,
            values,
            attention_mask,
            dropout=layer.dropout if self.training else 0.0,
            scaling=self.scaling,
            **extra,
            **kwargs,
        )
        out = self.kv.decode(out)
        return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights

    def extra_repr(self) -> str:
        return f"layer={self.layer_idx}, implementation={self.implementation}"

    def fold_projections(self) -> tuple[str, ...]:
        """Fold the codec's maps into ``k_proj``/``v_proj``/``o_proj`` where its algebra allows (the
        codec's ``fold_into``; see :mod:`lowrank.attention.low_rank_kv`), deleting the rows they made
        redundant. Returns the names of the projections replaced; the outputs do not change."""
        replaced = self.kv.fold_into({name: getattr(self, name) for name in _FOLDABLE}, self.layer)
        for name, module in replaced.items():
            replace_module(self, name, module)
        return tuple(sorted(replaced))

    # -- healing protocol (see lowrank.nn.registry) --------------------------------------------
    def healing_scope(self) -> str:
        """``'attention'`` when its codec asks for the whole attention to train (partial RoPE), else
        ``'replaced'``."""
        return self.kv.healing_scope()

    def healing_parameters(self, trainable: str):
        """The codec (and the projections that absorbed its maps) under ``'replaced'``: the rest of q/k/v/o
        is the original's, unless itself replaced; everything under ``'attention'``."""
        if trainable == "attention":
            return self.parameters()
        folded = [p for name in self.kv.folded for p in getattr(self, name).parameters()]
        return [*self.kv.parameters(), *folded]

    def healing_learning_rate(self, trainable: str) -> float | None:
        if trainable == "attention":
            return ATTENTION_LEARNING_RATE
        return self.kv.healing_learning_rate(trainable)

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
        codec_cls = codec_class(name)
        try:
            codec = codec_cls.from_codec_spec(spec, device=device, dtype=dtype)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"ProjectedAttention spec for {name} is incomplete: {spec!r}") from exc
        module = cls(original, codec)
        for part, (out_features, in_features) in codec.folded_shapes(dict(module.named_children())).items():
            old = getattr(module, part)
            replace_module(
                module,
                part,
                nn.Linear(
                    in_features,
                    out_features,
                    bias=old.bias is not None,
                    device=device or old.weight.device,
                    dtype=dtype or old.weight.dtype,
                ),
            )
        return module


_FOLDABLE = ("k_proj", "v_proj", "o_proj")


def _layer_type(module: ProjectedAttention) -> str | None:
    types = getattr(module.config, "layer_types", None)
    return types[module.layer_idx] if types else None


def _pre(module: ProjectedAttention) -> bool:
    """The layer reconstructs its keys before RoPE (the cache must keep positions)."""
    return module.kv.needs_positions


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
        self._rotary_takes_layer_type = (
            rotary is not None and "layer_type" in inspect.signature(rotary.forward).parameters
        )
        self._last_pre: dict[str | None, int] = {}
        """Per layer type, the highest pre-RoPE layer: the one that releases the pass's cos/sin."""
        for i, module in sorted(self.projected.items()):
            if _pre(module):
                self._last_pre[_layer_type(module)] = i
        self._tables_memo: dict[str | None, tuple[int, int, torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_model(cls, model: nn.Module) -> ProjectedKVCache:
        from lowrank.nn.architectures import get_arch_spec
        from lowrank.nn.attention_layout import attention_info
        from lowrank.nn.surgery import get_module

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
        from lowrank.attention.cache import default_kv_bytes_per_token

        total = default_kv_bytes_per_token(model)
        for module in model.modules():
            if isinstance(module, ProjectedAttention):
                codec = module.kv
                size = next(codec.parameters()).element_size()
                full = 2 * codec.num_kv_heads * codec.head_dim * size
                total += codec.cached_numbers() * size - full + (4 if _pre(module) else 0)
        return float(total)

    def append(
        self,
        module: ProjectedAttention,
        keys: torch.Tensor,
        values: torch.Tensor,
        rope_tables,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the codes of a projected layer's new rotated keys and values; return what it attends to.

        ``post`` layers get the stored codes; ``pre`` layers get every cached key reconstructed and rotated
        at its own position (positions default to the next ones in order).
        """
        layer_idx = module.layer_idx
        codes = module.kv.encode(keys, values, rope_tables)
        keys_out, values_out = self.update(*codes, layer_idx)
        if not _pre(module):
            return keys_out, values_out
        start = 0 if layer_idx not in self.positions else self.positions[layer_idx].shape[-1]
        if position_ids is None:
            t = keys.shape[-2]
            position_ids = torch.arange(start, start + t, device=keys.device).expand(keys.shape[0], -1)
        new = position_ids.to(torch.int32)
        previous = self.positions.get(layer_idx)
        self.positions[layer_idx] = new if previous is None else torch.cat([previous, new], dim=-1)
        cos_all, sin_all = self._tables(module, self.positions[layer_idx], keys)
        return module.kv.decode_rotated_keys(keys_out, cos_all, sin_all), values_out

    def _tables(self, module: ProjectedAttention, positions: torch.Tensor, like: torch.Tensor):
        """cos/sin at every cached position, computed once per forward pass and layer type.

        Every layer of a pass sees the same positions, so the first pre-RoPE layer of each type computes
        the tables and the later layers of the same pass (higher indices, same length) reuse them; the
        last one lets them go, so nothing but codes and positions stays in the cache between passes.
        """
        kind = _layer_type(module)
        layer_idx, length = module.layer_idx, positions.shape[-1]
        memo = self._tables_memo.get(kind)
        if memo is None or memo[1] != length or layer_idx <= memo[0] or memo[2].dtype != like.dtype:
            extra = {"layer_type": kind} if self._rotary_takes_layer_type else {}
            cos, sin = self._rotary(like, positions.long(), **extra)
        else:
            cos, sin = memo[2], memo[3]
        if layer_idx >= self._last_pre[kind]:
            self._tables_memo.pop(kind, None)
        else:
            self._tables_memo[kind] = (layer_idx, length, cos, sin)
        return cos, sin
