"""Tables and the figure of ``kv_projection.py`` (kept apart from the measuring loop)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks._tables import DASH, load_text, ppl, save_figure, sig

METHODS = ("k-svd", "eigen", "kq", "kq-sum", "mla")
CONVENTIONS = (
    "R/d = cached dimensions kept per KV head (keys; values too unless 'K only'); KV B/token = bytes of "
    "every tensor in the model's real cache object after a forward pass, per token (ratio to the "
    "baseline's in brackets); ppl = perplexity on the first windows of each test split (same windows for "
    "every row); logit err = √(‖K Qᵀ − K A Bᵀ Qᵀ‖²/‖K Qᵀ‖²) on the calibration tokens, every query head "
    "of the KV group kept, root of the mean over layers and KV heads of the squared relative error (the "
    "Analysis section's scale; post-RoPE keys for rope=post, pre-RoPE for rope=pre); value err = the same "
    "for V through o_proj; ε = the seed's gap on the SQUARED scale (mean over layers and KV heads), "
    "comparable with err²(k-svd) − err²(kq)."
)
MLA_NOTE = (
    "MLA rows (`mla`): the `mla` method's defaults, its best measured setting (rope_dim 8 rotary features "
    "chosen by 2-norm, one joint K/V latent, input-Gram whitening) at kv_fraction = R/d, i.e. the same "
    "cached numbers and KV bytes as the K+V rows; compressed from the same calibration tokens and "
    "evaluated on the same windows. Its own sweep of rope_dim / selection / latent / whitening is "
    "benchmarks/mla.py (results/mla_cpu.md)."
)


def _rows(p: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for k, c in p["configs"].items() if k != "baseline"]


def _find(p, kv, R, *, keys_only=False, value="wo-aware", rope="post", alloc="uniform"):
    for c in _rows(p):
        if (c["kv_method"], c["rank_fraction"], c["keys_only"], c["rope"], c["rank_allocation"]) == (
            kv,
            R,
            keys_only,
            rope,
            alloc,
        ) and (keys_only or c["value_method"] == value):
            return c
    return None


def _load(p: dict[str, Any]) -> str:
    load = load_text(p)
    return "" if load == DASH else f"1-min load average {load} (a shared machine); "


def _root(x: float | None) -> float | None:
    return None if x is None else x**0.5


def _cached(c: dict[str, Any]) -> str:
    if c["kv_method"] == "mla":
        return "K+V (joint latent)"
    return "K only" if c["keys_only"] else f"K+V ({c['value_method']})"


def _main_table(p: dict[str, Any]) -> str:
    base = p["configs"]["baseline"]
    b_bytes = base["kv_bytes_per_token"]
    lines = [
        "| R/d | keys | cached | rope | ranks | KV B/token | wiki ppl | shakespeare ppl | logit err | "
        "value err | ε |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| 1 (baseline) | – | K+V | – | – | {b_bytes:.0f} (1.00) | {ppl(base):.3f} | "
        f"{ppl(base, 'shakespeare'):.3f} | 0 | 0 | – |",
    ]
    rows = sorted(
        _rows(p),
        key=lambda c: (
            -c["rank_fraction"],
            c["keys_only"],
            c["rope"],
            c["rank_allocation"],
            c["value_method"] or "",
            METHODS.index(c["kv_method"]),
        ),
    )
    for c in rows:
        lines.append(
            f"| {c['rank_fraction']} | {c['kv_method']} | {_cached(c)} | {c['rope']} | "
            f"{c['rank_allocation']} | {c['kv_bytes_per_token']:.0f} "
            f"({c['kv_bytes_per_token'] / b_bytes:.2f}) "
            f"| {ppl(c):.3f} | {ppl(c, 'shakespeare'):.3f} | "
            f"{sig(_root(c['logit_error_calibration']), 3)} | "
            f"{sig(_root(c['value_error_calibration']), 3)} | {sig(c['epsilon_gap_calibration'], 3)} |"
        )
    return "\n".join(lines)


def _order(rows: dict[str, dict], value) -> str:
    return " < ".join(f"{m} ({value(c):.4g})" for m, c in sorted(rows.items(), key=lambda mc: value(mc[1])))


def _holds(rows: dict[str, dict], value, a: str, b: str) -> str:
    if a not in rows or b not in rows:
        return "–"
    return "yes" if value(rows[a]) <= value(rows[b]) else "**no**"


def _ordering_table(p: dict[str, Any]) -> str:
    lines = [
        "| R/d | cached | ordering by calibration logit err | by wiki ppl | by shakespeare ppl | "
        "kq ≤ eigen (err / wiki / shak.) | kq ≤ k-svd (err / wiki / shak.) | "
        "err²(k-svd) − err²(kq) vs ε |",
        "|---|---|---|---|---|---|---|---|",
    ]
    Rs = sorted({c["rank_fraction"] for c in _rows(p)}, reverse=True)
    measures = (
        lambda c: _root(c["logit_error_calibration"]),
        ppl,
        lambda c: ppl(c, "shakespeare"),
    )
    for R in Rs:
        for keys_only in (False, True):
            rows = {m: c for m in METHODS if (c := _find(p, m, R, keys_only=keys_only)) is not None}
            if len(rows) < 2:
                continue
            checks = [
                " / ".join(_holds(rows, v, "kq", other) for v in measures) for other in ("eigen", "k-svd")
            ]
            gap = "–"
            if "kq" in rows and "k-svd" in rows:
                d = rows["k-svd"]["logit_error_calibration"] - rows["kq"]["logit_error_calibration"]
                gap = f"{d:.4g} vs {rows['kq']['epsilon_gap_calibration']:.4g}"
            lines.append(
                f"| {R} | {'K only' if keys_only else 'K+V (wo-aware)'} | "
                + " | ".join(_order(rows, v) for v in measures)
                + f" | {checks[0]} | {checks[1]} | {gap} |"
            )
    return "\n".join(lines)


def _pair_table(p: dict[str, Any], pairs, header: tuple[str, str]) -> str:
    """Rows (label, a, b): wiki/shakespeare ppl of a and b and the relative change b / a − 1."""
    lines = [
        f"| config | wiki {header[0]} | wiki {header[1]} | change | shakespeare {header[0]} | "
        f"shakespeare {header[1]} | change |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, a, b in pairs:
        if a is None or b is None:
            continue
        cells = []
        for corpus in ("wiki", "shakespeare"):
            x, y = ppl(a, corpus), ppl(b, corpus)
            cells += [f"{x:.3f}", f"{y:.3f}", f"{100 * (y / x - 1):+.1f} %"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _variant_tables(p: dict[str, Any]) -> list[str]:
    Rs = sorted({c["rank_fraction"] for c in _rows(p)}, reverse=True)
    rope = [(f"{m} R/d={R}", _find(p, m, R), _find(p, m, R, rope="pre")) for m in ("k-svd", "kq") for R in Rs]
    budget = [(f"kq R/d={R}", _find(p, "kq", R), _find(p, "kq", R, alloc="budget")) for R in Rs]
    values = [(f"kq R/d={R}", _find(p, "kq", R, value="v-svd"), _find(p, "kq", R)) for R in Rs]
    return [
        "## RoPE: project after it (post) or before it (pre; reconstruct, then rotate)\n\n"
        "K+V (wo-aware), uniform ranks; change = pre / post − 1 (negative: pre is better).\n\n"
        + _pair_table(p, rope, ("post", "pre")),
        "## Per-layer ranks from the analysis (budget) vs uniform\n\n"
        "kq, K+V (wo-aware), post-RoPE; the same total of cached dimensions; "
        "change = budget / uniform − 1.\n\n" + _pair_table(p, budget, ("uniform", "budget")),
        "## Values: v-svd vs W_O-aware\n\nkq keys, post-RoPE, uniform; change = wo-aware / v-svd − 1.\n\n"
        + _pair_table(p, values, ("v-svd", "wo-aware")),
    ]


def _family_table(p: dict[str, Any]) -> str:
    """At each KV budget: the best kv-projection row (by wiki perplexity) against MLA."""
    lines = [
        "| R/d (KV B/token) | best kv-projection (wiki / shakespeare) | mla (wiki / shakespeare) |",
        "|---|---|---|",
    ]
    for R in sorted({c["rank_fraction"] for c in _rows(p)}, reverse=True):
        same = [c for c in _rows(p) if c["rank_fraction"] == R and not c["keys_only"]]
        kvp = [c for c in same if c["kv_method"] != "mla"]
        mla = [c for c in same if c["kv_method"] == "mla"]
        if not kvp and not mla:
            continue
        best = min(kvp, key=ppl) if kvp else None
        cells = [
            "–" if c is None else f"{c['key']}: {ppl(c):.3f} / {ppl(c, 'shakespeare'):.3f}"
            for c in (best, mla[0] if mla else None)
        ]
        kvb = (best or mla[0])["kv_bytes_per_token"]
        lines.append(f"| {R} ({kvb:.0f}) | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def _speed_table(p: dict[str, Any]) -> str:
    speed = p.get("throughput")
    if not speed:
        return "Decode speed was not measured in this run."
    w = p["throughput_workload"]
    lines = [
        f"Decode of {w['gen_len']} tokens after a prompt of {w['prompt_len']} tokens (the cache holds "
        f"≥ {w['prompt_len']} tokens), batch 1, greedy; the models' timed runs are interleaved "
        "(A B C A B C …) so the ratios to the baseline are measured under the same load.\n",
        "| model | KV B/token | prefill tok/s | decode tok/s | decode ratio | prefill ratio | cache |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in speed.items():
        c = p["configs"].get(name, {})
        kvb = c.get("kv_bytes_per_token", p["configs"]["baseline"]["kv_bytes_per_token"])
        lines.append(
            f"| {name} | {kvb:.0f} | {r['prefill_tokens_per_s']:.1f} | {r['decode_tokens_per_s']:.3f} | "
            f"{r['decode_ratio']:.2f} | {r['prefill_ratio']:.2f} | {r['cache_class']} |"
        )
    return "\n".join(lines)


def markdown(p: dict[str, Any]) -> str:
    s, env = p["settings"], p["env"]
    base = p["configs"]["baseline"]
    head = [
        "# KV-cache projections: perplexity, KV bytes per token and decode speed",
        "",
        f"Model `{s['model']}`; attention Grams of the unchanged model collected once on "
        f"{p['calibration_tokens']:,} wiki calibration tokens ({s['calib_samples']} × {s['calib_seq_len']}, "
        f"seed {s['seed']}, {sig(p.get('calibration_seconds'))} s) and reused by every configuration "
        f"(non-sequential). Perplexity on the first {s['windows']} wiki-test and {s['windows_shakespeare']} "
        f"shakespeare windows of {s['eval_seq_len']} tokens. Baseline: wiki {ppl(base):.3f}, shakespeare "
        f"{ppl(base, 'shakespeare'):.3f}, {base['kv_bytes_per_token']:.0f} KV bytes per token "
        f"({base['kv_cache_class']}).",
        "",
        f"Device {env['device_name']}, torch {env['torch']}, transformers {env['transformers']}, git "
        f"{env['git_sha']} (at report time); {p['torch_threads']} threads; {_load(p)}wall time "
        f"{p['wall_seconds']:.0f} s.",
        "",
        f"Conventions: {CONVENTIONS}",
        "",
        f"{MLA_NOTE}",
        "",
        "## Every configuration",
        "",
        _main_table(p),
        "",
        "## Which family at the same KV bytes: kv-projection or MLA",
        "",
        "Keys + values cached at R/d of their width (the same bytes per token on both sides).",
        "",
        _family_table(p),
        "",
        "## Does the theory's ordering hold? (post-RoPE, uniform ranks)",
        "",
        "Theory: the attention-optimal `kq` minimises the calibration logit error, so kq ≤ eigen and "
        "kq ≤ k-svd there, and err²(k-svd) − err²(kq) equals ε (calibration tokens). Perplexity is a "
        "different, held-out objective.",
        "",
        _ordering_table(p),
        "",
    ]
    for table in _variant_tables(p):
        head += [table, ""]
    head += ["## Decode speed against the baseline", "", _speed_table(p), ""]
    if p.get("notes"):
        head += ["## Notes", "", *[f"- {n}" for n in p["notes"]], ""]
    if p.get("missing"):
        head += [f"Not measured in this run: {', '.join(p['missing'])}.", ""]
    return "\n".join(head)


def _variant(c: dict[str, Any]) -> str:
    if c["kv_method"] == "mla":
        return "mla (rope_dim 8, 2-norm, joint latent)"
    extra = "" if c["rope"] == "post" else ", pre-RoPE"
    extra += "" if c["rank_allocation"] == "uniform" else ", budget ranks"
    return f"{c['kv_method']} {_cached(c)}{extra}"


def figure(p: dict[str, Any], out_dir: Path, stem: str) -> str:
    """Wiki perplexity against KV bytes per token, one line per method/variant; returns the file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, list[dict[str, Any]]] = {}
    for c in _rows(p):
        lines.setdefault(_variant(c), []).append(c)
    fig, ax = plt.subplots(figsize=(9, 6))
    for label, cs in sorted(lines.items()):
        cs = sorted(cs, key=lambda c: c["kv_bytes_per_token"])
        style = "--" if cs[0]["keys_only"] else ":" if cs[0]["rope"] == "pre" else "-"
        ax.plot([c["kv_bytes_per_token"] for c in cs], [ppl(c) for c in cs], style, marker="o", label=label)
    base = p["configs"]["baseline"]
    ax.plot([base["kv_bytes_per_token"]], [ppl(base)], "k*", markersize=14, label="baseline")
    ax.set_xlabel("KV-cache bytes per token (measured on the real cache)")
    ax.set_ylabel("wiki perplexity")
    ax.set_yscale("log")
    ax.set_title(f"{p['settings']['model']}: KV projections (R/d ∈ 0.25, 0.5, 0.75)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    name = f"{stem}_perplexity.png"
    save_figure(fig, out_dir / name)
    return name
