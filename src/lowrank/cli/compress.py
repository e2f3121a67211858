"""``lowrank compress``: factorize a model's decoder linear layers and save the smaller model.

Flags mirror the fields of the method configs (``lowrank.methods``); ``--config cfg.json`` loads a
serialized config and explicit flags override it. All logic lives in the library: this module only
loads the model and calibration tokens, calls ``compress`` and ``save_compressed``, and prints.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from lowrank.cli._common import add_device_argument, format_table

__all__ = ["register", "run", "summary_table"]

METHODS = ("svd", "svd-llm", "svd-llm-v2")
ALLOCATIONS = ("greedy", "greedy_relative", "greedy_anchored", "log_inverse", "uniform")
"""``lowrank.linalg.allocation.ALLOCATION_RULES``, spelled out so building the parser imports no torch."""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compress",
        help="compress a model's linear layers into low-rank factors (SVD, SVD-LLM, SVD-LLM V2)",
        description=(
            "Replace the decoder linear layers of a model by low-rank factors and save the result as a "
            "directory that 'lowrank evaluate --model DIR' loads. --ratio is the fraction of the targeted "
            "linear layers' parameters REMOVED (SVD-LLM convention); --keep-singular-fraction is the "
            "fraction of singular values kept (the rSVD paper's r). Give exactly one."
        ),
    )
    p.add_argument("--model", default="smollm2-135m", help="built-in model name or a model directory")
    p.add_argument(
        "--method", choices=METHODS, help="compression method (default: svd-llm-v2, or --config's)"
    )
    p.add_argument("--config", help="JSON file with a method config (as in a saved model's lowrank.json)")
    p.add_argument(
        "--decomposer", choices=("svd", "rsvd", "auto"), help="truncated decomposition (default svd)"
    )
    p.add_argument("--oversample", type=int, help="rSVD oversampling p (extra random directions)")
    p.add_argument("--power-iters", type=int, help="rSVD power iterations q")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--ratio", type=float, help="fraction of targeted linear parameters removed, in [0, 1)")
    g.add_argument("--keep-singular-fraction", type=float, help="fraction of singular values kept, in (0, 1]")
    p.add_argument("--calib-data", help="calibration corpus (default wiki)")
    p.add_argument("--calib-samples", type=int, help="calibration sequences (default 64; anchors use 256)")
    p.add_argument("--seq-len", type=int, help="tokens per calibration sequence (default 512; anchors 2048)")
    p.add_argument("--batch-size", type=int, help="sequences per calibration forward chunk (default 8)")
    p.add_argument(
        "--non-sequential",
        action="store_true",
        help="calibrate every layer on the ORIGINAL model's activations (default: sequential)",
    )
    p.add_argument(
        "--truncation",
        choices=("cholesky", "eigh", "projection"),
        help="route to the loss minimiser (default: cholesky for svd-llm, eigh for svd-llm-v2)",
    )
    p.add_argument(
        "--allocation",
        choices=ALLOCATIONS,
        help="svd-llm-v2 rank allocation rule within each group of same-type matrices (default uniform: "
        "homogeneous ranks, no reallocation; see docs/compression.md for the measured comparison)",
    )
    p.add_argument(
        "--gram-dtype", choices=("float64", "float32"), help="Gram accumulation dtype (default float64)"
    )
    p.add_argument(
        "--compute-dtype", choices=("float64", "float32"), help="decomposition dtype (default float64)"
    )
    p.add_argument(
        "--targets", nargs="+", help="modules to compress: name suffixes, 're:<regex>' or class names"
    )
    p.add_argument("--ignore", nargs="+", help="modules to skip (same syntax as --targets)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration sample draw (default 0)")
    p.add_argument("--checkpoint-dir", help="save after every layer; rerun with the same flags to resume")
    p.add_argument("--out", help="directory to write the compressed model to")
    p.add_argument("--json", help="write the summary as JSON to this file")
    add_device_argument(p)
    p.set_defaults(func=run)


_FLAG_FIELDS = {
    "ratio": "ratio",
    "keep_singular_fraction": "keep_singular_fraction",
    "calib_data": "calib_data",
    "calib_samples": "calib_samples",
    "seq_len": "seq_len",
    "batch_size": "batch_size",
    "truncation": "truncation",
    "allocation": "allocation",
    "gram_dtype": "gram_dtype",
    "compute_dtype": "compute_dtype",
    "targets": "targets",
    "ignore": "ignore",
}


def build_config(args: argparse.Namespace) -> Any:
    """The method config from ``--config`` (if any) overridden by the explicit flags."""
    from lowrank.methods import config_from_dict

    data: dict[str, Any] = {}
    if args.config:
        data = json.loads(Path(args.config).read_text())
    data["method"] = args.method or data.get("method") or "svd-llm-v2"
    if args.ratio is not None or args.keep_singular_fraction is not None:
        data.pop("ratio", None)
        data.pop("keep_singular_fraction", None)
    for flag, name in _FLAG_FIELDS.items():
        value = getattr(args, flag, None)
        if value is not None:
            data[name] = value
    if args.non_sequential:
        data["sequential"] = False
    dec = data.get("decomposer", "svd")
    dec = {"name": dec} if isinstance(dec, str) else dict(dec)
    if args.decomposer:
        dec["name"] = args.decomposer
    for flag in ("oversample", "power_iters"):
        if getattr(args, flag) is not None:
            dec[flag] = getattr(args, flag)
    data["decomposer"] = dec
    if data["method"] == "svd":
        for key in (
            "calib_data",
            "calib_samples",
            "seq_len",
            "batch_size",
            "truncation",
            "allocation",
            "gram_dtype",
            "sequential",
        ):
            data.pop(key, None)
    elif data["method"] == "svd-llm":
        data.pop("allocation", None)
    return config_from_dict(data)


def _decomposer_label(dec: dict[str, Any]) -> str:
    name = dec.get("name", "?")
    if name == "svd":
        return "svd (exact)"
    return f"{name} (oversample p={dec.get('oversample')}, power iterations q={dec.get('power_iters')})"


def summary_table(result: Any) -> str:
    """Human-readable summary: both ratio conventions, parameters, dense-kept modules, times, fallbacks."""
    t = result.timings
    rows = [
        ("method", result.method),
        ("decomposer", _decomposer_label(result.decomposer or {})),
        ("ratio target (fraction of targeted linear params REMOVED)", result.ratio_target or "-"),
        ("ratio achieved (fraction of targeted linear params REMOVED)", result.ratio_params_removed),
        (
            "keep-singular-fraction target (fraction of singular values KEPT)",
            result.keep_singular_fraction_target or "-",
        ),
        ("keep-singular-fraction achieved (Σ ranks / Σ min(m, n))", result.keep_singular_fraction),
        (
            "targeted linear params before → after",
            f"{result.linear_parameters_before:,} → {result.linear_parameters_after:,}",
        ),
        ("whole-model params before → after", f"{result.parameters_before:,} → {result.parameters_after:,}"),
        ("whole-model params kept", round(result.parameters_after / result.parameters_before, 4)),
        ("calibration tokens", result.calibration_tokens),
        ("dense-kept modules", len(result.dense_kept)),
        ("whitening fallbacks (non-PD Gram → eigh + pinv)", result.fallbacks),
        *((f"time {stage} (s)", seconds) for stage, seconds in t.items()),
    ]
    text = format_table(rows, ["quantity", "value"])
    if result.dense_kept:
        text += "\nkept dense (factors would not be smaller): " + ", ".join(result.dense_kept)
    if result.fallbacks:
        text += "\nwhitening fallbacks: " + ", ".join(result.fallback_modules)
    return text


def run(args: argparse.Namespace) -> int:
    import lowrank
    from lowrank.cli._common import resolve_device
    from lowrank.io import write_json
    from lowrank.methods import CalibratedConfig, compress
    from lowrank.serialization import save_compressed

    config = build_config(args)
    device = resolve_device(args.device)
    model, tokenizer = lowrank.load_model(args.model)
    calibration = None
    if isinstance(config, CalibratedConfig):
        text = lowrank.load_text(config.calib_data, "calibration")
        calibration = lowrank.calibration_batches(
            tokenizer, text, config.calib_samples, config.seq_len, seed=args.seed
        )
    result = compress(
        model, config, calibration=calibration, device=device, checkpoint_dir=args.checkpoint_dir
    )
    print(summary_table(result))
    if args.out:
        save_compressed(model, args.out, tokenizer=tokenizer, result=result)
        print(f"saved to {args.out}")
    if args.json:
        write_json(args.json, {"model": args.model, **result.summary()})
    return 0
