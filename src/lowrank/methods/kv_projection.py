"""Low-rank KV-cache projections learned from calibration statistics (``method='kv-projection'``).

Per layer and KV head, the keys (and values) the cache stores shrink from d to R dimensions. The
projections come from per-head d × d Gram matrices accumulated over the calibration tokens
(:mod:`lowrank.attention_stats`), never from n × d activations:

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

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from lowrank.architectures import attention_info, get_arch_spec
from lowrank.attention_stats import attention_request
from lowrank.kv_attention import ProjectedAttention, ProjectedKVCache
from lowrank.kv_cache import install_cache
from lowrank.linalg import kv_projection as kvp
from lowrank.methods.base import CompressionResult, MethodConfig, register_method
from lowrank.nn import KVProjection
from lowrank.pipeline import CalibrationConfig, RunContext
from lowrank.surgery import get_module, replace_module

__all__ = ["KVProjectionConfig", "KEY_METHODS", "VALUE_METHODS", "key_maps", "value_maps"]

logger = logging.getLogger(__name__)

KEY_METHODS = ("k-svd", "eigen", "kq", "kq-sum")
VALUE_METHODS = ("v-svd", "wo-aware")
ROPE_MODES = ("post", "pre")


@dataclass(kw_only=True)
class KVProjectionConfig(MethodConfig):
    """Low-rank projections of the cached keys and values, per layer and KV head."""

    method: ClassVar[str] = "kv-projection"
    calibrated: ClassVar[bool] = True
    example: ClassVar[dict[str, Any]] = {"rank_fraction": 0.5}

    kv_method: str = field(default="kq", metadata={"choices": KEY_METHODS})
    """Key projection: ``k-svd``, ``eigen``, ``kq`` (attention-optimal, every head kept) or ``kq-sum``
    (attention-optimal for the sum over the KV group's heads, the seed's GQA form)."""
    value_method: str = field(default="wo-aware", metadata={"choices": VALUE_METHODS})
    """Value projection: ``v-svd`` or ``wo-aware`` (through the output projection)."""
    rank_fraction: float = 0.5
    """R/d: cached dimensions per KV head kept, for keys and values, in (0, 1]."""
    keys_only: bool = False
    """Project the keys only; values stay at full width."""
    rope: str = field(default="post", metadata={"choices": ROPE_MODES})
    """``post``: project rotated keys; ``pre``: project keys before RoPE, rotate after reconstructing."""
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig, metadata={"prefix": "calib-"})
    """Calibration data and accumulation settings (see :class:`lowrank.pipeline.CalibrationConfig`)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, valid in (
            ("kv_method", KEY_METHODS),
            ("value_method", VALUE_METHODS),
            ("rope", ROPE_MODES),
        ):
            if getattr(self, name) not in valid:
                raise ValueError(f"{name} must be one of {valid}; got {getattr(self, name)!r}")
        if isinstance(self.rank_fraction, bool) or not 0.0 < float(self.rank_fraction) <= 1.0:
            raise ValueError(
                f"rank_fraction (R/d, cached dimensions kept) must be in (0, 1]; got {self.rank_fraction}"
            )
        if not isinstance(self.calibration, CalibrationConfig):
            raise ValueError(f"calibration must be a CalibrationConfig or its dict; got {self.calibration!r}")

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


def value_maps(stats: Any, method: str, o_weight: torch.Tensor, group: int, R: int) -> kvp.Projection:
    """The value projections (batched over KV heads) from VᵀV and, for ``wo-aware``, o_proj's weight."""
    if method == "v-svd":
        return kvp.v_svd(stats.vv, R)
    kv_heads, d = stats.vv.shape[0], stats.vv.shape[-1]
    blocks = o_weight.detach().to(torch.float64).T.reshape(kv_heads, group, d, -1)
    return kvp.wo_aware(stats.vv, blocks.to(stats.vv.device), R)


def _dense_weight(module: nn.Module) -> torch.Tensor:
    return module.weight if isinstance(module, nn.Linear) else module.to_linear().weight


def _project_layer(layer: nn.Module, stats: Any, config: KVProjectionConfig, attention: str, ctx) -> dict:
    """Replace the layer's attention by a :class:`ProjectedAttention` built from its Grams ``stats``."""
    attn = get_module(layer, attention)
    d, group = stats.head_dim, stats.group_size
    R = config.rank(d)
    ref = next(attn.parameters())
    with ctx.timings.measure("decomposition"):
        keys = key_maps(stats, config.kv_method, config.rope, R)
        values = (
            None
            if config.keys_only
            else value_maps(stats, config.value_method, _dense_weight(attn.o_proj), group, R)
        )
        G_Q = getattr(stats, f"qq_group_{config.rope}")
        G_K = getattr(stats, f"kk_{config.rope}")
        error = kvp.logit_error(G_K, G_Q, keys.A, keys.B) / kvp.logit_energy(G_K, G_Q).clamp_min(1e-300)
        gap = kvp.epsilon_gap(G_K, G_Q, R)
        projection = KVProjection.from_maps(
            stats.num_heads,
            keys.A.to(ref.device),
            keys.B.to(ref.device),
            None if values is None else values.A.to(ref.device),
            None if values is None else values.B.to(ref.device),
            dtype=ref.dtype,
        )
        replace_module(layer, attention, ProjectedAttention(attn, projection, config.rope))
    return {
        "key_rank": R,
        "value_rank": None if values is None else R,
        "logit_relative_error": [float(e) for e in error],
        "epsilon_gap": [float(g) for g in gap],
        "tokens": stats.tokens,
    }


@register_method(KVProjectionConfig)
def compress_kv_projection(
    model: nn.Module, config: KVProjectionConfig, ctx: RunContext
) -> CompressionResult:
    """Handler of ``method='kv-projection'``: a calibrated pass of per-head Grams, then the projections."""
    spec, info = get_arch_spec(model), attention_info(model)
    if config.rope == "pre" and (
        info.rotary_style != "rotate_half" or info.rotary_dim != info.shape.head_dim
    ):
        raise ValueError(
            f"rope='pre' needs full-width rotate-half RoPE; this model has {info.rotary_style} RoPE on "
            f"{info.rotary_dim} of {info.shape.head_dim} dimensions; use rope='post'"
        )
    sliding = [i for i, w in enumerate(info.sliding_window) if w is not None]
    if config.rope == "pre" and sliding:
        raise ValueError(f"rope='pre' is not supported on sliding-window layers {sliding}; use rope='post'")
    if any(isinstance(m, ProjectedAttention) for m in model.modules()):
        raise ValueError(
            "the model's attention already caches projected keys and values (kv-projection applied)"
        )
    dtype = config.calibration.dtype

    def requests(index: int, layer: nn.Module):
        return {"attention": attention_request(model, dtype=dtype)}

    def process(index: int, layer: nn.Module, stats: dict) -> dict[str, Any]:
        return {"entry": _project_layer(layer, stats["attention"], config, spec.attention, ctx)}

    records = ctx.layer_pass(
        requests,
        process,
        calibration=config.calibration,
        key=config.to_dict(),
        min_tokens_for=info.shape.head_dim,
        desc="kv-projection",
    )
    install_cache(model, ProjectedKVCache, {})
    modules = {
        f"{spec.layers}.{r['layer']}.{spec.attention}": {"kind": "attention", **r["entry"]} for r in records
    }
    errors = [e for m in modules.values() for e in m["logit_relative_error"]]
    return CompressionResult(
        method=config.method,
        config=config.to_dict(),
        modules=modules,
        details={
            "key_rank": config.rank(info.shape.head_dim),
            "value_rank": None if config.keys_only else config.rank(info.shape.head_dim),
            "head_dim": info.shape.head_dim,
            "rank_fraction (R/d, cached dimensions KEPT)": config.rank(info.shape.head_dim)
            / info.shape.head_dim,
            "mean_logit_relative_error (calibration)": sum(errors) / len(errors),
            "cache_class": "ProjectedKVCache",
        },
    )
