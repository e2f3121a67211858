"""Low-rank KV-cache projections learned from calibration statistics (``method='kv-projection'``).

Per layer and KV head, the keys (and values) the cache stores shrink from d to R dimensions. The
projections come from per-head d × d Gram matrices accumulated over the calibration tokens
(:mod:`lowrank.calibration.attention_stats`), never from n × d activations:

* keys: ``k-svd`` (top-R right singular vectors of K), ``eigen`` (of the stacked [K; Q]), ``kq`` (the
  optimal rank-R approximation of K Qᵀ with every head of the KV group kept: Σ_i ‖K A Bᵀ Q_iᵀ − K Q_iᵀ‖²)
  and ``kq-sum`` (the seed's GQA theorem: ‖Σ_i (K A Bᵀ Q_iᵀ − K Q_iᵀ)‖², SVD of K (Σ_i Q_i)ᵀ);
* values: ``v-svd`` (top-R right singular vectors of V) or ``wo-aware`` (minimises
  Σ_i ‖V C Dᵀ W_{O,i} − V W_{O,i}‖² through the output projection).

``rope='post'`` projects rotated keys (Grams after RoPE); ``rope='pre'`` projects keys before RoPE (Grams
before it) and rotates the reconstructed keys. The converted attention (:class:`ProjectedAttention`) and
its cache (:class:`ProjectedKVCache`, installed on the model) store K A and V C, so the KV bytes per token
fall to R/d of the projected part.

References:
    Lesens, Rakhshan, Rabusseau, "Some theoretical results on SVD methods for KV cache compression" (2025);
    Saxena et al., "Eigen Attention" (2024); Chang et al., "Palu" (2025).
"""

from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from lowrank.attention.cache import install_cache
from lowrank.attention.low_rank_kv import KVProjection
from lowrank.attention.wrapper import ProjectedAttention, ProjectedKVCache
from lowrank.calibration.attention_stats import attention_request
from lowrank.calibration.pipeline import CalibrationConfig, RunContext
from lowrank.linalg import kv_projection as kvp
from lowrank.methods.base import CompressionResult, MethodConfig, register_method
from lowrank.methods.records import attention_record
from lowrank.nn import LowRankLinear, dense_weight
from lowrank.nn.architectures import decoder_layers, get_arch_spec
from lowrank.nn.attention_layout import attention_info
from lowrank.nn.surgery import get_module, replace_module

__all__ = ["KVProjectionConfig", "KEY_METHODS", "VALUE_METHODS", "key_maps", "value_maps"]

logger = logging.getLogger(__name__)

KEY_METHODS = ("k-svd", "eigen", "kq", "kq-sum")
VALUE_METHODS = ("v-svd", "wo-aware")
ROPE_MODES = ("post", "pre")
RANK_ALLOCATIONS = ("uniform", "budget")


def attention_weights_problem(model: nn.Module) -> str | None:
    """Why the attention projections' weights cannot be read as dense matrices (one line), or None.

    The KV codecs are fitted to the dense weights of q/k/v/o (``nn.Linear``, or the product of a
    ``LowRankLinear``'s factors); a quantized or otherwise replaced projection has none.
    """
    spec = get_arch_spec(model)
    for index, layer in enumerate(decoder_layers(model)):
        for kind in ("q", "k", "v", "o"):
            module = get_module(layer, spec.linears[kind])
            if not isinstance(module, nn.Linear | LowRankLinear):
                return (
                    f"{spec.layers}.{index}.{spec.linears[kind]} is a {type(module).__name__}, not a dense "
                    "or low-rank linear layer (its weights cannot be read as a matrix)"
                )
    return None


@dataclass(kw_only=True)
class KVProjectionConfig(MethodConfig):
    """Low-rank projections of the cached keys and values, per layer and KV head."""

    method: ClassVar[str] = "kv-projection"
    follows: ClassVar[tuple[str, ...] | None] = ("svd", "svd-llm", "svd-llm-v2", "heal")
    calibrated: ClassVar[bool] = True
    example: ClassVar[dict[str, Any]] = {"rank_fraction": 0.5}
    detail_labels: ClassVar[dict[str, str]] = {
        "kv_fraction": "kv fraction (cached K+V dimensions KEPT in the projected layers)",
        "mean_logit_error_squared_relative": "mean squared relative logit error (calibration)",
    }

    kv_method: str = field(default="kq", metadata={"choices": KEY_METHODS})
    """Key projection: ``k-svd``, ``eigen``, ``kq`` (attention-optimal, every head kept) or ``kq-sum``
    (attention-optimal for the sum over the KV group's heads, the seed's GQA form)."""
    value_method: str = field(default="wo-aware", metadata={"choices": VALUE_METHODS})
    """Value projection: ``v-svd`` or ``wo-aware`` (through the output projection)."""
    rank_fraction: float = field(default=0.5, metadata={"range": "(0, 1]"})
    """R/d: cached dimensions per KV head kept, for keys and values, in (0, 1]."""
    keys_only: bool = False
    """Project the keys only; values stay at full width."""
    rope: str = field(default="post", metadata={"choices": ROPE_MODES})
    """``post``: project rotated keys; ``pre``: project keys before RoPE, rotate after reconstructing."""
    fold: bool = True
    """Fold the down-projections into the dense projections and delete the rows they made redundant:
    C into ``v_proj`` and D into ``o_proj`` always, A into ``k_proj`` with ``rope='pre'`` (post-RoPE keys
    are rotated before A applies, so ``k_proj`` stays whole). The outputs do not change; parameters and
    prefill work drop (see :mod:`lowrank.attention.low_rank_kv`)."""
    rank_allocation: str = field(default="uniform", metadata={"choices": RANK_ALLOCATIONS})
    """``uniform``: R = rank_fraction · d in every layer; ``budget``: the same total of cached dimensions
    spread over the layers (keys and values separately) to minimise the summed relative calibration error,
    from every layer's error at every rank (an extra non-sequential analysis pass)."""
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig, metadata={"prefix": "calib-"})
    """Calibration data and accumulation settings (see
    :class:`lowrank.calibration.pipeline.CalibrationConfig`)."""

    @classmethod
    def unsupported(cls, model: nn.Module) -> str | None:
        if any(isinstance(m, ProjectedAttention) for m in model.modules()):
            return "its attention already caches compressed keys and values (kv-projection or mla applied)"
        return attention_weights_problem(model)

    def rank(self, head_dim: int) -> int:
        """R for heads of ``head_dim`` dimensions: round(rank_fraction · d), at least 1."""
        return max(1, min(head_dim, round(self.rank_fraction * head_dim)))


def key_maps(stats: Any, method: str, rope: str, R: int) -> kvp.Projection:
    """The key projections (batched over KV heads) of one layer's :class:`AttentionGrams`."""
    G_K = getattr(stats, f"kk_{rope}")
    if method == "k-svd":
        return kvp.k_svd(G_K, R)
    if method == "eigen":
        return kvp.eigen(G_K, getattr(stats, f"qq_group_{rope}"), R)
    if method == "kq":
        return kvp.kq(G_K, getattr(stats, f"qq_group_{rope}"), R)
    return kvp.kq(G_K, getattr(stats, f"qsum_{rope}"), R)


def output_blocks(o_weight: torch.Tensor, G_V: torch.Tensor, group: int) -> torch.Tensor:
    """o_proj's weight as float64 blocks (H_kv, group, d, hidden) beside ``G_V`` (H_kv, d, d):
    W_{O,i} = ``o_weight[:, i·d:(i+1)·d]ᵀ``, the block multiplying query head i's output."""
    kv_heads, d = G_V.shape[0], G_V.shape[-1]
    return o_weight.detach().to(G_V.device, torch.float64).T.reshape(kv_heads, group, d, -1)


def value_maps(stats: Any, method: str, o_weight: torch.Tensor, group: int, R: int) -> kvp.Projection:
    """The value projections (batched over KV heads) from VᵀV and, for ``wo-aware``, o_proj's weight."""
    if method == "v-svd":
        return kvp.v_svd(stats.vv, R)
    return kvp.wo_aware(stats.vv, output_blocks(o_weight, stats.vv, group), R)


def _maps(
    stats: Any, config: KVProjectionConfig, o_weight: torch.Tensor, key_rank: int, value_rank: int | None
):
    keys = key_maps(stats, config.kv_method, config.rope, key_rank)
    if value_rank is None:
        return keys, None
    return keys, value_maps(stats, config.value_method, o_weight, stats.group_size, value_rank)


def _value_grams(stats: Any, o_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(VᵀV, Σ_i W_{O,i} W_{O,i}ᵀ) per KV head: the value path's objective as a "KQᵀ" problem."""
    blocks = output_blocks(o_weight, stats.vv, stats.group_size)
    return stats.vv, (blocks @ blocks.mT).sum(1)


def _relative(
    G_K: torch.Tensor, G_Q: torch.Tensor, maps: kvp.Projection, R: int | None = None
) -> torch.Tensor:
    A, B = (maps.A, maps.B) if R is None else (maps.A[..., :R], maps.B[..., :R])
    return kvp.logit_error(G_K, G_Q, A, B) / kvp.logit_energy(G_K, G_Q).clamp_min(1e-300)


def error_curves(stats: Any, config: KVProjectionConfig, o_weight: torch.Tensor) -> dict[str, list[float]]:
    """Relative calibration errors of the layer (summed over KV heads) at every rank 1 … d.

    Every method's rank-R maps are the first R columns of its rank-d maps (nested eigen/singular
    vectors), so one decomposition gives the whole curve.
    """
    d = stats.head_dim
    keys, values = _maps(stats, config, o_weight, d, None if config.keys_only else d)
    G_K, G_Q = getattr(stats, f"kk_{config.rope}"), getattr(stats, f"qq_group_{config.rope}")
    out = {"keys": [float(_relative(G_K, G_Q, keys, R).sum()) for R in range(1, d + 1)]}
    if values is not None:
        G_V, G_W = _value_grams(stats, o_weight)
        out["values"] = [float(_relative(G_V, G_W, values, R).sum()) for R in range(1, d + 1)]
    return out


def allocate_ranks(curves: list[list[float]], total: int) -> list[int]:
    """Ranks (≥ 1, ≤ len(curve)) summing to ``total`` that greedily minimise Σ_l curve_l[R_l − 1].

    Raises:
        ValueError: ``total`` outside [len(curves), Σ len(curve)].
    """
    ranks = [1] * len(curves)
    if not len(curves) <= total <= sum(map(len, curves)):
        raise ValueError(f"a budget of {total} dimensions cannot give {len(curves)} layers 1 … d each")
    heap = [(curve[1] - curve[0], i) for i, curve in enumerate(curves) if len(curve) > 1]
    heapq.heapify(heap)
    for _ in range(total - len(curves)):
        _, i = heapq.heappop(heap)
        ranks[i] += 1
        if ranks[i] < len(curves[i]):
            heapq.heappush(heap, (curves[i][ranks[i]] - curves[i][ranks[i] - 1], i))
    return ranks


def _project_layer(
    layer: nn.Module, stats: Any, config: KVProjectionConfig, ranks, attention: str, ctx
) -> dict:
    """Replace the layer's attention by a :class:`ProjectedAttention` built from its Grams ``stats``."""
    attn = get_module(layer, attention)
    key_rank, value_rank = ranks
    ref = next(attn.parameters())
    o_weight = dense_weight(attn.o_proj)
    with ctx.timings.measure("decomposition"):
        keys, values = _maps(stats, config, o_weight, key_rank, value_rank)
        G_K, G_Q = getattr(stats, f"kk_{config.rope}"), getattr(stats, f"qq_group_{config.rope}")
        gap = kvp.epsilon_gap(G_K, G_Q, key_rank) / kvp.logit_energy(G_K, G_Q).clamp_min(1e-300)
        projection = KVProjection.from_maps(
            stats.num_heads,
            keys.A.to(ref.device),
            keys.B.to(ref.device),
            None if values is None else values.A.to(ref.device),
            None if values is None else values.B.to(ref.device),
            rope=config.rope,
            dtype=ref.dtype,
        )
        wrapper = ProjectedAttention(attn, projection)
        folded = wrapper.fold_projections() if config.fold else ()
        replace_module(layer, attention, wrapper)
    record = {
        "folded": list(folded),
        "key_rank": key_rank,
        "value_rank": value_rank,
        "logit_error_squared_relative": [float(e) for e in _relative(G_K, G_Q, keys)],
        "epsilon_gap_relative": [float(g) for g in gap],
        "tokens": stats.tokens,
    }
    if values is not None:
        record["value_error_squared_relative"] = [
            float(e) for e in _relative(*_value_grams(stats, o_weight), values)
        ]
    return record


@register_method(KVProjectionConfig)
def compress_kv_projection(
    model: nn.Module, config: KVProjectionConfig, ctx: RunContext
) -> CompressionResult:
    """Handler of ``method='kv-projection'``: a calibrated pass of per-head Grams, then the projections."""
    spec, info = get_arch_spec(model), attention_info(model)
    sliding = [i for i, w in enumerate(info.sliding_window) if w is not None]
    if config.rope == "pre" and sliding:
        raise ValueError(f"rope='pre' is not supported on sliding-window layers {sliding}; use rope='post'")
    if config.rope == "pre" and (
        info.rotary_style != "rotate_half" or info.rotary_dim != info.shape.head_dim
    ):
        raise ValueError(
            f"rope='pre' needs full-width rotate-half RoPE; this model has {info.rotary_style} RoPE on "
            f"{info.rotary_dim} of {info.shape.head_dim} dimensions; use rope='post'"
        )
    dtype = config.calibration.dtype

    def requests(index: int, layer: nn.Module):
        return {"attention": attention_request(model, dtype=dtype)}

    ranks = _layer_ranks(model, config, requests, ctx, spec.attention, info.shape.head_dim)

    def process(index: int, layer: nn.Module, stats: dict) -> dict[str, Any]:
        entry = _project_layer(layer, stats["attention"], config, ranks[index], spec.attention, ctx)
        return {"entry": entry}

    records = ctx.layer_pass(
        requests,
        process,
        calibration=config.calibration,
        key={"project": config.to_dict(), "ranks": ranks},
        min_tokens_for=info.shape.head_dim,
        checkpoint="project",
        desc="kv-projection",
    )
    install_cache(model, ProjectedKVCache, {})
    modules = {
        f"{spec.layers}.{r['layer']}.{spec.attention}": attention_record(
            r["entry"], "logit_error_squared_relative"
        )
        for r in records
    }
    errors = [e for m in modules.values() for e in m.metrics["logit_error_squared_relative"]]
    d = info.shape.head_dim
    kept = sum(k + (v or d) for k, v in ranks) / (2 * d * len(ranks))
    return CompressionResult(
        method=config.method,
        config=config.to_dict(),
        modules=modules,
        details={
            "key_ranks": [k for k, _ in ranks],
            "value_ranks": [v for _, v in ranks],
            "head_dim": d,
            "kv_fraction": round(kept, 6),
            "mean_logit_error_squared_relative": sum(errors) / len(errors),
            "cache_class": "ProjectedKVCache",
        },
    )


def _layer_ranks(model, config: KVProjectionConfig, requests, ctx: RunContext, attention: str, d: int):
    """(key rank, value rank or None) of every layer: uniform, or the budget spread by error curves."""
    count = len(decoder_layers(model))
    R = config.rank(d)
    uniform = [(R, None if config.keys_only else R)] * count
    if config.rank_allocation == "uniform":
        return uniform
    if not config.calibration.sequential:  # one set of statistics serves both passes
        ctx.precompute(requests, config.calibration)

    def curves(index: int, layer: nn.Module, stats: dict) -> dict[str, Any]:
        o_weight = dense_weight(get_module(layer, attention).o_proj)
        with ctx.timings.measure("decomposition"):
            return {"curves": error_curves(stats["attention"], config, o_weight)}

    records = ctx.layer_pass(
        requests,
        curves,
        calibration=config.calibration,
        key={"curves": config.to_dict()},
        sequential=False,
        modifies=False,
        checkpoint="curves",
        desc="kv-analysis",
    )
    keys = allocate_ranks([r["curves"]["keys"] for r in records], R * count)
    if config.keys_only:
        return [(k, None) for k in keys]
    values = allocate_ranks([r["curves"]["values"] for r in records], R * count)
    return list(zip(keys, values, strict=True))
