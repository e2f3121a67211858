"""Architecture knowledge as data: where the decoder layers and their projections live.

Every method asks this module, never a model name, where things are. A Llama-shaped default covers
Llama, Mistral, Qwen2/Qwen3, Gemma/Gemma2/Gemma3 and anything else with the same module names; the
small registry below lists the families known to fit and the exceptions. A model whose modules do not
match raises one line naming what is missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

__all__ = [
    "ArchSpec",
    "LINEAR_TYPES",
    "get_arch_spec",
    "register_arch_spec",
    "decoder_layers",
    "attention_shape",
    "AttentionShape",
]

#: The seven kinds of decoder linear layer, in layer order. SVD-LLM V2 allocates ranks within each kind.
LINEAR_TYPES: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")


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
    """Path from a decoder layer to each linear layer, keyed by its kind (see ``LINEAR_TYPES``)."""
    rotary: str | None = "model.rotary_emb"
    """Path from the model to the shared rotary embedding module, if any."""

    def linear_type(self, relative_name: str) -> str | None:
        """The kind (``'q'``, ``'down'``, …) of a linear given its path inside a layer, else ``None``."""
        for kind, path in self.linears.items():
            if relative_name == path:
                return kind
        return None


_DEFAULT = ArchSpec()
_REGISTRY: dict[str, ArchSpec] = {
    name: _DEFAULT
    for name in (
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "gemma",
        "gemma2",
        "gemma3_text",
        "olmo",
        "olmo2",
        "granite",
        "smollm3",
    )
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
    if missing:
        raise ValueError(
            f"model_type {model_type!r}: decoder layer has no nn.Linear at {', '.join(missing)}; "
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
        """Query heads per key/value head (1 for MHA, >1 for GQA)."""
        return self.num_heads // self.num_kv_heads


def attention_shape(config) -> AttentionShape:
    """Read the attention geometry from a transformers config (handles ``head_dim`` and GQA)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return AttentionShape(hidden_size=cfg.hidden_size, num_heads=heads, num_kv_heads=kv, head_dim=head_dim)
