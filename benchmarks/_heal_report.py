"""Table and figure of ``heal.py`` (kept apart from the measuring loop)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

CORPORA = ("wiki", "shakespeare")


def _recovered(original: float, compressed: float, healed: float) -> float | None:
    """Share of the log-perplexity lost by compression that healing won back (None when nothing was lost)."""
    lost = math.log(compressed) - math.log(original)
    return None if lost <= 0 else (math.log(compressed) - math.log(healed)) / lost


def _compute(healed: dict[str, Any]) -> str:
    return healed["details"].get("compute_dtype", "float32")


def _source(healed: dict[str, Any]) -> str:
    return healed.get("source", "corpus")


_OBJECTIVE_LABELS = {"kd_weight": "KD weight", "temperature": "T", "hidden_weight": "hidden"}


def objective_defaults() -> dict[str, float]:
    """HealConfig's distillation objective (``kd_weight``, ``temperature``, ``hidden_weight``): what runs
    recorded before the benchmark compared objectives used, and what result keys and labels leave out."""
    from lowrank.methods import HealConfig

    return {name: getattr(HealConfig, name) for name in _OBJECTIVE_LABELS}


def _objective(healed: dict[str, Any]) -> dict[str, float]:
    """The objective of a run (HealConfig's default for what it does not record)."""
    return {name: healed.get(name, default) for name, default in objective_defaults().items()}


def _objective_label(healed: dict[str, Any]) -> str:
    defaults = objective_defaults()
    return "".join(
        f", {_OBJECTIVE_LABELS[n]} {v:g}" for n, v in _objective(healed).items() if v != defaults[n]
    )


def reference_key(healed: dict[str, Any]) -> str:
    """Key of the original's held-out cross-entropy that a run is measured against: its budget, compute
    and, for text the original sampled, the source (other held-out sequences)."""
    key = f"{healed['tokens']}@{_compute(healed)}"
    return key if _source(healed) == "corpus" else f"{key}@{_source(healed)}"


def _run_label(healed: dict[str, Any], compute: bool = True) -> str:
    """'lr 0.0001', 'lr 0.0001, bfloat16' or 'lr 1e-05, bfloat16, trains all, teacher text': what tells
    apart the runs of one configuration and budget (``compute=False``: the same recipe at any compute)."""
    dtype, trainable = _compute(healed), healed["details"].get("trainable", "replaced")
    return (
        f"lr {healed['learning_rate']:g}"
        + ("" if dtype == "float32" or not compute else f", {dtype}")
        + ("" if trainable == "replaced" else f", trains {trainable}")
        + ("" if _source(healed) == "corpus" else f", {_source(healed)} text")
        + _objective_label(healed)
    )


def _heldout(healed: dict[str, Any], references: dict[str, float], target: float) -> dict[str, Any]:
    """Recovered share of the held-out cross-entropy (= log-perplexity) at the restored state, and the
    first evaluation at which it reached ``target`` (tokens, seconds pro rata), against the original's
    cross-entropy on the same held-out sequences; empty without that reference."""
    d = healed["details"]
    reference = references.get(reference_key(healed))
    curve = d.get("heldout_curve", [])
    lost = None if reference is None or not curve else curve[0]["ce"] - reference
    if lost is None or lost <= 0:
        return {}
    per_step = d["tokens_trained"] / max(1, d["steps"])
    reached = next((e["step"] for e in curve if (curve[0]["ce"] - e["ce"]) / lost >= target), None)
    return {
        "heldout_recovered": (curve[0]["ce"] - d["heldout_ce_after"]) / lost,
        "target_tokens": None if reached is None else round(reached * per_step),
        "target_seconds": None if reached is None else d["train_time_s"] * reached / max(1, d["steps"]),
    }


def rows(state: dict[str, Any], target: float) -> list[dict[str, Any]]:
    """One row per (configuration, budget): perplexities, recovered fractions, time, structure check."""
    original = state["original"]["perplexity"]
    references = state["original"].get("heldout_ce", {})
    out = []
    for name, entry in state["configs"].items():
        before = entry["compressed"]
        for healed in sorted(entry["healed"].values(), key=lambda h: (h["tokens"], _run_label(h))):
            d = healed["details"]
            out.append(
                {
                    "config": name,
                    "tokens_budget": healed["tokens"],
                    "learning_rate": healed["learning_rate"],
                    "compute_dtype": _compute(healed),
                    "trainable": d.get("trainable", "replaced"),
                    "source": _source(healed),
                    **_objective(healed),
                    "tokens_trained": d["tokens_trained"],
                    "steps": d["steps"],
                    "stopped_early": d["steps"] < d["steps_planned"],
                    "heal_seconds": healed["heal_seconds"],
                    "perplexity_compressed": before["perplexity"],
                    "perplexity_healed": healed["perplexity"],
                    "recovered": {
                        c: _recovered(original[c], before["perplexity"][c], healed["perplexity"][c])
                        for c in CORPORA
                    },
                    **_heldout(healed, references, target),
                    "structure_unchanged": healed["weight_bytes"] == before["weight_bytes"]
                    and healed["kv_bytes_per_token"] == before["kv_bytes_per_token"],
                }
            )
    return out


def _reached(r: dict[str, Any]) -> str:
    if r.get("target_tokens") is None:
        return "–"
    return f"{r['target_tokens']:,} tokens, {r['target_seconds'] / 60:.0f} min"


def _f(x: float | None, fmt: str = ".2f") -> str:
    return "–" if x is None else format(x, fmt)


def report(
    state: dict[str, Any], figure_path: Path, target: float
) -> tuple[str, list[dict[str, Any]], Path | None]:
    """(Markdown, summary rows, figure path or None when matplotlib is missing)."""
    s = state["settings"]
    original = state["original"]["perplexity"]
    table = rows(state, target)
    lines = [
        f"# Healing on {s['model']} (CPU)",
        "",
        f"Perplexity on the first {s['windows']} wiki-test and {s['windows_shakespeare']} shakespeare "
        f"windows of 512 tokens, the original measured in the same run: wiki {original['wiki']:.2f}, "
        f"shakespeare {original['shakespeare']:.2f}. Compression calibration: {s['calib_samples']} × "
        f"{s['calib_seq_len']} wiki calibration tokens. Healing: `HealConfig` defaults "
        "(lr = peak learning rate)"
        + (f" except {s['heal']}" if s["heal"] else "")
        + f", on sequences of {s['calib_seq_len']} tokens: wiki calibration text (the test split is never "
        "trained on; shakespeare is out of domain), or, as healing text 'teacher-sampled', sequences the "
        "original samples itself (`HealConfig.source='teacher'`, no corpus). Recovered = "
        "(ln ppl_compressed − ln ppl_healed) / "
        "(ln ppl_compressed − ln ppl_original); held-out = the same on the held-out calibration sequences "
        "(never trained on, used for early stopping; evaluated every 10 steps under the run's compute, "
        "the original's cross-entropy on them measured the same way), where 'reached at' is the first "
        "evaluation at or above the target (time pro rata). Target ≥ "
        f"{target}. 'KD weight, T, hidden' = the objective's `kd_weight`, `temperature` and "
        "`hidden_weight` (0: logits only). Ratios: svd-llm-v2 'removed' = share of the original parameters "
        "removed; KV % = cached K/V numbers kept per token and layer; R/d = cached dimensions kept per KV "
        "head.",
        "",
        "| configuration | healing text | healing tokens | lr | compute | trains | KD weight, T, hidden "
        "| steps | wiki ppl before → after "
        "| recovered | shakespeare ppl before → after | recovered | held-out recovered "
        "| held-out target reached at | heal s | target wiki / shakespeare | structure unchanged |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        rec, before, after = r["recovered"], r["perplexity_compressed"], r["perplexity_healed"]
        met = " / ".join("PASS" if rec[c] is not None and rec[c] >= target else "FAIL" for c in CORPORA)
        tokens = f"{r['tokens_trained']:,}" + (" (stopped early)" if r["stopped_early"] else "")
        lines.append(
            f"| {r['config']} | {'wiki' if r['source'] == 'corpus' else 'teacher-sampled'} | {tokens} | "
            f"{r['learning_rate']:g} | {r['compute_dtype']} | "
            f"{r['trainable']} | {r['kd_weight']:g}, {r['temperature']:g}, {r['hidden_weight']:g} | "
            f"{r['steps']} | "
            f"{before['wiki']:.2f} → {after['wiki']:.2f} | {_f(rec['wiki'], '.3f')} | "
            f"{before['shakespeare']:.2f} → {after['shakespeare']:.2f} | "
            f"{_f(rec['shakespeare'], '.3f')} | {_f(r.get('heldout_recovered'), '.3f')} | {_reached(r)} | "
            f"{r['heal_seconds']:.0f} | {met} | "
            f"{'yes' if r['structure_unchanged'] else 'NO'} |"
        )
    figure = _figure(state, figure_path)
    if figure is not None:
        lines += ["", f"![wiki perplexity vs healing tokens]({figure.name})"]
    return "\n".join(lines) + "\n", table, figure


_LINES = (  # one per recipe of a configuration
    "-",
    "--",
    ":",
    "-.",
    (0, (5, 1, 1, 1, 1, 1)),
    (0, (1, 3)),
    (0, (8, 2)),
    (0, (3, 1, 1, 1, 1, 1, 1, 1)),
    (0, (8, 2, 1, 2)),
    (0, (2, 1)),
)
_MARKERS = (".", "s", "^", "D", "v", "x", "P", "*")  # the held-out panel: one per token budget


def _figure(state: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from benchmarks._common import save_figure

    fig, axes = plt.subplots(1, 3, figsize=(17, 10))
    colours = plt.get_cmap("tab10").colors
    recipes = {  # a colour per configuration, a line style per recipe of it (the same in every panel)
        name: sorted({_run_label(h, compute=False) for h in entry["healed"].values()})
        for name, entry in state["configs"].items()
    }

    def style(index: int, name: str, run: str) -> dict[str, Any]:
        r = recipes[name].index(run)
        return {"color": colours[index % len(colours)], "linestyle": _LINES[r % len(_LINES)]}

    budgets = sorted({h["tokens"] for entry in state["configs"].values() for h in entry["healed"].values()})
    for index, (name, entry) in enumerate(state["configs"].items()):  # held-out: exp(CE) during training
        for h in sorted(entry["healed"].values(), key=lambda h: (_run_label(h), h["tokens"])):
            tokens_per_step = h["details"]["tokens_trained"] / max(1, h["details"]["steps"])
            curve = h["details"].get("heldout_curve", [])
            axes[0].plot(
                [e["step"] * tokens_per_step for e in curve],
                [math.exp(e["ce"]) for e in curve],
                marker=_MARKERS[budgets.index(h["tokens"]) % len(_MARKERS)],
                markersize=4,
                label=f"{name}, {_run_label(h)}, {h['tokens']:,} tokens",
                **style(index, name, _run_label(h, compute=False)),
            )
    axes[0].set_yscale("log")
    axes[0].set_xlabel("healing tokens")
    axes[0].set_ylabel("held-out perplexity (exp of cross-entropy)")
    axes[0].set_title("held-out calibration sequences, during training")
    axes[0].grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13))
    for ax, corpus in zip(axes[1:], CORPORA, strict=True):
        for index, (name, entry) in enumerate(state["configs"].items()):  # a line per recipe, any compute
            runs = recipes[name]
            for run in runs:
                points = [(0, entry["compressed"]["perplexity"][corpus])] + sorted(
                    (h["details"]["tokens_trained"], h["perplexity"][corpus])
                    for h in entry["healed"].values()
                    if _run_label(h, compute=False) == run
                )
                label = name if len(runs) == 1 else f"{name}, {run}"
                ax.plot(
                    [p[0] for p in points],
                    [p[1] for p in points],
                    marker="o",
                    label=label,
                    **style(index, name, run),
                )
        ax.axhline(state["original"]["perplexity"][corpus], color="black", linestyle="--", label="original")
        ax.set_yscale("log")
        ax.set_xlabel("healing tokens")
        ax.set_ylabel(f"{corpus} perplexity")
        ax.set_title(corpus + (" (never trained on)" if corpus == "wiki" else " (out of domain)"))
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes:
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x / 1000:g}k"))
    axes[1].legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13))
    return save_figure(fig, path)
