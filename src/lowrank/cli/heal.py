"""``lowrank heal``: distillation fine-tune of a compressed model against the model it came from.

A thin alias of ``lowrank compress --method heal``: the options are derived from
:class:`lowrank.methods.heal.HealConfig` (``--teacher``, ``--tokens``, ``--learning-rate``, …) and the run is
``compress``'s (output checks before any work, calibration tokens, ``compress``, ``save_compressed``), so
the healed model is saved with the heal step recorded in its manifest.
"""

from __future__ import annotations

import argparse

from lowrank.cli._common import add_device_argument, add_model_arguments, add_output_arguments

__all__ = ["register", "add_derived_flags", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "heal",
        help="fine-tune a compressed model against the original's logits (distillation) and save it",
        description=(
            "Win back what one-shot compression lost: train what compression replaced (low-rank factors, "
            "KV codecs; --trainable attention: also the converted attention's q/k/v/o; all: every "
            "weight) to match the teacher's logits (KL at temperature T plus a cross-entropy term) on "
            "calibration text (--source teacher: on sequences the teacher samples), keeping the best "
            "held-out state. Ranks and KV-cache bytes are unchanged. "
            "The same as 'lowrank compress --method heal'."
        ),
    )
    add_model_arguments(p)
    p.add_argument(
        "--data",
        dest="cfg__calibration__data",
        help="corpus of the training text, split 'calibration' (built-in name, .txt file or datasets "
        "name; default: wiki; not read with --source teacher); same as --calib-data",
    )
    add_output_arguments(
        p, what="healed", checkpoint_help="save progress every --checkpoint-minutes; rerun to resume"
    )
    add_device_argument(p)
    p.set_defaults(func=run, method="heal")


def add_derived_flags(parser: argparse.ArgumentParser) -> None:
    """Add the heal config's options (imports the methods, hence torch: only when needed)."""
    from lowrank.cli._flags import add_method_flags
    from lowrank.methods import HealConfig

    parser.set_defaults(flag_specs=add_method_flags(parser, {"heal": HealConfig}))


def run(args: argparse.Namespace) -> int:
    from lowrank.cli.compress import run as compress_run

    return compress_run(args)
