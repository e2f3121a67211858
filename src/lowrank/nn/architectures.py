"""Architecture knowledge as data: where the decoder layers, their projections and attention parts live.

Every method asks this module, never a model name, where things are. A Llama-shaped default covers
Llama, Mistral, Qwen2/Qwen3, Gemma/Gemma2/Gemma3 and anything else with the same module names; the
small registry below lists the families known to fit and the exceptions (Qwen3, OLMo2 and Gemma3 carry
query/key norms). A model whose modules do not match raises one line naming what is missing.

:func:`attention_info` resolves everything attention-specific a method may need (head geometry, q/k
norms, biases, rotary convention and dimension, per-layer sliding windows, soft-capping, the score
scale) from the model's config and modules, so no method reads ``config.*`` attributes itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from torch import nn

__all__ = [
    "ArchSpec",
    "get_arch_spec",
    "vocab_size",
    "register_arch_spec",
    "decoder_layers",
    "attention_shape",
    "AttentionShape",
    "attention_function",
    "attention_implementation",
    "layer_attention",
    "LayerAttention",
    "routed_config",
    "attention_info",
    "AttentionInfo",
    "QKNormLayout",
]

#: Layouts of the tensors q/k norms see (b: batch, t: sequence, h: heads, d: head_dim).
QKNormLayout = Literal["b t h d", "b h t d", "b t (h d)"]


@dataclass(frozen=True, kw_only=True)
class ArchSpec:
    """Where a decoder-only transformer keeps its parts (paths relative to the model or a layer)."""

    layers: str = "model.layers"
    """Path from the model to the ``nn.ModuleList`` of decoder layers."""
    attention: str = "self_attn"
    """Path from a decoder layer to its attention module."""
    linears: dict[str, str] = field(
        default_factory=lambda: {
            "q": "self_attn.q_proj",
            "k": "self_attn.k_proj",
            "v": "self_attn.v_proj",
            "o": "self_attn.o_proj",
            "gate": "mlp.gate_proj",
            "up": "mlp.up_proj",
            "down": "mlp.down_proj",
        }
    )
    """Path from a decoder layer to each linear layer, keyed by its kind (``q``, ``k``, ``v``, ``o``,
    ``gate``, ``up``, ``down``: SVD-LLM V2 allocates ranks within each kind)."""
    rotary: str | None = "model.rotary_emb"
    """Path from the model to the shared rotary embedding module, if any."""
    rotary_style: Literal["rotate_half", "interleaved"] = "rotate_half"
    """RoPE pairing: ``rotate_half`` rotates feature ``i`` with ``i + rotary_dim/2`` (GPT-NeoX, Llama and
    every family registered here); ``interleaved`` rotates ``2i`` with ``2i + 1`` (GPT-J)."""
    q_norm: str | None = None
    """Path from the attention module to the norm applied to the queries before RoPE, if any."""
    k_norm: str | None = None
    """Path from the attention module to the norm applied to the keys before RoPE, if any."""
    qk_norm_layout: QKNormLayout = "b t h d"
    """Layout of the tensors the q/k norms receive and return (b: batch, t: sequence, h: heads, d:
    head_dim): ``"b t h d"`` per head before the transpose (Qwen3), ``"b h t d"`` per head after it
    (Gemma3), ``"b t (h d)"`` the whole projection output (OLMo2)."""

    def kind_of(self, relative_name: str) -> str | None:
        """The kind (``'q'``, ``'down'``, …) of a linear given its path inside a layer, else ``None``."""
        for kind, path in self.linears.items():
            if relative_name == path:
                return kind
        return None


_DEFAULT = ArchSpec()
_REGISTRY: dict[str, ArchSpec] = {
    **{
        name: _DEFAULT
        for name in ("llama", "mistral", "qwen2", "gemma", "gemma2", "olmo", "granite", "smollm3")
    },
    "qwen3": replace(_DEFAULT, q_norm="q_norm", k_norm="k_norm", qk_norm_layout="b t h d"),
    "gemma3_text": replace(_DEFAULT, q_norm="q_norm", k_norm="k_norm", qk_norm_layout="b h t d"),
    "olmo2": replace(_DEFAULT, q_norm="q_norm", k_norm="k_norm", qk_norm_layout="b t (h d)"),
}


def register_arch_spec(model_type: str, spec: ArchSpec) -> None:
    """Teach the toolkit a new ``config.model_type`` (or override a known one)."""
    _REGISTRY[model_type] = spec


def _get(root: nn.Module, path: str) -> nn.Module | None:
    module: nn.Module | None = root
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _is_linear_like(module: nn.Module | None) -> bool:
    """An ``nn.Linear`` or a drop-in replacement of one (it keeps ``in_features``/``out_features``)."""
    return isinstance(module, nn.Linear) or (
        isinstance(module, nn.Module) and hasattr(module, "in_features") and hasattr(module, "out_features")
    )


def get_arch_spec(model: nn.Module) -> ArchSpec:
    """Return the :class:`ArchSpec` of ``model`` and check that the model really has that shape.

    Raises:
        ValueError: the model's modules do not match any known layout (names what is missing).
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    spec = _REGISTRY.get(model_type or "", _DEFAULT)
    layers = _get(model, spec.layers)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(
            f"model_type {model_type!r}: no decoder layers at {spec.layers!r}; supported layouts are "
            f"Llama-like ({', '.join(sorted(_REGISTRY))}); register others with register_arch_spec()"
        )
    missing = [p for p in spec.linears.values() if not _is_linear_like(_get(layers[0], p))]
    missing += [
        f"{spec.attention}.{p}"
        for p in (spec.q_norm, spec.k_norm)
        if p and _get(layers[0], f"{spec.attention}.{p}") is None
    ]
    if missing:
        raise ValueError(
            f"model_type {model_type!r}: decoder layer has no linear or norm module at {', '.join(missing)}; "
            f"supported layouts are Llama-like ({', '.join(sorted(_REGISTRY))}); "
            "register others with register_arch_spec()"
        )
    return spec


def decoder_layers(model: nn.Module, spec: ArchSpec | None = None) -> nn.ModuleList:
    """The model's ``nn.ModuleList`` of decoder layers."""
    spec = spec or get_arch_spec(model)
    layers = _get(model, spec.layers)
    assert isinstance(layers, nn.ModuleList)
    return layers


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
        weight = getattr(_get(attn, path), "weight", None) if path else None
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
    attns = [_get(layer, spec.attention) for layer in layers]
    types = getattr(cfg, "layer_types", None)
    types = tuple(types) if types is not None else ("full_attention",) * len(layers)
    rotary = _get(model, spec.rotary) if spec.rotary else None
    scalar = getattr(cfg, "query_pre_attn_scalar", None)
    scaling = getattr(attns[0], "scaling", scalar**-0.5 if scalar else shape.head_dim**-0.5)
    return AttentionInfo(
        shape=shape,
        attention=spec.attention,
        q_norm=spec.q_norm,
        k_norm=spec.k_norm,
        qk_norm_layout=_norm_layout(attns[0], spec, shape),
        bias={kind: _has_bias(_get(layers[0], spec.linears[kind])) for kind in ("q", "k", "v", "o")},
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
    spec = _REGISTRY.get(getattr(cfg, "model_type", "") or "", _DEFAULT)
    shape = attention_shape(cfg)
    for path in (spec.q_norm, spec.k_norm):
        if path and _get(attention, path) is None:
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


def vocab_size(model: nn.Module) -> int:
    """Rows of the output head: the vocabulary the model predicts over (``config.vocab_size`` without one)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)
