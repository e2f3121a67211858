"""Weight-only quantization of the linear layers, dense or factorized (``method='quantize'``).

Every ``nn.Linear`` inside the decoder layers becomes a :class:`lowrank.nn.QuantizedLinear`: the two
factors of a ``LowRankLinear`` (plain ``nn.Linear`` modules) are quantized like any dense layer, and so
are the q/k/v/o projections a converted attention shares. The library does the quantization
(:mod:`lowrank.nn.quantization`; HQQ by default), so the method needs no calibration data and stacks after
any other method: ``svd-llm-v2`` then ``quantize`` is low-rank plus quantization at equal memory.

Embeddings, the output head, norms and the KV codecs stay in the model's dtype. Weight bytes are counted
as stored: packed weights plus scales and zero points (and the biases, which stay parameters).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from lowrank.calibration.pipeline import RunContext
from lowrank.core.dtypes import resolve_dtype
from lowrank.methods.base import CompressionResult, MethodConfig, register_method
from lowrank.methods.common import _patterns
from lowrank.methods.records import ModuleKind, ModuleRecord
from lowrank.nn.architectures import get_arch_spec
from lowrank.nn.quantization import BACKENDS, get_backend
from lowrank.nn.quantized_linear import QuantizedLinear
from lowrank.nn.surgery import match_modules, replace_module

__all__ = ["QuantizeConfig"]

SCALE_DTYPES = ("float16", "float32")


@dataclass(kw_only=True)
class QuantizeConfig(MethodConfig):
    """Weight-only quantization of the decoder's linear layers through a maintained library."""

    method: ClassVar[str] = "quantize"
    example: ClassVar[dict[str, Any]] = {"bits": 4, "group_size": 16}

    bits: int = field(default=4, metadata={"range": "[1, inf)"})
    """Bits per weight (hqq: 1, 2, 3, 4 or 8)."""
    group_size: int = field(default=64, metadata={"range": "[1, inf)"})
    """Weights sharing one scale and zero point (hqq: a multiple of 8)."""
    backend: str = field(default="hqq", metadata={"choices": lambda: tuple(BACKENDS)})
    """Quantization library (see ``lowrank.nn.quantization``)."""
    scale_dtype: str = field(default="float16", metadata={"choices": SCALE_DTYPES})
    """dtype in which scales and zero points are stored."""
    targets: tuple[str, ...] | None = None
    """Modules to quantize (name suffix, ``re:<regex>`` or class name); default: every ``nn.Linear`` in
    the decoder layers, the factors of low-rank layers included."""
    ignore: tuple[str, ...] = ()
    """Modules to leave alone (same grammar as ``targets``)."""

    def __post_init__(self) -> None:
        self.targets = None if self.targets is None else _patterns(self.targets)
        self.ignore = _patterns(self.ignore)
        super().__post_init__()
        get_backend(self.backend).check(self.bits, self.group_size)


def _targets(model: nn.Module, config: QuantizeConfig) -> dict[str, nn.Linear]:
    prefix = get_arch_spec(model).layers + "."
    found = match_modules(model, config.targets or ("Linear",), config.ignore)
    out = {}
    for name, module in found.items():
        if config.targets is not None:
            if not isinstance(module, nn.Linear):
                raise ValueError(
                    f"target {name!r} is a {type(module).__name__}; quantize replaces plain nn.Linear "
                    "modules (for a low-rank layer select its factors, e.g. 're:.*down_proj\\.(down|up)')"
                )
            if not name.startswith(prefix):
                raise ValueError(
                    f"target {name!r} is outside the decoder layers ({prefix[:-1]}); not supported"
                )
        if isinstance(module, nn.Linear) and name.startswith(prefix):
            out[name] = module
    if not out:
        raise ValueError("quantize: no plain nn.Linear left to quantize in the decoder layers; check targets")
    return out


@register_method(QuantizeConfig)
def compress_quantize(model: nn.Module, config: QuantizeConfig, ctx: RunContext) -> CompressionResult:
    """Handler of ``method='quantize'``: each targeted linear → a :class:`QuantizedLinear` (data-free)."""
    backend = get_backend(config.backend, scale_dtype=resolve_dtype(config.scale_dtype, SCALE_DTYPES))
    version = backend.version()
    targets = _targets(model, config)
    prefix = get_arch_spec(model).layers + "."
    by_layer: dict[int, list[str]] = {}
    for name in targets:
        by_layer.setdefault(int(name[len(prefix) :].split(".", 1)[0]), []).append(name)

    def process(index: int, layer: nn.Module, stats: dict) -> dict[str, Any]:
        entries = {}
        for name in by_layer.get(index, []):
            with ctx.timings.measure("quantization"):
                built = QuantizedLinear.from_linear(
                    targets[name], bits=config.bits, group_size=config.group_size, backend=backend
                )
            replace_module(layer, name[len(prefix) :].split(".", 1)[1], built)
            entries[name] = {
                "shape": [built.out_features, built.in_features],
                "bits": config.bits,
                "stored_bytes": built.stored_bytes(),
            }
        return {"entries": entries}

    records = ctx.layer_pass(None, process, desc="quantize")
    modules = {
        name: ModuleRecord(
            kind=ModuleKind.QUANTIZED,
            shape=info["shape"],
            metrics={"bits": info["bits"], "stored_bytes": info["stored_bytes"]},
        )
        for record in records
        for name, info in record["entries"].items()
    }
    weights = sum(m.shape[0] * m.shape[1] for m in modules.values())
    stored = sum(m.metrics["stored_bytes"] for m in modules.values())
    return CompressionResult(
        method=config.method,
        config=config.to_dict(),
        modules=modules,
        details={
            "backend": f"{backend.package.split('==')[0]}=={version}",
            "quantized_linears": len(modules),
            "quantized_weights": weights,
            "quantized_bytes": stored,
            "bits_per_weight_stored": round(8 * stored / weights, 4),
        },
    )
