"""Tables, quality targets and figures of ``compress_quality.py`` (kept apart from the measuring loop)."""

from __future__ import annotations

from typing import Any

from benchmarks._tables import load_text, ppl, sig

RATIO_NOTE = (
    "`ratio` = fraction of the targeted decoder linear-layer parameters REMOVED (SVD-LLM convention); "
    "`r` = keep_singular_fraction = fraction of singular values KEPT (the rSVD paper's r); "
    "'params kept' = whole-model parameters after / before (embeddings included)."
)
MUCH_WORSE = 10.0
"""'svd-llm ≪ svd' is read as: plain SVD's perplexity at least this many times SVD-LLM's."""
RSVD_TOLERANCE = 0.02
TIE = 1e-3
"""'svd-llm-v2 < svd-llm' needs a relative margin above this (equal computations differ by ~1e-7)."""

_RSVD_NOTE = (
    "rSVD's excess error is governed by the spectral gap (σ_{k+p+1}/σ_k)^{2q+1}; the whitened weights W·S "
    "of this model have flat spectra around the kept rank, which at ratio 0.2 is a large fraction of "
    "min(m, n) (230/576 for q/o, 115/192 for k/v, 335/576 for the MLPs), so p = 20, q = 4 leave a visible "
    "part of the discarded energy in the kept subspace; and at 20 % removed perplexity is already ~4× the "
    "original, on the steep part of its curve, which amplifies a small excess of output loss."
)
FAIL_NOTES: dict[str, str] = {
    "ordering": (
        "the grid's svd-llm-v2 uses the allocation study's best rule, `uniform` (every reallocating rule was "
        "worse at 40 % removed, see the allocation table): it then computes the same truncation as svd-llm "
        "through the eigh route instead of Cholesky, identical on these positive definite Grams, so with "
        "exact SVD its perplexity equals svd-llm's rather than being lower, and with rSVD the two differ "
        "only through the randomized sketch. The per-matrix whitened truncation loss that V2 reallocates "
        "by does not predict perplexity on this 135M model."
    ),
    "rsvd20_4_svd-llm": _RSVD_NOTE,
    "rsvd20_4_svd-llm-v2": _RSVD_NOTE,
}
"""Reasons found for failing targets (from the analysis of the committed run; printed only on a FAIL)."""


def _rows(p: dict[str, Any], group: str) -> list[dict[str, Any]]:
    return [c for c in p["configs"].values() if c.get("group") == group]


def _find(p, group, method, dec, *, ratio=None, keep=None):
    for c in _rows(p, group):
        if (c["method"], c["decomposer_label"], c["ratio"], c["keep_singular_fraction"]) == (
            method,
            dec,
            ratio,
            keep,
        ):
            return c
    return None


def targets(p: dict[str, Any]) -> list[dict[str, Any]]:
    """Check the issue's quality targets on the wiki perplexities of the grid."""
    out = []
    grid = _rows(p, "grid")
    ratios = sorted({c["ratio"] for c in grid})
    decs = sorted({c["decomposer_label"] for c in grid})
    cells, failed = [], []
    for dec in decs:
        for ratio in ratios:
            got = {m: _find(p, "grid", m, dec, ratio=ratio) for m in ("svd", "svd-llm", "svd-llm-v2")}
            if any(v is None for v in got.values()):
                continue
            v2, v1, plain = (ppl(got[m]) for m in ("svd-llm-v2", "svd-llm", "svd"))
            ok = v2 < (1.0 - TIE) * v1 and plain >= MUCH_WORSE * v1
            cell = {
                "decomposer": dec,
                "ratio": ratio,
                "svd-llm-v2": v2,
                "svd-llm": v1,
                "svd": plain,
                "ok": ok,
            }
            cells.append(cell)
            if not ok:
                failed.append(cell)
    if cells:
        out.append(
            {
                "name": "ordering",
                "text": f"wiki ppl: svd-llm-v2 < svd-llm by > {TIE:.1%} and svd >= {MUCH_WORSE:g} x svd-llm, "
                "every ratio and decomposer",
                "status": "PASS" if not failed else "FAIL",
                "cells": cells,
                "failed": failed,
            }
        )
    for method in ("svd-llm", "svd-llm-v2"):  # plain SVD's perplexity (~1e6) makes a 2 % test meaningless
        exact = _find(p, "grid", method, "svd", ratio=0.2)
        fast = _find(p, "grid", method, "rsvd(20,4)", ratio=0.2)
        if exact is None or fast is None:
            continue
        rel = ppl(fast) / ppl(exact) - 1.0
        out.append(
            {
                "name": f"rsvd20_4_{method}",
                "text": f"{method}: rSVD(20,4) wiki ppl within {RSVD_TOLERANCE:.0%} of exact SVD "
                "at ratio 0.2",
                "status": "PASS" if rel <= RSVD_TOLERANCE else "FAIL",
                "exact": ppl(exact),
                "rsvd": ppl(fast),
                "relative_gap": rel,
            }
        )
    return out


def _num(x: float | None) -> str:
    return sig(x, large=1e5)


def _config_table(p: dict[str, Any], group: str, x_name: str) -> str:
    from lowrank.cli._common import format_table

    orig = p["configs"]["original"]["perplexity"]
    rows = []
    for c in _rows(p, group):
        x = c["ratio"] if c["ratio"] is not None else c["keep_singular_fraction"]
        rows.append(
            (
                c["method"],
                c["decomposer_label"],
                c.get("allocation") or "–",
                c["calibration"],
                x,
                round(c["ratio_params_removed"], 4),
                round(c["keep_singular_fraction_achieved"], 4),
                round(c["parameters_retained"], 4),
                c["dense_kept"],
                _num(ppl(c)),
                f"{ppl(c) / orig['wiki']['perplexity']:.3g}",
                _num(ppl(c, "shakespeare")),
                f"{ppl(c, 'shakespeare') / orig['shakespeare']['perplexity']:.3g}",
                round(c["time_total_s"], 2),
                round(c["time_decomposition_s"], 2),
                c["fallbacks"] + sum(c["decomposer_fallbacks"].values()),
            )
        )
    headers = (
        "method",
        "decomposer",
        "allocation",
        "calibration",
        f"{x_name} (target)",
        "ratio removed",
        "r achieved",
        "params kept",
        "dense-kept",
        "wiki ppl",
        "× orig",
        "shakespeare ppl",
        "× orig",
        "compress s",
        "decomp s",
        "fallbacks",
    )
    return format_table(rows, headers)


def _speed_table(p: dict[str, Any]) -> str:
    from lowrank.cli._common import format_table

    cfg = p["configs"]
    base = [cfg[k]["throughput"] for k in ("original", "original_end") if "throughput" in cfg.get(k, {})]
    if not base:
        return "(throughput not measured)"
    pre0 = sum(b["prefill_tokens_per_s"] for b in base) / len(base)
    dec0 = sum(b["decode_tokens_per_s"] for b in base) / len(base)
    rows = [
        (
            "original (start)" if i == 0 else "original (end)",
            "–",
            1.0,
            b["prefill_tokens_per_s"],
            "–",
            b["decode_tokens_per_s"],
            "–",
        )
        for i, b in enumerate(base)
    ]
    for c in _rows(p, "grid"):
        if "throughput" not in c:
            continue
        t = c["throughput"]
        rows.append(
            (
                f"{c['method']} {c['decomposer_label']}",
                c["ratio"],
                round(c["parameters_retained"], 4),
                t["prefill_tokens_per_s"],
                f"{t['prefill_tokens_per_s'] / pre0:.3f}",
                t["decode_tokens_per_s"],
                f"{t['decode_tokens_per_s'] / dec0:.3f}",
            )
        )
    headers = ("model", "ratio", "params kept", "prefill tok/s", "× orig", "decode tok/s", "× orig")
    return format_table(rows, headers)


def _targets_text(p: dict[str, Any]) -> str:
    lines = []
    for t in p["targets"]:
        if t["name"] == "ordering":
            lines.append(
                f"* **{t['status']}** — {t['text']}: "
                f"{len(t['cells']) - len(t['failed'])}/{len(t['cells'])} cells hold."
            )
            for c in t["failed"]:
                lines.append(
                    f"  * fails at ratio {c['ratio']}, {c['decomposer']}: "
                    f"svd-llm-v2 {_num(c['svd-llm-v2'])}, svd-llm {_num(c['svd-llm'])}, svd {_num(c['svd'])}"
                )
        else:
            lines.append(
                f"* **{t['status']}** — {t['text']}: exact {_num(t['exact'])}, rSVD(20,4) {_num(t['rsvd'])} "
                f"({t['relative_gap']:+.2%})."
            )
        if t["status"] == "FAIL" and t["name"] in FAIL_NOTES:
            lines.append(f"  * reason: {FAIL_NOTES[t['name']]}")
    return "\n".join(lines)


def markdown(p: dict[str, Any]) -> str:
    """The results page: settings, conventions, one table per study, the targets."""
    s, env, cfg = p["settings"], p["env"], p["configs"]
    orig = cfg["original"]["perplexity"]
    gram_s = p["gram_collection_seconds"]
    gram_note = f"collected in {gram_s} s" if gram_s else "collection time not recorded by the last run"
    head = (
        f"Model {s['model']}; calibration: {s['calib_samples']} × {s['calib_seq_len']} wiki "
        f"`calibration` tokens ({p['calibration_tokens']:,}), seed {s['seed']}; Grams collected once on "
        "the unchanged model and shared by every non-sequential row "
        f"({gram_note}). Evaluation: the "
        f"first {s['windows']} wiki "
        f"`test` windows and the first {s['windows_shakespeare']} shakespeare `test` windows of "
        f"{s['eval_seq_len']} tokens (non-overlapping, every predicted token counted). Original model: "
        f"wiki {orig['wiki']['perplexity']:.4f}, shakespeare {orig['shakespeare']['perplexity']:.4f} on "
        f"the same windows. {env['device_name']}, torch {env['torch']}, transformers "
        f"{env['transformers']}, git {env['git_sha']}; 1-min load average {load_text(p)} "
        "(the machine was shared: times and speeds are indicative)."
    )
    parts = [
        "# Compression quality on the built-in model (CPU)",
        head,
        "Conventions (every table): " + RATIO_NOTE,
        *(["Notes on this run:\n\n" + "\n".join(f"* {n}" for n in p["notes"])] if p.get("notes") else []),
        *([_missing_text(p)] if p.get("missing") else []),
        "## Targets",
        _targets_text(p),
        f"## Methods × decomposers × ratio removed ({s['windows']} wiki / "
        f"{s['windows_shakespeare']} shakespeare windows of {s['eval_seq_len']} tokens)",
        "Conventions: " + RATIO_NOTE,
        f"svd-llm-v2 rows use allocation `{p.get('v2_allocation_grid')}` (the allocation study's best, "
        "see below; exact-SVD rows at the study's ratios are the study's own measurements).",
        _config_table(p, "grid", "ratio"),
        "## The rSVD paper's r sweep: SVD-LLM with exact SVD vs rSVD (seed §5 compares these)",
        "Conventions: "
        + RATIO_NOTE
        + " A matrix whose factors would not be smaller stays dense ('dense-kept', of "
        "210): at r ≥ 0.5 every square attention matrix is kept dense, so parameters barely drop.",
        _config_table(p, "r_sweep", "r"),
    ]
    if _rows(p, "allocation"):
        parts += [
            "## SVD-LLM V2 allocation rules (exact SVD, non-sequential, shared Grams)",
            "Conventions: " + RATIO_NOTE + " Σ relative loss: Σ over groups and matrices of "
            "ℓ_i(k_i)/‖W_i S_i‖²_F at the homogeneous and the allocated ranks.",
            _allocation_table(p),
        ]
    if _rows(p, "sequential"):
        parts += [
            "## Sequential spot checks (each layer calibrated on its compressed predecessors)",
            "Conventions: " + RATIO_NOTE,
            _sequential_table(p),
        ]
    parts += [
        "## CPU throughput (batch 1, prompt 128, 32 decoded tokens, median of timed runs)",
        "Conventions: " + RATIO_NOTE + " × orig uses the mean of the original's start and end runs.",
        _speed_table(p),
    ]
    if p.get("figures"):
        parts += ["## Figures", "\n".join(f"* `{f}`" for f in p["figures"])]
    return "\n\n".join(parts) + "\n"


def _allocation_table(p: dict[str, Any]) -> str:
    from lowrank.cli._common import format_table

    rows = []
    for c in _rows(p, "allocation"):
        rows.append(
            (
                c["allocation"],
                c["ratio"],
                round(c["ratio_params_removed"], 4),
                _num(c["relative_loss_homogeneous"]) if c["allocation"] != "uniform" else "–",
                _num(c["relative_loss_allocated"]) if c["allocation"] != "uniform" else "–",
                _num(ppl(c)),
                _num(ppl(c, "shakespeare")),
            )
        )
    rows.sort(key=lambda r: (r[1], r[0]))
    headers = (
        "rule",
        "ratio",
        "ratio removed",
        "Σ rel. loss homog.",
        "Σ rel. loss alloc.",
        "wiki ppl",
        "shakespeare ppl",
    )
    return format_table(rows, headers)


def _sequential_table(p: dict[str, Any]) -> str:
    from lowrank.cli._common import format_table

    rows = []
    for c in _rows(p, "sequential"):
        twin = _find(p, "grid", c["method"], c["decomposer_label"], ratio=c["ratio"])
        for label, r in (("non-sequential", twin), ("sequential", c)):
            if r is not None:
                rows.append(
                    (
                        c["method"],
                        c["decomposer_label"],
                        c["ratio"],
                        label,
                        _num(ppl(r)),
                        _num(ppl(r, "shakespeare")),
                        round(r["time_total_s"], 1),
                    )
                )
    return format_table(
        rows, ("method", "decomposer", "ratio", "calibration", "wiki ppl", "shakespeare ppl", "compress s")
    )


def _missing_text(p: dict[str, Any]) -> str:
    keys = p["missing"]
    return (
        f"**Incomplete sweep: {len(keys)} planned configuration(s) were not measured** (rerun the same "
        "command with `--resume` to add them): " + ", ".join(f"`{k}`" for k in keys)
    )
