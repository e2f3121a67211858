"""Healing: a short distillation fine-tune that wins back what one-shot compression lost (``method='heal'``).

The compressed model (the student) is trained against the logits of the original model (the teacher) on
calibration text, which is disjoint from the evaluation split, or on sequences the teacher samples itself
(``source='teacher'``, :mod:`lowrank.training.teacher_text`). Only what compression replaced trains by
default: the factors of every ``LowRankLinear`` and the codec (``kv``: latent and rotary projections) of
every converted attention, plus, after an MLA conversion only, the q/k/v/o projections of the converted
attention, whose position-free dimensions must relearn what to match. The structure never changes:
ranks, parameter counts and KV-cache bytes are those of the compressed model.

The objective (KL distillation at temperature T plus cross-entropy), the schedule, held-out early stopping
and the resumable checkpoints are in :mod:`lowrank.training.healing`; this module holds the config and the
handler.

References:
    Hinton et al., "Distilling the Knowledge in a Neural Network", 2015 (temperature, T² scaling);
    Wang et al., SVD-LLM, ICLR 2025 (parameter update after truncation); Ji et al., MHA2MLA, 2025
    (fine-tuning the converted attention).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from lowrank.calibration.pipeline import CalibrationConfig, RunContext
from lowrank.methods.base import CompressionResult, MethodConfig, register_method
from lowrank.methods.records import ModuleKind, ModuleRecord
from lowrank.nn.registry import describe_replacement
from lowrank.training.healing import PRECISIONS, SOURCES, heal, split_tokens
from lowrank.training.trainable import TRAINABLE, trainable_parameters

__all__ = ["HealConfig"]

_DEFAULT_SAMPLES = CalibrationConfig().samples


logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class HealConfig(MethodConfig):
    """Distillation fine-tune of a compressed model against the model it was compressed from."""

    method: ClassVar[str] = "heal"
    example: ClassVar[dict[str, Any]] = {
        "teacher": "self",
        "tokens": 256,
        "batch_size": 4,
        "heldout_sequences": 2,
        "eval_every": 1,
    }

    teacher: str | None = None
    """Model whose logits the compressed model learns (built-in name, directory or hub id; the model it was
    compressed from), or ``self``: a frozen copy of the model as it was before this step."""
    tokens: int = field(default=200_000, metadata={"range": "[1, inf)"})
    """Training tokens: ceil(tokens / seq_len) calibration sequences, each seen once. 200k is the smallest
    budget measured that wins back half the lost wiki log-perplexity (benchmarks/results/heal_cpu.md)."""
    learning_rate: float | None = field(default=None, metadata={"range": "(0, 1]"})
    """Peak AdamW learning rate (linear warmup over 5 % of the steps, cosine decay to 10 % of it); unset:
    1e-5 when only ``kv-projection`` codecs train, 3e-4 when converted attention trains whole, 1e-4
    otherwise (``lowrank.training.trainable.default_learning_rate``, chosen by measurement)."""
    batch_size: int = field(default=4, metadata={"range": "[1, inf)"})
    """Sequences per optimizer step."""
    source: str = field(default="corpus", metadata={"choices": SOURCES})
    """Training text: ``corpus``, the calibration split of ``calibration.data``; ``teacher``, sequences the
    teacher samples itself (data-free distillation; kept in the cache directory and reused, see
    :mod:`lowrank.training.teacher_text`). Measured on the built-in model, corpus text heals more, in its own
    domain and
    out of it (docs/healing.md)."""
    trainable: str = field(default="auto", metadata={"choices": TRAINABLE})
    """``replaced``: only what compression replaced (low-rank factors, KV codecs); ``attention``: that plus
    the q/k/v/o projections of every converted attention (what partial RoPE needs to relearn); ``all``:
    every weight; ``auto``: ``attention`` for a model with MLA (partial-RoPE) attention, else ``replaced``
    (``lowrank.training.trainable.resolve_trainable``, chosen by measurement)."""
    precision: str = field(default="auto", metadata={"choices": PRECISIONS})
    """Compute of the forward and backward passes: ``bfloat16`` autocast or ``float32``; ``auto``: bfloat16
    where the device multiplies it natively (CUDA with bf16, CPUs with AVX-512 BF16 or AMX), else float32.
    Parameters and optimizer state keep the model's dtype either way."""
    temperature: float = field(default=1.0, metadata={"range": "(0, inf)"})
    """Distillation temperature T (the KL term is scaled by T²)."""
    kd_weight: float = field(default=0.9, metadata={"range": "[0, 1]"})
    """Weight w of the distillation term, in [0, 1]; 1 − w goes to next-token cross-entropy."""
    hidden_weight: float = field(default=0.0, metadata={"range": "[0, inf)"})
    """Weight λ ≥ 0 of a hidden-state term added to the objective: the residual stream after every decoder
    layer learns the teacher's (relative squared error per token,
    ``lowrank.training.losses.hidden_state_loss``);
    0 (off): logits only."""
    heldout_sequences: int = field(default=8, metadata={"range": "[1, inf)"})
    """Calibration sequences kept out of training to measure the held-out loss."""
    eval_every: int = field(default=10, metadata={"range": "[1, inf)"})
    """Optimizer steps between held-out evaluations."""
    patience: int = field(default=3, metadata={"range": "[1, inf)"})
    """Held-out evaluations without improvement before training stops early."""
    seed: int = field(default=0, metadata={"range": "[0, inf)"})
    """Seed of the order in which training sequences are visited."""
    checkpoint_minutes: float = field(default=5.0, metadata={"range": "[0, inf)"})
    """Minutes between checkpoints when a checkpoint directory is given (0: after every step)."""
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig, metadata={"prefix": "calib-"})
    """Training text (split ``calibration``; ``samples`` is derived from ``tokens`` and
    ``heldout_sequences``; see ``lowrank.calibration.pipeline.CalibrationConfig``)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.teacher, str) or not self.teacher.strip():
            raise ValueError(
                "heal needs a teacher: the model the student was compressed from (e.g. --teacher "
                f"smollm2-135m) or 'self'; got {self.teacher!r}"
            )
        samples = self.training_sequences(self.calibration.seq_len) + self.heldout_sequences
        if self.calibration.samples not in (samples, _DEFAULT_SAMPLES):
            raise ValueError(
                f"calibration samples follow from tokens and heldout_sequences ({samples} sequences of "
                f"{self.calibration.seq_len}); set tokens instead of samples={self.calibration.samples}"
            )
        self.calibration = dataclasses.replace(self.calibration, samples=samples)

    @property
    def calibrated(self) -> bool:  # type: ignore[override]
        """Whether the run reads corpus text: not with ``source='teacher'``, where the teacher writes it."""
        return self.source == "corpus"

    @classmethod
    def unsupported(cls, model: nn.Module) -> str | None:
        if not any(describe_replacement(m) is not None for m in model.modules()):
            return (
                "it has no compressed modules; compress it first (healing trains what compression replaced)"
            )
        return None

    def training_sequences(self, seq_len: int) -> int:
        """Training sequences of ``seq_len`` tokens that hold ``tokens``."""
        return math.ceil(self.tokens / seq_len)


def _teacher_for(model: nn.Module, config: HealConfig, device: torch.device) -> nn.Module:
    if config.teacher == "self":
        teacher = copy.deepcopy(model)
    else:
        from lowrank.loading.models import load_model

        dtype = next(model.parameters()).dtype
        teacher, _ = load_model(config.teacher, device=device, dtype=dtype)
    return teacher.to(device).eval().requires_grad_(False)


@register_method(HealConfig)
def compress_heal(model: nn.Module, config: HealConfig, ctx: RunContext) -> CompressionResult:
    """Handler of ``method='heal'``: load the teacher, fine-tune, report (the structure is unchanged)."""
    if config.source == "corpus":
        split_tokens(ctx.calibration, config)  # refuse unusable token ids before loading a teacher
    with ctx.timings.measure("teacher"):
        teacher = _teacher_for(model, config, ctx.device)
    if config.source == "teacher":  # the teacher writes the text; no corpus is read
        from lowrank.training.teacher_text import teacher_sequences

        cal = config.calibration
        with ctx.timings.measure("sample"):
            ids = teacher_sequences(teacher, cal.samples, cal.seq_len, seed=config.seed)
    else:
        ids = ctx.calibration
    with ctx.timings.measure("heal"):
        details = heal(model, teacher, ids, config, device=ctx.device, checkpoint_dir=ctx.checkpoints("heal"))
    ctx.tokens = details["tokens_trained"]
    trained = {id(p) for p in trainable_parameters(model, config.trainable).values()}
    modules = {
        name: ModuleRecord(
            kind=ModuleKind.TRAINED, rank=getattr(m, "rank", None), metrics={"module": type(m).__name__}
        )
        for name, m in model.named_modules()
        if describe_replacement(m) is not None and any(id(p) in trained for p in m.parameters())
    }
    return CompressionResult(method=config.method, config=config.to_dict(), modules=modules, details=details)
