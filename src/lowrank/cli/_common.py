"""Helpers shared by the subcommands: device choice, JSON output, plain-text tables."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

__all__ = [
    "add_device_argument",
    "add_model_arguments",
    "add_output_arguments",
    "resolve_device",
    "format_table",
]


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="where to run: 'auto' picks cuda when available, else cpu (default: auto)",
    )


def resolve_device(name: str) -> str:
    """Map ``auto|cpu|cuda`` to a concrete torch device string."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "--device cuda was requested but torch.cuda.is_available() is False; use cpu or auto"
        )
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device must be one of auto, cpu, cuda; got {name!r}")
    return name


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.4g}"
        return f"{value:,.4f}".rstrip("0").rstrip(".") if abs(value) < 1000 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def format_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """Render rows as a Markdown table (readable in a terminal, pasteable into docs)."""
    cells = [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    return "\n".join([line, sep, *body])


def add_model_arguments(parser: argparse.ArgumentParser, default: str = "smollm2-135m") -> None:
    """``--model`` and ``--trust-remote-code``."""
    parser.add_argument(
        "--model",
        default=default,
        help=f"built-in name, model directory, .gguf file or hub id (default: {default})",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow running Python code shipped inside the model directory (off by default)",
    )


def add_output_arguments(parser: argparse.ArgumentParser, *, what: str, checkpoint_help: str) -> None:
    """``--config``, ``--checkpoint-dir``, ``--out``, ``--overwrite``, ``--json``: a command that saves."""
    parser.add_argument(
        "--config", help="JSON file with a method config (as in a saved model's lowrank.json)"
    )
    parser.add_argument("--checkpoint-dir", help=checkpoint_help)
    parser.add_argument("--out", help=f"directory to write the {what} model to (checked before any work)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="allow --out to replace a non-empty directory that this toolkit did not write",
    )
    parser.add_argument("--json", help="write the summary as JSON to this file")


#: flags that must be integers >= 1 wherever a command has them (None: not given, e.g. 'all windows')
_POSITIVE = ("seq_len", "max_windows", "batch_size", "prompt_len", "gen_len", "repeats")


def check_lengths(args: argparse.Namespace) -> None:
    """Refuse (one line naming the flag) a length or count below 1, before anything is loaded."""
    for name in _POSITIVE:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1; got {value}")


def check_positions(model: Any, args: argparse.Namespace, *, throughput: bool = True) -> None:
    """Refuse (one line) a window or a prompt + generation longer than the model's positions, before any
    compute: called right after the model is loaded."""
    from lowrank.evaluation.throughput import check_workload

    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and args.seq_len > limit:
        raise ValueError(
            f"--seq-len {args.seq_len} exceeds the model's max_position_embeddings={limit}; "
            f"use at most {limit}"
        )
    if throughput:
        check_workload(model, 1, args.prompt_len, args.gen_len, args.repeats, 0)
