"""``lowrank demo``: the main job end to end — compress a model, save it, reload it, compare before/after.

The defaults are the recommended recipe on the built-in model: SVD-LLM V2 with randomized SVD, 20 % of
the decoder linear parameters removed, 64 × 512 calibration tokens of ``wiki``. The compressed model is
saved, loaded back from disk (the figures of the "after" column come from the reloaded copy, so the demo
also proves the round trip) and compared with the original on the same windows and workload.
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

from lowrank.cli._common import (
    add_device_argument,
    add_model_arguments,
    check_lengths,
    check_positions,
    format_table,
    resolve_device,
)

__all__ = ["register", "run", "comparison_rows"]

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="compress the built-in model and print a before/after table (the README's main job)",
        description=(
            "Compress a model (default: the built-in smollm2-135m with svd-llm-v2 + rSVD, 20%% of the "
            "decoder linear parameters removed), save it, reload it from disk and print perplexity, "
            "parameters, KV-cache bytes, throughput and compression time before and after. --ratio is the "
            "fraction of the targeted linear layers' parameters REMOVED (SVD-LLM convention)."
        ),
    )
    add_model_arguments(p)
    p.add_argument(
        "--method", help=f"compression method (default: {DEFAULT_METHOD}); its options are listed below"
    )
    p.add_argument("--config", help="JSON file with a method config (as in a saved model's lowrank.json)")
    p.add_argument("--data", default="wiki", help="evaluation corpus, split 'test' (default: wiki)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per perplexity window (default: 512)")
    p.add_argument(
        "--max-windows",
        type=_windows,
        default=32,
        help="perplexity windows evaluated before and after: N >= 1 (default: 32), or 'all' for the "
        "whole split",
    )
    p.add_argument("--prompt-len", type=int, default=128, help="throughput: prompt tokens (default: 128)")
    p.add_argument("--gen-len", type=int, default=64, help="throughput: decoded tokens (default: 64)")
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="throughput: rounds, each timing the original and the compressed model once; medians "
        "reported (default: 3)",
    )
    p.add_argument(
        "--out",
        default="out/demo",
        help="directory the compressed model is saved to (default: out/demo; checked before any work)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="allow --out to replace a non-empty directory that this toolkit did not write",
    )
    p.add_argument("--checkpoint-dir", help="save after every layer; rerun with the same flags to resume")
    p.add_argument("--json", metavar="PATH", help="write both reports and the compression summary as JSON")
    add_device_argument(p)
    p.set_defaults(func=run)


#: the demo's recipe; flags and --config override it
DEFAULT_METHOD = "svd-llm-v2"
RECIPE = {"ratio": 0.2, "decomposer": {"name": "rsvd", "oversample": 10, "power_iters": 2}}


def _windows(value: str) -> int | None:
    if value == "all":
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1 or 'all'; got {value!r}")
    return n


def add_derived_flags(parser: argparse.ArgumentParser) -> None:
    """The method options, as in ``lowrank compress``."""
    from lowrank.cli.compress import add_derived_flags as add

    add(parser)


def _ratio(after: Any, before: Any) -> str:
    if isinstance(after, int | float) and isinstance(before, int | float) and before:
        return f"{after / before:.3f}x"
    return "-"


#: (key, label) rows of the before/after table.
_COMPARED = (
    ("perplexity", "perplexity ({data}, {windows} x {seq_len} tokens)"),
    ("parameters", "parameters (whole model)"),
    ("decoder_linear_parameters", "parameters (decoder linear layers)"),
    ("weight_bytes", "weight bytes"),
    ("kv_cache_bytes_per_token", "KV-cache bytes / token (measured)"),
    ("prefill_tokens_per_s", "prefill tokens/s (batch 1, {prompt_len}-token prompt)"),
    ("decode_tokens_per_s", "decode tokens/s (batch 1, {gen_len} tokens)"),
)


def comparison_rows(
    before: dict[str, Any], after: dict[str, Any], fmt: dict[str, Any]
) -> list[tuple[str, Any, Any, str]]:
    """Rows (label, before, after, after/before) for the figures both reports share."""
    rows = []
    for key, label in _COMPARED:
        b, a = before.get(key), after.get(key)
        rows.append((label.format(**fmt), "-" if b is None else b, "-" if a is None else a, _ratio(a, b)))
    return rows


def run(args: argparse.Namespace) -> int:
    """Check every flag and path before the slow steps, lock the outputs, then run the five steps."""
    from lowrank.cli.compress import build_config, check_outputs
    from lowrank.io.paths import output_lock

    config = build_config(args, RECIPE, DEFAULT_METHOD)
    check_lengths(args)
    check_outputs(args, config)
    device = resolve_device(args.device)
    with output_lock(args.out, args.json, args.checkpoint_dir):
        return _demo(args, config, device)


def _demo(args: argparse.Namespace, config: Any, device: str) -> int:
    """Compress, save, reload and compare (flags and paths already checked)."""
    import torch

    from lowrank.calibration.pipeline import calibration_tokens
    from lowrank.cli.compress import summary_table
    from lowrank.evaluation import paired_throughput
    from lowrank.evaluation.report import evaluate_model
    from lowrank.io.data import load_text, tokenize
    from lowrank.io.files import write_json
    from lowrank.loading.models import load_model
    from lowrank.loading.serialization import save_compressed
    from lowrank.methods import compress

    eval_kwargs = dict(seq_len=args.seq_len, max_windows=args.max_windows)
    load = dict(device=device, trust_remote_code=args.trust_remote_code)
    details = config.to_dict()
    recipe = f"{config.method} + {details.get('decomposer', {}).get('name', '-')}"

    model, tokenizer = load_model(args.model, **load)
    check_positions(model, args)
    eval_ids = tokenize(tokenizer, load_text(args.data, "test"))
    print(f"[1/5] perplexity and memory of the original {args.model} on {args.data}/test")
    before = evaluate_model(model, tokenizer, eval_ids, run_throughput=False, **eval_kwargs)

    print(f"[2/5] compressing with {recipe}, ratio {details.get('ratio')} removed")
    calibration = calibration_tokens(config.calibration, tokenizer) if config.calibrated else None
    start = time.perf_counter()
    result = compress(
        model, config, calibration=calibration, device=device, checkpoint_dir=args.checkpoint_dir
    )
    compress_seconds = time.perf_counter() - start
    print(summary_table(result))

    print(f"[3/5] saving to {args.out} and loading it back")
    save_compressed(model, args.out, tokenizer=tokenizer, result=result, overwrite=args.overwrite)
    del model
    compressed, _ = load_model(args.out, device=device)

    print("[4/5] perplexity and memory of the reloaded compressed model on the same windows")
    after = evaluate_model(compressed, tokenizer, eval_ids, run_throughput=False, **eval_kwargs)

    print("[5/5] throughput of both models, runs interleaved")
    original, _ = load_model(args.model, **load)
    workload = {"prompt_len": args.prompt_len, "gen_len": args.gen_len}
    speed = paired_throughput({"before": original, "after": compressed}, repeats=args.repeats, **workload)
    for report, key in ((before, "before"), (after, "after")):
        tp = speed[key]
        report.update(
            prefill_tokens_per_s=tp.prefill_tokens_per_s,
            decode_tokens_per_s=tp.decode_tokens_per_s,
            throughput_workload={"batch_size": 1, "repeats": args.repeats, "interleaved": True, **workload},
        )

    fmt = {"data": args.data, "windows": before["windows"], "seq_len": args.seq_len, **workload}
    rows = comparison_rows(before, after, fmt)
    rows.append(("compression time (s)", "-", round(compress_seconds, 1), "-"))
    achieved = result.details
    print(
        f"\n{args.model}: {recipe}, ratio {details.get('ratio')} "
        "(fraction of decoder linear parameters REMOVED; "
        f"achieved {achieved.get('ratio_params_removed', 0):.4f}, "
        f"keep_singular_fraction {achieved.get('keep_singular_fraction', 0):.4f}) on {before['device']}, "
        f"torch {torch.__version__}"
    )
    print(format_table(rows, headers=("metric", "original", "compressed", "compressed / original")))
    if args.json:
        write_json(
            args.json,
            {
                "model": args.model,
                "compressed_dir": str(args.out),
                "before": before,
                "after": after,
                "compression": result.summary(),
                "compression_wall_s": round(compress_seconds, 2),
            },
        )
        print(f"wrote {args.json}")
    return 0
