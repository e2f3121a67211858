"""RoRoPE: one shared rotary key for all KV heads, by a change of basis that commutes with RoPE.

In the rotate-half convention, frequency i of head h is the complex coordinate ``k[h, i] + 1j·k[h, i + d/2]``
and RoPE multiplies it by ``exp(1j·θ_i·t)``, the same phase for every head. Any real map T that mixes the
coordinates of one block of frequencies across heads, applied alike to the real and the imaginary halves,
commutes with RoPE exactly when the block holds one frequency; keys map by T and queries by T⁻ᵀ, so every
query-key product is unchanged. TransMLA takes T orthogonal from the PCA of the keys (real and imaginary
halves as separate samples); the top components of a block then keep RoPE and the rest become position-free.
With ``freqfold`` f > 1 adjacent frequencies share one block (the map mixes frequencies, so it is exact
only at f = 1).

The kept components rotate at every ``stride``-th frequency, j < rope_dim/2. TransMLA's ladder takes
``stride = head_dim / rope_dim``: the frequencies ``θ_{j·stride}`` are exactly those of DeepSeek's rotary key
of width ``rope_dim`` with the same base (``base^(−2j/rope_dim)``). A smaller stride keeps the faster
frequencies and leaves the slowest ones, which barely turn over a context, position-free; its stock
rotary key has base ``base^(stride · rope_dim / head_dim)``.

The query-aware choice balances keys against queries (the KQᵀ objective): with K-Gram Lk Lkᵀ and Q-Gram
Lq Lqᵀ, ``Lqᵀ Lk = U Σ Vᵀ`` and ``T = Σ^{-1/2} Uᵀ Lqᵀ``: both the keys' and the queries' Grams become Σ, so
component c carries score energy σ_c² and the kept ones are those whose loss of position would cost most
(balanced truncation). T is then not orthogonal; queries map by ``T⁻ᵀ = Σ^{-1/2} Vᵀ Lkᵀ``.

References:
    Meng et al., "TransMLA: Multi-Head Latent Attention Is All You Need", 2025 (RoRoPE, FreqFold, BKV-PCA);
    Moore, "Principal component analysis in linear systems", 1981 (balanced truncation).
"""

from __future__ import annotations

import torch

__all__ = ["ROTATIONS", "ladder_stride", "rope_ladder", "rorope", "psd_sqrt"]

ROTATIONS = ("key", "query-aware")


def ladder_stride(head_dim: int, rope_dim: int, stride: int | None = None) -> int:
    """The validated stride of the rotary key's ladder: ``stride``, or its default ``⌊d / rope_dim⌋`` (for a
    divisor of d, DeepSeek's and TransMLA's ladder, spread over the whole band, same base).

    Raises:
        ValueError: ``rope_dim`` is odd or outside [2, head_dim], or ``stride`` reaches past the head's
            frequencies (names the valid values).
    """
    if (
        isinstance(rope_dim, bool)
        or not isinstance(rope_dim, int)
        or not 2 <= rope_dim <= head_dim
        or rope_dim % 2
    ):
        raise ValueError(f"rope_dim must be even and in [2, head_dim] = [2, {head_dim}]; got {rope_dim!r}")
    widest = (head_dim // 2) // (rope_dim // 2)
    if stride is None:
        return widest
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= widest:
        raise ValueError(
            f"rope_stride must be an integer in [1, {widest}] (head_dim {head_dim}, rope_dim {rope_dim}); "
            f"got {stride!r}"
        )
    return stride


def rope_ladder(head_dim: int, rope_dim: int, stride: int | None = None) -> torch.Tensor:
    """Frequency indices (of the head's d/2) that the shared rotary key keeps: ``j · stride``, j < rope_dim/2.

    ``stride``: see :func:`ladder_stride`; ``1`` keeps the ``rope_dim/2`` fastest frequencies. Any stride is
    one geometric ladder from frequency 0, so a stock rotary key of width ``rope_dim`` with base
    ``base^(stride · rope_dim/d)`` turns at exactly these frequencies.

    Raises:
        ValueError: as :func:`ladder_stride`.
    """
    stride = ladder_stride(head_dim, rope_dim, stride)
    return torch.arange(0, stride * (rope_dim // 2), stride)


def psd_sqrt(C: torch.Tensor, damping: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric square root of a PSD matrix and its inverse, after adding ``damping · mean(diag)`` · I.

    Eigenvalues below ``1e-12 · max`` are clamped, so the inverse stays finite on rank-deficient Grams.
    """
    n = C.shape[-1]
    C = C + damping * C.diagonal().mean() * torch.eye(n, dtype=C.dtype, device=C.device)
    w, V = torch.linalg.eigh(C)
    w = w.clamp_min(max(float(w.max()), 1e-300) * 1e-12)
    return (V * w.sqrt()) @ V.mT, (V * w.rsqrt()) @ V.mT


def _block_map(Ck: torch.Tensor, Cq: torch.Tensor | None, damping: float):
    """(T, T⁻ᵀ) for one block, components ordered by importance."""
    if Cq is None:
        n = Ck.shape[-1]
        damped = Ck + damping * Ck.diagonal().mean() * torch.eye(n, dtype=Ck.dtype, device=Ck.device)
        _, V = torch.linalg.eigh(damped)
        T = V.flip(-1).mT
        return T, T
    Lk, _ = psd_sqrt(Ck, damping)
    Lq, _ = psd_sqrt(Cq, damping)
    U, S, Vh = torch.linalg.svd(Lq.mT @ Lk)
    s = S.clamp_min(float(S.max()) * 1e-12).rsqrt()
    return s[:, None] * (U.mT @ Lq.mT), s[:, None] * (Vh @ Lk.mT)


def rorope(
    key_gram: torch.Tensor,
    *,
    num_kv_heads: int,
    head_dim: int,
    rope_dim: int,
    freqfold: int = 1,
    query_gram: torch.Tensor | None = None,
    damping: float = 0.01,
    stride: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The RoRoPE change of basis of one layer's keys (and queries).

    Args:
        key_gram: (D, D) Gram KᵀK of the pre-RoPE keys of all KV heads, D = H_kv · d, head-major
            (feature ``h·d + k``).
        num_kv_heads, head_dim: H_kv, d.
        rope_dim: width of the shared rotary key (see :func:`rope_ladder`).
        freqfold: adjacent frequencies per block (divides d/2).
        query_gram: (D, D) Gram of the queries in the same coordinates (each query head embedded at its
            KV head's block, summed over heads): the query-aware (balanced) map; ``None``: key PCA.
        damping: ``damping · mean(diag)`` added to each block's Gram (TransMLA: 1 %).
        stride: the rotary key's frequency ladder (see :func:`rope_ladder`; default d / rope_dim).

    Returns:
        ``(A, B)``, both (D, D): new keys ``A k`` and queries ``B q`` with ``(B q)·(A k) = q·k``
        (``B = A⁻ᵀ``; ``B = A`` for key PCA). Rows ``[0, rope_dim)`` are the shared rotary key in
        rotate-half layout (row j and row j + rope_dim/2 are the real and imaginary parts rotating at
        frequency ``rope_ladder(d, rope_dim, stride)[j]``); rows ``[rope_dim, D)`` are position-free.

    Raises:
        ValueError: sizes that do not fit (the message names the valid values).
    """
    half, H = head_dim // 2, num_kv_heads
    ladder = rope_ladder(head_dim, rope_dim, stride)
    if freqfold < 1 or half % freqfold:
        valid = [f for f in range(1, half + 1) if half % f == 0]
        raise ValueError(f"freqfold must be one of {valid} (head_dim {head_dim}); got {freqfold}")
    D = H * head_dim
    if key_gram.shape != (D, D) or (query_gram is not None and query_gram.shape != (D, D)):
        raise ValueError(
            f"Grams must be ({D}, {D}) for {H} KV heads of {head_dim}; got {tuple(key_gram.shape)}"
        )
    kept = set(ladder.tolist())
    slot = {int(i): j for j, i in enumerate(ladder.tolist())}
    A = key_gram.new_zeros(D, D)
    B = key_gram.new_zeros(D, D)
    heads = torch.arange(H) * head_dim
    free = rope_dim  # next position-free row
    for start in range(0, half, freqfold):
        freqs = torch.arange(start, start + freqfold)
        re = (freqs[:, None] + heads[None, :]).reshape(-1)  # (f·H,) ordered (frequency, head)
        im = re + half
        Ck = key_gram[re][:, re] + key_gram[im][:, im]
        Cq = None if query_gram is None else query_gram[re][:, re] + query_gram[im][:, im]
        T, Tq = _block_map(Ck, Cq, damping)
        rotary = [slot[int(i)] for i in freqs if int(i) in kept]
        for c in range(T.shape[0]):
            if c < len(rotary):
                rows = (rotary[c], rotary[c] + rope_dim // 2)
            else:
                rows, free = (free, free + 1), free + 2
            for row, cols in zip(rows, (re, im), strict=True):
                A[row, cols] = T[c]
                B[row, cols] = Tq[c]
    return A, B
