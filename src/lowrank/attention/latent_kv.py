"""``LatentKV``: multi-head latent attention's cache for a converted MHA/GQA layer (MHA2MLA-style).

Per KV head j (head dimension d), a few whole RoPE frequency pairs keep their rotation (``rope_dims`` =
2p features, chosen per head) and the other d − 2p key features become position-free. The position-free
keys and the values are compressed into a latent:

* ``joint``: c = [K_nope, V] U with U ∈ R^{(d−2p+d)×r} orthonormal (one latent for keys and values, as
  MHA2MLA and DeepSeek), reconstructed as [K_nope, V] ≈ c Uᵀ;
* ``split``: c_k = K_nope U_k (r_k), c_v = V U_v (r_v).

The cache stores, per token and KV head, the rotated kept features and the latent(s): 2p + r numbers
(joint) instead of 2d. Attention never reconstructs keys or values: the up-projections are absorbed,
queries become [Q_rope, Q_nope U_k] (logits Q_rope K_ropeᵀ + Q_nope U_k cᵀ) and each head's output
softmax(·) c is mapped back through U_vᵀ before o_proj. With every pair kept and r = d (joint) the layer is
unchanged.

Layouts as in transformers' attention functions: queries (b, H, t, d), keys/values (b, H_kv, t, d),
outputs (b, t, H, d).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowrank.attention.codecs import KVCodec, register_codec
from lowrank.attention.rope import pair_dims, unrotate

__all__ = ["LatentKV", "LATENT_MODES"]

LATENT_MODES = ("joint", "split")


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: (b, h, t, d), index: (h, k) → (b, h, t, k)."""
    b, h, t, _ = x.shape
    return x.gather(-1, index[None, :, None, :].expand(b, h, t, index.shape[-1]))


@register_codec
class LatentKV(KVCodec):
    """Partial RoPE plus latent K/V of one attention layer.

    Args:
        num_heads, num_kv_heads, head_dim: H, H_kv, d.
        rope_pairs: frequency pairs p kept rotary per KV head, in [0, d/2].
        key_rank: r (``joint``: the latent size) or r_k (``split``).
        value_rank: r_v (``split`` only).
        mode: ``joint`` or ``split``.
        device, dtype: allocation of the (uninitialised) maps.
    """

    rope = "partial"

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        rope_pairs: int,
        key_rank: int,
        value_rank: int | None = None,
        *,
        mode: str = "joint",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if mode not in LATENT_MODES:
            raise ValueError(f"mode must be one of {LATENT_MODES}; got {mode!r}")
        if num_kv_heads < 1 or num_heads % num_kv_heads or head_dim % 2:
            raise ValueError(
                f"need H a multiple of H_kv and an even head_dim; got {num_heads}, {num_kv_heads}, {head_dim}"
            )
        if not 0 <= rope_pairs <= head_dim // 2:
            raise ValueError(
                f"rope_pairs must be in [0, head_dim/2] = [0, {head_dim // 2}]; got {rope_pairs}"
            )
        nope = head_dim - 2 * rope_pairs
        joint_max, key_max = nope + head_dim, max(nope, 1)
        if mode == "joint" and not 1 <= key_rank <= joint_max:
            raise ValueError(f"joint latent rank must be in [1, {joint_max}] (d_nope + d); got {key_rank}")
        if mode == "split" and not (1 <= key_rank <= key_max and value_rank and 1 <= value_rank <= head_dim):
            raise ValueError(
                f"split latents need key_rank in [1, {key_max}] and value_rank in [1, {head_dim}]; "
                f"got {key_rank}, {value_rank}"
            )
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rope_pairs, self.key_rank, self.mode = rope_pairs, key_rank, mode
        self.value_rank = key_rank if mode == "joint" else value_rank
        kw = dict(device=device, dtype=dtype)
        self.register_buffer(
            "rope_index", torch.zeros(num_kv_heads, 2 * rope_pairs, dtype=torch.long, device=device)
        )
        self.register_buffer("nope_index", torch.zeros(num_kv_heads, nope, dtype=torch.long, device=device))
        if mode == "joint":
            self.latent = nn.Parameter(torch.empty(num_kv_heads, nope + head_dim, key_rank, **kw))
            """U: (H_kv, d_nope + d, r); c = [K_nope, V] U."""
        else:
            self.key_latent = nn.Parameter(torch.empty(num_kv_heads, nope, key_rank, **kw))
            self.value_latent = nn.Parameter(torch.empty(num_kv_heads, head_dim, value_rank, **kw))

    @property
    def nope_dim(self) -> int:
        return self.head_dim - 2 * self.rope_pairs

    def set_pairs(self, pairs: torch.Tensor) -> None:
        """Choose the kept frequency pairs per KV head: pairs (H_kv, p) of indices in [0, d/2)."""
        d = self.head_dim
        rope = pair_dims(pairs.sort(dim=-1).values.to(self.rope_index.device), d)
        keep = torch.ones(self.num_kv_heads, d, dtype=torch.bool, device=rope.device)
        keep.scatter_(1, rope, False)
        nope = (
            torch.arange(d, device=rope.device).expand(self.num_kv_heads, d)[keep].view(self.num_kv_heads, -1)
        )
        self.rope_index.copy_(rope)
        self.nope_index.copy_(nope)

    def _maps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(U_k: (H_kv, d_nope, r_k), U_v: (H_kv, d, r_v))."""
        if self.mode == "joint":
            return self.latent[:, : self.nope_dim], self.latent[:, self.nope_dim :]
        return self.key_latent, self.value_latent

    def _per_query_head(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat_interleave(self.num_heads // self.num_kv_heads, dim=0)

    # -- codec protocol (see lowrank.attention.wrapper) ------------------------------------------------
    def encode(
        self, keys: torch.Tensor, values: torch.Tensor, rope_tables
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached codes of new rotated keys and values.

        Returns ``([K_rope, c], empty)`` (joint) or ``([K_rope, c_k], c_v)`` (split).
        """
        rope = _gather(keys, self.rope_index)  # rotating a pair's features is the pair's own rotation
        nope = _gather(unrotate(keys, *rope_tables), self.nope_index)
        if self.mode == "joint":
            latent = torch.einsum(
                "bhtm,hmr->bhtr", torch.cat([nope, values], dim=-1), self.latent.to(keys.dtype)
            )
            return torch.cat([rope, latent], dim=-1), values.new_zeros(*values.shape[:-1], 0)
        U_k, U_v = self._maps()
        c_k = torch.einsum("bhtm,hmr->bhtr", nope, U_k.to(keys.dtype))
        return torch.cat([rope, c_k], dim=-1), torch.einsum("bhtd,hdr->bhtr", values, U_v.to(values.dtype))

    def attend(self, queries, key_codes, value_codes, rope_tables, *, keys_decoded: bool = False):
        """Queries [Q_rope, Q_nope U_k] against the cached [K_rope, c]; values are the latent."""
        rope_index = self._per_query_head(self.rope_index)
        nope_index = self._per_query_head(self.nope_index)
        U_k = self._per_query_head(self._maps()[0]).to(queries.dtype)
        q_rope = _gather(queries, rope_index)
        q_nope = _gather(unrotate(queries, *rope_tables), nope_index)
        queries = torch.cat([q_rope, torch.einsum("bhtm,hmr->bhtr", q_nope, U_k)], dim=-1)
        values = key_codes[..., 2 * self.rope_pairs :] if self.mode == "joint" else value_codes
        return queries, key_codes, values

    def decode(self, outputs: torch.Tensor) -> torch.Tensor:
        """(b, t, H, r_v) → (b, t, H, d): each head's output through U_vᵀ."""
        U_v = self._per_query_head(self._maps()[1]).to(outputs.dtype)
        return torch.einsum("bthr,hdr->bthd", outputs, U_v)

    def healing_scope(self) -> str:
        """``'attention'``: after partial RoPE the queries and keys of the dimensions that lost their
        rotation must relearn what to match (benchmarks/results/heal_cpu.md)."""
        return "attention"

    def cached_numbers(self) -> int:
        """Numbers cached per token and layer (over all KV heads)."""
        latent = self.key_rank if self.mode == "joint" else self.key_rank + self.value_rank
        return self.num_kv_heads * (2 * self.rope_pairs + latent)

    def codec_spec(self) -> dict[str, Any]:
        return {
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rope_pairs": self.rope_pairs,
            "key_rank": self.key_rank,
            "value_rank": self.value_rank,
            "mode": self.mode,
        }

    @classmethod
    def from_codec_spec(cls, spec: dict[str, Any], *, device=None, dtype=None) -> LatentKV:
        return cls(
            int(spec["num_heads"]),
            int(spec["num_kv_heads"]),
            int(spec["head_dim"]),
            int(spec["rope_pairs"]),
            int(spec["key_rank"]),
            None if spec.get("value_rank") is None else int(spec["value_rank"]),
            mode=spec.get("mode", "joint"),
            device=device,
            dtype=dtype,
        )

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"rope_dims={2 * self.rope_pairs}, mode={self.mode}, key_rank={self.key_rank}, "
            f"value_rank={self.value_rank}"
        )
