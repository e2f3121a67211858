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
    "QKNormLayout",
    "get_arch_spec",
    "spec_for_model_type",
    "find_module",
    "vocab_size",
    "register_arch_spec",
    "decoder_layers",
]

QKNormLayout = Literal["b t h d", "b h t d", "b t (h d)"]
"""Where a family's q/k norm acts: per head before the transpose, after it, or on the whole projection."""


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


def find_module(root: nn.Module, path: str) -> nn.Module | None:
    """The submodule of ``root`` at the dotted ``path``, or ``None`` where any part is missing."""
    module: nn.Module | None = root
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def spec_for_model_type(model_type: str | None) -> ArchSpec:
    """The registered :class:`ArchSpec` of ``model_type`` (the Llama-like default for any other)."""
    return _REGISTRY.get(model_type or "", _DEFAULT)


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
    spec = spec_for_model_type(model_type)
    layers = find_module(model, spec.layers)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(
            f"model_type {model_type!r}: no decoder layers at {spec.layers!r}; supported layouts are "
            f"Llama-like ({', '.join(sorted(_REGISTRY))}); register others with register_arch_spec()"
        )
    # a replacement attention that fuses projections away names them (``absent_projections``)
    absent = getattr(find_module(layers[0], spec.attention), "absent_projections", ())
    absent = {f"{spec.attention}.{name}" for name in absent}
    missing = [
        p for p in spec.linears.values() if p not in absent and not _is_linear_like(find_module(layers[0], p))
    ]
    missing += [
        f"{spec.attention}.{p}"
        for p in (spec.q_norm, spec.k_norm)
        if p and find_module(layers[0], f"{spec.attention}.{p}") is None
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
    layers = find_module(model, spec.layers)
    assert isinstance(layers, nn.ModuleList)
    return layers


def vocab_size(model: nn.Module) -> int:
    """Rows of the output head: the vocabulary the model predicts over (``config.vocab_size`` without one)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)
