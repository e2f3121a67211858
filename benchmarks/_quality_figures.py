"""The figures of ``compress_quality.py``: the seed paper's four and the ratio-removed grid."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks._quality_report import _rows
from benchmarks._tables import ppl, save_figure


def _series(p, group, method, dec, key):
    pts = []
    for c in _rows(p, group):
        if c["method"] == method and c["decomposer_label"] == dec:
            x = c["ratio"] if c["ratio"] is not None else c["keep_singular_fraction"]
            pts.append((x, key(c)))
    return sorted(pts)


def _lines(ax, p, group, key, methods, decs) -> None:
    styles = {"svd": "-", "rsvd(10,2)": "--", "rsvd(20,4)": ":"}
    colours = {"svd": "tab:red", "svd-llm": "tab:blue", "svd-llm-v2": "tab:green"}
    for method in methods:
        for dec in decs:
            pts = _series(p, group, method, dec, key)
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(
                    xs,
                    ys,
                    styles.get(dec, "-"),
                    marker="o",
                    ms=3,
                    color=colours[method],
                    label=f"{method} {dec}",
                )


def figures(p: dict[str, Any], out_dir: Path, stem: str) -> list[str]:
    """The seed paper's four figures (plus the ratio-removed grid); returns the file names written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    grid_methods = sorted({c["method"] for c in _rows(p, "grid")})
    decs = [
        d
        for d in ("svd", "rsvd(10,2)", "rsvd(20,4)")
        if any(c["decomposer_label"] == d for c in p["configs"].values() if "decomposer_label" in c)
    ]
    orig = p["configs"]["original"]["perplexity"]
    written = []

    def save(fig, name):
        save_figure(fig, out_dir / f"{stem}_{name}.png", dpi=120)
        written.append(f"{stem}_{name}.png")

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, group, xlabel in (
        (axes[0], "grid", "ratio (fraction of linear parameters removed)"),
        (axes[1], "r_sweep", "r (fraction of singular values kept)"),
    ):
        _lines(ax, p, group, lambda c: c["parameters_retained"], ["svd-llm"], ["svd"])
        _lines(ax, p, group, lambda c: c["linear_parameters_retained"], ["svd-llm-v2"], ["svd"])
        ax.set(xlabel=xlabel, ylabel="fraction retained", title="parameters retained")
        ax.legend(["whole model", "targeted linear layers"], fontsize=8)
    save(fig, "params")

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, group, xlabel in ((axes[0], "grid", "ratio removed"), (axes[1], "r_sweep", "r kept")):
        methods = ["svd-llm", "svd-llm-v2", "svd"] if group == "grid" else ["svd-llm"]
        _lines(
            ax,
            p,
            group,
            lambda c: c["time_total_s"],
            [m for m in methods if m in grid_methods or group != "grid"],
            decs,
        )
        ax.set(
            xlabel=xlabel,
            ylabel="seconds (non-sequential, shared Grams)",
            title="compression time: SVD vs rSVD",
        )
        ax.legend(fontsize=7)
    save(fig, "time")

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    base = [
        p["configs"][k]["throughput"]
        for k in ("original", "original_end")
        if "throughput" in p["configs"].get(k, {})
    ]
    for ax, key in ((axes[0], "prefill_tokens_per_s"), (axes[1], "decode_tokens_per_s")):
        pts = sorted((c["ratio"], c["throughput"][key]) for c in _rows(p, "grid") if "throughput" in c)
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, "o-", color="tab:green", label="svd-llm-v2 svd")
        for b in base:
            ax.axhline(b[key], color="k", lw=0.8, ls="--")
        ax.set(xlabel="ratio removed", ylabel="tokens/s (CPU, batch 1)", title=key.replace("_", " "))
        ax.legend(["compressed", "original (start/end)"], fontsize=8)
    save(fig, "throughput")

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = (
        (axes[0], "grid", "wiki", "ratio removed"),
        (axes[1], "grid", "shakespeare", "ratio removed"),
        (axes[2], "r_sweep", "wiki", "r kept"),
    )
    for ax, group, corpus, xlabel in panels:
        _lines(
            ax,
            p,
            group,
            lambda c, corpus=corpus: ppl(c, corpus),
            grid_methods if group == "grid" else ["svd-llm"],
            decs,
        )
        ax.axhline(orig[corpus]["perplexity"], color="k", lw=0.8, ls="--", label="original")
        ax.set(xlabel=xlabel, ylabel=f"{corpus} perplexity (log)", yscale="log", title=f"{corpus} perplexity")
        ax.legend(fontsize=6)
    save(fig, "perplexity")
    return written
