"""Each family's attention as data (head shapes, GQA, q/k norms, biases, rotary width, sliding windows,
soft-capping) and the attention kernel it runs with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from lowrank.nn.architectures import (
    ArchSpec,
    QKNormLayout,
    decoder_layers,
    find_module,
    get_arch_spec,
    spec_for_model_type,
)

__all__ = [
    "AttentionInfo",
    "AttentionShape",
    "LayerAttention",
    "attention_function",
    "attention_implementation",
    "attention_info",
    "attention_shape",
    "layer_attention",
    "routed_config",
]


#: Layouts of the tensors q/k norms see (b: batch, t: sequence, h: heads, d: head_dim).


@dataclass(frozen=True)
class AttentionShape:
    """Head geometry of a model's attention (from its config)."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 for MHA, >1 for GQA); query head ``i`` reads KV head
        ``i // group_size``."""
        return self.num_heads // self.num_kv_heads

    @property
    def kind(self) -> Literal["MHA", "GQA", "MQA"]:
        """``MHA`` (one KV head per query head), ``MQA`` (one KV head in all) or ``GQA`` (in between)."""
        if self.num_kv_heads == self.num_heads:
            return "MHA"
        return "MQA" if self.num_kv_heads == 1 else "GQA"


def attention_shape(config) -> AttentionShape:
    """Read the attention geometry from a transformers config (handles ``head_dim`` and GQA)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    if heads % kv:
        raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
    return AttentionShape(hidden_size=cfg.hidden_size, num_heads=heads, num_kv_heads=kv, head_dim=head_dim)


@dataclass(frozen=True, kw_only=True)
class AttentionInfo:
    """Everything attention-specific about a model, resolved from its config and modules.

    Per-layer fields are tuples with one entry per decoder layer.
    """

    shape: AttentionShape
    """Head geometry (heads, KV heads, head_dim, group size, MHA/GQA/MQA)."""
    attention: str
    """Path from a decoder layer to its attention module."""
    q_norm: str | None
    """Path from the attention module to the query norm applied before RoPE, if any."""
    k_norm: str | None
    """Path from the attention module to the key norm applied before RoPE, if any."""
    qk_norm_layout: QKNormLayout | None
    """Layout of what the q/k norms receive and return (see :attr:`ArchSpec.qk_norm_layout`); ``None``
    without norms. ``"b t (h d)"`` normalizes the whole projection output, the others each head."""
    bias: dict[str, bool]
    """Whether the ``'q'``, ``'k'``, ``'v'`` and ``'o'`` projections carry a bias (read from layer 0)."""
    scaling: float
    """Factor applied to QKᵀ before the softmax: ``query_pre_attn_scalar**-0.5`` (Gemma2/3),
    ``attention_multiplier`` (Granite), else ``head_dim**-0.5`` (read from the attention module)."""
    attn_logit_softcapping: float | None
    """Scores become ``c · tanh(scores / c)`` before masking when set (Gemma2)."""
    final_logit_softcapping: float | None
    """The LM head's logits become ``c · tanh(logits / c)`` when set (Gemma2/3)."""
    rotary: str | None
    """Path from the model to the rotary embedding module that computes every layer's (cos, sin)."""
    rotary_style: Literal["rotate_half", "interleaved"]
    """RoPE pairing convention (see :attr:`ArchSpec.rotary_style`)."""
    rotary_dim: int
    """Leading features of each head that RoPE rotates (``head_dim · partial_rotary_factor``); 0 without
    RoPE."""
    layer_types: tuple[str, ...]
    """``'full_attention'`` or ``'sliding_attention'`` per layer."""
    sliding_window: tuple[int | None, ...]
    """Keys a query may see (itself included) per layer, ``None`` for full causal attention."""
    rope: tuple[bool, ...]
    """Whether the layer applies RoPE (SmolLM3 skips it in every fourth layer)."""


def _rotary_dim(rotary: nn.Module | None, cfg, head_dim: int) -> int:
    """Twice the number of inverse frequencies of the rotary module (else from the config)."""
    if rotary is not None:
        sizes = {
            b.numel() for n, b in rotary.named_buffers() if n.endswith("inv_freq") and "original" not in n
        }
        if len(sizes) == 1:
            return 2 * sizes.pop()
    params = getattr(cfg, "rope_parameters", None) or {}
    factor = params.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", None) or 1.0)
    return int(head_dim * factor)


def _layer_window(attn: nn.Module, cfg, layer_type: str) -> int | None:
    if hasattr(attn, "sliding_window"):  # families that resolve it per layer keep it on the module
        return attn.sliding_window
    if getattr(cfg, "layer_types", None) is not None:
        return getattr(cfg, "sliding_window", None) if layer_type == "sliding_attention" else None
    return getattr(cfg, "sliding_window", None)  # Mistral: one window for every layer


def _norm_layout(attn: nn.Module, spec: ArchSpec, shape: AttentionShape) -> QKNormLayout | None:
    """The spec's q/k norm layout, checked against the size of the norms' weights."""
    if spec.q_norm is None:
        return None
    heads = {spec.q_norm: shape.num_heads, spec.k_norm: shape.num_kv_heads}
    for path, h in heads.items():
        weight = getattr(find_module(attn, path), "weight", None) if path else None
        need = h * shape.head_dim if spec.qk_norm_layout == "b t (h d)" else shape.head_dim
        if weight is not None and weight.numel() != need:
            raise ValueError(
                f"{path} has a weight of {weight.numel()} features but qk_norm_layout "
                f"{spec.qk_norm_layout!r} needs {need}; register the family with the right layout"
            )
    return spec.qk_norm_layout


def _has_bias(module: nn.Module | None) -> bool:
    """A linear or a drop-in replacement (whose bias sits on a factor) carries a bias."""
    return module is not None and any(n.rsplit(".", 1)[-1] == "bias" for n, _ in module.named_parameters())


def attention_info(model: nn.Module) -> AttentionInfo:
    """Resolve the attention of ``model`` (a causal LM of a registered or Llama-like family).

    Returns:
        the :class:`AttentionInfo`; per-layer tuples have ``len(decoder_layers(model))`` entries.

    Raises:
        ValueError: the model's layout is unknown (see :func:`get_arch_spec`).
    """
    spec = get_arch_spec(model)
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    shape = attention_shape(cfg)
    layers = decoder_layers(model, spec)
    attns = [find_module(layer, spec.attention) for layer in layers]
    types = getattr(cfg, "layer_types", None)
    types = tuple(types) if types is not None else ("full_attention",) * len(layers)
    rotary = find_module(model, spec.rotary) if spec.rotary else None
    scalar = getattr(cfg, "query_pre_attn_scalar", None)
    scaling = getattr(attns[0], "scaling", scalar**-0.5 if scalar else shape.head_dim**-0.5)
    return AttentionInfo(
        shape=shape,
        attention=spec.attention,
        q_norm=spec.q_norm,
        k_norm=spec.k_norm,
        qk_norm_layout=_norm_layout(attns[0], spec, shape),
        bias={kind: _has_bias(find_module(layers[0], spec.linears[kind])) for kind in ("q", "k", "v", "o")},
        scaling=float(scaling),
        attn_logit_softcapping=getattr(cfg, "attn_logit_softcapping", None),
        final_logit_softcapping=getattr(cfg, "final_logit_softcapping", None),
        rotary=spec.rotary if rotary is not None else None,
        rotary_style=spec.rotary_style,
        rotary_dim=_rotary_dim(rotary, cfg, shape.head_dim) if rotary is not None else 0,
        layer_types=types,
        sliding_window=tuple(_layer_window(a, cfg, t) for a, t in zip(attns, types, strict=True)),
        rope=tuple(bool(getattr(a, "use_rope", rotary is not None)) for a in attns),
    )


@dataclass(frozen=True, kw_only=True)
class LayerAttention:
    """One attention layer as a forward pass needs it, read from the module and its config."""

    layer_idx: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    q_norm: str | None
    """Name of the attention module's query norm (applied before RoPE), if any."""
    k_norm: str | None
    """Name of the attention module's key norm (applied before RoPE), if any."""
    qk_norm_layout: QKNormLayout | None
    """What the norms see (see :attr:`ArchSpec.qk_norm_layout`); ``None`` without norms."""
    scaling: float
    """Factor applied to QKᵀ before the softmax."""
    sliding_window: int | None
    """Keys a query may see (itself included), ``None`` for full causal attention."""
    softcap: float | None
    """Scores become ``c · tanh(scores / c)`` before masking when set."""
    rope: bool
    """Whether the layer rotates queries and keys."""
    dropout: float
    """Attention dropout probability in training."""


def layer_attention(attention: nn.Module) -> LayerAttention:
    """Describe a transformers attention module of a registered or Llama-like family.

    Raises:
        ValueError: the module lacks a norm its family's spec names, or a norm's size does not fit.
    """
    config = attention.config
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    spec = spec_for_model_type(getattr(cfg, "model_type", None))
    shape = attention_shape(cfg)
    for path in (spec.q_norm, spec.k_norm):
        if path and find_module(attention, path) is None:
            raise ValueError(
                f"{type(attention).__name__} has no {path!r} module, which its family's spec names"
            )
    layer_idx = int(attention.layer_idx)
    types = getattr(cfg, "layer_types", None)
    layer_type = types[layer_idx] if types is not None else "full_attention"
    return LayerAttention(
        layer_idx=layer_idx,
        num_heads=shape.num_heads,
        num_kv_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        q_norm=spec.q_norm,
        k_norm=spec.k_norm,
        qk_norm_layout=_norm_layout(attention, spec, shape),
        scaling=float(getattr(attention, "scaling", shape.head_dim**-0.5)),
        sliding_window=_layer_window(attention, cfg, layer_type),
        softcap=getattr(cfg, "attn_logit_softcapping", None),
        rope=bool(getattr(attention, "use_rope", True)),
        dropout=float(getattr(attention, "attention_dropout", 0.0) or 0.0),
    )


def attention_implementation(config) -> str:
    """The attention kernel a transformers config selects (``"eager"``, ``"sdpa"``, …); ``"eager"`` if unset.

    transformers has no public getter for this setting: its attention modules and its attention-interface
    documentation read ``config._attn_implementation``. This is the one place in lowrank that reads it
    (``tests/test_transformers_contract.py`` holds the package to that).
    """
    value = config._attn_implementation
    if isinstance(value, dict):
        value = value.get("")
    return value or "eager"


def attention_function(module: nn.Module, implementation: str):
    """The attention function ``module``'s own modeling code calls for ``implementation`` (eager, sdpa, …).

    Raises:
        ValueError: the implementation is not registered and the family has no eager function.
    """
    import sys

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    modeling = sys.modules[type(module).__module__]
    eager = getattr(modeling, "eager_attention_forward", None)
    interface = getattr(modeling, "ALL_ATTENTION_FUNCTIONS", ALL_ATTENTION_FUNCTIONS)
    function = eager if implementation == "eager" else interface.get(implementation, eager)
    if function is None:
        raise ValueError(
            f"{type(module).__name__} uses attention implementation {implementation!r} but "
            f"{modeling.__name__} has no eager_attention_forward; use a registered one (e.g. 'sdpa')"
        )
    return function


def routed_config(config, implementation: str):
    """A shallow copy of an attention module's config that selects ``implementation`` for that module only.

    The dict form of the selection leaves sub-configs untouched; the model's own config (shared by every
    layer) is never modified. ``set_attn_implementation`` is transformers' public setter, but it acts on a
    whole model; a copy routes one module.
    """
    import copy

    routed = copy.copy(config)
    routed._attn_implementation = {"": implementation}
    return routed
