"""Flags that were renamed: the old spelling keeps working for one release, with a one-line warning.

Each entry maps a subcommand's old flag to its new one, with the release that drops the old spelling.
``--old=value`` and ``--old value`` are both rewritten; the new flag's parser then checks the value.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

__all__ = ["RENAMED", "Renamed", "rewrite_renamed"]


@dataclass(frozen=True)
class Renamed:
    old: str
    new: str
    removed_in: str


#: Renamed flags by subcommand (0.1.0 derived the calibration flags from the calibration config).
RENAMED: dict[str, tuple[Renamed, ...]] = {
    "compress": (
        Renamed("--seq-len", "--calib-seq-len", "0.2.0"),
        Renamed("--gram-dtype", "--calib-stat-dtype", "0.2.0"),
        Renamed("--non-sequential", "--no-calib-sequential", "0.2.0"),
    ),
}


def rewrite_renamed(argv: list[str], command: str | None) -> list[str]:
    """``argv`` with the command's renamed flags in their new spelling; warns once per old flag."""
    if command not in RENAMED or command not in argv:
        return argv
    start = argv.index(command) + 1
    table = {r.old: r for r in RENAMED[command]}
    out = argv[:start]
    for arg in argv[start:]:
        if arg == "--":
            out += argv[len(out) :]
            break
        flag, eq, value = arg.partition("=")
        entry = table.get(flag)
        if entry is None:
            out.append(arg)
            continue
        print(
            f"lowrank {command}: warning: {entry.old} is deprecated and will be removed in "
            f"{entry.removed_in}; use {entry.new}",
            file=sys.stderr,
        )
        out.append(entry.new + eq + value)
    return out
