"""Inference speed of weight-factorized models: a Llama-2-7B-shaped random model with 0/20/40/60 % of its
linear parameters removed, prefill and decode at batch 1 and 16, interleaved with the original.

    python -m benchmarks.factorized_speed --device cuda        # bf16, 32 layers, prompt 512, 32 decoded
    python -m benchmarks.factorized_speed --device cpu --shape smoke --layers 2 --batch-sizes 1 2 \\
        --prompt-len 32 --gen-len 4 --repeats 1 --results-dir /tmp/speed_smoke    # a smoke test

Each factorized model has the modules ``lowrank.compress`` builds with ``svd`` or ``svd-llm`` at that
ratio: the same targets and homogeneous ranks (``lowrank.methods.common.plan_targets``) as
``LowRankLinear`` factors in the model's dtype, but with random factor values. Speed depends on the shapes
only, and computing 224 truncated SVDs per ratio would spend device time measuring nothing (compression
time is ``compress_scale.py``'s). At 0 % every matrix is factorized at ⌊mn/(m+n)⌋, the rank whose factors
hold as many parameters as the dense matrix: the cost of two thin products instead of one at equal size.

All models sit on the device together and are timed with :func:`lowrank.evaluation.paired_throughput`
(one warm-up run each, then ``--repeats`` rounds in which every model runs once; medians), so the ratios
to the original compare models under the same conditions. Conventions: ``ratio`` = fraction of targeted
linear-layer parameters REMOVED (SVD-LLM); ``× original`` = tokens/s over the original's in the same
run (above 1: faster). Writes ``<results-dir>/factorized_speed_<device>.json`` and ``.md``; the last line
printed is one JSON line with the device, torch version and git SHA.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from typing import Any

from benchmarks._random_llama import (
    SHAPES,
    add_arguments,
    build_model,
    describe,
    device_tag,
)
from benchmarks._sweep import Sweep, parser, settings

RATIO = "ratio = fraction of targeted linear-layer parameters REMOVED (SVD-LLM convention)"


def _parser() -> argparse.ArgumentParser:
    p = parser(__doc__, None, device="cuda", model=None)
    add_arguments(p, "prompts")
    p.add_argument(
        "--ratios", type=float, nargs="+", default=[0.0, 0.2, 0.4, 0.6], help="fractions of params REMOVED"
    )
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16], help="batch sizes (1 16)")
    p.add_argument("--prompt-len", type=int, default=512, help="prompt tokens per sequence (512)")
    p.add_argument("--gen-len", type=int, default=32, help="decoded tokens per sequence (32)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timed rounds (3)")
    return p


def factorize(model, ratio: float) -> dict[str, Any]:
    """Replace ``model``'s targeted linears in place by randomly initialised ``LowRankLinear`` factors of the
    ranks ``svd``/``svd-llm`` give at ``ratio``; return the ranks and the fraction of parameters removed."""
    from lowrank.linalg.allocation import dense_parameters, factored_parameters
    from lowrank.methods.common import plan_targets
    from lowrank.methods.svd import SVDConfig
    from lowrank.nn import LowRankLinear
    from lowrank.nn.surgery import get_module, replace_module

    plan = plan_targets(model, SVDConfig(ratio=ratio, factorize_all=ratio == 0.0))
    dense = kept = 0
    for t in plan:
        dense += dense_parameters(t.out_features, t.in_features)
        if t.rank is None:
            kept += dense_parameters(t.out_features, t.in_features)
            continue
        kept += factored_parameters(t.out_features, t.in_features, t.rank)
        linear = get_module(model, t.name)
        w = linear.weight
        factors = LowRankLinear(
            t.in_features,
            t.out_features,
            t.rank,
            bias=linear.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        replace_module(model, t.name, factors)
    return {
        "ratio_params_removed": round(1.0 - kept / dense, 4),
        "ranks": {t.kind: t.rank for t in plan},
        "factorized_matrices": sum(t.rank is not None for t in plan),
    }


def _weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def pays_off(rows: dict[str, dict[str, Any]], key: str) -> str:
    """The smallest measured ratio from which every larger one is faster than the original, in words."""
    faster = [(r["ratio"], r[key] > 1.0) for name, r in rows.items() if name != "original"]
    faster.sort()
    for i, (ratio, _) in enumerate(faster):
        if all(ok for _, ok in faster[i:]):
            return f"from {ratio * 100:.0f} % removed on"
    return f"at none of the measured ratios (up to {faster[-1][0] * 100:.0f} % removed)"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.out_name = args.out_name or f"factorized_speed_{device_tag(args.device)}"
    import torch

    from lowrank.nn.attention_layout import attention_implementation

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was requested but torch.cuda.is_available() is False")
    sweep = Sweep(args, "factorized_speed", settings(args), device=args.device)
    t0 = time.perf_counter()
    original = build_model(
        args.shape,
        args.layers,
        getattr(torch, args.dtype),
        args.init_std,
        args.seed,
        args.device,
        device=args.device,
    )
    models, variants = {"original": original}, {"original": {"ratio": None}}
    for ratio in args.ratios:
        name = f"ratio {ratio:g}"
        models[name] = copy.deepcopy(original)
        variants[name] = {"ratio": ratio, **factorize(models[name], ratio)}
    for name, model in models.items():
        variants[name]["weight_bytes"] = _weight_bytes(model)
    build_s = round(time.perf_counter() - t0, 1)
    print(f"built {len(models)} models in {build_s} s", flush=True)
    plan = [{"key": f"batch{batch}", "batch": batch} for batch in args.batch_sizes]
    sweep.run(plan, lambda spec: _speed(args, models, variants, spec["batch"]), _describe)
    payload = {
        "model": {
            "shape": args.shape,
            **SHAPES[args.shape],
            "num_hidden_layers": args.layers,
            "dtype": args.dtype,
            "attn_implementation": attention_implementation(original.config),
        },
        "conventions": CONVENTIONS,
        "workload": {"prompt_len": args.prompt_len, "gen_len": args.gen_len, "repeats": args.repeats},
        "variants": variants,
        "build_seconds": build_s,
        "results": sweep.rows,
    }
    decode = {
        b: {n: round(m["decode_vs_original"], 3) for n, m in r["models"].items()}
        for b, r in sweep.rows.items()
    }
    return sweep.finish(payload, markdown, final=lambda p: {"decode_vs_original": decode})


CONVENTIONS = {
    "ratio": RATIO,
    "vs_original": "tokens/s over the original's in the same interleaved run (above 1: faster)",
    "factors": "random values, shapes and ranks as lowrank.compress gives with svd/svd-llm at the "
    "ratio (uniform ranks); at ratio 0 the break-even rank floor(mn/(m+n))",
    "peak_memory_bytes": "torch.cuda.max_memory_allocated over a model's runs: every model's weights "
    "are resident, so it is the device's peak, not one model's",
}


def _speed(args: argparse.Namespace, models: dict[str, Any], variants: dict[str, Any], batch: int) -> dict:
    """Every model's prefill and decode speed at ``batch``, interleaved, with ratios to the original."""
    from lowrank.evaluation import paired_throughput

    t0 = time.perf_counter()
    res = paired_throughput(
        models,
        repeats=args.repeats,
        progress=False,
        batch_size=batch,
        prompt_len=args.prompt_len,
        gen_len=args.gen_len,
        seed=args.seed,
    )
    base = res["original"]
    rows = {
        name: {
            **r.to_dict(),
            "ratio": variants[name]["ratio"],
            "prefill_vs_original": r.prefill_tokens_per_s / base.prefill_tokens_per_s,
            "decode_vs_original": r.decode_tokens_per_s / base.decode_tokens_per_s,
        }
        for name, r in res.items()
    }
    pays = {phase: pays_off(rows, f"{phase}_vs_original") for phase in ("prefill", "decode")}
    return {"seconds": round(time.perf_counter() - t0, 1), "models": rows, "pays_off": pays}


def _describe(row: dict[str, Any]) -> str:
    return ", ".join(
        f"{n} prefill ×{m['prefill_vs_original']:.3f} decode ×{m['decode_vs_original']:.3f}"
        for n, m in row["models"].items()
    )


def markdown(p: dict[str, Any]) -> str:
    from lowrank.cli._common import format_table

    env, m, w = p["env"], p["model"], p["workload"]
    out = [
        f"# Inference speed of factorized models: {m['shape']}-shaped random model on {env['device_name']}",
        f"{m['num_hidden_layers']} decoder layers of {describe(m)} in {m['dtype']}, attention "
        f"`{m['attn_implementation']}`; prompt {w['prompt_len']} random tokens, then {w['gen_len']} greedy "
        f"decode steps through the KV cache (`DynamicCache`); median of {w['repeats']} interleaved rounds "
        "after one warm-up run per model. torch "
        f"{env['torch']}, transformers {env['transformers']}, git {env['git_sha']}; script wall time "
        f"{p['wall_seconds']:.0f} s (building the models: {p['build_seconds']:.0f} s).",
        f"`{RATIO}`; `ratio removed` is what the factors actually remove (integer ranks). Factor values are "
        "random, with the shapes `lowrank.compress` builds with `svd`/`svd-llm` at that ratio: speed depends "
        "on the shapes only. At ratio 0 every matrix is factorized at its break-even rank ⌊mn/(m+n)⌋ (as "
        "many parameters as the dense matrix). `× original` = tokens/s over the original model's in the "
        "same run (above 1: faster).",
    ]
    for batch, res in p["results"].items():
        rows = []
        for name, r in res["models"].items():
            v = p["variants"][name]
            rows.append(
                (
                    name,
                    "–" if v["ratio"] is None else v["ratio_params_removed"],
                    round(v["weight_bytes"] / 1e9, 2),
                    round(r["prefill_tokens_per_s"], 1),
                    round(r["prefill_vs_original"], 3),
                    round(r["decode_tokens_per_s"], 1),
                    round(r["decode_vs_original"], 3),
                )
            )
        headers = (
            "model",
            "ratio removed",
            "weights GB",
            "prefill tok/s",
            "× original",
            "decode tok/s",
            "× original",
        )
        size = batch.removeprefix("batch")
        out += [
            f"## Batch {size} (measured)",
            format_table(rows, headers),
            f"Factorization pays off in prefill {res['pays_off']['prefill']}, in decode "
            f"{res['pays_off']['decode']} (batch {size}).",
        ]
    out.append(
        "Ideal: the factorized layers' FLOPs and weight bytes per token are (1 − ratio) of the dense ones, "
        "so their ideal speed-up is 1/(1 − ratio) (1.25× at 20 %, 1.67× at 40 %, 2.5× at 60 %); attention, "
        "embeddings, the LM head and per-kernel launch overhead (twice the linear kernels) do not shrink."
    )
    return "\n\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
