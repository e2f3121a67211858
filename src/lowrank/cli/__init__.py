"""``lowrank`` command line: a thin dispatcher, one module per subcommand.

Each subcommand module exposes ``register(subparsers)``, which adds its parser and sets ``func`` to a
callable taking the parsed namespace and returning an exit code. Modules import heavy dependencies
(torch, transformers) inside ``func`` so that ``lowrank --help`` stays instant; a module may also expose
``add_derived_flags(parser)``, called only when its subcommand is the one being run (the method options
are derived from the config classes, which needs torch).

Anticipated failures (bad values, unusable files, interrupted runs) print one line and exit 2 (130 on
Ctrl-C); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from lowrank.cli._renamed import rewrite_renamed

__all__ = ["main", "build_parser"]

# Order is the order shown by ``lowrank --help``.
SUBCOMMANDS = ("prepare", "evaluate", "compress", "heal", "export", "demo", "bench", "kv-analyze")


#: what an interrupted run of each command leaves behind and how to go on (one line after "interrupted; ")
INTERRUPTED = {
    "prepare": "finished cache entries are kept and leftovers are cleaned up on the next run; rerun it to "
    "complete the rest",
    "evaluate": "nothing was written; rerun it (--max-windows N evaluates fewer windows)",
    "compress": "finished layers are kept when --checkpoint-dir is given (rerun the same command to resume)",
    "heal": "training progress is kept every --checkpoint-minutes when --checkpoint-dir is given (rerun the "
    "same command to resume)",
    "export": "nothing was written (the output appears only when complete); rerun it",
    "demo": "finished layers of the compression are kept when --checkpoint-dir is given (rerun the same "
    "command to resume)",
    "bench": "results finished so far are not written; rerun it",
    "kv-analyze": "nothing was written; rerun it (fewer --calib-samples / --heldout-samples run faster)",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; ``command`` names the subcommand whose derived flags are added (None: none)."""
    parser = argparse.ArgumentParser(
        prog="lowrank",
        description="Make large language models cheaper by low-rank factorization.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"lowrank.cli.{name.replace('-', '_')}")
        module.register(sub)
        # accepted after the command too (``lowrank evaluate --debug``); SUPPRESS keeps the top-level value
        sub.choices[name].add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS)
        sub.choices[name].add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks"
        )
        if name == command and hasattr(module, "add_derived_flags"):
            module.add_derived_flags(sub.choices[name])
    return parser


def _command(argv: list[str]) -> str | None:
    return next((a for a in argv if a in SUBCOMMANDS), None)


def _anticipated() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ValueError, OSError, KeyError, ArithmeticError]
    try:
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = _command(argv)
    argv = rewrite_renamed(argv, command)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"lowrank {args.command}: interrupted; {INTERRUPTED[args.command]}", file=sys.stderr)
        return 130
    except _anticipated() as exc:
        if args.debug:
            raise
        print(f"lowrank {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, KeyError):
        return f"missing key {exc.args[0]!r}" if exc.args else "missing key"
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.strerror or type(exc).__name__}: {exc.filename}"
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
