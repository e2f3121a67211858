"""Statistics accumulated over calibration batches (input and output Grams), what a layer asks for, and
the time spent per stage."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["InputGram", "OutputGram", "STAGES", "StatRequest", "Statistic", "Timings"]


STAGES = ("calibration_forward", "gram_accumulation", "whitening", "decomposition", "other")


@dataclass
class Timings:
    """Wall-clock seconds per stage (GPU work is synchronized before each reading)."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    sync: bool = False

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    @contextmanager
    def measure(self, stage: str) -> Iterator[None]:
        """Add the time spent inside the block to ``stage``."""
        if self.sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.add(stage, time.perf_counter() - start)

    def to_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self.seconds.items()}


class Statistic:
    """Accumulates a quantity from every forward call of one module (subclass and override ``update``).

    ``update`` receives the module's positional ``inputs``, its ``output`` and its keyword arguments
    (attention modules are called with keywords: ``hidden_states``, ``position_embeddings``, …), so a
    statistic can equally be a Gram of an input, of an output, or of per-head queries and keys.
    A statistic that must observe more than that module's forward call (e.g. what happens inside it)
    overrides ``attach``.
    """

    #: a statistic of the module's INPUT may be shared by modules that receive the same tensor
    shares_input: bool = False

    def attach(self, module: nn.Module, hook: Callable[..., None]) -> list[Any]:
        """Start observing ``module``; return handles whose ``remove()`` undoes every change.

        Args:
            module: the module the request names.
            hook: the caller's forward hook ``hook(module, args, kwargs, output)``, which times the
                accumulation and calls ``update``; the default registers it on ``module``. Overrides must
                register it too (on ``module``) and undo their own partial work if they fail.
        """
        return [module.register_forward_hook(hook, with_kwargs=True)]

    def update(self, module: nn.Module, inputs: tuple[Any, ...], output: Any, kwargs: dict[str, Any]) -> None:
        raise NotImplementedError

    def to(self, device: torch.device | str) -> Statistic:
        """Move accumulated tensors (for keeping statistics of many layers on CPU)."""
        return self


class _Gram(Statistic):
    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        self.dtype = dtype
        self.gram: torch.Tensor | None = None
        self.tokens = 0

    def _add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(self.dtype)
        if self.gram is None:
            self.gram = torch.zeros(x.shape[1], x.shape[1], dtype=self.dtype, device=x.device)
        self.gram.addmm_(x.T, x)
        self.tokens += x.shape[0]

    def to(self, device: torch.device | str) -> _Gram:
        if self.gram is not None:
            self.gram = self.gram.to(device)
        return self


class InputGram(_Gram):
    """G = XᵀX (n × n) of a module's first input over all tokens, and the token count.

    Args:
        dtype: accumulation dtype (float64 by default; float32 is ~2–30× faster on GPUs).
    """

    shares_input = True

    def update(self, module: nn.Module, inputs: tuple[Any, ...], output: Any, kwargs: dict[str, Any]) -> None:
        self._add(inputs[0] if inputs else kwargs["hidden_states"])


class OutputGram(_Gram):
    """YᵀY (m × m) of a module's output over all tokens (e.g. keys of ``k_proj``; per-head blocks on the
    diagonal), and the token count."""

    def update(self, module: nn.Module, inputs: tuple[Any, ...], output: Any, kwargs: dict[str, Any]) -> None:
        self._add(output[0] if isinstance(output, (tuple, list)) else output)


@dataclass(frozen=True)
class StatRequest:
    """Accumulate ``make()`` on the module at ``module`` (path relative to the decoder layer)."""

    module: str
    make: Callable[[], Statistic]
