"""Stacked methods on the built-in model: weight compression of the MLP, then a KV-cache method on attention.

For each stack (``svd-llm-v2`` on the MLP projections, then ``mla`` or ``kv-projection`` on attention) the
script compresses a fresh copy of the model, saves it, reloads it, checks that the reloaded model gives
the same logits bit for bit, and reports against the original measured in the same run: perplexity on
wiki and shakespeare, weight bytes, and KV-cache bytes at a 4,096-token context (bytes per token measured
on the real cache object × 4,096).

    python -m benchmarks.stack            # results/stack_cpu.{json,md}
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._common import load_for_evaluation, perplexities
from benchmarks._sweep import Sweep, calibration_config, parser

CONTEXT = 4096
# svd-llm-v2 with uniform ranks, as measured (its default allocation, auto, came later)
STACKS: dict[str, list[dict[str, Any]]] = {
    "svd-llm-v2 MLP 20 % + mla (31.25 % KV)": [
        {"method": "svd-llm-v2", "ratio": 0.2, "allocation": "uniform", "targets": ["re:.*mlp\\..*_proj"]},
        {"method": "mla", "partial_rope": "mha2mla", "rope_dim": 8, "kv_rank": 32},
    ],
    "svd-llm-v2 MLP 20 % + kv-projection kq pre-RoPE (R/d 0.5)": [
        {"method": "svd-llm-v2", "ratio": 0.2, "allocation": "uniform", "targets": ["re:.*mlp\\..*_proj"]},
        {"method": "kv-projection", "kv_method": "kq", "rank_fraction": 0.5, "rope": "pre"},
    ],
}


def _parser() -> argparse.ArgumentParser:
    calibration = {"samples": 32, "seq_len": 512}
    return parser(__doc__, "stack_cpu", calibration=calibration, windows=(8, 4))


def measure(model, tokenizer, eval_ids: dict[str, tuple[Any, int]]) -> dict[str, Any]:
    from lowrank.evaluation import memory_report
    from lowrank.methods import weight_bytes

    ppl = perplexities(model, eval_ids, tokenizer)
    kv = memory_report(model).kv_cache_bytes_per_token
    return {"perplexity": ppl, "weight_bytes": weight_bytes(model), "kv_bytes_at_context": kv * CONTEXT}


def run_stack(name, steps, original, tokenizer, eval_ids, args) -> dict[str, Any]:
    import torch

    import lowrank
    from lowrank.calibration.pipeline import calibration_tokens
    from lowrank.loading.serialization import save_compressed
    from lowrank.methods import compress, config_from_dict

    model = copy.deepcopy(original)
    seconds = []
    for step in steps:
        config = config_from_dict({**step, "calibration": calibration_config(args)})
        start = time.perf_counter()
        compress(model, config, calibration=calibration_tokens(config.calibration, tokenizer))
        seconds.append(round(time.perf_counter() - start, 1))
    with tempfile.TemporaryDirectory() as tmp:
        save_compressed(model, Path(tmp) / "m", tokenizer=tokenizer)
        loaded, _ = lowrank.load_model(str(Path(tmp) / "m"))
    probe = eval_ids["wiki"][0][:256].unsqueeze(0)
    with torch.no_grad():
        identical = bool(torch.equal(loaded(probe).logits, model(probe).logits))
    return {
        "stack": name,
        "steps": steps,
        "compress_seconds": seconds,
        "reload_identical": identical,
        **measure(loaded, tokenizer, eval_ids),
    }


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    keys = ("model", "calib_samples", "calib_seq_len", "windows", "windows_shakespeare")
    sweep = Sweep(args, "stack", {k: getattr(args, k) for k in keys})
    original, tokenizer, eval_ids = load_for_evaluation(args)

    def measure_one(spec: dict[str, Any]) -> dict[str, Any]:
        if spec["key"] == "original":
            return measure(original, tokenizer, eval_ids)
        return run_stack(spec["key"], STACKS[spec["key"]], original, tokenizer, eval_ids, args)

    sweep.run([{"key": "original"}, *({"key": name} for name in STACKS)], measure_one)
    rows = [sweep.rows[name] for name in STACKS if name in sweep.rows]
    identical = all(r["reload_identical"] for r in rows)
    payload = {"original": sweep.rows["original"], "stacks": rows}
    final = {"stacks": len(rows), "identical": identical}
    sweep.finish(payload, _markdown, final=lambda p: final)
    return 0 if identical else 1


def _markdown(p: dict[str, Any]) -> str:
    s, base = p["settings"], p["original"]
    lines = [
        f"# Stacked methods on {s['model']} (CPU)",
        "",
        f"Perplexity on the first {s['windows']} wiki-test and {s['windows_shakespeare']} shakespeare "
        f"windows of 512 tokens; calibration {s['calib_samples']} × {s['calib_seq_len']} wiki tokens per "
        "method "
        "(sequential); KV bytes = bytes per token of the real cache object × 4,096 tokens (float32); "
        "every figure of a stack is measured on the model reloaded from disk. Ratios are to the original "
        "in the same run.",
        "",
        "| model | wiki ppl | shakespeare ppl | weight bytes | KV bytes at 4k context | compress s "
        "| reload identical |",
        "|---|---|---|---|---|---|---|",
        f"| original | {base['perplexity']['wiki']:.2f} | {base['perplexity']['shakespeare']:.2f} | "
        f"{base['weight_bytes']:,} | {base['kv_bytes_at_context']:,.0f} | – | – |",
    ]
    for r in p["stacks"]:
        lines.append(
            f"| {r['stack']} | {r['perplexity']['wiki']:.2f} | {r['perplexity']['shakespeare']:.2f} | "
            f"{r['weight_bytes']:,} ({r['weight_bytes'] / base['weight_bytes']:.3f}×) | "
            f"{r['kv_bytes_at_context']:,.0f} "
            f"({r['kv_bytes_at_context'] / base['kv_bytes_at_context']:.4f}×) | "
            f"{' + '.join(map(str, r['compress_seconds']))} | {'yes' if r['reload_identical'] else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
