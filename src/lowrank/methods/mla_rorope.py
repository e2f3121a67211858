"""``mla`` with ``partial_rope='rorope'``: GQA/MHA → DeepSeek-V3 MLA in one shot (TransMLA-grade).

Per layer, from the input Gram G = XᵀX of the attention's input on calibration text (keys, queries and
values are linear in it, so every statistic below is exact):

1. **RoRoPE + FreqFold** (:func:`lowrank.linalg.rorope.rorope`): a change of basis of all KV heads' keys per
   block of ``freqfold`` frequencies (key PCA, or the query-aware balanced map) whose top components form
   ONE rotary key of width ``rope_dim`` turning at every ``rope_stride``-th frequency (default: DeepSeek's
   spread ladder); the other components are position-free.
2. **Whitened joint latent**: the position-free keys and the values of every KV head, jointly, by the top
   ``kv_lora_rank`` left singular vectors of [K_nope/α; V]·S with S Sᵀ = G (``whiten``; plain weight SVD
   without), computed with the configured decomposer. ``latent_objective='kv'`` is TransMLA's BKV-PCA
   (α = ‖K_nope‖/‖V‖ with ``balance``); ``'attention'`` (default) weights the rows by the queries and
   W_O that read them (:func:`_attention_weights`, α = 1). The latent c is what the cache holds, with the
   rotary key.
3. **Per-head maps**: query head i's position-free score is q_iᵀ Φ_i c (Φ_i: d × r). With ``qk_nope_dim`` = d
   that is exact; below d (default d − rope_dim, so q_proj keeps its size and the layer loses parameters)
   Φ_i is truncated by the SVD of C_q^{1/2} Φ_i C_c^{1/2} (the error of the scores on calibration text).
4. The original softmax scale is folded into q_proj (the layer divides by sqrt(d_n + rope_dim), as DeepSeek).

The result is a :class:`~lowrank.attention.deepseek_mla.DeepseekLatentAttention` per layer, caching
``kv_lora_rank + rope_dim`` numbers per token and layer, that :mod:`lowrank.loading.export_deepseek` writes
as a stock ``DeepseekV3ForCausalLM``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lowrank.attention.cache import install_cache
from lowrank.attention.deepseek_mla import DeepseekLatentAttention, LatentRopeCache
from lowrank.calibration.pipeline import RunContext
from lowrank.calibration.statistics import InputGram, StatRequest
from lowrank.linalg import get_decomposer
from lowrank.linalg.rorope import ladder_stride, psd_sqrt, rope_ladder, rorope
from lowrank.linalg.whitening import whiten
from lowrank.methods.base import CompressionResult
from lowrank.methods.records import ModuleKind, ModuleRecord
from lowrank.nn import dense_weight
from lowrank.nn.architectures import get_arch_spec
from lowrank.nn.attention_layout import attention_info, layer_attention
from lowrank.nn.surgery import get_module, replace_module

__all__ = [
    "deepseek_sizes",
    "latent_from_fraction",
    "compress_rorope",
    "convert_attention",
    "resolved_freqfold",
]


def latent_from_fraction(fraction: float, numbers: int, rope: int, unit: str) -> int:
    """The latent width that caches ``round(fraction · numbers)`` values with the ``rope`` rotary ones.

    Raises:
        ValueError: a fraction that leaves no latent (names what it keeps and what to change).
    """
    r = round(float(fraction) * numbers) - rope
    if r < 1:
        raise ValueError(
            f"kv_fraction {fraction} keeps {r + rope} of {numbers} numbers per {unit}, no more than "
            f"rope_dim {rope}: raise it or lower rope_dim"
        )
    return r


def resolved_freqfold(config, head_dim: int) -> int:
    """``config.freqfold``, or its default: 4 where the rotary ladder skips frequencies and 4 divides
    head_dim/2 (chosen on held-out calibration text), else 1 (every block exact)."""
    if config.freqfold is not None:
        return int(config.freqfold)
    stride = ladder_stride(head_dim, int(config.rope_dim), config.rope_stride)
    return 4 if stride > 1 and (head_dim // 2) % 4 == 0 else 1


def deepseek_sizes(config, shape, hidden: int) -> tuple[int, int, int]:
    """(rope_dim, kv_lora_rank, qk_nope_dim) of ``config`` for a model of this shape, validated.

    Raises:
        ValueError: a size that does not fit (names the valid range).
    """
    d, Hkv = shape.head_dim, shape.num_kv_heads
    rope = int(config.rope_dim)
    ladder_stride(d, rope, config.rope_stride)  # validates rope_dim (even, ≤ head_dim) and rope_stride
    fold = resolved_freqfold(config, d)
    if (d // 2) % fold:
        valid = [f for f in range(1, d // 2 + 1) if (d // 2) % f == 0]
        raise ValueError(f"freqfold must be one of {valid} (head_dim {d}); got {fold}")
    full = min(hidden, 2 * Hkv * d - rope)
    if config.kv_fraction is not None:
        r = latent_from_fraction(config.kv_fraction, 2 * Hkv * d, rope, "token and layer")
    else:
        r = 88 if config.kv_lora_rank is None else int(config.kv_lora_rank)
    if not 1 <= r <= full:
        raise ValueError(f"kv_lora_rank must be in [1, {full}] for this model; got {r}")
    nope = d - rope if config.qk_nope_dim is None else int(config.qk_nope_dim)
    if not 0 <= nope <= d:
        raise ValueError(f"qk_nope_dim must be in [0, head_dim] = [0, {d}]; got {nope}")
    return rope, r, nope


def _query_gram(Wq: torch.Tensor, G: torch.Tensor, Hkv: int, d: int) -> torch.Tensor:
    """(H_kv·d)² block-diagonal Gram of the queries, each group's query heads summed at its KV head."""
    Cq = Wq.new_zeros(Hkv * d, Hkv * d)
    for g, W in enumerate(Wq.view(Hkv, -1, d, Wq.shape[-1])):
        Cq[g * d : (g + 1) * d, g * d : (g + 1) * d] = torch.einsum("mdn,nk,mek->de", W, G, W)
    return Cq


def _attention_weights(Wq, Wv, Wo, B_nope, G, tokens: int, layer) -> tuple[torch.Tensor, torch.Tensor]:
    """Ω^{1/2} and Ω^{-1/2} of the ``attention`` latent objective over the rows [K_nope; V].

    A position-free key error e of KV group g moves query head i's logit by s·q_iᵀ B_gᵀ e (s: the softmax
    scale), and a logit error δ moves the head's output by about δ·W_O,i (v − o); a value error e moves it
    by W_O,i e. So the key block is Σ_i λ_i s² B_g C_{q,i} B_gᵀ with C_{q,i} the query second moment and
    λ_i = E‖W_O,i v‖² the head's output spread, and the value block is Σ_{i∈g} W_O,iᵀ W_O,i per group:
    both in units of squared output error per token.
    """
    H, Hkv, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
    groups, per_token = H // Hkv, 1.0 / max(tokens, 1)
    n_nope = B_nope.shape[0]
    omega_k = Wq.new_zeros(n_nope, n_nope)
    omega_v = Wq.new_zeros(Hkv * d, Hkv * d)
    for i in range(H):
        g = i // groups
        W_i, Wo_i, Wv_g = Wq[i * d : (i + 1) * d], Wo[:, i * d : (i + 1) * d], Wv[g * d : (g + 1) * d]
        out = Wo_i @ Wv_g  # (hidden, n): head i's output of its group's values
        spread = float(torch.einsum("hn,nk,hk->", out, G, out)) * per_token
        B_g = B_nope[:, g * d : (g + 1) * d]
        omega_k += (spread * layer.scaling**2 * per_token) * (B_g @ W_i @ G @ W_i.T @ B_g.T)
        omega_v[g * d : (g + 1) * d, g * d : (g + 1) * d] += Wo_i.T @ Wo_i
    k_sqrt, k_isqrt = psd_sqrt(omega_k, 1e-6) if n_nope else (omega_k, omega_k)
    v_sqrt, v_isqrt = psd_sqrt(omega_v, 1e-6)
    return torch.block_diag(k_sqrt, v_sqrt), torch.block_diag(k_isqrt, v_isqrt)


def convert_attention(
    attn: nn.Module, G: torch.Tensor, config, sizes, decompose, tokens: int = 1
) -> tuple[nn.Module, dict]:
    """The DeepSeek-layout replacement of one attention module and its record (see the module docstring);
    ``tokens``: how many calibration tokens G sums over."""
    layer = layer_attention(attn)
    H, Hkv, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
    rope, r, nope = sizes
    groups = H // Hkv
    f64 = dict(dtype=torch.float64, device=G.device)
    G = G.to(**f64)
    Wq = dense_weight(attn.q_proj).detach().to(**f64)
    Wk = dense_weight(attn.k_proj).detach().to(**f64)
    Wv = dense_weight(attn.v_proj).detach().to(**f64)
    bias = any(getattr(getattr(attn, n), "bias", None) is not None for n in ("q_proj", "k_proj", "v_proj"))

    def bias_of(name: str, rows: int) -> torch.Tensor:
        b = getattr(getattr(attn, name), "bias", None)
        return Wq.new_zeros(rows) if b is None else b.detach().to(**f64)

    bq, bk, bv = bias_of("q_proj", H * d), bias_of("k_proj", Hkv * d), bias_of("v_proj", Hkv * d)
    Cq = _query_gram(Wq, G, Hkv, d) if config.rotation == "query-aware" else None
    A, B = rorope(
        Wk @ G @ Wk.T,
        num_kv_heads=Hkv,
        head_dim=d,
        rope_dim=rope,
        freqfold=resolved_freqfold(config, d),
        query_gram=Cq,
        stride=config.rope_stride,
    )
    K, kb = A @ Wk, A @ bk  # keys are affine in x: A (W_k x + b_k)
    K_rope, K_nope = K[:rope], K[rope:]
    energy = torch.einsum("an,nk,ak->a", K, G, K)
    alpha = 1.0
    if config.balance:
        alpha = math.sqrt(
            float(energy[rope:].sum()) / max(float(torch.einsum("an,nk,ak->", Wv, G, Wv)), 1e-300)
        )
    whitening = whiten(G, "eigh") if config.whiten else None
    if config.latent_objective == "attention":
        alpha = 1.0
        Wo = dense_weight(attn.o_proj).detach().to(**f64)
        weight_sqrt, weight_isqrt = _attention_weights(Wq, Wv, Wo, B[rope:], G, tokens, layer)
    else:
        weight_sqrt = weight_isqrt = None
    M = torch.cat([K_nope / alpha, Wv])
    Mo = M if weight_sqrt is None else weight_sqrt @ M  # the rows whose error the latent minimises
    Mw = Mo if whitening is None else whitening.apply(Mo)
    U, S, _ = decompose(Mw, r)
    total = float(Mw.square().sum())
    latent_loss = max(total - float(S.square().sum()), 0.0) / total if total > 0 else 0.0
    L = U.T @ Mo  # (r, n): the latent's rows of kv_a_proj_with_mqa
    up = U if weight_isqrt is None else weight_isqrt @ U  # M ≈ up · L
    B_k, B_v = alpha * up[: K_nope.shape[0]], up[K_nope.shape[0] :]
    scale = layer.scaling * math.sqrt(nope + rope)
    C_c = L @ G @ L.T
    C_c_sqrt, C_c_isqrt = psd_sqrt(C_c)
    q_rows, q_bias, b_rows, query_losses = [], [], [], []
    for i in range(H):
        g = i // groups
        W_i, B_g, b_i = Wq[i * d : (i + 1) * d], B[:, g * d : (g + 1) * d], bq[i * d : (i + 1) * d]
        Phi = B_g[rope:].T @ B_k  # (d, r): query head i's position-free score is q_iᵀ Φ c
        if nope == d:
            q_nope, q_nope_bias, k_rows, loss = W_i, b_i, Phi, 0.0
        else:
            C_q_sqrt, C_q_isqrt = psd_sqrt(W_i @ G @ W_i.T)
            Us, Ss, Vhs = torch.linalg.svd(C_q_sqrt @ Phi @ C_c_sqrt)  # Us: (d, d), Vhs: (r, r)
            q_map = Us[:, :nope].T @ C_q_isqrt
            q_nope, q_nope_bias = q_map @ W_i, q_map @ b_i
            k = min(nope, Ss.numel())  # the form's rank is at most min(d, r): any further rows are zero
            k_rows = Phi.new_zeros(nope, r)
            k_rows[:k] = Ss[:k, None] * Vhs[:k] @ C_c_isqrt
            loss = float(Ss[nope:].square().sum() / Ss.square().sum().clamp_min(1e-300))
        query_losses.append(loss)
        q_rows += [q_nope * scale, (B_g[:rope] @ W_i) * scale]
        q_bias += [q_nope_bias * scale, (B_g[:rope] @ b_i) * scale]
        b_rows += [k_rows, B_v[g * d : (g + 1) * d]]
    module = DeepseekLatentAttention(
        attn,
        kv_lora_rank=r,
        qk_rope_head_dim=rope,
        qk_nope_head_dim=nope,
        rope_frequencies=rope_ladder(d, rope, config.rope_stride),
        bias=bias,
        layer=layer,
    )
    with torch.no_grad():
        for linear, rows in (
            (module.q_proj, q_rows),
            (module.kv_a_proj_with_mqa, [L, K_rope]),
            (module.kv_b_proj, b_rows),
        ):
            linear.weight.copy_(torch.cat(rows).to(linear.weight))
        if bias:
            biases = torch.cat([kb[rope:] / alpha, bv])
            latent_bias = U.T @ (biases if weight_sqrt is None else weight_sqrt @ biases)
            module.q_proj.bias.copy_(torch.cat(q_bias).to(module.q_proj.bias))
            module.kv_a_proj_with_mqa.bias.copy_(torch.cat([latent_bias, kb[:rope]]).to(module.q_proj.bias))
    record = {
        "rope_energy": float(energy[:rope].sum() / energy.sum().clamp_min(1e-300)),
        "alpha": alpha,
        "latent_relative_loss": latent_loss,
        "query_nope_relative_loss": sum(query_losses) / len(query_losses),
        "whitening_fallback": bool(whitening is not None and whitening.fallback),
    }
    return module, record


def compress_rorope(model: nn.Module, config, ctx: RunContext) -> CompressionResult:
    """Convert every decoder layer's attention to DeepSeek-layout MLA (one calibrated pass)."""
    spec, info = get_arch_spec(model), attention_info(model)
    shape = info.shape
    hidden = model.config.get_text_config(decoder=True).hidden_size
    sizes = deepseek_sizes(config, shape, hidden)
    decompose = get_decomposer(config.decomposer)

    def requests(index: int, layer: nn.Module) -> dict[str, StatRequest]:
        return {"input": StatRequest(spec.linears["k"], lambda: InputGram(config.calibration.dtype))}

    def process(index: int, layer: nn.Module, stats: dict) -> dict[str, Any]:
        attn = get_module(layer, spec.attention)
        with ctx.timings.measure("decomposition"), torch.no_grad():
            gram = stats["input"]
            module, record = convert_attention(attn, gram.gram, config, sizes, decompose, gram.tokens)
        replace_module(layer, spec.attention, module)
        return {"entry": record}

    records = ctx.layer_pass(
        requests,
        process,
        calibration=config.calibration,
        key=config.to_dict(),
        min_tokens_for=hidden,
        desc="mla",
    )
    install_cache(model, LatentRopeCache, {})
    rope, r, nope = sizes
    modules = {
        f"{spec.layers}.{rec['layer']}.{spec.attention}": ModuleRecord(
            kind=ModuleKind.ATTENTION,
            rank=r,
            loss=rec["entry"]["latent_relative_loss"],
            fallback=rec["entry"]["whitening_fallback"],
            metrics={k: v for k, v in rec["entry"].items() if k != "whitening_fallback"},
        )
        for rec in records
    }
    fallbacks = [n for n, m in modules.items() if m.fallback]
    mean = lambda key: sum(m.metrics[key] for m in modules.values()) / max(len(modules), 1)  # noqa: E731
    return CompressionResult(
        method=config.method,
        config=config.to_dict(),
        modules=modules,
        details={
            "decomposer": config.decomposer.to_dict(),
            "partial_rope": "rorope",
            "rope_dim": rope,
            "rope_frequencies": rope_ladder(shape.head_dim, rope, config.rope_stride).tolist(),
            "freqfold": resolved_freqfold(config, shape.head_dim),
            "latent_objective": config.latent_objective,
            "kv_lora_rank": r,
            "qk_nope_dim": nope,
            "cached_per_token_layer": r + rope,
            "kv_fraction": round((r + rope) / (2 * shape.num_kv_heads * shape.head_dim), 6),
            "mean_rope_energy": mean("rope_energy"),
            "mean_latent_relative_loss": mean("latent_relative_loss"),
            "cache_class": "LatentRopeCache",
        },
        fallbacks=len(fallbacks),
        fallback_modules=fallbacks,
    )
