"""Checks of loaded weights against the config that describes them."""

from __future__ import annotations

from pathlib import Path

__all__ = ["check_loading_info"]


def check_loading_info(source: str | Path, info: dict) -> None:
    """Refuse (one line naming the first tensor) weights that do not fit the config: a missing tensor would
    be randomly initialised, a mismatched or unexpected one means the config describes another model."""
    mismatched = sorted(info.get("mismatched_keys") or [], key=str)
    if mismatched:
        key, *shapes = mismatched[0] if isinstance(mismatched[0], tuple | list) else (mismatched[0],)
        shown = f" (weights {tuple(shapes[0])}, config {tuple(shapes[1])})" if len(shapes) == 2 else ""
        raise ValueError(
            f"{source}: tensor {key!r} has another shape in the weights than config.json describes{shown}; "
            f"{len(mismatched)} mismatching tensor(s): the config does not belong to these weights"
        )
    for kind, what in (
        ("missing_keys", "missing from the weights"),
        ("unexpected_keys", "not in config.json"),
    ):
        names = sorted(info.get(kind) or [])
        if names:
            raise ValueError(
                f"{source}: tensor {names[0]!r} is {what} ({len(names)} tensor(s)); config.json and the "
                "weights describe different models, refusing to use randomly initialised weights"
            )
