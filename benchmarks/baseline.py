"""Baseline of the built-in model: perplexity on wiki (seq 512 and 2048) and shakespeare, CPU speed, memory.

    python -m benchmarks.baseline                      # defaults below; about 10 minutes on 2 idle CPU cores
    python -m benchmarks.baseline --windows-512 0      # 0 = every window of the split
    python -m benchmarks.baseline --reuse-perplexity   # re-measure speed and memory only

Writes ``benchmarks/results/baseline_<device>.json`` and ``.md``; the last line printed is one JSON line
with the device, torch version and git SHA.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from benchmarks._common import RESULTS_DIR, env_info, final_line, write_results


def _windows(n: int) -> int | None:
    return None if n == 0 else n


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="model to measure (default: smollm2-135m)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="device (default: cpu)")
    parser.add_argument("--windows-512", type=int, default=64, help="wiki windows at seq 512 (0: all)")
    parser.add_argument("--windows-2048", type=int, default=16, help="wiki windows at seq 2048 (0: all)")
    parser.add_argument("--windows-shakespeare", type=int, default=32, help="shakespeare windows, seq 512")
    parser.add_argument("--repeats", type=int, default=5, help="timed throughput runs (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--reuse-perplexity",
        action="store_true",
        help="take perplexities from the existing results file when its model and window counts match, and "
        "re-measure only speed and memory (perplexity is deterministic, speed is noisy)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    import torch

    from lowrank.evaluation import memory_report, perplexity, throughput
    from lowrank.io.data import load_text, tokenize
    from lowrank.loading.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    start = time.perf_counter()
    model, tokenizer = load_model(args.model, device=args.device)
    load_seconds = time.perf_counter() - start
    wiki = tokenize(tokenizer, load_text("wiki", "test"))
    plays = tokenize(tokenizer, load_text("shakespeare", "test"))
    plan = {  # name -> (token ids, seq_len, max_windows)
        "wiki_test_seq512": (wiki, 512, _windows(args.windows_512)),
        "wiki_test_seq2048": (wiki, 2048, _windows(args.windows_2048)),
        "shakespeare_test_seq512": (plays, 512, _windows(args.windows_shakespeare)),
    }
    runs = _reused(args, plan) if args.reuse_perplexity else {}
    for name, (ids, seq_len, windows) in plan.items():
        if name not in runs:
            runs[name] = perplexity(model, None, ids, seq_len=seq_len, max_windows=windows).to_dict()
    speed = {
        f"batch{b}": throughput(
            model, batch_size=b, prompt_len=128, gen_len=64, repeats=args.repeats
        ).to_dict()
        for b in (1, 4)
    }
    env = env_info(args.device)
    payload = {
        "model": args.model,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "cached_load_seconds": round(load_seconds, 2),
        "corpus_tokens": {"wiki_test": wiki.numel(), "shakespeare_test": plays.numel()},
        "perplexity": runs,
        "throughput": speed,
        "memory": memory_report(model, tokens=64).to_dict(),
        "env": env,
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": {"start": round(load_before[0], 2), "end": round(os.getloadavg()[0], 2)},
    }
    markdown = _markdown(payload)
    write_results(f"baseline_{args.device}", payload, markdown)
    print(markdown)
    ppl = {f"ppl_{name}": round(r["perplexity"], 3) for name, r in runs.items()}
    print(
        final_line(
            benchmark="baseline", device=env["device_name"], torch=env["torch"], git_sha=env["git_sha"], **ppl
        )
    )
    return 0


def _reused(args: argparse.Namespace, plan: dict) -> dict:
    """Perplexity results of the previous run whose model and window counts match this plan."""
    path = RESULTS_DIR / f"baseline_{args.device}.json"
    if not path.is_file():
        return {}
    previous = json.loads(path.read_text())
    if previous.get("model") != args.model:
        return {}
    reused = {}
    for name, (ids, seq_len, windows) in plan.items():
        old = previous.get("perplexity", {}).get(name)
        expected = min(ids.numel() // seq_len, windows or ids.numel())
        if old and old["seq_len"] == seq_len and old["windows"] == expected:
            reused[name] = {
                **old,
                "reused_from_git_sha": old.get("reused_from_git_sha", previous["env"]["git_sha"]),
            }
    return reused


def _markdown(p: dict) -> str:
    from lowrank.cli._common import format_table

    ppl_rows = [
        (name, r["perplexity"], r["windows"], r["tokens_evaluated"]) for name, r in p["perplexity"].items()
    ]
    speed_rows = [
        (
            name,
            r["prompt_len"],
            r["gen_len"],
            r["prefill_tokens_per_s"],
            r["decode_tokens_per_s"],
            r["peak_memory_bytes"],
            r["peak_memory_kind"],
        )
        for name, r in p["throughput"].items()
    ]
    mem = p["memory"]
    mem_rows = [
        (k, mem[k])
        for k in ("parameters", "decoder_linear_parameters", "weight_bytes", "kv_cache_bytes_per_token")
    ]
    env, load = p["env"], p["load_average_1min"]
    header = (
        f"torch {env['torch']}, transformers {env['transformers']}, git {env['git_sha']}; cached model load "
        f"{p['cached_load_seconds']} s; {p['torch_threads']} torch threads; 1-min load average "
        f"{load['start']} at start, {load['end']} at end (speed is only meaningful on an otherwise idle "
        "machine)"
    )
    return (
        "\n\n".join(
            [
                f"# Baseline: {p['model']} ({p['dtype']}) on {env['device_name']}",
                header,
                "## Perplexity (non-overlapping windows, every predicted token counted)",
                format_table(ppl_rows, ("split / seq_len", "perplexity", "windows", "tokens evaluated")),
                "## Throughput (greedy decode with the KV cache; median of timed runs)",
                format_table(
                    speed_rows,
                    (
                        "batch",
                        "prompt",
                        "generated",
                        "prefill tok/s",
                        "decode tok/s",
                        "peak bytes",
                        "peak kind",
                    ),
                ),
                "## Memory",
                format_table(mem_rows, ("quantity", "value")),
            ]
        )
        + "\n"
    )


if __name__ == "__main__":
    sys.exit(main())
