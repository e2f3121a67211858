"""Tables and projections of ``compress_scale.py`` (kept apart so the script stays short)."""

from __future__ import annotations

from typing import Any

from benchmarks._random_llama import describe
from benchmarks._tables import gib, load_text
from lowrank.cli._common import format_table

STAGES = ("calibration_forward", "gram_accumulation", "whitening", "decomposition", "other")
#: stages whose cost grows with the number of calibration tokens (the rest depend on the shapes only)
TOKEN_STAGES = ("calibration_forward", "gram_accumulation")


def per_layer(timings: dict[str, float], layers: int) -> dict[str, float]:
    """Seconds per decoder layer of every stage (capture of the first layer's inputs included)."""
    return {k: round(v / layers, 4) for k, v in timings.items() if k != "total"}


def projection(payload: dict[str, Any], full_layers: int, full_tokens: int) -> dict[str, Any] | None:
    """Linear extrapolation of a reduced run to ``full_layers`` layers and ``full_tokens`` tokens.

    Every stage scales with the number of layers; calibration forward and Gram accumulation also scale
    with the number of tokens (attention's quadratic term in seq_len is ignored: a lower bound there).
    """
    layers = payload["model"]["num_hidden_layers"]
    tokens = payload["calibration"]["tokens"]
    if not payload["reduced"]:
        return None
    out: dict[str, Any] = {"layers": full_layers, "tokens": full_tokens, "runs": {}}
    for name, run in payload["runs"].items():
        t = run["timings"]
        same_tokens = {k: t.get(k, 0.0) * full_layers / layers for k in STAGES}
        full = {k: v * (full_tokens / tokens if k in TOKEN_STAGES else 1.0) for k, v in same_tokens.items()}
        out["runs"][name] = {
            "total_s_same_tokens": round(sum(same_tokens.values()), 1),
            "total_s_full_tokens": round(sum(full.values()), 1),
            "stages_s_full_tokens": {k: round(v, 1) for k, v in full.items()},
        }
    kernels = payload.get("kernels")
    if kernels:
        names = [k.removesuffix("_s") for k in kernels[0] if k.endswith("_s")]
        out["kernel_decomposition_s"] = {
            n: round(sum(r[f"{n}_s"] * r["per_layer"] for r in kernels) * full_layers, 1) for n in names
        }
    return out


def _run_rows(runs: dict[str, Any]) -> list[tuple]:
    rows = []
    for name, r in runs.items():
        t = r["timings"]
        rows.append(
            (
                name,
                t["total"],
                *(t.get(k, 0.0) for k in STAGES),
                gib(r["peak_accelerator_bytes"], none="n/a (CPU)"),
                r["ratio_params_removed"],
                r["fallbacks"],
                f"{r['truncation_loss_sum']:.4g}",
            )
        )
    return rows


def _kernel_section(kernels: list[dict[str, Any]], device: str, runs: dict[str, Any]) -> list[str]:
    names = [k.removesuffix("_s") for k in kernels[0] if k.endswith("_s")]
    rows = [
        (r["shape"], r["rank"], round(r["rank"] / min(r["m"], r["n"]), 3), r["per_layer"])
        + tuple(r[f"{n}_s"] for n in names)
        for r in kernels
    ]
    totals = {n: sum(r[f"{n}_s"] * r["per_layer"] for r in kernels) for n in names}
    rows.append(("per layer (4 + 2 + 1 matrices)", "", "", 7, *(round(totals[n], 2) for n in names)))
    rows.append(("× 32 layers (projection)", "", "", 224, *(round(32 * totals[n], 1) for n in names)))
    text = [
        f"## Decomposition kernels on {device}",
        "Measured, one call each, Gaussian input in the compute dtype.",
        "Rank from `ratio` (fraction of parameters removed) = the rank the compression uses for that shape. "
        "The last row multiplies the measured per-layer sum by 32: a projection, not a measurement.",
        format_table(rows, ("shape", "rank", "rank / min(m, n)", "per layer", *(f"{n} s" for n in names))),
        "`lowrank.linalg.decomposer.AUTO_RANK_FRACTION` (the measured exact/rSVD crossover of the `auto` "
        "decomposer: 0.5 on CPU, 0.75 on CUDA) is the rank fraction above which rSVD stops paying off.",
    ]
    if "svd" in totals and "rsvd" in totals and totals["rsvd"] > 0:
        text.append(f"Kernel speed-up exact/rSVD per layer: {totals['svd'] / totals['rsvd']:.2f}×.")
    rest = [
        f"{n}: {runs[n]['per_layer']['decomposition']:.1f} s − {totals[n]:.1f} s = "
        f"{runs[n]['per_layer']['decomposition'] - totals[n]:.1f} s"
        for n in names
        if n in runs
    ]
    if rest:
        text.append(
            "The compression's `decomposition` stage per layer minus these kernels is the float64 work "
            "around them (W·S products, triangular solves with S, factor assembly): " + "; ".join(rest) + "."
        )
    return text


def _projection_section(proj: dict[str, Any]) -> list[str]:
    rows = [
        (name, p["total_s_same_tokens"], p["total_s_full_tokens"], *p["stages_s_full_tokens"].values())
        for name, p in proj["runs"].items()
    ]
    return [
        f"## Projection to {proj['layers']} layers × {proj['tokens']:,} tokens on the same device "
        "(extrapolated, NOT measured)",
        "Every stage × (32 / measured layers); calibration forward and Gram accumulation also × "
        "(tokens / measured tokens); attention's quadratic part in seq_len is not scaled, so forward "
        "is a lower bound.",
        format_table(rows, ("decomposer", "32 layers, same tokens s", "32 layers, full tokens s", *STAGES)),
    ]


def markdown(p: dict[str, Any]) -> str:
    env, cal, s = p["env"], p["calibration"], p["settings"]
    layers = p["model"]["num_hidden_layers"]
    label = "REDUCED run" if p["reduced"] else "full-size run"
    if s["device"] == "cpu":
        label += " on CPU"
    out = [
        f"# Compression at scale: {p['settings']['method']}, {p['model']['shape']}-shaped random model on "
        f"{env['device_name']} ({label})",
        f"{layers} decoder layer(s) of {describe(p['model'])} in "
        f"{p['model']['dtype']}; weights: {p['init']}; weights stay on the host, one layer at a time visits "
        f"{s['device']}. Calibration: {cal['samples']} × {cal['seq_len']} random token ids "
        f"({cal['tokens']:,} tokens), sequential (each layer sees the compressed previous layers).",
        f"`ratio` = fraction of targeted linear-layer parameters REMOVED (SVD-LLM convention): {s['ratio']}. "
        f"Gram dtype {s['gram_dtype']}, decomposition dtype {s['compute_dtype']}, TF32 "
        f"{'on' if s['tf32_used'] else 'off'}, rSVD oversample {s['oversample']}, power iterations "
        f"{s['power_iters']}, batch {s['batch_size']}, activations offloaded to {s['offload_device']}.",
        f"torch {env['torch']}, transformers {env['transformers']}, git {env['git_sha']}; "
        f"{p['torch_threads']} torch threads; 1-min load average {load_text(p)} (start → end of each "
        f"invocation); script wall time {p['wall_seconds']:.0f} s.",
        "## Measured time breakdown (seconds, whole run)",
        format_table(
            _run_rows(p["runs"]),
            ("decomposer", "total", *STAGES, "peak accel GiB", "ratio removed", "fallbacks", "loss sum"),
        ),
        "`loss sum` = Σ over matrices of the whitened truncation loss ‖(W − W')X‖²_F (exact for rSVD's "
        "output too). `other` = time the library does not attribute to a stage (surgery, moves).",
    ]
    sp = p.get("speedup_exact_over_rsvd")
    if sp:
        svd, rsvd = p["runs"]["svd"], p["runs"]["rsvd"]
        slow = max(STAGES, key=lambda k: rsvd["timings"].get(k, 0.0))
        l0 = svd["truncation_loss_layer0"]
        rel0 = rsvd["truncation_loss_layer0"] / l0 if l0 else float("nan")
        out.append(
            f"**Speed-up exact SVD / rSVD: {sp['total']:.2f}× end to end, {sp['decomposition']:.2f}× in the "
            f"decomposition stage.** Slowest stage with rSVD: `{slow}`. Layer-0 truncation loss (identical "
            f"inputs in both runs) rSVD / exact: {rel0:.4f} (Gaussian weights have flat spectra: the "
            "hard case for rSVD's accuracy)."
        )
    if p.get("projection"):
        out += _projection_section(p["projection"])
    if p.get("kernels"):
        out += _kernel_section(p["kernels"], env["device_name"], p["runs"])
    if p["reduced"]:
        out.append(
            "This run is reduced (fewer layers, calibration tokens or a smaller shape; the projection above "
            "scales it); the full-size measurement is `python -m benchmarks.compress_scale --device cuda` "
            "(Llama-2-7B shape, 32 layers, 256 × 2048 tokens)."
        )
    return "\n\n".join(out) + "\n"
