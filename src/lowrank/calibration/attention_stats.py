"""Per-head attention statistics: d × d Gram matrices of queries, keys, values and attention outputs.

Methods that compress attention per head (W_O-aware value projections, joint K/Q factorizations, MLA
conversions) need second moments of what each head computes, over ALL calibration tokens, in a memory
that does not grow with the number of tokens. :class:`AttentionGrams` accumulates, for one decoder
layer with H query heads, H_kv key/value heads, group size G = H / H_kv and head dimension d (query head
``i`` reads KV head ``g(i) = i // G``; Q_i, K_j, V_j, O_i are the n × d matrices of all n tokens)::

    kk[j] = K_jᵀ K_j      vv[j] = V_jᵀ V_j      qq[i] = Q_iᵀ Q_i      kq[i] = K_g(i)ᵀ Q_i
    oo[i] = O_iᵀ O_i,     O_i = softmax(scores_i) V_g(i)   (the head's output before o_proj)
    qsum[j] = (Σ_{g(i)=j} Q_i)ᵀ (Σ_{g(i)=j} Q_i)           (Gram of the SUM of group j's queries)

with the Q/K statistics both before RoPE (after q_norm/k_norm where the family has them) and after it.

Observation goes through transformers' attention interface rather than forked modeling code: while
the statistic is attached, the attention module's config is replaced by a shallow copy whose
``_attn_implementation`` names a capturing function registered with ``AttentionInterface``; it records
the post-RoPE query/key/value and the attention output and delegates to the implementation the module
would have used (its family's ``eager_attention_forward`` or a registered one such as ``sdpa``), so the
layer's outputs are bit-identical. Pre-RoPE queries and keys come from forward hooks on the q/k norms
(or projections). Everything is undone by the handles ``collect_layer_statistics`` removes in ``finally``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface

from lowrank.calibration.statistics import Statistic, StatRequest
from lowrank.nn.architectures import get_arch_spec
from lowrank.nn.attention_layout import (
    QKNormLayout,
    attention_function,
    attention_implementation,
    attention_info,
    routed_config,
)
from lowrank.nn.surgery import get_module

__all__ = ["AttentionGrams", "attention_request", "CAPTURE_IMPLEMENTATION"]

#: The name under which the capturing attention function is registered with ``AttentionInterface``.
CAPTURE_IMPLEMENTATION = "lowrank_capture"

#: attention module -> the tap observing it (only while a statistic is attached)
_TAPS: dict[nn.Module, _AttentionTap] = {}


def _capture(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args, **kwargs):
    """Attention function: delegate to the module's own implementation, then record what it saw."""
    tap = _TAPS.get(module)
    if tap is None:
        raise RuntimeError(
            f"attention implementation {CAPTURE_IMPLEMENTATION!r} is only valid while an AttentionGrams "
            f"statistic is attached to this {type(module).__name__}"
        )
    out = tap.original(module, query, key, value, *args, **kwargs)
    tap.sink(query, key, value, out[0])
    return out


AttentionInterface.register(CAPTURE_IMPLEMENTATION, _capture)


class _AttentionTap:
    """Routes one attention module through :func:`_capture` until ``remove()`` restores its config."""

    def __init__(self, module: nn.Module, sink: Callable[..., None]) -> None:
        if module in _TAPS:
            raise ValueError(
                f"{type(module).__name__} is already observed by an AttentionGrams; request one per layer"
            )
        config = getattr(module, "config", None)
        if config is None:
            raise ValueError(
                f"{type(module).__name__} has no config; expected a transformers attention module"
            )
        original = attention_function(module, attention_implementation(config))
        self.module, self.config, self.original, self.sink = module, config, original, sink
        _TAPS[module] = self
        module.config = routed_config(config, CAPTURE_IMPLEMENTATION)

    def remove(self) -> None:
        if _TAPS.get(self.module) is self:
            self.module.config = self.config
            del _TAPS[self.module]


def _heads(
    x: torch.Tensor, layout: QKNormLayout, heads: int, head_dim: int, dtype: torch.dtype
) -> torch.Tensor:
    """A tensor in ``layout`` (b: batch, t: sequence, h: heads, d: head_dim) -> (heads, tokens, d)."""
    x = x.detach()
    if layout == "b h t d":  # as the attention interface receives queries, keys and values
        return x.transpose(0, 1).reshape(heads, -1, head_dim).to(dtype)
    return x.reshape(-1, heads, head_dim).transpose(0, 1).to(dtype)


class AttentionGrams(Statistic):
    """Per-head d × d Gram matrices of one attention module, accumulated over all tokens.

    Attributes (``None`` until the first forward pass; ``_pre``/``_post``: before/after RoPE):
        kk_pre, kk_post: (H_kv, d, d) KᵀK per KV head.
        vv: (H_kv, d, d) VᵀV per KV head.
        qq_pre, qq_post: (H, d, d) QᵀQ per query head (``qq_group_*``: summed over each KV group).
        qsum_pre, qsum_post: (H_kv, d, d) Gram (Σ_i Q_i)ᵀ(Σ_i Q_i) of the sum of the queries of each KV
            group (i over its G query heads). The summed GQA objective ‖Σ_i (K A B_iᵀ Q_iᵀ − K Q_iᵀ)‖²
            needs it; the per-head Grams do not determine it (it adds the cross terms Q_iᵀQ_j, i ≠ j).
        kq_pre, kq_post: (H, d, d) cross Gram ``K_g(i)ᵀ Q_i`` of query head i with its KV head:
            ``kq[i][a, b] = Σ_t K[t, a] Q_i[t, b]`` (rows: key features, columns: query features).
        oo: (H, d, d) OᵀO of each query head's attention output ``softmax(scores) V`` before o_proj.
        tokens: number of tokens accumulated.

    Args:
        num_heads: query heads H.
        num_kv_heads: key/value heads H_kv (divides H).
        head_dim: features per head d.
        q_source, k_source: paths inside the attention module whose outputs are the pre-RoPE queries
            and keys (the q/k norms where the family has them, else the projections).
        source_layout: layout of those outputs (``"b t (h d)"`` for projections; see
            ``ArchSpec.qk_norm_layout`` for norms).
        dtype: accumulation dtype.
    """

    def __init__(
        self,
        *,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        q_source: str = "q_proj",
        k_source: str = "k_proj",
        source_layout: QKNormLayout = "b t (h d)",
        dtype: torch.dtype = torch.float64,
    ) -> None:
        if min(num_heads, num_kv_heads, head_dim) < 1 or num_heads % num_kv_heads:
            raise ValueError(
                f"got num_heads={num_heads}, num_kv_heads={num_kv_heads}, head_dim={head_dim}; "
                "expected positive sizes with num_heads a multiple of num_kv_heads"
            )
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_source, self.k_source, self.source_layout = q_source, k_source, source_layout
        self.dtype = dtype
        self.kk_pre: torch.Tensor | None = None
        self.kk_post: torch.Tensor | None = None
        self.vv: torch.Tensor | None = None
        self.qq_pre: torch.Tensor | None = None
        self.qq_post: torch.Tensor | None = None
        self.qsum_pre: torch.Tensor | None = None
        self.qsum_post: torch.Tensor | None = None
        self.kq_pre: torch.Tensor | None = None
        self.kq_post: torch.Tensor | None = None
        self.oo: torch.Tensor | None = None
        self.tokens = 0
        self._seen: dict[str, torch.Tensor] = {}

    @property
    def group_size(self) -> int:
        """Query heads per KV head G."""
        return self.num_heads // self.num_kv_heads

    @property
    def qq_group_pre(self) -> torch.Tensor | None:
        """(H_kv, d, d): Σ over the query heads i of KV group j of Q_iᵀQ_i, before RoPE."""
        return self._group(self.qq_pre)

    @property
    def qq_group_post(self) -> torch.Tensor | None:
        """(H_kv, d, d): Σ over the query heads i of KV group j of Q_iᵀQ_i, after RoPE."""
        return self._group(self.qq_post)

    def _group(self, qq: torch.Tensor | None) -> torch.Tensor | None:
        d = self.head_dim
        return None if qq is None else qq.reshape(self.num_kv_heads, self.group_size, d, d).sum(1)

    # ------------------------------------------------------------------------------ observation
    def attach(self, module: nn.Module, hook: Callable[..., None]) -> list[Any]:
        """Hook the pre-RoPE q/k sources, route ``module`` through the capturing attention function and
        register ``hook`` (which calls ``update``) on ``module``; return the handles undoing all three."""
        handles: list[Any] = []
        try:
            for name, path in (("q_pre", self.q_source), ("k_pre", self.k_source)):
                source = get_module(module, path)
                handles.append(source.register_forward_hook(partial(self._keep_output, name)))
            handles.append(_AttentionTap(module, self._keep_attention))
            handles.append(module.register_forward_hook(hook, with_kwargs=True))
        except BaseException:
            for handle in reversed(handles):
                handle.remove()
            raise
        return handles

    def _keep_output(self, name: str, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self._seen[name] = output

    def _keep_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor) -> None:
        self._seen.update(q_post=q, k_post=k, v=v, o=o)

    def update(self, module: nn.Module, inputs: tuple[Any, ...], output: Any, kwargs: dict[str, Any]) -> None:
        seen, self._seen = self._seen, {}
        missing = {"q_pre", "k_pre", "q_post", "k_post", "v", "o"} - seen.keys()
        if missing:
            raise RuntimeError(
                f"{type(module).__name__} forward produced no {', '.join(sorted(missing))}; "
                "expected a transformers attention module that calls the attention interface"
            )
        H, Hkv, d, dt = self.num_heads, self.num_kv_heads, self.head_dim, self.dtype
        pre = self.source_layout
        Q = {"pre": _heads(seen["q_pre"], pre, H, d, dt), "post": _heads(seen["q_post"], "b h t d", H, d, dt)}
        K = {
            "pre": _heads(seen["k_pre"], pre, Hkv, d, dt),
            "post": _heads(seen["k_post"], "b h t d", Hkv, d, dt),
        }
        V = _heads(seen["v"], "b h t d", Hkv, d, dt)
        O = _heads(seen["o"], "b t h d", H, d, dt)  # attention interfaces return (batch, seq, H, d)
        if self.oo is None:
            self._allocate(V.device)
        for stage in ("pre", "post"):
            K_rep = K[stage].repeat_interleave(self.group_size, dim=0)  # (H, n, d): KV head of each query
            getattr(self, f"kk_{stage}").baddbmm_(K[stage].mT, K[stage])
            getattr(self, f"qq_{stage}").baddbmm_(Q[stage].mT, Q[stage])
            Q_sum = Q[stage].unflatten(0, (Hkv, self.group_size)).sum(1)  # (H_kv, n, d)
            getattr(self, f"qsum_{stage}").baddbmm_(Q_sum.mT, Q_sum)
            getattr(self, f"kq_{stage}").baddbmm_(K_rep.mT, Q[stage])
        self.vv.baddbmm_(V.mT, V)
        self.oo.baddbmm_(O.mT, O)
        self.tokens += V.shape[1]

    def _allocate(self, device: torch.device) -> None:
        d = self.head_dim
        heads_of = (
            ("kk", self.num_kv_heads),
            ("qq", self.num_heads),
            ("qsum", self.num_kv_heads),
            ("kq", self.num_heads),
        )
        for name, heads in heads_of:
            for stage in ("pre", "post"):
                setattr(self, f"{name}_{stage}", torch.zeros(heads, d, d, dtype=self.dtype, device=device))
        self.vv = torch.zeros(self.num_kv_heads, d, d, dtype=self.dtype, device=device)
        self.oo = torch.zeros(self.num_heads, d, d, dtype=self.dtype, device=device)

    def to(self, device: torch.device | str) -> AttentionGrams:
        """Move every accumulated Gram to ``device`` (in place); return ``self``."""
        names = (
            "kk_pre",
            "kk_post",
            "vv",
            "qq_pre",
            "qq_post",
            "qsum_pre",
            "qsum_post",
            "kq_pre",
            "kq_post",
            "oo",
        )
        for name in names:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        return self


def attention_request(model: nn.Module, dtype: torch.dtype = torch.float64) -> StatRequest:
    """Request :class:`AttentionGrams` of a decoder layer's attention module (the same for every layer).

    Args:
        model: a causal LM of a registered or Llama-like family (see ``lowrank.nn.architectures``).
        dtype: accumulation dtype.

    Returns:
        a :class:`StatRequest` for ``collect_layer_statistics`` / ``run_layerwise`` ``requests``.
    """
    spec, info = get_arch_spec(model), attention_info(model)
    prefix = f"{spec.attention}."
    sources = []
    for norm, kind in ((spec.q_norm, "q"), (spec.k_norm, "k")):
        path = norm or spec.linears[kind]
        if norm is None and not path.startswith(prefix):
            raise ValueError(f"{kind}_proj at {path!r} is not inside the attention module {spec.attention!r}")
        sources.append(norm or path.removeprefix(prefix))
    make = partial(
        AttentionGrams,
        num_heads=info.shape.num_heads,
        num_kv_heads=info.shape.num_kv_heads,
        head_dim=info.shape.head_dim,
        q_source=sources[0],
        k_source=sources[1],
        source_layout=info.qk_norm_layout or "b t (h d)",
        dtype=dtype,
    )
    return StatRequest(spec.attention, make)
