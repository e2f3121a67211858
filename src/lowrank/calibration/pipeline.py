"""The calibrated pipeline every method runs through: calibration settings, one run context, layer passes.

A method handler receives a :class:`RunContext` and asks it for *passes* over the decoder layers:

>>> records = ctx.layer_pass(requests, process, key=config.to_dict(), sequential=True)

``requests(index, layer) -> {key: StatRequest}`` says what to accumulate on each layer (``None`` for a
data-free method: no forward pass at all), ``process(index, layer, stats) -> record`` changes the layer
in place. Where the statistics come from is the context's business: fresh calibration tokens (layer by
layer, sequential or not, checkpointed and resumable) or :class:`CalibrationStatistics` computed once
on the unchanged model and reused across configurations. Methods never see dataloaders or devices.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from lowrank.calibration.capture import check_calibration_size
from lowrank.calibration.layerwise import collect_statistics, process_statistics, run_layerwise
from lowrank.calibration.statistics import Statistic, StatRequest, Timings
from lowrank.core.config import Config
from lowrank.core.dtypes import resolve_dtype

__all__ = [
    "CalibrationConfig",
    "CalibrationStatistics",
    "RunContext",
    "collect_calibration_statistics",
    "calibration_tokens",
]

logger = logging.getLogger(__name__)

Requests = Callable[[int, nn.Module], dict[str, StatRequest]]
Process = Callable[[int, nn.Module, dict[str, Statistic]], dict[str, Any]]
STAT_DTYPES = ("float64", "float32")


@dataclass(kw_only=True)
class CalibrationConfig(Config):
    """Where calibration activations come from and how they are accumulated (any calibrated method)."""

    label: ClassVar[str] = "calibration"

    data: str = "wiki"
    """Corpus the calibration tokens are drawn from (split ``calibration``): a built-in name, a ``.txt``
    file or a ``datasets`` name."""
    samples: int = field(default=64, metadata={"range": "[1, inf)"})
    """Calibration sequences (GPU runs: 256 like the SVD-LLM anchors)."""
    seq_len: int = field(default=512, metadata={"range": "[1, inf)"})
    """Tokens per calibration sequence (GPU runs: 2048)."""
    seed: int = field(default=0, metadata={"range": "[0, inf)"})
    """Seed of the draw of calibration sequences from the corpus."""
    batch_size: int = field(default=8, metadata={"range": "[1, inf)"})
    """Sequences per forward chunk while calibrating."""
    sequential: bool = True
    """Feed each layer the outputs of the already compressed layers (SVD-LLM); false: the original
    model's activations (one set of statistics then serves every ratio)."""
    stat_dtype: str = field(default="float64", metadata={"choices": STAT_DTYPES})
    """Accumulation dtype of the statistics (XᵀX, per-head Grams): ``float64`` or ``float32``."""
    offload_device: str = "cpu"
    """Where activations wait between layers."""

    @property
    def dtype(self) -> torch.dtype:
        return resolve_dtype(self.stat_dtype, STAT_DTYPES)


def calibration_tokens(config: CalibrationConfig, tokenizer: Any) -> torch.Tensor:
    """Draw the (samples, seq_len) calibration token ids that ``config`` describes."""
    from lowrank.io.data import calibration_batches, load_text

    text = load_text(config.data, "calibration")
    return calibration_batches(tokenizer, text, config.samples, config.seq_len, seed=config.seed)


@dataclass
class CalibrationStatistics:
    """Statistics of every decoder layer of the UNCHANGED model (non-sequential calibration).

    ``per_layer[i][key]`` is the statistic requested under ``key`` for layer i. Pass it as
    ``calibration=`` to :func:`lowrank.compress` with non-sequential configs to compress at many
    settings from one calibration pass.
    """

    per_layer: list[dict[str, Statistic]]
    tokens: int
    stat_dtype: str


def collect_calibration_statistics(
    model: nn.Module,
    input_ids: torch.Tensor,
    requests: Requests,
    calibration: CalibrationConfig,
    *,
    device: torch.device | str | None = None,
    timings: Timings | None = None,
) -> CalibrationStatistics:
    """Accumulate ``requests`` on every layer of the unchanged ``model`` over ``input_ids`` (samples, seq)."""
    per_layer = collect_statistics(
        model,
        input_ids,
        requests,
        device=device,
        offload_device=calibration.offload_device,
        batch_size=calibration.batch_size,
        timings=timings,
    )
    return CalibrationStatistics(
        per_layer=per_layer, tokens=int(input_ids.numel()), stat_dtype=calibration.stat_dtype
    )


@dataclass
class RunContext:
    """What one ``compress`` call runs with: the model, its calibration, device, checkpoints and timings.

    Args:
        model: the model being compressed (changed in place).
        calibration: token ids (samples, seq_len), :class:`CalibrationStatistics`, or ``None``.
        device: compute device; layers visit it one at a time.
        checkpoint_dir: where passes save after every layer and resume from.
        timings: stage times of the whole run.
    """

    model: nn.Module
    calibration: Any = None
    device: torch.device | None = None
    checkpoint_dir: Path | None = None
    timings: Timings = field(default_factory=Timings)
    tokens: int = 0
    """Calibration tokens the statistics of the last pass came from."""

    def __post_init__(self) -> None:
        home = next(self.model.parameters()).device
        self.device = torch.device(self.device) if self.device is not None else home
        self.timings.sync = self.device.type == "cuda"
        if self.checkpoint_dir is not None:
            self.checkpoint_dir = Path(self.checkpoint_dir)

    def checkpoints(self, name: str | None) -> Path | None:
        """The checkpoint directory of the pass called ``name`` (``None`` without checkpointing)."""
        if self.checkpoint_dir is None:
            return None
        return self.checkpoint_dir if name is None else self.checkpoint_dir / name

    def precompute(self, requests: Requests, calibration: CalibrationConfig) -> None:
        """Replace token ids by statistics of the unchanged model, so several passes share one calibration."""
        if isinstance(self.calibration, torch.Tensor):
            self.calibration = collect_calibration_statistics(
                self.model, self._tokens(), requests, calibration, device=self.device, timings=self.timings
            )

    def layer_pass(
        self,
        requests: Requests | None,
        process: Process,
        *,
        calibration: CalibrationConfig | None = None,
        key: Any = None,
        sequential: bool | None = None,
        modifies: bool = True,
        checkpoint: str | None = None,
        min_tokens_for: int = 0,
        desc: str = "compress",
    ) -> list[dict[str, Any]]:
        """Run ``process`` on every decoder layer with the statistics ``requests`` asks for.

        Args:
            requests: statistics per layer; ``None`` for a data-free pass (no forward pass at all).
            process: changes a layer in place and returns its JSON-able record.
            calibration: the method's calibration settings (required unless ``requests`` is None).
            key: JSON-able description of the pass for the checkpoint fingerprint.
            sequential: override ``calibration.sequential`` (e.g. an analysis pass on the original model).
            modifies: ``process`` changes the layer (False: checkpoints store records only).
            checkpoint: sub-directory of the checkpoint directory for this pass.
            min_tokens_for: the largest input dimension statistics are taken of (warns on too few tokens).
            desc: progress bar label.

        Returns:
            One record per layer (with ``"layer"`` and the replacement ``"modules"`` it holds).
        """
        if requests is None:
            return process_statistics(
                self.model, [{}] * _layer_count(self.model), process, device=self.device, desc=desc
            )
        if calibration is None:
            raise ValueError("a calibrated layer pass needs the method's CalibrationConfig")
        sequential = calibration.sequential if sequential is None else sequential
        if isinstance(self.calibration, CalibrationStatistics):
            if sequential:
                raise ValueError(
                    "precomputed CalibrationStatistics come from the unchanged model; use a non-sequential "
                    "calibration (sequential=False) with them"
                )
            self.tokens = self.calibration.tokens
            return process_statistics(
                self.model, self.calibration.per_layer, process, device=self.device, desc=desc
            )
        ids = self._tokens()
        if min_tokens_for:
            check_calibration_size(int(ids.numel()), min_tokens_for)
        self.tokens = int(ids.numel())
        return run_layerwise(
            self.model,
            ids,
            requests,
            process,
            sequential=sequential,
            device=self.device,
            offload_device=calibration.offload_device,
            batch_size=calibration.batch_size,
            checkpoint_dir=self.checkpoints(checkpoint),
            run_key=key,
            timings=self.timings,
            modifies=modifies,
            desc=desc,
        )

    def _tokens(self) -> torch.Tensor:
        ids = self.calibration
        if not isinstance(ids, torch.Tensor) or ids.ndim != 2:
            raise ValueError(
                "this method needs calibration token ids (samples, seq_len) or CalibrationStatistics; got "
                f"{type(ids).__name__}; build them with lowrank.calibration_batches(...) or "
                "lowrank.calibration.pipeline.calibration_tokens(config.calibration, tokenizer)"
            )
        return ids


def _layer_count(model: nn.Module) -> int:
    from lowrank.nn.architectures import decoder_layers

    return len(decoder_layers(model))
