"""``KVProjection``: per-KV-head low-rank maps that shrink what an attention layer caches.

For one attention layer with H query heads, H_kv key/value heads (group size G = H / H_kv, query head i
reads KV head g(i) = i // G) and head dimension d, a key projection is a pair A, B ∈ R^{d×R_k} per KV head:
the cache stores K A (R_k numbers per token and head instead of d) and the logits become
(Q B)(K A)ᵀ = Q B Aᵀ Kᵀ ≈ Q Kᵀ. A value projection is a pair C, D ∈ R^{d×R_v}: the cache stores V C and
each head's output softmax(·) V C is mapped back to d dimensions by Dᵀ before o_proj. Orthogonal methods
have B = A (D = C); the attention-optimal ones are oblique. With R = d and A Bᵀ = I the layer is unchanged.

Tensor layouts follow transformers' attention functions: queries (b, H, t, d), keys and values
(b, H_kv, t, d), attention outputs (b, t, H, d).

As a *codec* of :class:`lowrank.attention.wrapper.ProjectedAttention` it works in one of two RoPE modes:
``post`` projects rotated keys (queries become Q B); ``pre`` projects keys before RoPE (they are
un-rotated, encoded, and at attention time reconstructed as (K A) Bᵀ and rotated again).

Folded down-projections (:meth:`KVProjection.fold_into`): the maps that only ever multiply a dense
projection's output are folded into it, and the rows they made redundant are deleted.

* Values, in both modes: ``v_proj`` becomes C_gᵀ W_v,g per KV head (it computes V C directly, R_v rows a
  head instead of d) and ``o_proj`` absorbs D (its input shrinks from H·d to H·R_v columns), so neither
  C nor D is applied at run time.
* Keys, ``pre`` only: RoPE acts after the projection, so ``k_proj`` becomes A_gᵀ W_k,g and computes the
  cached codes K A directly; the dense key rows and A are gone. RoPE then needs the rebuilt keys
  (K A) Bᵀ at every position, at every step: that rebuild is the cost ``pre`` pays (see the decode
  benchmark).
* Keys, ``post``: RoPE rotates each frequency pair by the token's angle *before* A mixes the pairs, and A
  does not commute with that rotation, so neither A nor B (on the query side, after the queries' RoPE)
  can move into a dense projection. ``k_proj`` stays whole and the cache stores K A computed from it.
  A layer with a key norm (Qwen3 and the like) keeps ``k_proj`` whole as well: the norm is not linear.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowrank.attention.codecs import KVCodec, register_codec
from lowrank.attention.rope import unrotate
from lowrank.nn import folded_linear

__all__ = ["KVProjection", "ROPE_MODES", "CODEC_LEARNING_RATE"]

ROPE_MODES = ("post", "pre")
CODEC_LEARNING_RATE = 1e-5
"""Peak healing learning rate when only ``kv-projection`` codecs train: they start at a closed-form optimum
that 1e-4 knocks them off for good, while 1e-5 wins back 0.58 of the lost wiki log-perplexity in 200k
tokens (benchmarks/results/heal_cpu.md)."""


@register_codec
class KVProjection(KVCodec):
    """Key (and optionally value) projections of one attention layer.

    Args:
        num_heads: query heads H.
        num_kv_heads: key/value heads H_kv (H must be a multiple).
        head_dim: d.
        key_rank: R_k, the cached key width per KV head, in [1, d].
        value_rank: R_v in [1, d], or ``None`` to cache values at full width.
        rope: ``"post"`` or ``"pre"`` (see the module docstring).
        fused_keys: A is folded into the layer's ``k_proj`` (``pre`` only): keys arrive as codes.
        fused_values: C is folded into ``v_proj`` and D into ``o_proj``: values arrive as codes and
            outputs leave at width R_v.
        device, dtype: where and how the (uninitialised) maps are allocated.
    """

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        key_rank: int,
        value_rank: int | None = None,
        *,
        rope: str = "post",
        fused_keys: bool = False,
        fused_values: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if rope not in ROPE_MODES:
            raise ValueError(f"rope must be one of {ROPE_MODES}; got {rope!r}")
        if fused_keys and rope != "pre":
            raise ValueError(
                "fused_keys needs rope='pre': post-RoPE keys are rotated before they are projected"
            )
        if fused_values and value_rank is None:
            raise ValueError("fused_values needs a value projection (value_rank)")
        self.rope = rope
        self.fused_keys, self.fused_values = fused_keys, fused_values
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        for name, rank in (("key_rank", key_rank), ("value_rank", value_rank)):
            if rank is not None and not 1 <= rank <= head_dim:
                raise ValueError(f"{name} must be in [1, head_dim] = [1, {head_dim}]; got {rank}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.key_rank, self.value_rank = key_rank, value_rank
        shape = (num_kv_heads, head_dim)
        if not fused_keys:
            self.key_down = nn.Parameter(torch.empty(*shape, key_rank, device=device, dtype=dtype))
            """A: (H_kv, d, R_k); the cache stores K A."""
        self.query_map = nn.Parameter(torch.empty(*shape, key_rank, device=device, dtype=dtype))
        """B: (H_kv, d, R_k); queries become Q B (every head of a group shares its KV head's B)."""
        if value_rank is not None and not fused_values:
            self.value_down = nn.Parameter(torch.empty(*shape, value_rank, device=device, dtype=dtype))
            """C: (H_kv, d, R_v); the cache stores V C."""
            self.value_up = nn.Parameter(torch.empty(*shape, value_rank, device=device, dtype=dtype))
            """D: (H_kv, d, R_v); each head's output O is mapped back as O Dᵀ."""

    @property
    def projects_values(self) -> bool:
        return self.value_rank is not None

    @property
    def key_width(self) -> int:
        """Width per KV head of what the layer's ``k_proj`` gives: R_k once A is folded in, else d."""
        return self.key_rank if self.fused_keys else self.head_dim

    @property
    def value_width(self) -> int:
        """Width per KV head of what ``v_proj`` gives (and per query head of what ``o_proj`` takes)."""
        return self.value_rank if self.fused_values else self.head_dim

    @property
    def folded(self) -> tuple[str, ...]:
        """Names of the layer's projections that carry folded maps of this codec."""
        return ("k_proj",) * self.fused_keys + ("v_proj", "o_proj") * self.fused_values

    def fold_into(self, projections: dict[str, nn.Module], layer) -> dict[str, nn.Linear]:
        """Fold A into ``k_proj`` (``pre``) and C, D into ``v_proj``, ``o_proj``; drop them from the codec.

        Args:
            projections: the layer's ``k_proj``, ``v_proj`` and ``o_proj``.
            layer: the layer's :class:`~lowrank.nn.attention_layout.LayerAttention` (keys fold only on a
                layer with RoPE and without a key norm).

        Returns:
            The replacement projections, by name; a projection that is not a plain ``nn.Linear`` (a
            low-rank or quantized one) keeps its map in the codec.
        """
        plain = {name: type(module) is nn.Linear for name, module in projections.items()}
        keys = self.rope == "pre" and not self.fused_keys and layer.rope and layer.k_norm is None
        values = self.projects_values and not self.fused_values and plain["v_proj"] and plain["o_proj"]
        out: dict[str, nn.Linear] = {}
        with torch.no_grad():
            if keys and plain["k_proj"]:
                out["k_proj"] = folded_linear(projections["k_proj"], outputs=torch.block_diag(*self.key_down))
                del self.key_down
                self.fused_keys = True
            if values:
                downs, ups = torch.block_diag(*self.value_down), self._per_query_head(self.value_up)
                out["v_proj"] = folded_linear(projections["v_proj"], outputs=downs)
                out["o_proj"] = folded_linear(projections["o_proj"], inputs=torch.block_diag(*ups))
                del self.value_down, self.value_up
                self.fused_values = True
        return out

    def folded_shapes(self, projections: dict[str, nn.Module]) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of each folded projection, to rebuild the layer before loading."""
        shapes = {}
        if self.fused_keys:
            shapes["k_proj"] = (self.num_kv_heads * self.key_rank, projections["k_proj"].in_features)
        if self.fused_values:
            shapes["v_proj"] = (self.num_kv_heads * self.value_rank, projections["v_proj"].in_features)
            shapes["o_proj"] = (projections["o_proj"].out_features, self.num_heads * self.value_rank)
        return shapes

    @classmethod
    def from_maps(
        cls,
        num_heads: int,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor | None = None,
        D: torch.Tensor | None = None,
        *,
        rope: str = "post",
        dtype: torch.dtype | None = None,
    ) -> KVProjection:
        """Build from A, B: (H_kv, d, R_k) and optionally C, D: (H_kv, d, R_v)."""
        if (
            A.shape != B.shape
            or A.ndim != 3
            or (C is None) != (D is None)
            or (C is not None and C.shape != D.shape)
        ):
            raise ValueError(
                "need A, B of one shape (H_kv, d, R_k) and optionally C, D of one shape (H_kv, d, R_v); got "
                f"A {tuple(A.shape)}, B {tuple(B.shape)}, C {None if C is None else tuple(C.shape)}, "
                f"D {None if D is None else tuple(D.shape)}"
            )
        kv_heads, d, key_rank = A.shape
        dtype = dtype or A.dtype
        value_rank = None if C is None else C.shape[2]
        module = cls(num_heads, kv_heads, d, key_rank, value_rank, rope=rope, device=A.device, dtype=dtype)
        with torch.no_grad():
            module.key_down.copy_(A)
            module.query_map.copy_(B)
            if C is not None:
                module.value_down.copy_(C)
                module.value_up.copy_(D)
        return module

    def _per_query_head(self, maps: torch.Tensor) -> torch.Tensor:
        return maps.repeat_interleave(self.num_heads // self.num_kv_heads, dim=0)

    def encode_keys(self, keys: torch.Tensor) -> torch.Tensor:
        """(b, H_kv, t, d) → (b, H_kv, t, R_k): K A."""
        return torch.einsum("bhtd,hdr->bhtr", keys, self.key_down.to(keys.dtype))

    def decode_keys(self, codes: torch.Tensor) -> torch.Tensor:
        """(b, H_kv, t, R_k) → (b, H_kv, t, d): (K A) Bᵀ, the keys as the queries see them."""
        return torch.matmul(codes, self.query_map.to(codes.dtype).transpose(1, 2))

    def decode_rotated_keys(self, codes: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE of :meth:`decode_keys` at the codes' positions (cos, sin: (b, t, d), rotate-half layout).

        ``pre`` mode pays this at every decode step over every cached position, so RoPE is applied on the
        two halves in place (k₁ cos − k₂ sin, k₂ cos + k₁ sin) instead of through rotate_half's copies:
        one product, two multiplies and two fused multiply-adds."""
        keys = self.decode_keys(codes)
        half = self.head_dim // 2
        cos = cos[..., :half].unsqueeze(1).to(codes.dtype)
        sin = sin[..., :half].unsqueeze(1).to(codes.dtype)
        first, second = keys[..., :half], keys[..., half:]
        if torch.is_grad_enabled() and keys.requires_grad:  # healing: out= has no autograd
            return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)
        out = torch.empty_like(keys)
        torch.mul(first, cos, out=out[..., :half]).addcmul_(second, sin, value=-1)
        torch.mul(second, cos, out=out[..., half:]).addcmul_(first, sin)
        return out

    def map_queries(self, queries: torch.Tensor) -> torch.Tensor:
        """(b, H, t, d) → (b, H, t, R_k): Q B with each head's KV-group map."""
        return torch.einsum("bhtd,hdr->bhtr", queries, self._per_query_head(self.query_map).to(queries.dtype))

    def encode_values(self, values: torch.Tensor) -> torch.Tensor:
        """(b, H_kv, t, d) → (b, H_kv, t, R_v): V C (identity without a value projection, or with C folded
        into ``v_proj``)."""
        if not self.projects_values or self.fused_values:
            return values
        return torch.einsum("bhtd,hdr->bhtr", values, self.value_down.to(values.dtype))

    def decode_outputs(self, outputs: torch.Tensor) -> torch.Tensor:
        """(b, t, H, R_v) → (b, t, H, d): each head's output O Dᵀ (identity without a value projection, or
        with D folded into ``o_proj``)."""
        if not self.projects_values or self.fused_values:
            return outputs
        return torch.einsum("bthr,hdr->bthd", outputs, self._per_query_head(self.value_up).to(outputs.dtype))

    # -- codec protocol (see lowrank.attention.wrapper) ------------------------------------------------
    def encode(
        self, keys: torch.Tensor, values: torch.Tensor, rope_tables
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What the cache stores for new rotated ``keys`` and ``values``: (K A, V C). With A folded into
        ``k_proj`` the keys arrive as un-rotated codes already (C likewise for values)."""
        if self.fused_keys:
            return keys, self.encode_values(values)
        if self.rope == "pre":
            keys = unrotate(keys, *rope_tables)
        return self.encode_keys(keys), self.encode_values(values)

    def attend(self, queries, key_codes, value_codes, rope_tables, *, keys_decoded: bool = False):
        """(queries, keys, values) for the attention function from rotated queries and stored codes.

        ``rope_tables`` are the cos/sin of the codes' positions; ``keys_decoded``: the cache already
        reconstructed and rotated the keys (``pre`` mode, where positions differ from the queries').
        """
        if self.rope == "post":
            return _same_width(self.map_queries(queries), key_codes, value_codes)
        if not keys_decoded:
            key_codes = self.decode_rotated_keys(key_codes, *rope_tables)
        return _same_width(queries, key_codes, value_codes)

    def decode(self, outputs: torch.Tensor) -> torch.Tensor:
        """Each head's attention output (zero padding dropped) back to d dimensions, or at R_v for the
        ``o_proj`` that absorbed D."""
        return self.decode_outputs(outputs[..., : self.value_rank or self.head_dim])

    @property
    def needs_positions(self) -> bool:
        """``rope='pre'``: keys are rebuilt before RoPE, so the cache keeps each token's position."""
        return self.rope == "pre"

    def healing_learning_rate(self, trainable: str) -> float:
        """:data:`CODEC_LEARNING_RATE` (measured) whatever trains with it."""
        return CODEC_LEARNING_RATE

    def cached_numbers(self) -> int:
        """Numbers cached per token and layer (over all KV heads)."""
        return self.num_kv_heads * (self.key_rank + (self.value_rank or self.head_dim))

    def codec_spec(self) -> dict[str, Any]:
        return {
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "key_rank": self.key_rank,
            "value_rank": self.value_rank,
            "rope": self.rope,
            "fused_keys": self.fused_keys,
            "fused_values": self.fused_values,
        }

    @classmethod
    def from_codec_spec(cls, spec: dict[str, Any], *, device=None, dtype=None) -> KVProjection:
        value_rank = spec["value_rank"]
        return cls(
            int(spec["num_heads"]),
            int(spec["num_kv_heads"]),
            int(spec["head_dim"]),
            int(spec["key_rank"]),
            None if value_rank is None else int(value_rank),
            rope=spec.get("rope", "post"),
            fused_keys=bool(spec.get("fused_keys", False)),
            fused_values=bool(spec.get("fused_values", False)),
            device=device,
            dtype=dtype,
        )

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"key_rank={self.key_rank}, value_rank={self.value_rank}, rope={self.rope}, "
            f"folded={','.join(self.folded) or 'none'}"
        )


def _same_width(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor):
    """Zero-pad the narrower of (queries and keys) or values to the other's width.

    CPU and GPU fused attention kernels need one head width for q, k and v and otherwise fall back to the
    unfused math path (measured: 2.2× slower on a 2,048-token prefill); padding q and k changes no score
    (the scale is passed explicitly), padding v adds zero columns that :meth:`KVProjection.decode` drops.
    """
    width, value_width = queries.shape[-1], values.shape[-1]
    if value_width < width:
        values = _padded(values, width)
    elif width < value_width:
        queries, keys = _padded(queries, value_width), _padded(keys, value_width)
    return queries, keys, values


def _padded(x: torch.Tensor, width: int) -> torch.Tensor:
    """``x`` with zero columns up to ``width`` (each element written once)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return nn.functional.pad(x, (0, width - x.shape[-1]))
    out = x.new_empty(*x.shape[:-1], width)
    out[..., : x.shape[-1]] = x
    out[..., x.shape[-1] :] = 0
    return out
