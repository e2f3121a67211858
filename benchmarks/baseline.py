"""Baseline of the built-in model: perplexity on wiki (seq 512 and 2048) and shakespeare, CPU speed, memory.

    python -m benchmarks.baseline                      # defaults below; about 10 minutes on 2 idle CPU cores
    python -m benchmarks.baseline --windows-512 0      # 0 = every window of the split
    python -m benchmarks.baseline --reuse-perplexity   # re-measure speed and memory only

Writes ``benchmarks/results/baseline_<device>.json`` and ``.md`` (``--resume`` keeps the measured rows);
the last line printed is one JSON line with the device, torch version and git SHA.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from benchmarks._sweep import Sweep, parser
from benchmarks._tables import load_text


def _windows(n: int) -> int | None:
    return None if n == 0 else n


def _parser() -> argparse.ArgumentParser:
    p = parser(__doc__, "baseline_cpu", device="cpu")
    p.add_argument("--windows-512", type=int, default=64, help="wiki windows at seq 512 (0: all)")
    p.add_argument("--windows-2048", type=int, default=16, help="wiki windows at seq 2048 (0: all)")
    p.add_argument("--windows-shakespeare", type=int, default=32, help="shakespeare windows, seq 512")
    p.add_argument("--repeats", type=int, default=5, help="timed throughput runs (median reported)")
    p.add_argument(
        "--reuse-perplexity",
        action="store_true",
        help="take perplexities from the existing results file when its model and window counts match, and "
        "re-measure only speed and memory (perplexity is deterministic, speed is noisy)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.out_name == "baseline_cpu":
        args.out_name = f"baseline_{args.device}"
    from lowrank.evaluation import memory_report, perplexity, throughput
    from lowrank.io.data import load_text, tokenize
    from lowrank.loading.models import load_model

    settings = {k: getattr(args, k) for k in ("model", "windows_512", "windows_2048", "windows_shakespeare")}
    sweep = Sweep(args, "baseline", settings, device=args.device)
    start = time.perf_counter()
    model, tokenizer = load_model(args.model, device=args.device)
    load_seconds = time.perf_counter() - start
    wiki = tokenize(tokenizer, load_text("wiki", "test"))
    plays = tokenize(tokenizer, load_text("shakespeare", "test"))
    texts = {  # name -> (token ids, seq_len, max_windows)
        "wiki_test_seq512": (wiki, 512, _windows(args.windows_512)),
        "wiki_test_seq2048": (wiki, 2048, _windows(args.windows_2048)),
        "shakespeare_test_seq512": (plays, 512, _windows(args.windows_shakespeare)),
    }
    reused = _reused(args, texts) if args.reuse_perplexity else {}
    sweep.rows.update({k: v for k, v in reused.items() if k not in sweep.rows})

    def measure(spec: dict) -> dict:
        if spec["key"] in texts:
            ids, seq_len, windows = texts[spec["key"]]
            return perplexity(model, None, ids, seq_len=seq_len, max_windows=windows).to_dict()
        return throughput(
            model, batch_size=spec["batch"], prompt_len=128, gen_len=64, repeats=args.repeats
        ).to_dict()

    plan = [{"key": name} for name in texts] + [{"key": f"batch{b}", "batch": b} for b in (1, 4)]
    sweep.run(plan, measure)
    runs = {k: sweep.rows[k] for k in texts if k in sweep.rows}
    payload = {
        "model": args.model,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "cached_load_seconds": round(load_seconds, 2),
        "corpus_tokens": {"wiki_test": wiki.numel(), "shakespeare_test": plays.numel()},
        "perplexity": runs,
        "throughput": {k: sweep.rows[k] for k in ("batch1", "batch4") if k in sweep.rows},
        "memory": memory_report(model, tokens=64).to_dict(),
    }
    return sweep.finish(
        payload, _markdown, final=lambda p: {f"ppl_{k}": round(r["perplexity"], 3) for k, r in runs.items()}
    )


def _reused(args: argparse.Namespace, plan: dict) -> dict:
    """Perplexity results of the previous run whose model and window counts match this plan."""
    path = args.results_dir / f"{args.out_name}.json"
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
    env = p["env"]
    header = (
        f"torch {env['torch']}, transformers {env['transformers']}, git {env['git_sha']}; cached model load "
        f"{p['cached_load_seconds']} s; {p['torch_threads']} torch threads; 1-min load average "
        f"{load_text(p)} (start → end of each invocation; speed is only meaningful on an otherwise idle "
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
