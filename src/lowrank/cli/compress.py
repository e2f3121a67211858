"""``lowrank compress``: apply a compression method to a model and save the result.

The method options are derived from the registered config classes (``lowrank.cli._flags``);
``--config cfg.json`` loads a serialized config and explicit flags override it. All logic lives in the
library: this module validates the output paths, loads the model and calibration tokens, calls
``compress`` and ``save_compressed``, and prints. Applied to a model saved by this command, it stacks a
further method on it (e.g. ``svd-llm`` on the MLP, then another method on attention).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from lowrank.cli._common import add_device_argument, add_model_arguments, add_output_arguments, format_table

__all__ = ["register", "add_derived_flags", "run", "summary_table", "read_config_file"]

DEFAULT_METHOD = "svd-llm-v2"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compress",
        help="compress a model with a registered method (svd, svd-llm, svd-llm-v2, …) and save it",
        description=(
            "Apply a compression method to a model and save the result as a directory that "
            "'lowrank evaluate --model DIR' loads; applied to such a directory it stacks another method. "
            "For the low-rank weight methods --ratio is the fraction of the targeted linear layers' "
            "parameters REMOVED (SVD-LLM convention) and --keep-singular-fraction the fraction of singular "
            "values KEPT (the rSVD paper's r); give one. 'lowrank compress --help' lists every method's "
            "options."
        ),
    )
    add_model_arguments(p)
    p.add_argument("--method", help=f"compression method (default: {DEFAULT_METHOD}, or --config's)")
    add_output_arguments(
        p, what="compressed", checkpoint_help="save after every layer; rerun with the same flags to resume"
    )
    add_device_argument(p)
    p.set_defaults(func=run)


def add_derived_flags(parser: argparse.ArgumentParser) -> None:
    """Add every registered method's options (imports the methods, hence torch: only when needed)."""
    from lowrank.cli._flags import add_method_flags
    from lowrank.methods import config_class, method_names

    names = method_names()
    for action in parser._actions:
        if action.dest == "method":
            action.choices = names
            action.help += f"; one of: {', '.join(names)}"
    specs = add_method_flags(parser, {name: config_class(name) for name in names})
    parser.set_defaults(flag_specs=specs)


def read_config_file(path: str) -> dict[str, Any]:
    """The JSON object in ``path`` (one-line errors for a missing, unreadable or malformed file)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"--config {path}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"--config {path}: expected a JSON object with a 'method' key; got {type(data).__name__}"
        )
    return data


def build_config(args: argparse.Namespace, base: dict[str, Any] | None = None, default: str = DEFAULT_METHOD):
    """The method config: ``base`` (command defaults), then ``--config``, then the explicit flags."""
    from lowrank.cli._flags import config_from_args

    data = dict(base or {})
    if getattr(args, "config", None):
        data = read_config_file(args.config)
    method = args.method or data.get("method") or default
    if data.get("method") not in (None, method):  # --method overrides the file's: keep the shared fields
        data = _shared_fields(data, method)
    return config_from_args(args, args.flag_specs, method, {k: v for k, v in data.items() if k != "method"})


def _shared_fields(data: dict[str, Any], method: str) -> dict[str, Any]:
    """The fields of ``data`` (a config of another method) that ``method``'s config has, in the current
    version of the dict form (the file's own version is read by its own method's migrations)."""
    import dataclasses

    from lowrank.core.config import upgrade
    from lowrank.methods import config_class, method_names

    target = config_class(method)
    fields = {k: v for k, v in data.items() if k != "method"}
    if data.get("method") in method_names():
        fields = upgrade(config_class(data["method"]), fields)
    else:
        fields.pop("version", None)
    known = {f.name for f in dataclasses.fields(target)}
    return {**{k: v for k, v in fields.items() if k in known}, "version": target.version}


def _label(value: Any) -> Any:
    if isinstance(value, dict) and "name" in value:  # a decomposer
        if value["name"] == "svd":
            return "svd (exact)"
        p, q = value.get("oversample"), value.get("power_iters")
        return f"{value['name']} (oversample p={p}, power iterations q={q})"
    if isinstance(value, list) and value and all(isinstance(v, int | float) for v in value):
        low, high = min(value), max(value)
        return (
            f"{low} in all {len(value)} layers" if low == high else f"{low} … {high} over {len(value)} layers"
        )
    if isinstance(value, list):
        return len(value)
    return "-" if value is None else value


#: labels of the detail keys of the low-rank methods (other keys are shown by name)
_DETAIL_LABELS = {
    "ratio_target": "ratio target (fraction of targeted linear params REMOVED)",
    "ratio_params_removed": "ratio achieved (fraction of targeted linear params REMOVED)",
    "keep_singular_fraction_target": "keep-singular-fraction target (fraction of singular values KEPT)",
    "keep_singular_fraction": "keep-singular-fraction achieved (Σ ranks / Σ min(m, n))",
    "linear_parameters_before": "targeted linear params before",
    "linear_parameters_after": "targeted linear params after",
    "dense_kept": "dense-kept modules (factors would not be smaller)",
}


def summary_table(result: Any) -> str:
    """Human-readable summary: the common core, the method's details (both ratio conventions), times."""
    from lowrank.methods import config_class

    kv = (result.kv_bytes_per_token_before, result.kv_bytes_per_token_after)
    labels = {**_DETAIL_LABELS, **config_class(result.method).detail_labels}
    rows = [
        ("method", result.method),
        *(
            (labels.get(k, k.replace("_", " ")), _label(v))
            for k, v in result.details.items()
            if not isinstance(v, dict) or "name" in v
        ),
        ("whole-model params before → after", f"{result.parameters_before:,} → {result.parameters_after:,}"),
        ("whole-model params kept", round(result.parameters_after / max(result.parameters_before, 1), 4)),
        ("weight bytes before → after", f"{result.weight_bytes_before:,} → {result.weight_bytes_after:,}"),
        ("KV-cache bytes / token before → after", " → ".join("-" if v is None else f"{v:,.0f}" for v in kv)),
        ("calibration tokens", result.calibration_tokens),
        ("whitening fallbacks (non-PD Gram → eigh + pinv)", result.fallbacks),
        *((f"time {stage} (s)", seconds) for stage, seconds in result.timings.items()),
    ]
    text = format_table(rows, ["quantity", "value"])
    dense = result.details.get("dense_kept") or []
    if dense:
        text += "\nkept dense (factors would not be smaller): " + ", ".join(dense)
    if result.fallbacks:
        text += "\nwhitening fallbacks: " + ", ".join(result.fallback_modules)
    return text


def run_inputs(args: argparse.Namespace, config: Any = None) -> dict[str, Any]:
    """Label → path of everything the run reads (outputs may not touch any of them)."""
    inputs = {"--model": args.model, "--config": getattr(args, "config", None)}
    if config is not None:
        inputs["--teacher"] = getattr(config, "teacher", None)
        calibration = getattr(config, "calibration", None)
        inputs["--calib-data"] = getattr(calibration, "data", None) if config.calibrated else None
    return inputs


def check_outputs(args: argparse.Namespace, config: Any = None) -> None:
    """Refuse unusable or unsafe output paths before any work (one line each): every output against
    every input and every other output, then each output on its own."""
    from lowrank.io.files import check_output_dir, check_output_file
    from lowrank.io.paths import check_paths

    outputs = {"--out": args.out, "--checkpoint-dir": args.checkpoint_dir, "--json": args.json}
    check_paths(run_inputs(args, config), outputs)
    if args.out:
        check_output_dir(args.out, overwrite=args.overwrite)
    if args.json:
        check_output_file(args.json)
    if args.checkpoint_dir:
        check_output_dir(args.checkpoint_dir, overwrite=True)


def run(args: argparse.Namespace) -> int:
    """Check every flag and path, lock the outputs, then compress."""
    from lowrank.cli._common import resolve_device
    from lowrank.io.paths import output_lock

    config = build_config(args)
    check_outputs(args, config)
    device = resolve_device(args.device)
    with output_lock(args.out, args.json, args.checkpoint_dir):
        return _compress(args, config, device)


def _compress(args: argparse.Namespace, config: Any, device: str) -> int:
    """Load, compress, print and save (the output paths are checked and locked)."""
    from lowrank.calibration.pipeline import calibration_tokens
    from lowrank.io.files import write_json
    from lowrank.loading.models import load_model
    from lowrank.loading.serialization import save_compressed
    from lowrank.methods import compress

    model, tokenizer = load_model(args.model, trust_remote_code=args.trust_remote_code)
    calibration = calibration_tokens(config.calibration, tokenizer) if config.calibrated else None
    result = compress(
        model, config, calibration=calibration, device=device, checkpoint_dir=args.checkpoint_dir
    )
    print(summary_table(result))
    if args.out:
        save_compressed(model, args.out, tokenizer=tokenizer, result=result, overwrite=args.overwrite)
        print(f"saved to {args.out}")
    if args.json:
        write_json(args.json, {"model": args.model, **result.summary()})
    return 0
