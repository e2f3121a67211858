"""Multi-head latent attention in DeepSeek-V3's layout, for a converted Llama-family model.

Per token the layer computes (H heads, latent r, shared rotary key of width ρ, d_n position-free query/key
features and d_v value features per head)::

    q = q_proj(x)                  → per head [q_nope (d_n), q_rope (ρ)]
    [c, k_rope] = kv_a_proj_with_mqa(x)     c: the latent (r), k_rope: ONE rotary key for every head (ρ)
    [k_nope_h, v_h] = kv_b_proj(c)          per head (d_n + d_v)
    score_h = (q_nope_h·k_nope_h + RoPE(q_rope_h)·RoPE(k_rope)) / sqrt(d_n + ρ)

exactly as transformers' ``DeepseekV3Attention`` with ``q_lora_rank=None`` and ``rope_interleave=False``, with
one difference: there is no ``kv_a_layernorm`` (the conversion's latent is a linear image of the input; the
export makes DeepSeek's norm linear instead, see :mod:`lowrank.loading.export_deepseek`). The rotary key
turns at the model's own frequencies ``rope_frequencies`` (indices into its RoPE tables), so the layer
runs inside the original model, whose rotary embedding computes the tables.

The cache holds only the latent and the rotary key, r + ρ numbers per token and layer as in DeepSeek, side
by side in one tensor: ``cache.update([c, k_rope], ∅)`` (one "head" of r + ρ, and a zero-width value), so
that the absorbed path attends over the cached tensor as it is, with no copy per step.
:class:`LatentRopeCache` is that ``DynamicCache`` with its analytic byte count. Two exact ways to attend
over it (``decode_path``):

* **expanded**: ``kv_b_proj`` rebuilds every cached position's keys and values, then the model's attention
  kernel runs: T · r · H (d_n + d_v) multiply-adds per step for T cached tokens, before attention.
* **absorbed** (DeepSeek/vLLM's decode): W_uk is folded into the queries (q̃_h = q_nope,h W_uk,h, r wide),
  so every head scores against the cached [c, k_rope] directly; that is multi-query attention with one
  shared key of width r + ρ and one shared value c (r), run as ONE ``scaled_dot_product_attention`` with the
  heads folded into the query length; W_uv maps each head's attended latent to its value after.

``auto`` (the default) takes the one with fewer multiply-adds for the call's t queries over T positions
(:meth:`DeepseekLatentAttention.absorbs`): absorbed costs t · T · H (2r + ρ) + t · H · r (d_n + d_v),
expanded T · r · H (d_n + d_v) + t · T · H (d_n + ρ + d_v), so absorption wins while
t < r (d_n + d_v) / (2r − d_n − d_v) (every t when 2r ≤ d_n + d_v): decode steps and short chunks absorb,
long prefills expand. Soft-capping, dropout in training and returned attention weights keep the expanded
path; a sliding window is applied through the mask either way.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from lowrank.attention.cache import default_kv_bytes_per_token, register_cache
from lowrank.attention.rope import pair_dims, rotate
from lowrank.attention.wrapper import attention_kernel
from lowrank.nn import register_replacement
from lowrank.nn.attention_layout import LayerAttention, attention_implementation, layer_attention

__all__ = [
    "DECODE_PATHS",
    "DEEPSEEK_MLA_LEARNING_RATE",
    "DeepseekLatentAttention",
    "LatentRopeCache",
    "set_decode_path",
]

DEEPSEEK_MLA_LEARNING_RATE = 1e-4
"""Peak healing learning rate of this attention training whole, measured on the built-in model at the
seed's budget (rope 32 + latent 88, 200k tokens; benchmarks/results/heal_cpu.md): from the conversion's
wiki 45.2, 1e-4 wins back 0.78 of the lost log-perplexity (→ 19.6), while 3e-4, the rate of MHA2MLA-style
attention that starts from 279, raised the held-out loss for 30 steps and stopped early with no gain."""

logger = logging.getLogger(__name__)

DECODE_PATHS = ("auto", "absorbed", "expanded")
"""How :class:`DeepseekLatentAttention` attends over its latent cache (see the module docstring)."""


@register_replacement
class DeepseekLatentAttention(nn.Module):
    """An attention layer in DeepSeek-V3's MLA layout (uninitialised projections; the conversion fills them).

    Args:
        attention: the transformers attention module it replaces (its ``o_proj`` is taken over).
        kv_lora_rank: r, the latent cached per token.
        qk_rope_head_dim: ρ, the shared rotary key's width (even).
        qk_nope_head_dim: d_n, position-free query/key features per head.
        rope_frequencies: (ρ/2,) indices of the model's RoPE frequencies the rotary key turns at.
        bias: q_proj and kv_a_proj_with_mqa carry biases (families with q/k/v biases; not exportable).
        layer: the layer's description (default: read from ``attention``).
        implementation: attention kernel (default: the one the model's config selects).
    """

    absent_projections = ("k_proj", "v_proj")
    """The original's dense key and value projections, fused into kv_a_proj_with_mqa and kv_b_proj."""

    def __init__(
        self,
        attention: nn.Module,
        *,
        kv_lora_rank: int,
        qk_rope_head_dim: int,
        qk_nope_head_dim: int,
        rope_frequencies: torch.Tensor | list[int],
        bias: bool = False,
        layer: LayerAttention | None = None,
        implementation: str | None = None,
    ) -> None:
        super().__init__()
        self.layer = layer or layer_attention(attention)
        if self.layer.q_norm or self.layer.k_norm:
            raise ValueError(
                "DeepseekLatentAttention has no q/k norms; this layer normalises its queries/keys"
            )
        H, d = self.layer.num_heads, self.layer.head_dim
        frequencies = torch.as_tensor(rope_frequencies, dtype=torch.long)
        if qk_rope_head_dim % 2 or frequencies.numel() != qk_rope_head_dim // 2:
            raise ValueError(
                f"qk_rope_head_dim must be even with one frequency per pair; got {qk_rope_head_dim} "
                f"and {frequencies.numel()} frequencies"
            )
        if kv_lora_rank < 1 or qk_nope_head_dim < 0:
            raise ValueError(
                f"need kv_lora_rank >= 1, qk_nope_head_dim >= 0; got {kv_lora_rank}, {qk_nope_head_dim}"
            )
        ref = next(attention.o_proj.parameters())  # o_proj may be a LowRankLinear (stacked methods)
        hidden = attention.o_proj.out_features
        kw = dict(bias=False, device=ref.device, dtype=ref.dtype)
        self.num_heads, self.head_dim, self.v_head_dim = H, d, d
        self.kv_lora_rank, self.qk_rope_head_dim, self.qk_nope_head_dim = (
            kv_lora_rank,
            qk_rope_head_dim,
            qk_nope_head_dim,
        )
        self.qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.bias = bool(bias)
        self.q_proj = nn.Linear(hidden, H * self.qk_head_dim, **{**kw, "bias": self.bias})
        self.kv_a_proj_with_mqa = nn.Linear(
            hidden, kv_lora_rank + qk_rope_head_dim, **{**kw, "bias": self.bias}
        )
        self.kv_b_proj = nn.Linear(kv_lora_rank, H * (qk_nope_head_dim + d), **kw)
        self.o_proj = attention.o_proj
        where = "cpu" if ref.device.type == "meta" else ref.device  # computed, never loaded: real tensors
        self.register_buffer("rope_frequencies", frequencies.to(where), persistent=False)
        self.register_buffer("rope_index", pair_dims(frequencies, d).to(where), persistent=False)
        self.config = attention.config  # attention kernels read their settings from module.config
        self.layer_idx = self.layer.layer_idx
        self.num_key_value_groups = 1
        self.scaling = self.qk_head_dim**-0.5
        self.is_causal = True
        self.implementation = implementation or attention_implementation(attention.config)
        self._kernel = attention_kernel(self.implementation)
        self.decode_path = "auto"

    def set_decode_path(self, path: str) -> None:
        """Attend by ``path`` (one of :data:`DECODE_PATHS`); both give the same output to float tolerance.

        Raises:
            ValueError: an unknown path, or ``absorbed`` on a soft-capped layer.
        """
        if path not in DECODE_PATHS:
            raise ValueError(f"decode path must be one of {DECODE_PATHS}; got {path!r}")
        if path == "absorbed" and not self._absorbable():
            raise ValueError(
                f"layer {self.layer_idx} soft-caps its scores, which the absorbed path does not compute; use "
                "'auto' or 'expanded'"
            )
        self.decode_path = path

    def _absorbable(self) -> bool:
        return self.layer.softcap is None

    def absorbs(self, queries: int, positions: int) -> bool:
        """Whether a call with ``queries`` new tokens over ``positions`` cached ones (new included) takes
        the absorbed path: forced by ``decode_path``, else the cheaper by multiply-adds (module docstring)."""
        if self.decode_path != "auto" or not self._absorbable():
            return self.decode_path == "absorbed" and self._absorbable()
        H, r, rho = self.num_heads, self.kv_lora_rank, self.qk_rope_head_dim
        dn, dv = self.qk_nope_head_dim, self.v_head_dim
        absorbed = queries * positions * H * (2 * r + rho) + queries * H * r * (dn + dv)
        expanded = positions * r * H * (dn + dv) + queries * positions * H * (dn + rho + dv)
        return absorbed < expanded

    def absorbed_attention(
        self,
        q_nope: torch.Tensor,
        q_rope: torch.Tensor,
        entries: torch.Tensor,
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Attention over the cache with W_uk folded into the queries: (b, H, t, ·) queries and the
        (b, 1, T, r + ρ) cached [latent, rotary key] → (b, t, H · d_v), the input of ``o_proj``."""
        b, H, t, _ = q_nope.shape
        T, r = entries.shape[2], self.kv_lora_rank
        w = self.kv_b_proj.weight.view(H, self.qk_nope_head_dim + self.v_head_dim, r)
        w_uk, w_uv = w.split([self.qk_nope_head_dim, self.v_head_dim], dim=1)
        q = torch.cat([torch.matmul(q_nope, w_uk), q_rope], dim=-1)  # (b, H, t, r + ρ)
        q = q.reshape(b, 1, H * t, r + self.qk_rope_head_dim)  # heads folded into the query length
        window = self.layer.sliding_window
        if attention_mask is None:  # causal, the t queries being the last t of the T positions
            mask = None
            if t > 1 or (window is not None and window < T):
                mask = torch.ones(t, T, dtype=torch.bool, device=q.device).tril(T - t)
                if window is not None:  # and no further back than the window
                    mask = mask.triu(T - t - window + 1)
                mask = mask.repeat(H, 1)
        else:  # transformers' (b, 1, t, ≥T) mask: row h · t + i is query i's
            mask = attention_mask[..., :T].repeat(1, 1, H, 1)
        # values: the whole cached entry, so that q, k and v share one width and the fused (flash) kernel
        # applies; the first r output features are the attended latent, the last ρ are dropped
        out = F.scaled_dot_product_attention(q, entries, entries, attn_mask=mask, scale=self.scaling)
        out = torch.matmul(out[..., :r].reshape(b, H, t, r), w_uv.transpose(1, 2))  # (b, H, t, d_v)
        return out.transpose(1, 2).reshape(b, t, H * self.v_head_dim)

    def expand(self, latent: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached (b, 1, T, r) latents and (b, 1, T, ρ) rotated rotary keys → keys (b, H, T, d_n + ρ) and
        values (b, H, T, d_v)."""
        b, _, T, _ = latent.shape
        kv = self.kv_b_proj(latent[:, 0]).view(b, T, self.num_heads, -1).transpose(1, 2)
        k_nope, values = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        keys = torch.cat([k_nope, k_rope.expand(-1, self.num_heads, -1, -1)], dim=-1)
        return keys, values

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        cache=None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        cache = cache if cache is not None else past_key_values
        b, t = hidden_states.shape[:-1]
        q = self.q_proj(hidden_states).view(b, t, self.num_heads, self.qk_head_dim).transpose(1, 2)
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(hidden_states).split(
            [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1
        )
        latent, k_rope = latent.view(b, 1, t, -1), k_rope.view(b, 1, t, -1)
        if self.layer.rope:
            cos, sin = position_embeddings
            cos, sin = cos[..., self.rope_index], sin[..., self.rope_index]
            q_rope, k_rope = rotate(q_rope, cos, sin), rotate(k_rope, cos, sin)
        entries = torch.cat([latent, k_rope], dim=-1)  # the new tokens' cache entries (b, 1, t, r + ρ)
        if cache is not None:
            entries, _ = cache.update(entries, entries.new_zeros(b, 1, t, 0), self.layer_idx)
        mask_ok = attention_mask is None or (
            isinstance(attention_mask, torch.Tensor)
            and attention_mask.ndim == 4
            and attention_mask.shape[1] == 1
        )
        eager_weights = kwargs.get("output_attentions") or (self.training and self.layer.dropout > 0)
        if mask_ok and not eager_weights and self.absorbs(t, entries.shape[2]):
            out = self.absorbed_attention(q_nope, q_rope, entries, attention_mask)
            return self.o_proj(out), None
        keys, values = self.expand(*entries.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1))
        queries = torch.cat([q_nope, q_rope], dim=-1)
        extra = {}
        if self.layer.sliding_window is not None:
            extra["sliding_window"] = self.layer.sliding_window
        if self.layer.softcap is not None:
            extra["softcap"] = self.layer.softcap
        kwargs.pop("position_ids", None)
        out, weights = self._kernel(
            self,
            queries,
            keys,
            values,
            attention_mask,
            dropout=self.layer.dropout if self.training else 0.0,
            scaling=self.scaling,
            **extra,
            **kwargs,
        )
        return self.o_proj(out.reshape(b, t, -1).contiguous()), weights

    def cached_numbers(self) -> int:
        """Numbers cached per token: the latent and the rotary key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def extra_repr(self) -> str:
        return (
            f"layer={self.layer_idx}, kv_lora_rank={self.kv_lora_rank}, qk_rope_head_dim="
            f"{self.qk_rope_head_dim}, qk_nope_head_dim={self.qk_nope_head_dim}, "
            f"implementation={self.implementation}"
        )

    # -- healing protocol (see lowrank.nn.registry) --------------------------------------------
    def healing_scope(self) -> str:
        """``'attention'``: after the RoPE conversion the whole layer (q_proj included) relearns to match."""
        return "attention"

    def healing_learning_rate(self, trainable: str) -> float:
        """:data:`DEEPSEEK_MLA_LEARNING_RATE`, measured for this conversion (every parameter here is the
        layer's)."""
        return DEEPSEEK_MLA_LEARNING_RATE

    # -- serialization protocol (see lowrank.nn.registry) --------------------------------------
    def replacement_spec(self) -> dict[str, Any]:
        return {
            "kv_lora_rank": self.kv_lora_rank,
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "qk_nope_head_dim": self.qk_nope_head_dim,
            "rope_frequencies": self.rope_frequencies.tolist(),
            "bias": self.bias,
        }

    @classmethod
    def from_spec(cls, spec, *, original=None, model_config=None, device=None, dtype=None):
        """Rebuild around ``original`` (the freshly built attention module) with uninitialised projections."""
        if original is None:
            raise ValueError(
                "DeepseekLatentAttention is rebuilt around the attention module it replaced; none given"
            )
        try:
            return cls(
                original,
                kv_lora_rank=int(spec["kv_lora_rank"]),
                qk_rope_head_dim=int(spec["qk_rope_head_dim"]),
                qk_nope_head_dim=int(spec["qk_nope_head_dim"]),
                rope_frequencies=[int(i) for i in spec["rope_frequencies"]],
                bias=bool(spec.get("bias", False)),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"DeepseekLatentAttention spec is incomplete: {spec!r}") from exc


@register_cache
class LatentRopeCache(DynamicCache):
    """``DynamicCache`` of a model with :class:`DeepseekLatentAttention` layers: those store [latent, rotary
    key] as one "head" of keys (r + ρ numbers per token and layer) and zero-width values."""

    @classmethod
    def bytes_per_token(cls, model: nn.Module) -> float:
        """Analytic bytes per token: r + ρ per converted layer, the default K and V elsewhere."""
        total = default_kv_bytes_per_token(model)
        layers = [m for m in model.modules() if isinstance(m, DeepseekLatentAttention)]
        for module in layers:
            size = module.kv_a_proj_with_mqa.weight.element_size()
            full = 2 * module.layer.num_kv_heads * module.head_dim * size
            total += module.cached_numbers() * size - full
        return float(total)


def set_decode_path(model: nn.Module, path: str) -> int:
    """Set ``decode_path`` of every :class:`DeepseekLatentAttention` in ``model``; returns how many.

    Raises:
        ValueError: an unknown path (see :meth:`DeepseekLatentAttention.set_decode_path`).
    """
    if path not in DECODE_PATHS:
        raise ValueError(f"decode path must be one of {DECODE_PATHS}; got {path!r}")
    layers = [m for m in model.modules() if isinstance(m, DeepseekLatentAttention)]
    kept = 0
    for module in layers:
        if path == "absorbed" and not module._absorbable():
            module.set_decode_path("expanded")
            kept += 1
        else:
            module.set_decode_path(path)
    if kept:
        logger.info("%d of %d latent layers keep the expanded path (soft-capped scores)", kept, len(layers))
    return len(layers)
