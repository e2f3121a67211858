"""What the low-rank weight methods share: config fields, target planning, per-layer truncation, results."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from lowrank.calibration.pipeline import CalibrationConfig
from lowrank.calibration.statistics import InputGram, Statistic, StatRequest, Timings
from lowrank.core.dtypes import resolve_dtype
from lowrank.linalg import DecomposerConfig, get_decomposer
from lowrank.linalg.allocation import (
    dense_parameters,
    factored_parameters,
    rank_for_keep_fraction,
    rank_for_ratio,
    saves_parameters,
)
from lowrank.linalg.whitening import truncate_projection, truncate_whitened, whiten
from lowrank.methods.base import CompressionResult, MethodConfig
from lowrank.methods.records import ModuleKind, ModuleRecord
from lowrank.nn import LowRankLinear, describe_replacement
from lowrank.nn.architectures import get_arch_spec
from lowrank.nn.surgery import match_modules, replace_module

__all__ = [
    "LowRankConfig",
    "WhitenedConfig",
    "Target",
    "plan_targets",
    "lowrank_result",
    "input_gram_requests",
    "TRUNCATION_ROUTES",
]

TRUNCATION_ROUTES = ("cholesky", "eigh", "projection")
COMPUTE_DTYPES = ("float64", "float32")


@dataclass(kw_only=True)
class LowRankConfig(MethodConfig):
    """Fields of every method that replaces linear layers by low-rank factors."""

    exclusive: ClassVar[tuple[tuple[str, ...], ...]] = (("ratio", "keep_singular_fraction"),)
    follows: ClassVar[tuple[str, ...] | None] = (
        "svd",
        "svd-llm",
        "svd-llm-v2",
        "mla",
        "kv-projection",
        "heal",
    )
    """Dense linears left by any weight or attention method; never quantized ones."""
    example: ClassVar[dict[str, Any]] = {"ratio": 0.3}

    ratio: float | None = field(default=None, metadata={"range": "[0, 1)"})
    """Fraction of each targeted matrix's parameters REMOVED (SVD-LLM convention), in [0, 1)."""
    keep_singular_fraction: float | None = field(default=None, metadata={"range": "(0, 1]"})
    """Fraction of singular values KEPT (the rSVD paper's r), in (0, 1]. Give exactly one of the two."""
    decomposer: DecomposerConfig | str = field(
        default="svd",
        metadata={"prefix": "", "flags": {"name": "decomposer", "seed": "decomposer-seed"}},
    )
    """Truncated decomposition: a ``DecomposerConfig``, its dict, or a name (``svd``, ``rsvd``, ``auto``)."""
    targets: tuple[str, ...] | None = None
    """Modules to compress (name suffix, ``re:<regex>`` or class name); default: the seven linear kinds
    not already replaced by an earlier method."""
    ignore: tuple[str, ...] = ()
    """Modules to leave alone (same grammar as ``targets``)."""
    compute_dtype: str = field(default="float64", metadata={"choices": COMPUTE_DTYPES})
    """dtype of the decompositions: ``float64`` (exact reference) or ``float32`` (faster on GPUs)."""
    factorize_all: bool = False
    """Factorize even where the factors are not smaller than the dense matrix (analysis and tests)."""

    def __post_init__(self) -> None:
        self.targets = None if self.targets is None else _patterns(self.targets)
        self.ignore = _patterns(self.ignore)
        super().__post_init__()
        if self.ratio is None and self.keep_singular_fraction is None:
            raise ValueError(
                f"{self.method}: give exactly one of ratio (fraction of parameters removed) or "
                "keep_singular_fraction; got neither"
            )
        if isinstance(self.decomposer, str):
            self.decomposer = DecomposerConfig(name=self.decomposer)

    @property
    def dtype(self) -> torch.dtype:
        return resolve_dtype(self.compute_dtype, COMPUTE_DTYPES)

    def homogeneous_rank(self, m: int, n: int) -> int:
        if self.ratio is not None:
            return rank_for_ratio(m, n, self.ratio)
        return rank_for_keep_fraction(m, n, self.keep_singular_fraction)


def _patterns(value: Any) -> Any:
    """One pattern given as a string, or a JSON list, as a tuple; anything else is left to the field check."""
    if isinstance(value, str):
        return (value,)
    return tuple(value) if isinstance(value, list) else value


@dataclass(kw_only=True)
class WhitenedConfig(LowRankConfig):
    """Fields of the activation-aware (whitened) low-rank methods: calibration and truncation route."""

    calibrated: ClassVar[bool] = True

    calibration: CalibrationConfig = field(default_factory=CalibrationConfig, metadata={"prefix": "calib-"})
    """Calibration data and accumulation settings (see
    :class:`lowrank.calibration.pipeline.CalibrationConfig`)."""
    truncation: str = field(default="cholesky", metadata={"choices": TRUNCATION_ROUTES})
    """Route to the minimiser of ‖(W − W')X‖_F: ``cholesky``, ``eigh`` (two-round SVD) or ``projection``."""


@dataclass
class Target:
    """One targeted linear layer: where it is, its kind, its shape and its planned rank (None: kept dense)."""

    name: str
    layer: int
    rel: str
    kind: str
    out_features: int
    in_features: int
    rank: int | None


def plan_targets(model: nn.Module, config: LowRankConfig) -> list[Target]:
    """Match the config's targets, check them, and give each its homogeneous rank.

    With the default targets, linears already replaced by an earlier method are skipped (methods stack);
    an explicit target that is not a plain ``nn.Linear`` is refused.

    Raises:
        ValueError: nothing matches, a match is not an ``nn.Linear``, or it is outside the decoder layers.
    """
    spec = get_arch_spec(model)
    explicit = config.targets is not None
    prefix = spec.layers + "."
    plan = []
    for name, module in match_modules(
        model, config.targets or tuple(spec.linears.values()), config.ignore
    ).items():
        if not isinstance(module, nn.Linear):
            if not explicit and describe_replacement(module) is not None:
                continue  # replaced by an earlier method of the stack
            raise ValueError(
                f"target {name!r} is a {type(module).__name__}; method {config.method!r} compresses plain "
                "nn.Linear modules only (select linears, e.g. 'q_proj' or 're:.*mlp\\..*_proj')"
            )
        index, _, rel = name[len(prefix) :].partition(".") if name.startswith(prefix) else ("", "", "")
        if not index.isdigit():
            raise ValueError(f"target {name!r} is outside the decoder layers ({spec.layers}); not supported")
        m, n = module.out_features, module.in_features
        rank = config.homogeneous_rank(m, n)
        if not (config.factorize_all or saves_parameters(m, n, rank)):
            rank = None
        plan.append(Target(name, int(index), rel, spec.kind_of(rel) or rel, m, n, rank))
    if not plan:
        raise ValueError(
            f"method {config.method!r}: every matched linear layer was already replaced by an earlier "
            "method; "
            "choose other targets"
        )
    return plan


def by_layer(plan: list[Target]) -> dict[int, list[Target]]:
    out: dict[int, list[Target]] = {}
    for t in plan:
        out.setdefault(t.layer, []).append(t)
    return out


def decomposer_for(config: LowRankConfig):
    return get_decomposer(config.decomposer)


def input_gram_requests(targets: list[Target], dtype: torch.dtype) -> dict[str, StatRequest]:
    """One input-Gram request per target (modules fed the same tensor share one Gram)."""
    return {t.rel: StatRequest(t.rel, lambda: InputGram(dtype)) for t in targets}


def truncate_layer(
    layer: nn.Module,
    targets: list[Target],
    stats: dict[str, Statistic],
    config: WhitenedConfig,
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
            built = LowRankLinear.from_linear(linear, tr.A, tr.B)
            replace_module(layer, t.rel, built)
        entries[t.rel] = {
            "rank": built.rank,
            "planned_rank": t.rank,
            "loss": tr.loss,
            "relative_loss": tr.loss / tr.total if tr.total > 0 else 0.0,
            "fallback": wh.fallback,
            "gram_rank": wh.rank,
            "tokens": getattr(stat, "tokens", 0),
        }
    return {"entries": entries}


def built_rank(module: nn.Module) -> int | None:
    """The inner dimension of a factored linear as built (its factors' shapes), None for a dense one."""
    if isinstance(module, LowRankLinear):
        return int(module.down.weight.shape[0])
    return None


def lowrank_result(
    model: nn.Module,
    config: LowRankConfig,
    plan: list[Target],
    records: list[dict[str, Any]],
    **details: Any,
) -> CompressionResult:
    """Ranks as built, both ratio conventions and fallbacks of a low-rank pass as a ``CompressionResult``.

    Ranks are read from the modules in ``model`` (their factors' shapes), never from the records: a
    record restored from a checkpoint's ``progress.json`` may say anything.
    """
    by_index = {r.get("layer"): r for r in records}
    modules: dict[str, ModuleRecord] = {}
    for t in plan:
        info = dict(by_index.get(t.layer, {}).get("entries", {}).get(t.rel, {}))
        rank = built_rank(model.get_submodule(t.name))
        info.pop("rank", None)
        modules[t.name] = ModuleRecord(
            kind=ModuleKind.DENSE if rank is None else ModuleKind.LOW_RANK,
            role=t.kind,
            shape=(t.out_features, t.in_features),
            rank=rank,
            planned_rank=info.pop("planned_rank", None),
            loss=info.pop("loss", None),
            fallback=bool(info.pop("fallback", False)),
            metrics=info,
        )
    shapes = [(t.out_features, t.in_features, modules[t.name].rank) for t in plan]
    before = sum(dense_parameters(m, n) for m, n, _ in shapes)
    after = sum(dense_parameters(m, n) if k is None else factored_parameters(m, n, k) for m, n, k in shapes)
    kept = sum(min(m, n) if k is None else k for m, n, k in shapes)
    fallback_modules = [n for n, e in modules.items() if e.fallback]
    return CompressionResult(
        method=config.method,
        config=config.to_dict(),
        modules=modules,
        details={
            "decomposer": config.decomposer.to_dict(),
            "ratio_target": config.ratio,
            "ratio_params_removed": round(1.0 - after / before, 6),
            "keep_singular_fraction_target": config.keep_singular_fraction,
            "keep_singular_fraction": round(kept / sum(min(m, n) for m, n, _ in shapes), 6),
            "linear_parameters_before": before,
            "linear_parameters_after": after,
            "dense_kept": [n for n, e in modules.items() if e.rank is None],
            **details,
        },
        fallbacks=len(fallback_modules),
        fallback_modules=fallback_modules,
    )
