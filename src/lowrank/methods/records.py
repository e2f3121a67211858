"""What a method did to each module it touched: one typed record per module, with an enum ``kind``.

Handlers return ``CompressionResult.modules`` as ``{module name: ModuleRecord}``; method-specific numbers
go into ``metrics`` under identifier keys, and the words a person reads go into the report
(``MethodConfig.detail_labels`` and the CLI's summary table), never into keys.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

__all__ = ["ModuleKind", "ModuleRecord", "attention_record"]


class ModuleKind(StrEnum):
    """What a targeted module became (the value is what JSON output shows)."""

    LOW_RANK = "low_rank"
    """A factored linear layer (``LowRankLinear``)."""
    DENSE = "dense"
    """Targeted, but kept dense: its factors would not have been smaller."""
    QUANTIZED = "quantized"
    """A linear layer whose weights are stored quantized."""
    ATTENTION = "attention"
    """An attention layer whose keys and values are cached through a codec."""
    TRAINED = "trained"
    """A replacement module that healing trained."""
    OTHER = "other"
    """Any other replacement module (its ``metrics`` say what it is)."""


@dataclass(kw_only=True)
class ModuleRecord:
    """One module as the method left it."""

    kind: ModuleKind
    role: str | None = None
    """The projection a linear layer is (``q k v o gate up down``), ``None`` for other modules."""
    shape: tuple[int, int] | None = None
    """(out_features, in_features) of a linear layer."""
    rank: int | None = None
    """Rank as built (the factors' inner dimension, or the cached key rank of an attention layer)."""
    planned_rank: int | None = None
    """The rank the plan asked for (a tolerance-driven decomposer may build a smaller one)."""
    loss: float | None = None
    """The method's own fit loss for this module (truncation loss, mean relative error, …)."""
    fallback: bool = False
    """A numerical fallback was taken for this module (counted in the run's summary)."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """Method-specific numbers under identifier keys."""

    def __post_init__(self) -> None:
        self.kind = ModuleKind(self.kind)
        if self.shape is not None:
            self.shape = (int(self.shape[0]), int(self.shape[1]))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["kind"] = self.kind.value
        out["shape"] = None if self.shape is None else list(self.shape)
        return out


def attention_record(entry: dict[str, Any], losses: str, fallback: str | None = None) -> ModuleRecord:
    """The record of a converted attention layer from its per-layer ``entry``: ``key_rank`` as its rank,
    the mean of the per-head list ``entry[losses]`` as its loss, ``entry[fallback]`` as its fallback flag;
    every other key stays in ``metrics``."""
    metrics = dict(entry)
    values = metrics[losses]
    return ModuleRecord(
        kind=ModuleKind.ATTENTION,
        rank=metrics.pop("key_rank"),
        loss=sum(values) / len(values),
        fallback=bool(metrics.pop(fallback)) if fallback else False,
        metrics=metrics,
    )
