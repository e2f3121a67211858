"""MLA in DeepSeek-V3's layout (``mla --partial-rope rorope``) against MHA2MLA's recipe at equal KV bytes.

On the built-in model (30 layers, 9 query / 3 KV heads of 64: 384 cached numbers per token and layer), with
the original in the same run: wiki-test and shakespeare perplexity, KV bytes per token measured on the real
cache after a forward pass, parameters. Budgets: the seed's 120 numbers per token and layer, then 50 %, 25 %
and 12.5 % of the cache. At each budget: MHA2MLA's recipe (8 rotary + the rest latent per KV head);
TransMLA's recipe (rotary key 16 or 32 on DeepSeek's spread ladder, freqfold 1, balanced whitened latent);
and the conversion whose settings (rope_dim, ladder stride, freqfold, the latent's objective) are chosen by
perplexity on held-out windows of the wiki CALIBRATION split (drawn with the Gram windows, never used for
the Grams). Ablations at 120 numbers (rope 32 + latent 88, TransMLA's settings unless named): RoRoPE
alone (full latent) against 2-norm partial RoPE alone, on both ladders; the ladder of the fastest
frequencies (stride 1); freqfold 1/2/4/8; balanced or not; whitened or plain SVD; key-only or query-aware
rotation; the latent's objective (key/value outputs, or weighted by the queries and W_O that read them);
position-free query width d − rope (default, fewer parameters) or d. Last: the stock-transformers export of
the selected 120-number model, its perplexity against lowrank's runtime.

The test splits are only measured, never used to choose. One calibration pass serves every configuration.
Resumable (``--resume``); writes ``results/mla_deepseek_cpu.{json,md,png}``; the last line printed is one
JSON line.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._common import (
    RESULTS_DIR,
    compressed_copy,
    env_info,
    final_line,
    kv_statistics,
    load_for_evaluation,
    open_run,
    save_figure,
)

BUDGETS = {"seed (120)": 120, "50 % (192)": 192, "25 % (96)": 96, "12.5 % (48)": 48}
"""Cached numbers per token and layer (of 384 = 2 · 3 KV heads · 64)."""


def _spec(key: str, recipe: str, budget: int | None, **config: Any) -> dict[str, Any]:
    return {"key": key, "recipe": recipe, "budget": budget, "config": config}


TRANSMLA = {"rope_stride": None, "freqfold": 1, "latent_objective": "kv"}
"""TransMLA's settings, pinned so that the library's defaults can move without changing these rows."""


def candidates(budget: int) -> list[dict[str, Any]]:
    """The settings the selection tries at ``budget`` cached numbers: rotary width 16 or 32, DeepSeek's
    spread ladder at freqfold 1 or 4 or the fastest frequencies (stride 1), the latent's two objectives."""
    out = []
    for rope in (16, 32):
        for ladder in (
            {"rope_stride": None, "freqfold": 1},
            {"rope_stride": None, "freqfold": 4},
            {"rope_stride": 1, "freqfold": 1},
        ):
            for objective in ("kv", "attention"):
                out.append(
                    {"rope_dim": rope, "kv_lora_rank": budget - rope, **ladder, "latent_objective": objective}
                )
    return out


def plan_configs() -> list[dict[str, Any]]:
    """Every configuration in run order: per budget MHA2MLA, TransMLA, the selection and its choice; then
    the ablations."""
    plan = []
    for n in BUDGETS.values():
        plan.append(
            _spec(f"mha2mla/{n}", "mha2mla", n, partial_rope="mha2mla", rope_dim=8, kv_rank=n // 3 - 8)
        )
        for rope in (16, 32):
            plan.append(
                _spec(
                    f"rorope{rope}/{n}",
                    f"TransMLA rope {rope}",
                    n,
                    rope_dim=rope,
                    kv_lora_rank=n - rope,
                    **TRANSMLA,
                )
            )
        plan.append(
            {"key": f"selected/{n}", "recipe": "rorope, chosen on calibration", "budget": n, "select": True}
        )
    base = {"rope_dim": 32, "kv_lora_rank": 88, **TRANSMLA}
    full = {"rope_dim": 32, "kv_lora_rank": 352, "qk_nope_dim": 64}
    plan += [
        _spec("ablation/rorope-alone", "RoRoPE alone (full latent)", None, **{**base, **full}),
        _spec(
            "ablation/rorope-alone-stride1",
            "RoRoPE alone on the fastest frequencies (full latent)",
            None,
            **{**base, **full, "rope_stride": 1},
        ),
        _spec(
            "ablation/2-norm-alone",
            "2-norm partial RoPE alone (full latent)",
            None,
            partial_rope="mha2mla",
            rope_dim=8,
            kv_rank=120,
        ),
        _spec(
            "ablation/stride1",
            "ladder of the fastest frequencies (stride 1)",
            120,
            **{**base, "rope_stride": 1},
        ),
        *[_spec(f"ablation/freqfold{f}", f"freqfold {f}", 120, **{**base, "freqfold": f}) for f in (2, 4, 8)],
        _spec("ablation/unbalanced", "unbalanced latent", 120, **base, balance=False),
        _spec("ablation/plain-svd", "plain weight SVD (no whitening)", 120, **base, whiten=False),
        _spec("ablation/query-aware", "query-aware rotation", 120, **base, rotation="query-aware"),
        _spec(
            "ablation/attention-objective",
            "latent weighted by what reads it (queries, W_O)",
            120,
            **{**base, "latent_objective": "attention"},
        ),
        _spec(
            "ablation/nope64", "position-free queries of 64 (more parameters)", 120, **base, qk_nope_dim=64
        ),
    ]
    return plan


def heldout_perplexity(model, ids) -> float:
    """Perplexity on held-out calibration windows ``ids`` (n, t), every window scored on its own."""
    import math

    import torch

    with torch.no_grad():
        losses = [float(model(input_ids=row[None], labels=row[None]).loss) for row in ids]
    return math.exp(sum(losses) / len(losses))


def select(model, stats, heldout, budget: int) -> dict[str, Any]:
    """Every candidate's perplexity on the held-out calibration windows, and the best one."""
    from lowrank.methods.mla import MLAConfig

    tried = []
    for settings in candidates(budget):
        converted, _ = compressed_copy(model, MLAConfig(**settings, calibration={"sequential": False}), stats)
        tried.append({"config": settings, "calibration_perplexity": heldout_perplexity(converted, heldout)})
        del converted
    best = min(tried, key=lambda t: t["calibration_perplexity"])
    return {"candidates": tried, "chosen": best["config"]}


def _config(spec: dict[str, Any]):
    from lowrank.methods.mla import MLAConfig

    return MLAConfig(**spec["config"], calibration={"sequential": False})


def _attention_parameters(model) -> int:
    from lowrank.nn.architectures import decoder_layers, get_arch_spec
    from lowrank.nn.surgery import get_module

    spec = get_arch_spec(model)
    return sum(
        p.numel() for layer in decoder_layers(model) for p in get_module(layer, spec.attention).parameters()
    )


def evaluate(model, tokenizer, eval_ids) -> dict[str, Any]:
    from lowrank.evaluation import memory_report, perplexity

    out: dict[str, Any] = {"perplexity": {}}
    for corpus, (ids, windows) in eval_ids.items():
        r = perplexity(model, tokenizer, ids, seq_len=512, max_windows=windows, progress=False)
        out["perplexity"][corpus] = r.perplexity
    mem = memory_report(model, tokens=64)
    out.update(
        parameters=mem.parameters,
        attention_parameters=_attention_parameters(model),
        kv_bytes_per_token=mem.kv_cache_bytes_per_token,
        kv_cache_class=mem.kv_cache_class,
    )
    return out


def export_check(model, tokenizer, eval_ids, calib) -> dict[str, Any]:
    """Export ``model`` as stock DeepSeek-V3, reload it with transformers alone, compare perplexities."""
    import torch
    from transformers import AutoModelForCausalLM

    from lowrank.evaluation import perplexity
    from lowrank.loading.export_deepseek import export_deepseek_v3

    with tempfile.TemporaryDirectory() as tmp:
        export_deepseek_v3(model, Path(tmp) / "ds", calibration=calib[:4])
        stock = AutoModelForCausalLM.from_pretrained(str(Path(tmp) / "ds"), dtype=torch.float32).eval()
        ids = eval_ids["wiki"][0][:512].unsqueeze(0)
        with torch.no_grad():
            diff = float((stock(ids).logits - model(ids).logits).abs().max())
        out = {"type": type(stock).__name__, "max_abs_logit_diff_512_tokens": diff, "perplexity": {}}
        for corpus, (ids_c, windows) in eval_ids.items():
            r = perplexity(stock, tokenizer, ids_c, seq_len=512, max_windows=windows, progress=False)
            out["perplexity"][corpus] = r.perplexity
    return out


def _statistics(args, model, calib, state):
    """The shared calibration statistics, from ``--stats-cache`` when it holds them."""
    import torch

    if args.stats_cache and args.stats_cache.is_file():
        return torch.load(args.stats_cache, weights_only=False)
    stats, state["calibration_seconds"] = kv_statistics(model, calib)
    if args.stats_cache:
        torch.save(stats, args.stats_cache)
    return stats


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib-samples", type=int, default=16, help="wiki calibration windows (default 16)")
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--select-windows",
        type=int,
        default=4,
        help="held-out wiki calibration windows that choose the settings at each budget (default 4)",
    )
    p.add_argument("--windows", type=int, default=4, help="wiki test windows of 512 tokens (default 4)")
    p.add_argument("--windows-shakespeare", type=int, default=2, help="shakespeare test windows (2)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--report-only", action="store_true")
    p.add_argument(
        "--only", nargs="+", default=None, help="measure only configurations with these key prefixes"
    )
    p.add_argument("--no-export", action="store_true", help="skip the stock-transformers export check")
    p.add_argument(
        "--stats-cache", type=Path, default=None, help="file keeping the calibration statistics between runs"
    )
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--out-name", default="mla_deepseek_cpu")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from lowrank.io.data import calibration_batches, load_text
    from lowrank.io.files import write_json

    keys = (
        "model",
        "calib_samples",
        "calib_seq_len",
        "seed",
        "select_windows",
        "windows",
        "windows_shakespeare",
    )
    state, partial, _, started = open_run(args, {k: getattr(args, k) for k in keys})
    done = state["configs"]
    model, tokenizer, eval_ids = load_for_evaluation(args)
    drawn = calibration_batches(
        tokenizer,
        load_text("wiki", "calibration"),
        args.calib_samples + args.select_windows,
        args.calib_seq_len,
        seed=args.seed,
    )  # non-overlapping windows: the first ones make the Grams, the rest choose the settings
    calib, heldout = drawn[: args.calib_samples], drawn[args.calib_samples :]
    plan = plan_configs()
    if args.only:
        plan = [s for s in plan if s["key"].startswith(tuple(args.only))]
    if not args.report_only:
        if "baseline" not in done:
            done["baseline"] = {
                "key": "baseline",
                "recipe": "original",
                **evaluate(model, tokenizer, eval_ids),
            }
            write_json(partial, state)
        stats = None
        for i, spec in enumerate(plan):
            if spec["key"] in done:
                continue
            if stats is None:
                stats = _statistics(args, model, calib, state)
            t0 = time.perf_counter()
            if spec.get("select"):
                choice = state.setdefault("selection", {}).get(str(spec["budget"]))
                if choice is None:
                    choice = select(model, stats, heldout, spec["budget"])
                    state["selection"][str(spec["budget"])] = choice
                    write_json(partial, state)
                spec = {**spec, "config": choice["chosen"]}
            converted, result = compressed_copy(model, _config(spec), stats)
            rec = {**spec, "conversion_seconds": result.time_total_s, "details": result.details}
            rec.update(evaluate(converted, tokenizer, eval_ids))
            if spec["key"] == "selected/120" and not args.no_export and "export" not in state:
                state["export"] = export_check(converted, tokenizer, eval_ids, calib)
                state["export"]["runtime_perplexity"] = rec["perplexity"]
            done[spec["key"]] = rec
            write_json(partial, state)
            ppl = rec["perplexity"]
            print(
                f"[{i + 1}/{len(plan)}] {spec['key']}: wiki {ppl['wiki']:.4g}, shakespeare "
                f"{ppl['shakespeare']:.4g}, {rec['kv_bytes_per_token']:.0f} B/token, attention params "
                f"{rec['attention_parameters']}, {time.perf_counter() - t0:.0f} s",
                flush=True,
            )
            del converted
        state.setdefault("invocation_seconds", []).append(round(time.perf_counter() - started, 1))
        write_json(partial, state)
    return report(args, state, plan)


def report(args, state, plan) -> int:
    import torch

    from lowrank.io.files import write_json, write_text

    env = env_info("cpu")
    payload = {
        "benchmark": "mla_deepseek",
        "conventions": {
            "budget": "cached numbers per token and layer (original: 384)",
            "selection": "settings chosen by perplexity on held-out windows of the wiki calibration split",
            "kv_bytes_per_token": "bytes of every tensor in the model's real cache after a 64-token forward, "
            "per token (lowrank.evaluation.memory_report), float32",
            "attention_parameters": "parameters of the 30 attention modules (original: 30 × 884,736)",
        },
        "settings": state["settings"],
        "calibration_seconds": state.get("calibration_seconds"),
        "configs": state["configs"],
        "export": state.get("export"),
        "selection": state.get("selection", {}),
        "env": env,
        "torch_threads": torch.get_num_threads(),
        "wall_seconds": round(sum(state.get("invocation_seconds", [])), 1),
        "load_average_1min_end": round(os.getloadavg()[0], 2),
        "missing": [s["key"] for s in plan if s["key"] not in state["configs"]],
    }
    payload["figures"] = [figure(payload, args.results_dir, args.out_name)]
    text = markdown(payload)
    write_json(args.results_dir / f"{args.out_name}.json", payload)
    write_text(args.results_dir / f"{args.out_name}.md", text)
    print(text)
    base = state["configs"].get("baseline", {})
    seed = state["configs"].get("selected/120", {})
    print(
        final_line(
            benchmark="mla_deepseek",
            device=env["device_name"],
            torch=env["torch"],
            git_sha=env["git_sha"],
            configs=len(state["configs"]) - 1,
            ppl_wiki_baseline=base.get("perplexity", {}).get("wiki"),
            ppl_wiki_selected_120=seed.get("perplexity", {}).get("wiki"),
            ppl_wiki_transmla_120=state["configs"].get("rorope32/120", {}).get("perplexity", {}).get("wiki"),
            ppl_wiki_mha2mla_120=state["configs"].get("mha2mla/120", {}).get("perplexity", {}).get("wiki"),
        )
    )
    return 0


def settings_label(config: dict[str, Any]) -> str:
    """``rope 32 + 88, stride 1, freqfold 1, kv`` for a rorope configuration."""
    stride = config.get("rope_stride")
    return (
        f"rope {config['rope_dim']} + {config['kv_lora_rank']}, "
        f"{'spread ladder' if stride is None else f'stride {stride}'}, freqfold {config.get('freqfold', 1)}, "
        f"{config.get('latent_objective', 'kv')} objective"
    )


def _row(c: dict[str, Any]) -> list[str]:
    ppl = c["perplexity"]
    budget = c.get("budget")
    recipe = c["recipe"] + (f" ({settings_label(c['config'])})" if c.get("select") else "")
    return [
        c["key"],
        recipe,
        "384" if c["key"] == "baseline" else (str(budget) if budget else "—"),
        f"{ppl['wiki']:.2f}",
        f"{ppl['shakespeare']:.2f}",
        f"{c['kv_bytes_per_token']:.0f}",
        f"{c['attention_parameters']:,}",
    ]


def markdown(payload: dict[str, Any]) -> str:
    configs = payload["configs"]
    s = payload["settings"]
    head = [
        "key",
        "recipe",
        "cached / token·layer",
        "wiki ppl",
        "shakespeare ppl",
        "KV B/token",
        "attn params",
    ]
    lines = [
        "# MLA in DeepSeek-V3 layout (rorope) vs MHA2MLA, built-in model, CPU",
        "",
        f"_{s['model']}; calibration {s['calib_samples']}×{s['calib_seq_len']} wiki-calibration tokens; "
        f"wiki test {s['windows']} and shakespeare {s['windows_shakespeare']} windows of 512; fp32; "
        f"{payload['env']['device_name']}; git {payload['env']['git_sha']}; "
        f"wall {payload['wall_seconds']} s._",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    order = ["baseline"] + [k for k in configs if k != "baseline"]
    lines += ["| " + " | ".join(_row(configs[k])) + " |" for k in order if k in configs]
    export = payload.get("export")
    if export:
        rt, st = export["runtime_perplexity"], export["perplexity"]
        rel = max(abs(st[c] / rt[c] - 1) for c in rt)
        lines += [
            "",
            "## Stock-transformers export of selected/120",
            "",
            f"{export['type']} loaded by transformers alone: wiki {st['wiki']:.4f} (lowrank runtime "
            f"{rt['wiki']:.4f}), shakespeare {st['shakespeare']:.4f} ({rt['shakespeare']:.4f}); largest "
            f"relative perplexity difference {rel:.2e}; max |Δlogit| on 512 tokens "
            f"{export['max_abs_logit_diff_512_tokens']:.2e}.",
        ]
    if payload.get("selection"):
        lines += [
            "",
            "## Selection on held-out calibration text",
            "",
            f"Perplexity on {s.get('select_windows', 4)} held-out windows of the wiki calibration split "
            "(not used for the Grams; the test splits play no part), best first:",
            "",
            "| budget | settings | calibration ppl |",
            "|---|---|---|",
        ]
        for budget, choice in payload["selection"].items():
            ranked = sorted(choice["candidates"], key=lambda t: t["calibration_perplexity"])
            lines += [
                f"| {budget} | {settings_label(t['config'])}{' **(chosen)**' if i == 0 else ''} | "
                f"{t['calibration_perplexity']:.2f} |"
                for i, t in enumerate(ranked)
            ]
    if payload["missing"]:
        lines += ["", f"Not measured yet: {', '.join(payload['missing'])}."]
    return "\n".join(lines) + "\n"


def figure(payload: dict[str, Any], directory: Path, name: str) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = payload["configs"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    recipes: dict[str, list[tuple[float, float]]] = {}
    for c in configs.values():
        if c.get("budget") and not c["key"].startswith("ablation"):
            recipes.setdefault(c["recipe"], []).append((c["kv_bytes_per_token"], c["perplexity"]["wiki"]))
    for recipe, points in recipes.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=recipe)
    if "baseline" in configs:
        b = configs["baseline"]
        ax.axhline(b["perplexity"]["wiki"], color="k", ls="--", lw=1, label="original")
    ax.set_xlabel("KV-cache bytes per token (fp32)")
    ax.set_ylabel("wiki test perplexity")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("Perplexity against KV bytes, built-in model")
    path = save_figure(fig, Path(directory) / f"{name}.png")
    return path.name


if __name__ == "__main__":
    sys.exit(main())
