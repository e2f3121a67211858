"""Which KV-cache projection to use where: every method's error per layer and KV head, on held-out text.

For one layer, KV head j, its g query heads Q_1 … Q_g (n × d), keys K and values V, and a kept rank R:

* keys: the relative error of the attention logits of every head of the group,
  ‖[K Q_1ᵀ … K Q_gᵀ] − K A Bᵀ [Q_1ᵀ … Q_gᵀ]‖_F / ‖[K Q_1ᵀ … K Q_gᵀ]‖_F, i.e. √(logit_error / logit_energy)
  with G_K = KᵀK and G_Q = Σ_i Q_iᵀQ_i, for ``k-svd``, ``eigen``, ``kq`` and ``kq-sum``;
* values: the relative error of the value path through o_proj, Σ_i ‖V C Dᵀ W_{O,i} − V W_{O,i}‖²_F over
  Σ_i ‖V W_{O,i}‖²_F (square-rooted), i.e. the same formula with G_K → VᵀV and G_Q → Σ_i W_{O,i} W_{O,i}ᵀ,
  for ``v-svd`` and ``wo-aware``;
* the seed's gap ε = ‖Σ_{:R}‖² − ‖Σ_{K,:R} V_{K,:R}ᵀ V_Q Σ_Q‖²
  (:func:`lowrank.linalg.kv_projection.epsilon_gap`) beside the measured difference
  logit_error(k-svd) − logit_error(kq), both divided by logit_energy
  (squared relative errors, so the two are directly comparable).

The maps are fitted on the calibration tokens' Grams and evaluated on the held-out tokens' Grams, so every
number says how a projection learned on one text does on another. ε is computed from the held-out Grams:
it is then the gap between k-svd and kq refitted on the held-out text, which equals the measured gap only
when both are fitted and evaluated on the same tokens (the seed's identity); on held-out text the identity
no longer holds exactly and the measured gap may even be negative. The same quantities on the calibration
tokens (``*_calibration``) are reported too; there ε equals the measured gap up to rounding.

Everything is computed from per-head d × d Gram matrices
(:class:`lowrank.calibration.attention_stats.AttentionGrams`)
of the unchanged model: memory does not grow with the number of tokens.

References:
    Lesens, Rakhshan, Rabusseau, "Some theoretical results on SVD methods for KV cache compression", 2025.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank.calibration.attention_stats import AttentionGrams, attention_request
from lowrank.calibration.pipeline import CalibrationConfig, collect_calibration_statistics
from lowrank.linalg import kv_projection as kvp
from lowrank.methods.base import refusal
from lowrank.methods.kv_projection import KEY_METHODS, VALUE_METHODS, KVProjectionConfig, key_maps, value_maps
from lowrank.nn.architectures import decoder_layers, get_arch_spec
from lowrank.nn.attention_layout import attention_info
from lowrank.nn.surgery import get_module

__all__ = ["KVAnalysis", "analyze_kv", "collect_attention_grams", "recommend", "plot_kv_analysis"]

logger = logging.getLogger(__name__)

#: Differences of relative errors below TIE_RTOL · error + TIE_ATOL are rounding: the simpler method wins.
TIE_RTOL, TIE_ATOL = 1e-9, 1e-12

NOTE = (
    "maps fitted on the calibration tokens, errors measured on the held-out tokens; epsilon is the seed's "
    "gap from the held-out Grams, measured_gap = err(k-svd)^2 - err(kq)^2 on held-out (both relative to "
    "||K Q^T||^2): the identity epsilon == measured_gap is exact only when fitting and evaluating on the "
    "same tokens (see the *_calibration fields)"
)


@dataclass
class KVAnalysis:
    """Result of :func:`analyze_kv`.

    Attributes:
        rank_fraction: R/d requested.
        rank: kept rank R per KV head.
        head_dim: d.
        rope: ``post`` (Grams after RoPE) or ``pre``.
        tokens: ``{"calibration": n, "heldout": n}``.
        rows: one dict per (layer, KV head): ``logit_error`` / ``value_error`` ({method: relative error,
            held-out}), the same on the calibration tokens (``*_calibration``), ``epsilon``,
            ``measured_gap`` (held-out) and ``epsilon_calibration``, ``measured_gap_calibration``.
        layers: one dict per layer: the means over its KV heads and ``key_method`` / ``value_method``,
            the recommendation (see :func:`recommend`).
    """

    rank_fraction: float
    rank: int
    head_dim: int
    rope: str
    tokens: dict[str, int]
    rows: list[dict[str, Any]] = field(default_factory=list)
    layers: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """How often each method is recommended, mean errors over all heads, how well ε tracks the gap."""
        eps = [r["epsilon"] for r in self.rows]
        gap = [r["measured_gap"] for r in self.rows]
        return {
            "key_wins": {m: sum(la["key_method"] == m for la in self.layers) for m in KEY_METHODS},
            "value_wins": {m: sum(la["value_method"] == m for la in self.layers) for m in VALUE_METHODS},
            "mean_logit_error": {m: _mean([r["logit_error"][m] for r in self.rows]) for m in KEY_METHODS},
            "mean_value_error": {m: _mean([r["value_error"][m] for r in self.rows]) for m in VALUE_METHODS},
            "mean_epsilon": _mean(eps),
            "mean_measured_gap": _mean(gap),
            "epsilon_gap_correlation": _pearson(eps, gap),
            "max_abs_epsilon_minus_gap": max(abs(e - m) for e, m in zip(eps, gap, strict=True)),
            "max_abs_epsilon_minus_gap_calibration": max(
                abs(r["epsilon_calibration"] - r["measured_gap_calibration"]) for r in self.rows
            ),
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict: settings, ``rows``, ``layers``, ``summary`` and a note on what is measured."""
        return {
            "rank_fraction": self.rank_fraction,
            "rank": self.rank,
            "head_dim": self.head_dim,
            "rope": self.rope,
            "tokens": dict(self.tokens),
            "note": NOTE,
            "summary": self.summary(),
            "layers": self.layers,
            "rows": self.rows,
        }


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson correlation of ``x`` and ``y``; None when either is constant (or fewer than two points)."""
    if len(x) < 2:
        return None
    mx, my = _mean(x), _mean(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return None if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)


def recommend(errors: dict[str, float], order: Sequence[str]) -> str:
    """The method of ``order`` with the lowest error; ties (within rounding) go to the earliest.

    Args:
        errors: method -> error (e.g. a layer's held-out relative logit error summed over its KV heads).
        order: the methods from simplest to most involved, e.g. ``("k-svd", "eigen", "kq", "kq-sum")``.

    Returns:
        the recommended method: a later method must beat the best so far by more than
        ``TIE_RTOL · best + TIE_ATOL``.
    """
    best = order[0]
    for method in order[1:]:
        if errors[method] < errors[best] - (TIE_RTOL * abs(errors[best]) + TIE_ATOL):
            best = method
    return best


def collect_attention_grams(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    batch_size: int = 8,
    device: torch.device | str | None = None,
) -> list[AttentionGrams]:
    """:class:`AttentionGrams` (float64) of every decoder layer of the unchanged ``model`` on the tokens."""
    calibration = CalibrationConfig(sequential=False, batch_size=batch_size)
    stats = collect_calibration_statistics(
        model, input_ids, lambda i, layer: {"attention": attention_request(model)}, calibration, device=device
    )
    return [layer["attention"] for layer in stats.per_layer]


def _relative(error: torch.Tensor, energy: torch.Tensor) -> list[float]:
    return [math.sqrt(max(float(e), 0.0)) for e in error / energy]


def _layer_rows(
    index: int, fit: AttentionGrams, test: AttentionGrams, o_weight: torch.Tensor, R: int, rope: str
) -> list[dict[str, Any]]:
    """Rows of one layer: maps fitted on ``fit``'s Grams, errors on ``test``'s (and on ``fit``'s)."""
    grams = {
        name: (getattr(s, f"kk_{rope}"), getattr(s, f"qq_group_{rope}"), s.vv)
        for name, s in (("heldout", test), ("calibration", fit))
    }
    d, group = fit.head_dim, fit.group_size
    blocks = o_weight.detach().to(device="cpu", dtype=torch.float64).T.reshape(fit.num_kv_heads, group, d, -1)
    G_W = (blocks @ blocks.mT).sum(1)  # Σ_i W_{O,i} W_{O,i}ᵀ, (H_kv, d, d)
    keys = {m: key_maps(fit, m, rope, R) for m in KEY_METHODS}
    values = {m: value_maps(fit, m, o_weight.detach().cpu(), group, R) for m in VALUE_METHODS}
    out: dict[str, Any] = {}
    for name, (G_K, G_Q, G_V) in grams.items():
        suffix = "" if name == "heldout" else "_calibration"
        energy = kvp.logit_energy(G_K, G_Q).clamp_min(1e-300)
        err = {m: kvp.logit_error(G_K, G_Q, p.A, p.B) for m, p in keys.items()}
        v_energy = kvp.logit_energy(G_V, G_W).clamp_min(1e-300)
        v_err = {m: kvp.logit_error(G_V, G_W, p.A, p.B) for m, p in values.items()}
        out[f"logit_error{suffix}"] = {m: _relative(e, energy) for m, e in err.items()}
        out[f"value_error{suffix}"] = {m: _relative(e, v_energy) for m, e in v_err.items()}
        out[f"epsilon{suffix}"] = (kvp.epsilon_gap(G_K, G_Q, R) / energy).tolist()
        out[f"measured_gap{suffix}"] = ((err["k-svd"] - err["kq"]) / energy).tolist()
    rows = []
    for j in range(fit.num_kv_heads):
        row: dict[str, Any] = {"layer": index, "kv_head": j}
        for key, value in out.items():
            row[key] = {m: v[j] for m, v in value.items()} if isinstance(value, dict) else value[j]
        rows.append(row)
    return rows


def _layer_summary(index: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over the layer's KV heads and the recommended key and value methods."""
    logit = {m: _mean([r["logit_error"][m] for r in rows]) for m in KEY_METHODS}
    value = {m: _mean([r["value_error"][m] for r in rows]) for m in VALUE_METHODS}
    return {
        "layer": index,
        "logit_error": logit,
        "value_error": value,
        "epsilon": _mean([r["epsilon"] for r in rows]),
        "measured_gap": _mean([r["measured_gap"] for r in rows]),
        "key_method": recommend(logit, KEY_METHODS),
        "value_method": recommend(value, VALUE_METHODS),
    }


def analyze_kv(
    model: nn.Module,
    calibration_ids: torch.Tensor,
    heldout_ids: torch.Tensor,
    *,
    rank_fraction: float,
    rope: str = "post",
    batch_size: int = 8,
    device: torch.device | str | None = None,
) -> KVAnalysis:
    """Fit every KV projection method on ``calibration_ids`` and measure it on ``heldout_ids``.

    Args:
        model: a causal LM of a supported family (unchanged: only observed).
        calibration_ids: (samples, seq) token ids the maps are fitted on.
        heldout_ids: (samples, seq) token ids the errors are measured on (may be ``calibration_ids``:
            then ε equals the measured gap up to rounding).
        rank_fraction: R/d in (0, 1]; R = round(rank_fraction · d), at least 1 (as ``kv-projection``).
        rope: ``post`` (keys and queries after RoPE, what the cache stores) or ``pre`` (before RoPE).
        batch_size: sequences per forward pass while collecting the Grams.
        device: where the forward passes run (None: the model's device).

    Returns:
        :class:`KVAnalysis` with one row per (layer, KV head) and one summary per layer.

    Raises:
        ValueError: a rank fraction outside (0, 1], an unknown ``rope``, or a model that ``compress`` with
            ``kv-projection`` refuses (quantized, attention already projected: :func:`methods.refusal`).

    References:
        Lesens, Rakhshan, Rabusseau, 2025 (attention-optimal projection, gap ε).
    """
    config = KVProjectionConfig(rank_fraction=rank_fraction, rope=rope)  # validates both
    reason = refusal(KVProjectionConfig, model)
    if reason:  # what compress --method kv-projection would refuse is not analysed either
        raise ValueError(f"kv-analyze prepares kv-projection; {reason}")
    for name, ids in (("calibration_ids", calibration_ids), ("heldout_ids", heldout_ids)):
        if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.numel() == 0:
            raise ValueError(
                f"{name} must be a non-empty (samples, seq) tensor; got {getattr(ids, 'shape', ids)}"
            )
    d = attention_info(model).shape.head_dim
    R = config.rank(d)
    logger.info("kv-analyze: Grams of the calibration tokens %s", tuple(calibration_ids.shape))
    fit = collect_attention_grams(model, calibration_ids, batch_size=batch_size, device=device)
    logger.info("kv-analyze: Grams of the held-out tokens %s", tuple(heldout_ids.shape))
    test = collect_attention_grams(model, heldout_ids, batch_size=batch_size, device=device)
    spec = get_arch_spec(model)
    analysis = KVAnalysis(
        rank_fraction=float(rank_fraction),
        rank=R,
        head_dim=d,
        rope=rope,
        tokens={"calibration": int(calibration_ids.numel()), "heldout": int(heldout_ids.numel())},
    )
    for index, layer in enumerate(decoder_layers(model, spec)):
        o_proj = get_module(layer, spec.linears["o"])
        o_weight = o_proj.weight if isinstance(o_proj, nn.Linear) else o_proj.to_linear().weight
        rows = _layer_rows(index, fit[index], test[index], o_weight, R, rope)
        analysis.rows.extend(rows)
        analysis.layers.append(_layer_summary(index, rows))
    return analysis


def plot_kv_analysis(analysis: KVAnalysis, path: str | Path) -> Path:
    """Heat-maps (layers × KV heads) of ε, the measured gap and each method's held-out error, as PNG.

    Raises:
        ModuleNotFoundError: matplotlib is not installed (``pip install matplotlib``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lowrank.io.files import atomic_path

    layers = len(analysis.layers)
    heads = len(analysis.rows) // layers

    def grid(value) -> list[list[float]]:
        return [[value(r) for r in analysis.rows[i * heads : (i + 1) * heads]] for i in range(layers)]

    panels = [
        ("ε (rel², held-out Grams)", grid(lambda r: r["epsilon"]), "gap"),
        ("measured err²(k-svd) − err²(kq)", grid(lambda r: r["measured_gap"]), "gap"),
        *((f"{m}: logit rel. error", grid(lambda r, m=m: r["logit_error"][m]), "key") for m in KEY_METHODS),
        *(
            (f"{m}: value rel. error", grid(lambda r, m=m: r["value_error"][m]), "value")
            for m in VALUE_METHODS
        ),
    ]
    scale = {
        group: (
            min(min(map(min, g)) for _, g, k in panels if k == group),
            max(max(map(max, g)) for _, g, k in panels if k == group),
        )
        for group in ("gap", "key", "value")
    }
    cols = 4
    fig, axes = plt.subplots(2, cols, figsize=(3.2 * cols, 0.22 * layers + 2.6), squeeze=False)
    for ax, (title, values, group) in zip(axes.flat, panels, strict=False):
        image = ax.imshow(values, aspect="auto", cmap="viridis", vmin=scale[group][0], vmax=scale[group][1])
        ax.set(title=title, xlabel="KV head", ylabel="layer", xticks=range(heads))
        ax.title.set_fontsize(8)
        fig.colorbar(image, ax=ax, fraction=0.05)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(f"R/d = {analysis.rank}/{analysis.head_dim}, rope={analysis.rope}, held-out")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return Path(path)
