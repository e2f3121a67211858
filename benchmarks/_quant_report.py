"""Table, equal-memory comparison and Pareto figure of ``quantize.py`` (apart from the measuring loop)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CORPORA = ("wiki", "shakespeare")


def _label(p: dict[str, Any]) -> str:
    bits = "float32" if p["bits"] is None else f"{p['bits']}-bit"
    if p["ratio"] is None:
        return "original (float32)" if p["bits"] is None else f"quantize {bits}"
    return f"svd-llm-v2 {p['ratio']:.0%} removed" + ("" if p["bits"] is None else f" + {bits}")


def pareto(points: list[dict[str, Any]], corpus: str = "wiki") -> list[dict[str, Any]]:
    """The points no other point beats on both linear bytes and ``corpus`` perplexity, by bytes."""
    ordered = sorted(points, key=lambda p: (p["linear_bytes"], p["perplexity"][corpus]))
    front, best = [], float("inf")
    for p in ordered:
        if p["perplexity"][corpus] < best:
            front.append(p)
            best = p["perplexity"][corpus]
    return front


def equal_memory(points: list[dict[str, Any]], corpus: str = "wiki") -> list[dict[str, Any]]:
    """For each quantization-alone point: the best low-rank + quantization point within its linear bytes."""
    out = []
    combos = [p for p in points if p["ratio"] is not None and p["bits"] is not None]
    for q in sorted(
        (p for p in points if p["ratio"] is None and p["bits"] is not None), key=lambda p: p["bits"]
    ):
        fitting = [c for c in combos if c["linear_bytes"] <= q["linear_bytes"]]
        best = min(fitting, key=lambda c: c["perplexity"][corpus], default=None)
        out.append(
            {
                "budget": _label(q),
                "budget_linear_bytes": q["linear_bytes"],
                "quantize_alone_ppl": q["perplexity"][corpus],
                "best_combination": None if best is None else _label(best),
                "combination_linear_bytes": None if best is None else best["linear_bytes"],
                "combination_ppl": None if best is None else best["perplexity"][corpus],
                "winner": None
                if best is None
                else (
                    "combination"
                    if best["perplexity"][corpus] < q["perplexity"][corpus]
                    else "quantize alone"
                ),
            }
        )
    return out


def report(state: dict[str, Any], figure_path: Path) -> tuple[str, dict[str, Any], Path | None]:
    """(Markdown, summary, figure path or None when matplotlib is missing)."""
    s = state["settings"]
    points = list(state["configs"].values())
    original = next((p for p in points if p["ratio"] is None and p["bits"] is None), None)
    base_bytes = original["linear_bytes"] if original else None
    lines = [
        f"# Low-rank plus quantization on {s['model']} (CPU)",
        "",
        f"Perplexity on the first {s['windows']} wiki-test and {s['windows_shakespeare']} shakespeare "
        "windows of 512 tokens, every point in the same run. quantize = HQQ (hqq 0.2.8.post1) weight-only, "
        f"group size {s['group_size']}, scales and zero points in float16, on every linear layer of the "
        "decoder (both factors of a low-rank layer); svd-llm-v2 calibrated on "
        f"{s['calib_samples']} × {s['calib_seq_len']} wiki calibration tokens (one shared Gram pass). "
        "Ratio convention: svd-llm-v2 % = fraction of the decoder-linear parameters REMOVED. Bytes as "
        "stored: linear bytes = the decoder's linear layers (packed weights + scales + zero points, or "
        "float32 factors); weight bytes = the whole model, embeddings, norms and output head included "
        "(float32 in every point). bits/weight = 8 × linear bytes / original decoder-linear parameters.",
        "",
        "| point | linear bytes | × original | bits/weight | weight bytes | wiki ppl | shakespeare ppl |",
        "|---|---|---|---|---|---|---|",
    ]
    params = base_bytes / 4 if base_bytes else None
    for p in sorted(points, key=lambda p: -p["linear_bytes"]):
        ratio = f"{p['linear_bytes'] / base_bytes:.3f}" if base_bytes else "–"
        bpw = f"{8 * p['linear_bytes'] / params:.2f}" if params else "–"
        lines.append(
            f"| {_label(p)} | {p['linear_bytes']:,} | {ratio} | {bpw} | {p['weight_bytes']:,} | "
            f"{p['perplexity']['wiki']:.2f} | {p['perplexity']['shakespeare']:.2f} |"
        )
    front = {c: [_label(p) for p in pareto(points, c)] for c in CORPORA}
    comparisons = {c: equal_memory(points, c) for c in CORPORA}
    lines += [
        "",
        "## At equal memory",
        "",
        "Each quantization-alone point sets a budget (its linear bytes); the best svd-llm-v2 + quantize "
        "point that fits within it is compared on perplexity.",
        "",
        "| corpus | budget | quantize alone ppl | best combination within budget | its linear bytes "
        "| its ppl | winner | ppl ratio (combination / alone) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for corpus in CORPORA:
        for row in comparisons[corpus]:
            if row["best_combination"] is None:
                lines.append(
                    f"| {corpus} | {row['budget']} ({row['budget_linear_bytes']:,} B) | "
                    f"{row['quantize_alone_ppl']:.2f} | none fits | – | – | quantize alone | – |"
                )
                continue
            lines.append(
                f"| {corpus} | {row['budget']} ({row['budget_linear_bytes']:,} B) | "
                f"{row['quantize_alone_ppl']:.2f} | {row['best_combination']} | "
                f"{row['combination_linear_bytes']:,} | {row['combination_ppl']:.2f} | {row['winner']} | "
                f"{row['combination_ppl'] / row['quantize_alone_ppl']:.3g} |"
            )
    lines += ["", "Pareto front (linear bytes vs perplexity):", ""]
    lines += [f"- {c}: " + " → ".join(front[c]) for c in CORPORA]
    figure = _figure(points, figure_path)
    if figure is not None:
        lines += ["", f"![perplexity vs linear bytes]({figure.name})"]
    return "\n".join(lines) + "\n", {"pareto": front, "equal_memory": comparisons}, figure


def _figure(points: list[dict[str, Any]], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return None
    from benchmarks._common import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    series: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        name = "quantize alone" if p["ratio"] is None else f"svd-llm-v2 {p['ratio']:.0%} + quantize"
        if p["bits"] is None:
            name = "float32 (original / svd-llm-v2 alone)"
        series.setdefault(name, []).append(p)
    for ax, corpus in zip(axes, CORPORA, strict=True):
        for name, group in series.items():
            group = sorted(group, key=lambda p: p["linear_bytes"])
            ax.plot(
                [p["linear_bytes"] / 2**20 for p in group],
                [p["perplexity"][corpus] for p in group],
                marker="o",
                linestyle="-" if "quantize" in name else "none",
                label=name,
            )
            for p in group:
                if p["bits"] is not None:
                    ax.annotate(
                        str(p["bits"]), (p["linear_bytes"] / 2**20, p["perplexity"][corpus]), fontsize=7
                    )
        front = pareto(points, corpus)
        ax.plot(
            [p["linear_bytes"] / 2**20 for p in front],
            [p["perplexity"][corpus] for p in front],
            color="black",
            linewidth=0.8,
            linestyle=":",
            label="Pareto front",
        )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks([16, 32, 64, 128, 256, 512], labels=["16", "32", "64", "128", "256", "512"])
        ax.set_xlabel("decoder linear bytes (MiB, as stored)")
        ax.set_ylabel(f"{corpus} perplexity")
        ax.set_title(f"{corpus} (labels: bits per weight)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    return save_figure(fig, path)
