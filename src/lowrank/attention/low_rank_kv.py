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
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowrank.attention.codecs import register_codec
from lowrank.attention.rope import rotate, unrotate

__all__ = ["KVProjection", "ROPE_MODES", "CODEC_LEARNING_RATE"]

ROPE_MODES = ("post", "pre")
CODEC_LEARNING_RATE = 1e-5
"""Peak healing learning rate when only ``kv-projection`` codecs train: they start at a closed-form optimum
that 1e-4 knocks them off for good, while 1e-5 wins back 0.58 of the lost wiki log-perplexity in 200k
tokens (benchmarks/results/heal_cpu.md)."""


@register_codec
class KVProjection(nn.Module):
    """Key (and optionally value) projections of one attention layer.

    Args:
        num_heads: query heads H.
        num_kv_heads: key/value heads H_kv (H must be a multiple).
        head_dim: d.
        key_rank: R_k, the cached key width per KV head, in [1, d].
        value_rank: R_v in [1, d], or ``None`` to cache values at full width.
        rope: ``"post"`` or ``"pre"`` (see the module docstring).
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
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if rope not in ROPE_MODES:
            raise ValueError(f"rope must be one of {ROPE_MODES}; got {rope!r}")
        self.rope = rope
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        for name, rank in (("key_rank", key_rank), ("value_rank", value_rank)):
            if rank is not None and not 1 <= rank <= head_dim:
                raise ValueError(f"{name} must be in [1, head_dim] = [1, {head_dim}]; got {rank}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.key_rank, self.value_rank = key_rank, value_rank
        shape = (num_kv_heads, head_dim)
        self.key_down = nn.Parameter(torch.empty(*shape, key_rank, device=device, dtype=dtype))
        """A: (H_kv, d, R_k); the cache stores K A."""
        self.query_map = nn.Parameter(torch.empty(*shape, key_rank, device=device, dtype=dtype))
        """B: (H_kv, d, R_k); queries become Q B (every head of a group shares its KV head's B)."""
        if value_rank is not None:
            self.value_down = nn.Parameter(torch.empty(*shape, value_rank, device=device, dtype=dtype))
            """C: (H_kv, d, R_v); the cache stores V C."""
            self.value_up = nn.Parameter(torch.empty(*shape, value_rank, device=device, dtype=dtype))
            """D: (H_kv, d, R_v); each head's output O is mapped back as O Dᵀ."""

    @property
    def projects_values(self) -> bool:
        return self.value_rank is not None

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
        return torch.einsum("bhtr,hdr->bhtd", codes, self.query_map.to(codes.dtype))

    def map_queries(self, queries: torch.Tensor) -> torch.Tensor:
        """(b, H, t, d) → (b, H, t, R_k): Q B with each head's KV-group map."""
        return torch.einsum("bhtd,hdr->bhtr", queries, self._per_query_head(self.query_map).to(queries.dtype))

    def encode_values(self, values: torch.Tensor) -> torch.Tensor:
        """(b, H_kv, t, d) → (b, H_kv, t, R_v): V C (identity without a value projection)."""
        if not self.projects_values:
            return values
        return torch.einsum("bhtd,hdr->bhtr", values, self.value_down.to(values.dtype))

    def decode_outputs(self, outputs: torch.Tensor) -> torch.Tensor:
        """(b, t, H, R_v) → (b, t, H, d): each head's output O Dᵀ (identity without a value projection)."""
        if not self.projects_values:
            return outputs
        return torch.einsum("bthr,hdr->bthd", outputs, self._per_query_head(self.value_up).to(outputs.dtype))

    # -- codec protocol (see lowrank.attention.wrapper) ------------------------------------------------
    def encode(
        self, keys: torch.Tensor, values: torch.Tensor, rope_tables
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What the cache stores for new rotated ``keys`` and ``values``: (K A, V C)."""
        if self.rope == "pre":
            keys = unrotate(keys, *rope_tables)
        return self.encode_keys(keys), self.encode_values(values)

    def attend(self, queries, key_codes, value_codes, rope_tables, *, keys_decoded: bool = False):
        """(queries, keys, values) for the attention function from rotated queries and stored codes.

        ``rope_tables`` are the cos/sin of the codes' positions; ``keys_decoded``: the cache already
        reconstructed and rotated the keys (``pre`` mode, where positions differ from the queries').
        """
        if self.rope == "post":
            return self.map_queries(queries), key_codes, value_codes
        if not keys_decoded:
            key_codes = rotate(self.decode_keys(key_codes), *rope_tables)
        return queries, key_codes, value_codes

    def decode(self, outputs: torch.Tensor) -> torch.Tensor:
        """Each head's attention output back to d dimensions."""
        return self.decode_outputs(outputs)

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
            device=device,
            dtype=dtype,
        )

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"key_rank={self.key_rank}, value_rank={self.value_rank}, rope={self.rope}"
        )
