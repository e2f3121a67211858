"""``lowrank kv-analyze``: every KV projection method's error per layer and KV head on held-out text."""

from __future__ import annotations

import argparse
import importlib.util

from lowrank.cli._common import add_device_argument, add_model_arguments, format_table, resolve_device

HEADERS_KEYS = ("k-svd", "eigen", "kq", "kq-sum")
HEADERS_VALUES = ("v-svd", "wo-aware")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "kv-analyze",
        help="which KV-cache projection to use, per layer (held-out errors, gap ε)",
        description="Fit every KV-cache projection (keys: k-svd, eigen, kq, kq-sum; values: v-svd, "
        "wo-aware) on the calibration split and measure, per layer and KV head on the held-out test split, "
        "the relative error of the attention logits and of the value path through o_proj, the seed's gap ε "
        "beside the measured err²(k-svd) − err²(kq), and recommend a method per layer. Everything comes "
        "from per-head d × d Grams (see docs/kv_projection.md).",
    )
    add_model_arguments(p)
    p.add_argument(
        "--data",
        default="wiki",
        help="built-in corpus (calibration split to fit, test split held out), a .txt file (both drawn from "
        "it with different seeds) or a datasets name (default: wiki)",
    )
    p.add_argument("--calib-samples", type=int, default=32, help="calibration sequences (default: 32)")
    p.add_argument(
        "--calib-seq-len", type=int, default=512, help="tokens per sequence, both splits (default: 512)"
    )
    p.add_argument("--heldout-samples", type=int, default=16, help="held-out sequences (default: 16)")
    p.add_argument(
        "--rank-fraction",
        type=float,
        default=0.5,
        help="R/d, cached dimensions per KV head kept, in (0, 1] (default: 0.5)",
    )
    p.add_argument(
        "--rope",
        default="post",
        choices=("post", "pre"),
        help="Grams after RoPE (what the cache stores) or before it (default: post)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default: 8)")
    p.add_argument("--json", metavar="PATH", default=None, help="write the full analysis as JSON to PATH")
    p.add_argument("--md", metavar="PATH", default=None, help="write the printed tables as Markdown to PATH")
    p.add_argument(
        "--png",
        metavar="PATH",
        default=None,
        help="write heat-maps (layers × KV heads: ε, measured gap, each method's error) to PATH; needs "
        "matplotlib",
    )
    add_device_argument(p)
    p.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> None:
    if not 0.0 < args.rank_fraction <= 1.0:
        raise ValueError(f"--rank-fraction must be in (0, 1]; got {args.rank_fraction}")
    for flag in ("calib_samples", "calib_seq_len", "heldout_samples", "batch_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1; got {getattr(args, flag)}")
    if args.png and importlib.util.find_spec("matplotlib") is None:
        raise ValueError("--png needs matplotlib: pip install matplotlib")


def run(args: argparse.Namespace) -> int:
    from lowrank.io.data import calibration_batches, load_text
    from lowrank.io.files import check_output_file, write_json, write_text
    from lowrank.loading.models import load_model
    from lowrank.methods import KVProjectionConfig
    from lowrank.methods.base import refusal
    from lowrank.methods.kv_analysis import analyze_kv, plot_kv_analysis

    _check_args(args)
    for path in (args.json, args.md, args.png):
        if path:
            check_output_file(path)
    device = resolve_device(args.device)
    model, tokenizer = load_model(args.model, device=device, trust_remote_code=args.trust_remote_code)
    reason = refusal(KVProjectionConfig, model)
    if reason:  # before any data is read: a model compress --method kv-projection refuses
        raise ValueError(f"{args.model}: kv-analyze prepares kv-projection; {reason}")
    draws = (("calibration", args.calib_samples, 0), ("test", args.heldout_samples, 1))
    calib, heldout = (
        calibration_batches(tokenizer, load_text(args.data, split), n, args.calib_seq_len, seed=seed)
        for split, n, seed in draws
    )
    analysis = analyze_kv(
        model,
        calib,
        heldout,
        rank_fraction=args.rank_fraction,
        rope=args.rope,
        batch_size=args.batch_size,
        device=device,
    )
    report = {
        "model": args.model,
        "data": args.data,
        "calib_samples": args.calib_samples,
        "heldout_samples": args.heldout_samples,
        "seq_len": args.calib_seq_len,
        **analysis.to_dict(),
    }
    text = render(report)
    print(text)
    for path, write in (
        (args.json, lambda p: write_json(p, report)),
        (args.md, lambda p: write_text(p, text + "\n")),
    ):
        if path:
            write(path)
            print(f"wrote {path}")
    if args.png:
        plot_kv_analysis(analysis, args.png)
        print(f"wrote {args.png}")
    return 0


def render(report: dict) -> str:
    """The per-layer table (means over KV heads, held-out) and the summary lines, as Markdown."""
    rows = [
        (
            la["layer"],
            *(la["logit_error"][m] for m in HEADERS_KEYS),
            la["epsilon"],
            la["measured_gap"],
            la["key_method"],
            *(la["value_error"][m] for m in HEADERS_VALUES),
            la["value_method"],
        )
        for la in report["layers"]
    ]
    headers = ("layer", *HEADERS_KEYS, "ε", "err²(k-svd)−err²(kq)", "keys →", *HEADERS_VALUES, "values →")
    s = report["summary"]
    wins = ", ".join(f"{m} {n}" for m, n in {**s["key_wins"], **s["value_wins"]}.items())
    means = ", ".join(f"{m} {v:.4f}" for m, v in {**s["mean_logit_error"], **s["mean_value_error"]}.items())
    corr = s["epsilon_gap_correlation"]
    return "\n".join(
        [
            f"\n{report['model']} on {report['data']}: R = {report['rank']} of d = {report['head_dim']} "
            f"(rank fraction {report['rank_fraction']}), rope={report['rope']}; fitted on "
            f"{report['tokens']['calibration']:,} calibration tokens, measured on "
            f"{report['tokens']['heldout']:,} held-out tokens",
            "relative logit error (keys) and value-path error (values), mean over KV heads; ε and the "
            "measured gap are squared relative errors (held-out: ε ≠ the gap in general)",
            "",
            format_table(rows, headers),
            "",
            f"recommended (layers won): {wins}",
            f"mean held-out error: {means}",
            f"ε vs measured gap over heads: mean ε {s['mean_epsilon']:.4g}, "
            f"mean gap {s['mean_measured_gap']:.4g}, "
            f"correlation {'n/a' if corr is None else f'{corr:.3f}'}, max |ε − gap| "
            f"{s['max_abs_epsilon_minus_gap']:.3g} (on the calibration tokens: "
            f"{s['max_abs_epsilon_minus_gap_calibration']:.3g})",
        ]
    )
