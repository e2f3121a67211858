"""Report of ``benchmarks/decode.py``: the tables, the targets and the figure (tokens/s against context)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks._common import save_figure

__all__ = ["targets", "markdown", "figures"]

TARGETS = {"mla 120": 1.5, "kv-projection post 0.5": 1.2}
"""Decode ratio each method must reach at batch 16 × 8,192 cached tokens."""
PREFILL_FLOOR = 0.9


def _cell(rows: list[dict[str, Any]], **where: Any) -> dict[str, dict[str, Any]]:
    return {r["method"]: r for r in rows if all(r.get(k) == v for k, v in where.items())}


def targets(p: dict[str, Any]) -> dict[str, Any]:
    """Decode ratios at batch 16 × 8k per dtype, prefill ratios at batch 1, and whether peak RSS falls by at
    least the cache saving (95 % of it, for allocator slack)."""
    out: dict[str, Any] = {}
    for dtype in sorted({r["dtype"] for r in p["rows"]}):
        cell = _cell(p["rows"], dtype=dtype, batch=16, context=8192)
        for method, floor in TARGETS.items():
            if method in cell:
                ratio = cell[method]["decode_ratio"]
                out[f"{dtype} {method} b16x8k"] = {
                    "ratio": round(ratio, 3),
                    "target": floor,
                    "met": ratio >= floor,
                }
        base = cell.get("original", {})
        for method, row in cell.items():
            if method == "original" or base.get("peak_rss_above_start_bytes") is None:
                continue
            saving = base["cache_bytes"] - row["cache_bytes"]
            fall = base["peak_rss_above_start_bytes"] - row["peak_rss_above_start_bytes"]
            out[f"{dtype} {method} peak memory"] = {
                "cache_saving_gb": round(saving / 1e9, 3),
                "peak_fall_gb": round(fall / 1e9, 3),
                "met": fall >= 0.95 * saving,
            }
    for row in p["prefill"]:
        if row["method"] != "original":
            key = f"{row['dtype']} {row['method']} prefill"
            out[key] = {"ratio": round(row["prefill_ratio"], 3), "target": PREFILL_FLOOR}
            out[key]["met"] = row["prefill_ratio"] >= PREFILL_FLOOR
    return out


def markdown(p: dict[str, Any]) -> str:
    from lowrank.cli._common import format_table

    env, s = p["env"], p["settings"]
    lines = [
        f"# Decode speed of compressed KV caches: built-in model on {env['device_name']}",
        f"{s['model']}, attention `{p['attn_implementation']}`, torch {env['torch']}, transformers "
        f"{env['transformers']}, {p['torch_threads']} torch threads, git {env['git_sha']}; wall "
        f"{p['wall_seconds']:.0f} s.",
        f"{s['steps']} greedy decode steps per model and round, median of {s['repeats']} rounds after a "
        "warm-up, methods interleaved with the original in each cell. **Caches are not filled by a real "
        f"batch × context prefill**: {s['seed_len']} tokens per sequence are prefilled for real and repeated "
        "to the context through `cache.update` (same cache class, shapes and dtypes; decode cost does not "
        "depend on the content). Quality below is from real prefills.",
        "`decode ×` = decode tokens/s over the original's in the same cell; `KV B/token` measured on the "
        "filled cache object; `peak RSS` = resident high-water mark during one fill + decode above the RSS "
        "before it.",
        "## Quality (real prefill, float32) and size",
    ]
    conv = p.get("conversions") or {}
    quality = [
        (
            m,
            round(q["perplexity"]["wiki"], 2),
            round(q["perplexity"]["shakespeare"], 2),
            f"{q['parameters']:,}",
            conv.get(m, {}).get("kv_bytes_per_token", "–"),
        )
        for m, q in (p.get("quality") or {}).items()
    ]
    lines.append(format_table(quality, ("method", "wiki ppl", "shakespeare ppl", "parameters", "KV B/token")))
    lines.append("## Decode")
    decode = [
        (
            r["dtype"],
            r["context"],
            r["batch"],
            r["method"],
            round(r["kv_bytes_per_token"]),
            round(r["decode_tokens_per_s"], 1),
            round(r["decode_ratio"], 2),
            "–"
            if r["peak_rss_above_start_bytes"] is None
            else round(r["peak_rss_above_start_bytes"] / 1e9, 2),
        )
        for r in p["rows"]
    ]
    headers = ("dtype", "context", "batch", "method", "KV B/token", "decode tok/s", "decode ×", "peak RSS GB")
    lines.append(format_table(decode, headers))
    lines.append("## Prefill (batch 1, real tokens)")
    prefill = [
        (
            r["dtype"],
            r["prefill_tokens"],
            r["method"],
            round(r["prefill_tokens_per_s"], 1),
            round(r["prefill_ratio"], 2),
        )
        for r in p["prefill"]
    ]
    lines.append(format_table(prefill, ("dtype", "tokens", "method", "prefill tok/s", "prefill ×")))
    lines.append("## Targets")
    lines.append("\n".join(f"- {k}: {v}" for k, v in p["targets"].items()))
    if p.get("notes"):
        lines.append("## Notes")
        lines.append("\n".join(f"- {n}" for n in p["notes"]))
    if p.get("skipped"):
        lines.append(f"Skipped (memory limit): {', '.join(p['skipped'])}.")
    if p.get("missing"):
        lines.append(f"Not measured yet: {', '.join(p['missing'])}.")
    return "\n\n".join(lines) + "\n"


def figures(p: dict[str, Any], directory: Path, name: str) -> list[Path]:
    """Decode tokens/s against context, one line per method, one panel per (dtype, batch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["dtype"], r["batch"]) for r in p["rows"]}, key=lambda x: (x[0] != "float32", x[1]))
    if not panels:
        return []
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), squeeze=False)
    for ax, (dtype, batch) in zip(axes[0], panels, strict=True):
        rows = [r for r in p["rows"] if r["dtype"] == dtype and r["batch"] == batch]
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = sorted((r["context"], r["decode_tokens_per_s"]) for r in rows if r["method"] == method)
            ax.plot(*zip(*pts, strict=True), marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{dtype}, batch {batch}")
        ax.set_xlabel("cached tokens per sequence")
        ax.set_ylabel("decode tokens/s")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return [save_figure(fig, directory / f"{name}.png")]
