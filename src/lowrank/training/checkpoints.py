"""Resumable healing checkpoints: one checksummed file per run, refused when damaged or saved by another
run."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lowrank.io.checked import ChecksumError, load_checked, save_checked

__all__ = ["CHECKPOINT_FILE", "CheckpointError", "HealCheckpoint", "HealProgress"]

logger = logging.getLogger(__name__)

_FORMAT = 2  # 2: the file carries its SHA-256 (lowrank.io.checked)
CHECKPOINT_FILE = "heal_state.pt"  # the one file a checkpoint directory holds


class CheckpointError(ValueError):
    """A healing checkpoint that cannot be resumed from: damaged, or saved by another run."""


@dataclass
class HealProgress:
    """Everything a resumed run needs besides the parameters and the optimizer state."""

    step: int = 0
    best_loss: float = math.inf
    bad_evals: int = 0
    stopped: bool = False
    losses: list[float] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    elapsed_s: float = 0.0


class HealCheckpoint:
    """One file holding the trainable state, optimizer, best state and progress, replaced atomically."""

    def __init__(self, directory: Path | None, key: str, settings: dict[str, Any]) -> None:
        self.path = None if directory is None else Path(directory) / CHECKPOINT_FILE
        self.key = key
        self.settings = settings  # saved with the state, to say what differs when a resume is refused

    def save(self, params, optimizer, best, progress: HealProgress) -> None:
        if self.path is None:
            return
        state = {
            "format": _FORMAT,
            "fingerprint": self.key,
            "settings": self.settings,
            "params": {n: p.detach().cpu().clone() for n, p in params.items()},
            "best": {n: t.cpu() for n, t in best.items()},
            "optimizer": optimizer.state_dict(),
            "progress": dataclasses.asdict(progress),
        }
        save_checked(state, self.path)

    def load(self, params, optimizer, best) -> HealProgress | None:
        if self.path is None or not self.path.is_file():
            return None
        try:
            state = load_checked(self.path, "healing checkpoint", "delete it to start afresh")
        except ChecksumError as exc:
            raise CheckpointError(str(exc)) from None
        if not isinstance(state, dict) or state.get("fingerprint") != self.key:
            raise CheckpointError(
                f"{self.path} belongs to another healing run ({self._difference(state)}); choose another "
                "checkpoint directory or delete it"
            )
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state["params"][name])
                best[name] = state["best"][name].to(p.device)
        optimizer.load_state_dict(state["optimizer"])
        progress = HealProgress(**state["progress"])
        logger.info("resuming healing from %s at step %d", self.path, progress.step)
        return progress

    def _difference(self, state: Any) -> str:
        """What sets the run of a refused checkpoint apart from this one, in words."""
        saved = state.get("settings") if isinstance(state, dict) else None
        if not isinstance(saved, dict):
            return "a different configuration, data or model"
        there, here = _flat(saved), _flat(self.settings)
        changed = [
            f"{k}: {there.get(k)!r} there, {here.get(k)!r} here"
            for k in here.keys() | there.keys()
            if there.get(k) != here.get(k)
        ]
        return "; ".join(sorted(changed)) or "other training text or starting weights"


def _flat(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"calibration": {"seq_len": 512}}`` → ``{"calibration.seq_len": 512}``."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
