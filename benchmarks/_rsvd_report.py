"""Markdown, JSON and PNG output of the SVD benchmark."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from benchmarks._tables import save_figure, table
from lowrank.io.files import write_json, write_text

__all__ = ["markdown", "plot", "write_outputs"]

logger = logging.getLogger(__name__)


def _main_table(rows: list[dict[str, Any]]) -> str:
    body = [
        [
            r["matrix"],
            r["rank"],
            r["method"],
            f"{r['time_s']:.4f}",
            f"{r['speedup']:.2f}x",
            f"{r['rel_error']:.6f}",
            f"{r['delta_vs_svd']:.6f}",
        ]
        for r in rows
    ]
    return table(body, ["Matrix", "Rank", "Method", "Time (s)", "Speedup", "Rel Error", "Δ vs SVD"])


def _targets(t: dict[str, Any]) -> list[str]:
    out = [f"## Targets (shapes divided by {t['scale']})" if t["scale"] != 1 else "## Targets"]
    rows = [
        [e["family"], e["matrix"], e["config"], f"{e['speedup']:.2f}x", f"{100 * e['error_rel_diff']:+.2f} %"]
        for e in t["vs_svd_lowrank"]
    ]
    out += [
        "### vs torch.svd_lowrank (Table 1 matrices, same p, q)",
        table(rows, ["family", "matrix", "(p, q)", "speed-up", "error vs torch"]),
    ]
    rows = [
        [
            f"{e['shape'][0]}×{e['shape'][1]}",
            e["rank"],
            f"{e['time_s']:.4f}",
            f"{e['torch_time_s']:.4f}",
            f"{e['speedup']:.2f}x",
            f"{100 * e['error_rel_diff']:+.2f} %",
        ]
        for e in t["wide_vs_svd_lowrank"]
    ]
    out += [
        "### Wide matrix, (p, q) = (10, 2)",
        table(rows, ["shape", "rank", "lowrank (s)", "torch (s)", "speed-up", "error vs torch"]),
    ]
    rows = [
        [
            f"{e['shape'][0]}×{e['shape'][1]}",
            e["family"],
            e["rank"],
            f"{e['time_s']:.4f}",
            f"{e['svd_time_s']:.4f}",
            f"{e['speedup']:.2f}x",
            f"{e['rel_error']:.6f}",
            f"{e['svd_rel_error']:.6f}",
            f"{e['sigma_r_rel_diff']:.1e}",
            e["fell_back_to_svd"],
        ]
        for e in t["exact_route"]
    ]
    out += [
        "### Exact route (Gram + float64 eigh) vs torch.linalg.svd",
        table(
            rows,
            [
                "shape",
                "family",
                "rank",
                "lowrank (s)",
                "linalg.svd (s)",
                "speed-up",
                "error",
                "svd error",
                "σ_r rel. diff",
                "fell back",
            ],
        ),
    ]
    a = t["auto_crossover"]
    rows = [
        [
            e["fraction"],
            e["rank"],
            f"{e['exact_s']:.4f}",
            f"{e['rsvd_s']:.4f}",
            f"{e['auto_s']:.4f}",
            f"{e['auto_vs_best']:.2f}",
        ]
        for e in a["rows"]
    ]
    out += [
        f"### auto: crossover at rank fraction {a['crossover_fraction']} of {a['shape'][0]}² "
        f"(auto switches above {a['auto_rank_fraction']}); worst auto / best = {a['worst_auto_vs_best']:.2f}",
        table(rows, ["rank / n", "rank", "exact (s)", "rsvd 10,2 (s)", "auto (s)", "auto / best"]),
    ]
    rows = [
        [
            e["method"],
            f"{e['batch']}×{e['shape'][0]}×{e['shape'][1]}",
            e["rank"],
            f"{e['batched_s']:.4f}",
            f"{e['loop_s']:.4f}",
            f"{e['speedup']:.2f}x",
        ]
        for e in t["batched"]
    ]
    out += [
        "### Batched vs loop",
        table(rows, ["method", "batch", "rank", "batched (s)", "loop (s)", "speed-up"]),
    ]
    k = t["krylov_equal_time"]
    rows = [
        [
            e["method"],
            f"{e['time_s']:.4f}",
            f"{e['gap']:.2e}",
            "" if e.get("gap_ratio") is None else f"{e['gap_ratio']:.2f}",
        ]
        for e in k["rows"]
    ]
    out += [
        f"### Accuracy option on a decaying spectrum {k['shape'][0]}², rank {k['rank']} "
        f"(optimal error {k['optimal_error']:.5f})",
        table(rows, ["method", "time (s)", "gap to optimal", "gap / rsvd gap at equal time"]),
    ]
    rows = [
        [
            e["tol"],
            e["rank"],
            e["optimal_rank"],
            f"{e['rel_error']:.4f}",
            f"{e['time_s']:.4f}",
            f"{e['rsvd_same_rank_s']:.4f}",
        ]
        for e in t["tolerance"]
    ]
    out += [
        "### Rank by tolerance",
        table(rows, ["tol", "rank", "optimal rank", "error", "time (s)", "rsvd at that rank (s)"]),
    ]
    return out


def markdown(payload: dict[str, Any]) -> str:
    """The whole report as Markdown: one Table-1 block per family, then the targets."""
    p = payload["provenance"]
    out = [
        f"# Exact vs randomized SVD ({p['device_name']}, torch {p['torch']}, {p['threads']} threads)",
        "Time: median of repeats after a warm-up, device synchronised. Rel Error: ‖A − A_r‖_F / ‖A‖_F. "
        "Rank: number of singular values kept.",
    ]
    for family in dict.fromkeys(r["family"] for r in payload["rows"]):
        out += [f"## {family}", _main_table([r for r in payload["rows"] if r["family"] == family])]
    if "targets" in payload:
        try:
            out += _targets(payload["targets"])
        except (KeyError, TypeError) as exc:  # a target that failed is reported in the JSON
            out.append(f"Targets incomplete ({type(exc).__name__}: {exc}); see the JSON")
    out.append(f"Fallbacks during the run: {payload.get('fallbacks') or 'none'}")
    return "\n\n".join(out) + "\n"


def plot(payload: dict[str, Any], path: Path) -> Path | None:
    """Time vs size per method and error gap vs size (synthetic families); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed: no PNG written")
        return None
    families = [f for f in dict.fromkeys(r["family"] for r in payload["rows"]) if f != "weights"]
    if not families:  # the plot is per size of the square synthetic matrices
        logger.info("no synthetic family in the results: no PNG written")
        return None
    fig, axes = plt.subplots(len(families), 2, figsize=(12, 4.2 * len(families)), squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in payload["rows"]))
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    for ax_t, ax_e, family in ((a[0], a[1], f) for a, f in zip(axes, families, strict=True)):
        rows = [r for r in payload["rows"] if r["family"] == family]
        sizes = sorted({r["m"] for r in rows})
        for method in methods:
            pts = [(r["m"], r["time_s"], r["delta_vs_svd"]) for r in rows if r["method"] == method]
            x = [p[0] for p in pts]
            style = dict(ls="--" if method.startswith(("torch.", "sklearn")) else "-", marker="o", ms=3)
            ax_t.plot(x, [p[1] for p in pts], color=colors[method], label=method, **style)
            if method.startswith(("lowrank rsvd", "lowrank krylov", "torch.", "sklearn")):
                ax_e.plot(x, [max(p[2], 1e-7) for p in pts], color=colors[method], label=method, **style)
        for ax in (ax_t, ax_e):
            ax.set_xscale("log")
            ax.set_xticks(sizes, [str(n) for n in sizes], fontsize=7)
            ax.minorticks_off()
        ax_t.set(yscale="log", xlabel="n (n×n matrix)", ylabel="time (s)", title=f"{family}: time")
        ax_e.set(
            yscale="log",
            xlabel="n (n×n matrix)",
            ylabel="rel. error − exact SVD's (floor 1e-7)",
            title=f"{family}: error gap to the optimum",
        )
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{payload['provenance']['device_name']}, torch {payload['provenance']['torch']}")
    return save_figure(fig, path)


def write_outputs(payload: dict[str, Any], text: str, out: Path) -> None:
    """``<out>.json``, ``<out>.md`` and ``<out>.png`` (PNG only when matplotlib is available)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out.with_suffix(".json"), payload)
    write_text(out.with_suffix(".md"), text)
    plot(payload, out.with_suffix(".png"))
