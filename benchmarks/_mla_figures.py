"""The figure of ``mla.py``: wiki perplexity against measured KV bytes per token."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks._mla_report import VARIANTS, _sweep_rows, _variant
from benchmarks._tables import ppl, save_figure


def figure(p: dict[str, Any], out_dir: Path, stem: str) -> str | None:
    """Wiki perplexity against KV bytes per token, one line per variant; returns the file name."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    base = p["configs"]["baseline"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in VARIANTS.values():
        rows = [
            c
            for c in _sweep_rows(p, rope_dim=8, rope_selection="2-norm", latent="joint")
            if _variant(c) == label and c["kv_fraction"] < 1
        ]
        rows.sort(key=lambda c: c["kv_bytes_per_token"])
        if rows:
            ax.plot([c["kv_bytes_per_token"] for c in rows], [ppl(c) for c in rows], "o-", label=label)
    others = [
        c
        for c in _sweep_rows(p)
        if (c["rope_dim"], c["rope_selection"], c["latent"]) != (8, "2-norm", "joint")
    ]
    for whiten, marker in ((False, "x"), (True, "+")):
        pts = [c for c in others if c["whiten"] == whiten]
        if pts:
            ax.plot(
                [c["kv_bytes_per_token"] for c in pts],
                [ppl(c) for c in pts],
                marker,
                color="gray",
                label=f"{_variant(pts[0])}, other rope_dim / selection / split (31.25 %)",
            )
    full = [c for c in _sweep_rows(p, rope_dim=8, rope_selection="2-norm") if c["kv_fraction"] >= 1]
    if full:
        ax.plot(
            [c["kv_bytes_per_token"] for c in full],
            [ppl(c) for c in full],
            "s",
            color="purple",
            label="partial RoPE alone (rope_dim 8, full latent rank)",
        )
    ax.plot([base["kv_bytes_per_token"]], [ppl(base)], "k*", markersize=12, label="baseline")
    ax.axhline(ppl(base), color="k", linestyle=":", linewidth=0.8)
    ax.set_yscale("log")
    ax.set(
        xlabel="KV-cache bytes per token (float32, measured)",
        ylabel=f"wiki perplexity ({p['settings']['windows']} × 512 tokens)",
        title=f"MHA → MLA on {p['settings']['model']}: 2-norm RoPE, rope_dim 8, joint latent",
    )
    ax.legend(fontsize=7, loc="center right")
    name = f"{stem}_ppl_vs_kv_bytes.png"
    save_figure(fig, out_dir / name, dpi=120)
    return name
