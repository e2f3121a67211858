"""``lowrank evaluate``: perplexity, throughput and memory of a model on a corpus split."""

from __future__ import annotations

import argparse
import logging

from lowrank.cli._common import (
    add_device_argument,
    add_model_arguments,
    check_lengths,
    check_positions,
    format_table,
    resolve_device,
)

logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="perplexity, throughput and memory of a model",
        description="Evaluate a model: perplexity (WikiText-2 protocol: non-overlapping windows, every token "
        "counted, BOS first where the tokenizer adds one; see docs/evaluation.md), prefill/decode throughput "
        "with the KV cache, parameters, weight bytes and KV-cache bytes per token measured on a real forward "
        "pass. Prints a table; --json writes the same figures.",
    )
    add_model_arguments(p)
    p.add_argument(
        "--data",
        default="wiki",
        help="built-in corpus (wiki, shakespeare), local .txt file or datasets name 'name[:config]' "
        "(default: wiki)",
    )
    p.add_argument("--split", default="test", help="corpus split: calibration or test (default: test)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per perplexity window (default: 512)")
    p.add_argument(
        "--max-windows",
        type=int,
        default=None,
        metavar="N",
        help="evaluate only the first N windows, N >= 1 (0 is an error); omit it to evaluate the whole split "
        "(default: all windows)",
    )
    p.add_argument(
        "--bos",
        default="auto",
        choices=("auto", "yes", "no"),
        help="start every perplexity window with the BOS token: 'auto' does as the model's tokenizer does "
        "by default (Gemma, Llama-2/3 add BOS; SmolLM2, GPT-2, Qwen do not), 'yes'/'no' force it "
        "(default: auto)",
    )
    p.add_argument(
        "--batch-size", type=int, default=1, help="windows per forward pass for perplexity (default: 1)"
    )
    p.add_argument("--no-throughput", action="store_true", help="skip the prefill/decode speed measurement")
    p.add_argument(
        "--prompt-len",
        type=int,
        default=128,
        help="throughput: prompt tokens of the prefill, batch size 1 (default: 128)",
    )
    p.add_argument(
        "--gen-len",
        type=int,
        default=64,
        help="throughput: greedy-decoded tokens after the prompt (default: 64)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="throughput: timed runs after one warm-up; the median is reported (default: 3)",
    )
    p.add_argument("--json", metavar="PATH", default=None, help="also write the report as JSON to PATH")
    add_device_argument(p)
    p.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="dtype the model is loaded in (default: float32)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lowrank.evaluation import NonFiniteLogitsError
    from lowrank.evaluation.report import report_rows
    from lowrank.io.data import load_text
    from lowrank.io.files import check_output_file, write_json
    from lowrank.io.paths import check_paths
    from lowrank.loading.models import load_model

    if args.max_windows is not None and args.max_windows < 1:
        raise ValueError(f"--max-windows must be >= 1 (omit it for the whole split); got {args.max_windows}")
    check_lengths(args)
    check_paths({"--model": args.model, "--data": args.data}, {"--json": args.json})
    if args.json:
        check_output_file(args.json)
    device = resolve_device(args.device)
    model, tokenizer = load_model(
        args.model, device=device, dtype=args.dtype, trust_remote_code=args.trust_remote_code
    )
    check_positions(model, args, throughput=not args.no_throughput)
    text = load_text(args.data, args.split)
    try:
        report = _evaluate(model, tokenizer, text, args)
    except NonFiniteLogitsError as exc:  # a broken model is a one-line error too, not a traceback
        raise ValueError(str(exc)) from exc
    report = {"model": args.model, "data": args.data, "split": args.split, **report}
    print(f"\n{args.model} on {args.data}/{args.split} ({report['device']}, {report['dtype']})")
    print(format_table(report_rows(report), headers=("metric", "value")))
    if args.json:
        write_json(args.json, report)
        print(f"wrote {args.json}")
    return 0


def _evaluate(model, tokenizer, text, args: argparse.Namespace) -> dict:
    from lowrank.evaluation.report import evaluate_model

    return evaluate_model(
        model,
        tokenizer,
        text,
        seq_len=args.seq_len,
        max_windows=args.max_windows,
        batch_size=args.batch_size,
        add_bos={"auto": None, "yes": True, "no": False}[args.bos],
        run_throughput=not args.no_throughput,
        prompt_len=args.prompt_len,
        gen_len=args.gen_len,
        repeats=args.repeats,
    )
