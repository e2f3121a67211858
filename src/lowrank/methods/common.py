"""What the low-rank weight methods share: config fields, target planning, per-layer truncation, results."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowrank.architectures import get_arch_spec
from lowrank.calibration import InputGram, Statistic, StatRequest, Timings
from lowrank.linalg import DecomposerConfig, get_decomposer
from lowrank.linalg.allocation import (
    rank_for_keep_fraction,
    rank_for_ratio,
    saves_parameters,
)
from lowrank.linalg.whitening import truncate_projection, truncate_whitened, whiten
from lowrank.methods.base import CompressionResult, MethodConfig, count_parameters
from lowrank.nn import LowRankLinear
from lowrank.surgery import match_modules, replace_module

__all__ = ["LowRankConfig", "CalibratedConfig", "Target", "plan_targets", "build_result", "TRUNCATION_ROUTES"]

TRUNCATION_ROUTES = ("cholesky", "eigh", "projection")
_DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass(kw_only=True)
class LowRankConfig(MethodConfig):
    """Fields of every method that replaces linear layers by low-rank factors."""

    ratio: float | None = None
    """Fraction of each targeted matrix's parameters removed (SVD-LLM convention), in [0, 1)."""
    keep_singular_fraction: float | None = None
    """Fraction of singular values kept (the rSVD paper's r), in (0, 1]. Give exactly one of the two."""
    decomposer: Any = "svd"
    """Truncated decomposition: a ``DecomposerConfig``, its dict, or a name (``svd``, ``rsvd``, ``auto``)."""
    targets: tuple[str, ...] | None = None
    """Modules to compress (name suffix, ``re:<regex>`` or class name); default: the seven linear kinds."""
    ignore: tuple[str, ...] = ()
    """Modules to leave alone (same grammar as ``targets``)."""
    compute_dtype: str = "float64"
    """dtype of the decompositions: ``float64`` (exact reference) or ``float32`` (faster on GPUs)."""
    factorize_all: bool = False
    """Factorize even where the factors are not smaller than the dense matrix (analysis and tests)."""

    def __post_init__(self) -> None:
        if (self.ratio is None) == (self.keep_singular_fraction is None):
            raise ValueError(
                f"give exactly one of ratio (fraction of parameters removed) or keep_singular_fraction; "
                f"got ratio={self.ratio}, keep_singular_fraction={self.keep_singular_fraction}"
            )
        if self.ratio is not None and not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio (fraction of parameters removed) must be in [0, 1); got {self.ratio}")
        if self.keep_singular_fraction is not None and not 0.0 < self.keep_singular_fraction <= 1.0:
            raise ValueError(f"keep_singular_fraction must be in (0, 1]; got {self.keep_singular_fraction}")
        if self.compute_dtype not in _DTYPES:
            raise ValueError(f"compute_dtype must be one of {sorted(_DTYPES)}; got {self.compute_dtype!r}")
        if isinstance(self.decomposer, str):
            self.decomposer = DecomposerConfig(name=self.decomposer)
        elif isinstance(self.decomposer, dict):
            self.decomposer = DecomposerConfig.from_dict(self.decomposer)
        elif not isinstance(self.decomposer, DecomposerConfig):
            raise ValueError(f"decomposer must be a DecomposerConfig, dict or name; got {self.decomposer!r}")
        if isinstance(self.targets, str):
            self.targets = (self.targets,)
        if isinstance(self.ignore, str):
            self.ignore = (self.ignore,)
        self.targets = None if self.targets is None else tuple(self.targets)
        self.ignore = tuple(self.ignore)

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.compute_dtype]

    def homogeneous_rank(self, m: int, n: int) -> int:
        if self.ratio is not None:
            return rank_for_ratio(m, n, self.ratio)
        return rank_for_keep_fraction(m, n, self.keep_singular_fraction)


@dataclass(kw_only=True)
class CalibratedConfig(LowRankConfig):
    """Fields of the methods that need calibration activations."""

    calib_data: str = "wiki"
    """Corpus the calibration tokens come from (used by the CLI to build them)."""
    calib_samples: int = 64
    """Calibration sequences (GPU runs: 256 like the SVD-LLM anchors)."""
    seq_len: int = 512
    """Tokens per calibration sequence (GPU runs: 2048)."""
    batch_size: int = 8
    """Sequences per forward chunk while calibrating."""
    sequential: bool = True
    """Feed each layer the outputs of the already compressed layers (SVD-LLM); False: original activations."""
    gram_dtype: str = "float64"
    """Accumulation dtype of XᵀX: ``float64`` or ``float32`` (faster on GPUs)."""
    truncation: str = "cholesky"
    """Route to the minimiser of ‖(W − W')X‖_F: ``cholesky``, ``eigh`` (two-round SVD) or ``projection``."""
    offload_device: str = "cpu"
    """Where activations wait between layers."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("calib_samples", "seq_len", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer; got {getattr(self, name)}")
        if self.gram_dtype not in _DTYPES:
            raise ValueError(f"gram_dtype must be one of {sorted(_DTYPES)}; got {self.gram_dtype!r}")
        if self.truncation not in TRUNCATION_ROUTES:
            raise ValueError(f"truncation must be one of {TRUNCATION_ROUTES}; got {self.truncation!r}")

    def gram_requests(self, targets: list[Target]) -> dict[str, StatRequest]:
        dtype = _DTYPES[self.gram_dtype]
        return {t.rel: StatRequest(t.rel, lambda: InputGram(dtype)) for t in targets}


@dataclass
class Target:
    """One targeted linear layer: where it is, its shape and its (planned) rank (None: kept dense)."""

    name: str
    layer: int
    rel: str
    group: str
    out_features: int
    in_features: int
    rank: int | None
    info: dict[str, Any] = field(default_factory=dict)


def plan_targets(model: nn.Module, config: LowRankConfig) -> list[Target]:
    """Match the config's targets, check them, and give each its homogeneous rank.

    Raises:
        ValueError: nothing matches, a match is not an ``nn.Linear``, or it is outside the decoder layers.
    """
    spec = get_arch_spec(model)
    targets = config.targets or tuple(spec.linears.values())
    prefix = spec.layers + "."
    plan = []
    for name, module in match_modules(model, targets, config.ignore).items():
        if not isinstance(module, nn.Linear):
            raise ValueError(
                f"target {name!r} is a {type(module).__name__}; method {config.method!r} compresses "
                "nn.Linear "
                "modules only (select linears, e.g. 'q_proj' or 're:.*mlp\\..*_proj')"
            )
        index, _, rel = name[len(prefix) :].partition(".") if name.startswith(prefix) else ("", "", "")
        if not index.isdigit():
            raise ValueError(f"target {name!r} is outside the decoder layers ({spec.layers}); not supported")
        m, n = module.out_features, module.in_features
        rank = config.homogeneous_rank(m, n)
        if not (config.factorize_all or saves_parameters(m, n, rank)):
            rank = None
        plan.append(Target(name, int(index), rel, spec.linear_type(rel) or rel, m, n, rank))
    return plan


def by_layer(plan: list[Target]) -> dict[int, list[Target]]:
    out: dict[int, list[Target]] = {}
    for t in plan:
        out.setdefault(t.layer, []).append(t)
    return out


def decomposer_for(config: LowRankConfig):
    return get_decomposer(config.decomposer)


def truncate_layer(
    layer: nn.Module,
    targets: list[Target],
    stats: dict[str, Statistic],
    config: CalibratedConfig,
    decompose,
    timings: Timings,
) -> dict[str, Any]:
    """Whitened truncation of the targets of one layer (in place); returns the layer's record."""
    cache: dict[int, Any] = {}
    method = {"cholesky": "cholesky", "eigh": "eigh", "projection": "sqrt"}[config.truncation]
    entries = {}
    for t in targets:
        if t.rank is None:
            entries[t.rel] = {"rank": None}
            continue
        linear = layer.get_submodule(t.rel)
        stat = stats[t.rel]
        if id(stat) not in cache:  # q/k/v and gate/up share one Gram: factor it once
            with timings.measure("whitening"):
                cache[id(stat)] = whiten(stat.gram.to(linear.weight.device), method)
        wh = cache[id(stat)]
        route = truncate_projection if config.truncation == "projection" else truncate_whitened
        with timings.measure("decomposition"):
            tr = route(linear.weight, wh, t.rank, decompose=decompose, dtype=config.dtype)
            replace_module(layer, t.rel, LowRankLinear.from_linear(linear, tr.A, tr.B))
        entries[t.rel] = {
            "rank": t.rank,
            "loss": tr.loss,
            "relative_loss": tr.loss / tr.total if tr.total > 0 else 0.0,
            "fallback": wh.fallback,
            "gram_rank": wh.rank,
            "tokens": getattr(stat, "tokens", 0),
        }
    return {"entries": entries}


def build_result(
    model: nn.Module,
    config: LowRankConfig,
    plan: list[Target],
    records: list[dict[str, Any]],
    *,
    parameters_before: int,
    timings: Timings,
    calibration_tokens: int = 0,
    extra: dict[str, Any] | None = None,
) -> CompressionResult:
    """Collect ranks, parameter counts, ratios and fallbacks into a :class:`CompressionResult`."""
    entries: dict[str, dict[str, Any]] = {}
    for t in plan:
        rec = next((r for r in records if r.get("layer") == t.layer), {})
        info = dict(rec.get("entries", {}).get(t.rel, {"rank": t.rank}))
        entries[t.name] = {"kind": t.group, "shape": [t.out_features, t.in_features], **info}
    before = sum(t.out_features * t.in_features for t in plan)
    after = sum(
        t.out_features * t.in_features if e["rank"] is None else e["rank"] * (t.out_features + t.in_features)
        for t, e in zip(plan, entries.values(), strict=True)
    )
    kept = sum(
        min(t.out_features, t.in_features) if e["rank"] is None else e["rank"]
        for t, e in zip(plan, entries.values(), strict=True)
    )
    fallback_modules = [n for n, e in entries.items() if e.get("fallback")]
    return CompressionResult(
        method=config.method,
        config=config.to_dict(),
        decomposer=config.decomposer.to_dict(),
        ratio_target=config.ratio,
        ratio_params_removed=round(1.0 - after / before, 6),
        keep_singular_fraction_target=config.keep_singular_fraction,
        keep_singular_fraction=round(kept / sum(min(t.out_features, t.in_features) for t in plan), 6),
        parameters_before=parameters_before,
        parameters_after=count_parameters(model),
        linear_parameters_before=before,
        linear_parameters_after=after,
        modules=entries,
        dense_kept=[n for n, e in entries.items() if e["rank"] is None],
        fallbacks=len(fallback_modules),
        fallback_modules=fallback_modules,
        calibration_tokens=calibration_tokens,
        timings=timings.to_dict(),
        extra=extra or {},
    )
