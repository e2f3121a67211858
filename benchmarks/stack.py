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

from benchmarks._common import env_info, final_line, write_results

CONTEXT = 4096
STACKS: dict[str, list[dict[str, Any]]] = {
    "svd-llm-v2 MLP 20 % + mla (31.25 % KV)": [
        {"method": "svd-llm-v2", "ratio": 0.2, "targets": ["re:.*mlp\\..*_proj"]},
        {"method": "mla", "rope_dim": 8, "kv_rank": 32},
    ],
    "svd-llm-v2 MLP 20 % + kv-projection kq pre-RoPE (R/d 0.5)": [
        {"method": "svd-llm-v2", "ratio": 0.2, "targets": ["re:.*mlp\\..*_proj"]},
        {"method": "kv-projection", "kv_method": "kq", "rank_fraction": 0.5, "rope": "pre"},
    ],
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration sequences per method (32)")
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--windows", type=int, default=8, help="wiki test windows of 512 tokens (8)")
    p.add_argument("--windows-shakespeare", type=int, default=4)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out-name", default="stack_cpu")
    return p


def measure(model, tokenizer, eval_ids: dict[str, tuple[Any, int]]) -> dict[str, Any]:
    from lowrank.evaluation import memory_report, perplexity
    from lowrank.methods import weight_bytes

    ppl = {
        corpus: perplexity(model, tokenizer, ids, seq_len=512, max_windows=n, progress=False).perplexity
        for corpus, (ids, n) in eval_ids.items()
    }
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
        calibration = {"samples": args.calib_samples, "seq_len": args.calib_seq_len}
        config = config_from_dict({**step, "calibration": calibration})
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
    import torch

    import lowrank
    from lowrank.io.data import tokenize

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    original, tokenizer = lowrank.load_model(args.model)
    eval_ids = {
        "wiki": (tokenize(tokenizer, lowrank.load_text("wiki", "test")), args.windows),
        "shakespeare": (
            tokenize(tokenizer, lowrank.load_text("shakespeare", "test")),
            args.windows_shakespeare,
        ),
    }
    base = measure(original, tokenizer, eval_ids)
    rows = [run_stack(name, steps, original, tokenizer, eval_ids, args) for name, steps in STACKS.items()]
    lines = [
        f"# Stacked methods on {args.model} (CPU)",
        "",
        f"Perplexity on the first {args.windows} wiki-test and {args.windows_shakespeare} shakespeare "
        f"windows of 512 tokens; calibration {args.calib_samples} × {args.calib_seq_len} wiki tokens per "
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
    for r in rows:
        lines.append(
            f"| {r['stack']} | {r['perplexity']['wiki']:.2f} | {r['perplexity']['shakespeare']:.2f} | "
            f"{r['weight_bytes']:,} ({r['weight_bytes'] / base['weight_bytes']:.3f}×) | "
            f"{r['kv_bytes_at_context']:,.0f} "
            f"({r['kv_bytes_at_context'] / base['kv_bytes_at_context']:.4f}×) | "
            f"{' + '.join(map(str, r['compress_seconds']))} | {'yes' if r['reload_identical'] else 'NO'} |"
        )
    markdown = "\n".join(lines) + "\n"
    print(markdown)
    env = env_info("cpu")
    payload = {
        "settings": vars(args),
        "env": env,
        "original": base,
        "stacks": rows,
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    write_results(args.out_name, payload, markdown)
    print(
        final_line(
            device=env["device_name"],
            torch=env["torch"],
            git_sha=env["git_sha"],
            stacks=len(rows),
            identical=all(r["reload_identical"] for r in rows),
        )
    )
    return 0 if all(r["reload_identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
