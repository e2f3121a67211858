"""MHA/GQA → multi-head latent attention without training (``method='mla'``).

Two recipes, chosen by ``partial_rope``:

* ``rorope`` (default): TransMLA-grade conversion to DeepSeek-V3's layout, one latent and one rotary key
  shared by all KV heads (see :mod:`lowrank.methods.mla_rorope`); exportable as a stock
  ``DeepseekV3ForCausalLM`` (``lowrank export --format deepseek-v3``).
* ``mha2mla``: MHA2MLA's recipe, a latent per KV head, described below.

``mha2mla``, per layer and KV head:

1. **Partial RoPE**: keep ``rope_dim`` rotary features (``rope_dim/2`` whole frequency pairs) and make the
   other key and query features position-free. Pairs are chosen by ``rope_selection``: ``high`` (the
   highest frequencies), ``low``, ``uniform`` (evenly spaced), or ``2-norm`` (the largest product of the
   pair's query and key norms on calibration text, the group's queries combined; MHA2MLA's best).
2. **Low-rank K/V**: the position-free rows of W_k and all rows of W_v are factored into a latent basis U:
   ``joint`` (one latent for keys and values: the top-r left singular vectors of [W_k,nope; W_v]) or
   ``split`` (separate bases of W_k,nope and W_v). With ``whiten`` the factorization minimises the error of
   the keys and values the layer actually produces on the calibration tokens, ‖(I − U Uᵀ) W X‖_F, through
   the input Gram XᵀX (SVD-LLM's whitening, applied on the output side), instead of the bare weights.

The converted attention (:class:`~lowrank.attention.wrapper.ProjectedAttention` with a
:class:`~lowrank.nn.LatentKV` codec) caches the rotated kept features and the latent only, never
reconstructed keys or values: the key up-projection is absorbed into the queries and the value
up-projection applied to each head's output before o_proj. Cached numbers per token and layer:
H_kv · (rope_dim + r) instead of H_kv · 2d.

References:
    Ji et al., "Towards Economical Inference: Enabling DeepSeek's Multi-Head Latent Attention in Any
    Transformer-based LLMs" (MHA2MLA), 2025; DeepSeek-V2 (MLA), 2024.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from lowrank.attention.cache import install_cache
from lowrank.attention.deepseek_mla import DeepseekLatentAttention
from lowrank.attention.latent_kv import LatentKV
from lowrank.attention.wrapper import ProjectedAttention, ProjectedKVCache
from lowrank.calibration.attention_stats import attention_request
from lowrank.calibration.pipeline import CalibrationConfig, RunContext
from lowrank.calibration.statistics import InputGram, StatRequest
from lowrank.core.config import Migration, unversioned
from lowrank.linalg import DecomposerConfig, get_decomposer
from lowrank.linalg.rorope import ROTATIONS
from lowrank.linalg.whitening import whiten
from lowrank.methods.base import CompressionResult, MethodConfig, register_method
from lowrank.methods.mla_rorope import compress_rorope, latent_from_fraction
from lowrank.methods.records import attention_record
from lowrank.nn import dense_weight
from lowrank.nn.architectures import get_arch_spec
from lowrank.nn.attention_layout import attention_info
from lowrank.nn.surgery import get_module, replace_module

__all__ = ["MLAConfig", "select_pairs", "latent_basis", "ROPE_SELECTIONS", "PARTIAL_ROPE"]

logger = logging.getLogger(__name__)

ROPE_SELECTIONS = ("high", "low", "uniform", "2-norm")
LATENTS = ("joint", "split")
LATENT_OBJECTIVES = ("kv", "attention")
PARTIAL_ROPE = ("rorope", "mha2mla")


def _rorope_settings_were_transmlas(data: dict[str, Any]) -> dict[str, Any]:
    """Version 1 → 2: the ``rorope`` defaults became the settings chosen on calibration text (see
    ``MLAConfig``); a version-1 config that left a setting out meant TransMLA's: freqfold 1 and the
    key/value latent objective (its ladder, DeepSeek's spread one, is still the default)."""
    return {
        **data,
        "freqfold": data.get("freqfold", 1),
        "latent_objective": data.get("latent_objective", "kv"),
    }


@dataclass(kw_only=True)
class MLAConfig(MethodConfig):
    """Partial RoPE plus a low-rank latent K/V cache: shared across KV heads (``rorope``) or per head."""

    method: ClassVar[str] = "mla"
    version: ClassVar[int] = 2
    migrations: ClassVar[dict[int, Migration]] = {0: unversioned, 1: _rorope_settings_were_transmlas}
    follows: ClassVar[tuple[str, ...] | None] = ("svd", "svd-llm", "svd-llm-v2", "heal")
    calibrated: ClassVar[bool] = True
    exclusive: ClassVar[tuple[tuple[str, ...], ...]] = (("kv_lora_rank", "kv_fraction"),)
    example: ClassVar[dict[str, Any]] = {"rope_dim": 4, "kv_fraction": 0.5}
    detail_labels: ClassVar[dict[str, str]] = {
        "rope_dim": "rope_dim (rotary features kept per KV head; rorope: the shared rotary key)",
        "kv_rank": "kv_rank (latent numbers per KV head)",
        "kv_lora_rank": "kv_lora_rank (shared latent)",
        "qk_nope_dim": "qk_nope_dim (position-free query/key features per head)",
        "cached_per_token_layer": "cached numbers per token and layer",
        "kv_fraction": "kv fraction (KV-cache numbers KEPT)",
    }

    partial_rope: str = field(default="rorope", metadata={"choices": PARTIAL_ROPE})
    """``rorope``: one rotary key and one latent shared by every KV head, in DeepSeek-V3's layout (RoRoPE +
    FreqFold + whitened latent); ``mha2mla``: MHA2MLA's per-KV-head partial RoPE and latent."""
    rope_dim: int | None = field(default=None, metadata={"range": "[0, inf)"})
    """``rorope``: width of the shared rotary key (even, at most head_dim; default 32). ``mha2mla``:
    rotary features kept per KV head (even: whole frequency pairs), in [0, head_dim] (default 8)."""
    kv_lora_rank: int | None = field(default=None, metadata={"range": "[1, inf)"})
    """``rorope``: numbers of the shared latent per token and layer (default 88; or give ``kv_fraction``)."""
    rope_stride: int | None = field(default=None, metadata={"range": "[1, inf)"})
    """``rorope``: the shared rotary key turns at every ``rope_stride``-th RoPE frequency from the fastest
    (default ⌊head_dim / rope_dim⌋: DeepSeek's and TransMLA's ladder over the whole band; 1: the rope_dim/2
    fastest frequencies, the slowest ones position-free). Exported with base ``base^(stride·rope_dim/d)``."""
    freqfold: int | None = field(default=None, metadata={"range": "[1, inf)"})
    """``rorope``: adjacent RoPE frequencies whose components are mixed by one PCA (exact at 1). Default: 4
    where the ladder skips frequencies (stride > 1) and 4 divides head_dim/2, else 1; chosen on held-out
    calibration text on the built-in model (benchmarks/results/mla_deepseek_cpu.md)."""
    rotation: str = field(default="key", metadata={"choices": ROTATIONS})
    """``rorope``: ``key`` (TransMLA's key PCA) or ``query-aware`` (balanced against the queries)."""
    balance: bool = True
    """``rorope``: scale the position-free keys to the values' norm before the joint latent (BKV-PCA)."""
    latent_objective: str = field(default="attention", metadata={"choices": LATENT_OBJECTIVES})
    """``rorope``: what the shared latent preserves. ``kv``: the position-free keys and the values as produced
    (balanced by ``balance``; TransMLA's BKV-PCA); ``attention`` (default, chosen on held-out calibration
    text): what is made of them: the scores every query head computes from the keys and the outputs o_proj
    makes of the values, the keys weighted by each head's output spread (``balance`` then has no effect)."""
    qk_nope_dim: int | None = field(default=None, metadata={"range": "[0, inf)"})
    """``rorope``: position-free query/key features per head (default head_dim − rope_dim, so q_proj keeps
    its size; head_dim is exact)."""
    rope_selection: str = field(default="2-norm", metadata={"choices": ROPE_SELECTIONS})
    """Which frequency pairs stay rotary: ``high``, ``low``, ``uniform`` or ``2-norm`` (calibration norms)."""
    kv_rank: int | None = field(default=None, metadata={"range": "[1, inf)"})
    """``mha2mla``: latent numbers cached per token and KV head (MHA2MLA's d_kv; ``split`` divides it
    between K and V).
    Give this or ``kv_fraction``; default 32 when neither is given."""
    kv_fraction: float | None = field(default=None, metadata={"range": "(0, 1]"})
    """Fraction of the KV cache kept, in (0, 1]: (rope_dim + kv_lora_rank) / (2 · H_kv · head_dim)
    (``rorope``) or (rope_dim + kv_rank) / (2 · head_dim) (``mha2mla``)."""
    latent: str = field(default="joint", metadata={"choices": LATENTS})
    """``joint``: one latent shared by keys and values; ``split``: separate key and value latents."""
    whiten: bool = True
    """Factor to minimise the error of the keys and values produced on calibration text (input-Gram
    whitening); ``--no-whiten`` factors the bare weights as MHA2MLA does. Whitening was the better one in
    every measured setting on the built-in model (wiki perplexity 220 against 21,529 at the seed's
    setting; benchmarks/results/mla_cpu.md)."""
    decomposer: DecomposerConfig | str = field(
        default="svd",
        metadata={"prefix": "", "flags": {"name": "decomposer", "seed": "decomposer-seed"}},
    )
    """Truncated decomposition of the K/V weights: a ``DecomposerConfig``, its dict, or a name."""
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig, metadata={"prefix": "calib-"})
    """Calibration data, used by ``2-norm`` and ``whiten`` (see
    ``lowrank.calibration.pipeline.CalibrationConfig``)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.decomposer, str):
            self.decomposer = DecomposerConfig(name=self.decomposer)
        if self.rope_dim is None:
            self.rope_dim = 32 if self.partial_rope == "rorope" else 8
        if self.partial_rope == "rorope":
            for name, bad in (("kv_rank", self.kv_rank is not None),):
                if bad:
                    raise ValueError(
                        f"{name}={getattr(self, name)!r} belongs to partial_rope='mha2mla'; with 'rorope' "
                        "give kv_lora_rank (the shared latent) or kv_fraction"
                    )
        elif self.kv_lora_rank is not None:
            raise ValueError(
                f"kv_lora_rank={self.kv_lora_rank!r} belongs to partial_rope='rorope'; "
                "with 'mha2mla' give kv_rank"
            )
        if self.kv_lora_rank is not None and self.kv_fraction is not None:
            raise ValueError(
                f"give kv_lora_rank or kv_fraction, not both; got {self.kv_lora_rank} and {self.kv_fraction}"
            )
        if self.rope_dim % 2:
            raise ValueError(
                f"mla field 'rope_dim' must be even (whole frequency pairs); got {self.rope_dim}"
            )
        if self.kv_rank is not None and self.kv_fraction is not None:
            raise ValueError(
                f"give kv_rank or kv_fraction, not both; got {self.kv_rank} and {self.kv_fraction}"
            )
        if self.kv_rank is not None and (isinstance(self.kv_rank, bool) or int(self.kv_rank) < 1):
            raise ValueError(f"kv_rank must be a positive integer; got {self.kv_rank!r}")
        if self.kv_fraction is not None and not 0.0 < float(self.kv_fraction) <= 1.0:
            raise ValueError(
                f"kv_fraction (fraction of the KV cache kept) must be in (0, 1]; got {self.kv_fraction}"
            )

    @classmethod
    def unsupported(cls, model: nn.Module) -> str | None:
        info = attention_info(model)
        if info.q_norm or info.k_norm:
            return (
                f"its queries/keys are normalised ({info.k_norm or info.q_norm}) before RoPE, so keys are "
                "not linear in the input; use kv-projection"
            )
        if info.rotary_style != "rotate_half" or info.rotary_dim != info.shape.head_dim:
            return (
                f"mla needs full-width rotate-half RoPE; this model has {info.rotary_style} RoPE on "
                f"{info.rotary_dim} of {info.shape.head_dim} dimensions"
            )
        if any(isinstance(m, (ProjectedAttention, DeepseekLatentAttention)) for m in model.modules()):
            return "its attention already caches compressed keys and values"
        from lowrank.methods.kv_projection import attention_weights_problem

        return attention_weights_problem(model)

    def ranks(self, head_dim: int) -> tuple[int, int, int]:
        """(rope pairs, key latent rank, value latent rank) per KV head; joint: the two ranks are equal.

        Raises:
            ValueError: a rope_dim or latent size that does not fit ``head_dim`` (names the valid range).
        """
        d, p = head_dim, self.rope_dim // 2
        if self.rope_dim > d:
            raise ValueError(f"rope_dim must be in [0, head_dim] = [0, {d}]; got {self.rope_dim}")
        nope = d - self.rope_dim
        if self.kv_fraction is not None:
            r = latent_from_fraction(self.kv_fraction, 2 * d, self.rope_dim, "KV head")
        else:
            r = 32 if self.kv_rank is None else int(self.kv_rank)
        if self.latent == "joint":
            if r > nope + d:
                raise ValueError(
                    f"kv_rank must be in [1, {nope + d}] (position-free key + value dims); got {r}"
                )
            return p, r, r
        if nope == 0 or r < 2:
            raise ValueError(
                f"split latents need rope_dim < head_dim and kv_rank >= 2; got {self.rope_dim}, {r}"
            )
        r_k = min(nope, r // 2)
        r_v = r - r_k
        if r_v > d:
            raise ValueError(f"kv_rank must be in [2, {nope + d}] for split latents; got {r}")
        return p, r_k, r_v


def select_pairs(strategy: str, pairs: int, half: int, kk: torch.Tensor | None, qq: torch.Tensor | None):
    """Frequency pairs kept rotary per KV head: (H_kv, pairs) indices in [0, half).

    Args:
        strategy: one of ``ROPE_SELECTIONS``.
        pairs: p, pairs kept.
        half: d/2, pairs per head.
        kk, qq: (H_kv, d, d) pre-RoPE Grams of keys and of the group's queries (``2-norm`` only).
    """
    if strategy == "2-norm":
        d = 2 * half
        k2, q2 = kk.diagonal(dim1=-2, dim2=-1), qq.diagonal(dim1=-2, dim2=-1)  # (H_kv, d)
        score = ((k2[:, :half] + k2[:, half:d]) * (q2[:, :half] + q2[:, half:d])).sqrt()
        return score.topk(pairs, dim=-1).indices.sort(dim=-1).values.cpu()
    if strategy == "high":
        index = torch.arange(pairs)
    elif strategy == "low":
        index = torch.arange(half - pairs, half)
    else:
        index = torch.linspace(0, half - 1, pairs).round().long() if pairs else torch.arange(0)
    heads = 1 if kk is None else kk.shape[0]
    return index.expand(heads, -1)


def latent_basis(W: torch.Tensor, rank: int, decompose, whitening=None) -> tuple[torch.Tensor, float]:
    """Top-``rank`` left singular vectors U of W (m × n) or of W S (whitened), and the relative loss.

    The loss is ‖(I − U Uᵀ) W S‖²_F / ‖W S‖²_F (S = I without whitening): the error of the projected
    keys/values on the calibration tokens, relative to their energy.
    """
    M = W if whitening is None else whitening.apply(W)
    U, S, _ = decompose(M, rank)
    total = float(M.square().sum())
    return U, max(total - float(S.square().sum()), 0.0) / total if total > 0 else 0.0


def _convert_layer(layer: nn.Module, stats: dict, config: MLAConfig, shape, paths, decompose, ctx) -> dict:
    """Replace the layer's attention by a latent-cache one; returns the layer's record."""
    attention, k_path = paths
    attn = get_module(layer, attention)
    H, Hkv, d = shape.num_heads, shape.num_kv_heads, shape.head_dim
    p, r_k, r_v = config.ranks(d)
    grams = stats.get("attention")
    pairs = select_pairs(
        config.rope_selection,
        p,
        d // 2,
        None if grams is None else grams.kk_pre,
        None if grams is None else grams.qq_group_pre,
    ).expand(Hkv, -1)
    ref = next(attn.parameters())
    codec = LatentKV(
        H,
        Hkv,
        d,
        p,
        r_k,
        r_v if config.latent == "split" else None,
        mode=config.latent,
        device=ref.device,
        dtype=ref.dtype,
    )
    codec.set_pairs(pairs)
    W_k = dense_weight(get_module(layer, k_path)).detach().to(torch.float64).view(Hkv, d, -1)
    W_v = dense_weight(attn.v_proj).detach().to(torch.float64).view(Hkv, d, -1)
    whitening = None
    if config.whiten:
        with ctx.timings.measure("whitening"):
            whitening = whiten(stats["input"].gram.to(W_k.device), "eigh")
    losses = []
    with ctx.timings.measure("decomposition"), torch.no_grad():
        for j in range(Hkv):
            nope = W_k[j, codec.nope_index[j].to(W_k.device)]
            if config.latent == "joint":
                U, loss = latent_basis(torch.cat([nope, W_v[j]]), r_k, decompose, whitening)
                codec.latent[j].copy_(U)
            else:
                U_k, loss_k = latent_basis(nope, r_k, decompose, whitening)
                U_v, loss_v = latent_basis(W_v[j], r_v, decompose, whitening)
                codec.key_latent[j].copy_(U_k)
                codec.value_latent[j].copy_(U_v)
                loss = (loss_k + loss_v) / 2
            losses.append(loss)
    replace_module(layer, attention, ProjectedAttention(attn, codec))
    return {
        "rope_pairs": pairs.tolist(),
        "key_rank": r_k,
        "value_rank": r_v,
        "relative_loss": losses,
        "whitening_fallback": bool(whitening is not None and whitening.fallback),
    }


@register_method(MLAConfig)
def compress_mla(model: nn.Module, config: MLAConfig, ctx: RunContext) -> CompressionResult:
    """Handler of ``method='mla'``: per-layer partial RoPE + latent K/V, one calibrated pass if needed."""
    if config.partial_rope == "rorope":
        return compress_rorope(model, config, ctx)
    spec, shape = get_arch_spec(model), attention_info(model).shape
    p, r_k, r_v = config.ranks(shape.head_dim)  # validate sizes before any work
    dtype = config.calibration.dtype
    decompose = get_decomposer(config.decomposer)
    paths = (spec.attention, spec.linears["k"])

    def requests(index: int, layer: nn.Module) -> dict[str, StatRequest]:
        wanted = {}
        if config.rope_selection == "2-norm":
            wanted["attention"] = attention_request(model, dtype=dtype)
        if config.whiten:
            wanted["input"] = StatRequest(spec.linears["k"], lambda: InputGram(dtype))
        return wanted

    def process(index: int, layer: nn.Module, stats: dict) -> dict[str, Any]:
        return {"entry": _convert_layer(layer, stats, config, shape, paths, decompose, ctx)}

    calibrated = config.rope_selection == "2-norm" or config.whiten
    records = ctx.layer_pass(
        requests if calibrated else None,
        process,
        calibration=config.calibration,
        key=config.to_dict(),
        min_tokens_for=shape.hidden_size if config.whiten else 0,
        desc="mla",
    )
    install_cache(model, ProjectedKVCache, {})
    modules = {
        f"{spec.layers}.{r['layer']}.{spec.attention}": attention_record(
            r["entry"], "relative_loss", "whitening_fallback"
        )
        for r in records
    }
    fallbacks = [n for n, m in modules.items() if m.fallback]
    cached = shape.num_kv_heads * (2 * p + (r_k if config.latent == "joint" else r_k + r_v))
    losses = [x for m in modules.values() for x in m.metrics["relative_loss"]]
    return CompressionResult(
        method=config.method,
        config=config.to_dict(),
        modules=modules,
        details={
            "decomposer": config.decomposer.to_dict(),
            "rope_dim": 2 * p,
            "kv_rank": r_k if config.latent == "joint" else r_k + r_v,
            "kv_fraction": round(cached / (2 * shape.num_kv_heads * shape.head_dim), 6),
            "mean_relative_loss": sum(losses) / len(losses),
            "cache_class": "ProjectedKVCache",
        },
        fallbacks=len(fallbacks),
        fallback_modules=fallbacks,
    )
