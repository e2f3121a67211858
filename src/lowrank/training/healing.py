"""The distillation fine-tune behind ``method='heal'``: what trains, the loss, the loop, its checkpoints.

See :mod:`lowrank.methods.heal` for the method (config, defaults, handler). Objective per batch, with
the teacher run under ``no_grad`` on the same batch (its logits are never cached beyond one batch, so
memory does not grow with the number of tokens):

    L = w · T² · KL(softmax(z_teacher / T) ‖ softmax(z_student / T)) + (1 − w) · CE(z_student, next token)
        + λ · mean over layers ℓ and tokens of ‖h_student,ℓ − h_teacher,ℓ‖² / ‖h_teacher,ℓ‖²

where the last term (``hidden_weight`` λ, off by default) matches the residual stream after every decoder
layer as well as the logits (feature distillation). The logit terms run over chunks of tokens, each with
its gradient in closed form (:func:`distillation_loss`): the loss holds the gradient of the logits and a
few chunks of float32 work, not several float32 copies of batch × seq × vocab.

The forward and backward passes run under bfloat16 autocast where the device multiplies bfloat16 fast
(``precision='auto'``; the parameters and the optimizer state stay in their own dtype) and in float32
otherwise. AdamW (no weight decay) with linear warmup and cosine decay, the peak chosen by what trains
(:func:`default_learning_rate`) unless given; held-out loss every ``eval_every`` steps on sequences kept
out of training; the best held-out state is restored at the end and training stops after
``patience`` evaluations without improvement. Progress (parameters, optimizer, step, best state, history)
is checkpointed atomically and an interrupted run resumes to the same result as an uninterrupted one.

References:
    Hinton et al., "Distilling the Knowledge in a Neural Network", 2015 (temperature, T² scaling).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lowrank.calibration.layerwise import fingerprint
from lowrank.core.dtypes import dtype_name
from lowrank.nn.architectures import vocab_size
from lowrank.training.checkpoints import HealCheckpoint, HealProgress
from lowrank.training.losses import distillation_loss, hidden_state_loss
from lowrank.training.trainable import default_learning_rate, resolve_trainable, trainable_parameters

#: The heal method's config (:class:`lowrank.methods.heal.HealConfig`). Typed loosely on purpose: the
#: training loop sits below the methods layer and reads only the fields it documents.
HealConfig = Any


__all__ = ["heal", "split_tokens", "autocast_dtype", "fast_bfloat16", "PRECISIONS", "SOURCES"]

logger = logging.getLogger(__name__)

SOURCES = ("corpus", "teacher")
PRECISIONS = ("auto", "float32", "bfloat16")
WARMUP_FRACTION = 0.05
"""Share of the steps spent warming the learning rate up linearly from zero."""
FINAL_LR_FRACTION = 0.1
"""The cosine decay ends at this fraction of the peak learning rate."""
CLIP_NORM = 1.0
"""Gradients are clipped to this global norm."""


def fast_bfloat16(device: torch.device | str) -> bool:
    """Whether ``device`` multiplies bfloat16 natively (CUDA with bf16; a CPU with AVX-512 BF16 or AMX)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


def autocast_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of a healing run (None: plain float32 compute) for ``precision`` on ``device``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}; got {precision!r}")
    if precision == "bfloat16" or (precision == "auto" and fast_bfloat16(device)):
        return torch.bfloat16
    return None


def _batch_loss(model, teacher, ids, config: HealConfig, amp: torch.dtype | None):
    """``(loss, kl, ce, hidden)`` of one batch: the objective and its three terms (unweighted)."""
    hidden = config.hidden_weight > 0
    target = None
    with torch.autocast(ids.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        if config.kd_weight > 0 or hidden:
            with torch.no_grad():
                target = teacher(ids, use_cache=False, output_hidden_states=hidden)
        out = model(ids, use_cache=False, output_hidden_states=hidden)
    loss, kl, ce = distillation_loss(
        out.logits,
        target.logits if config.kd_weight > 0 else None,
        ids,
        temperature=config.temperature,
        kd_weight=config.kd_weight,
    )
    if not hidden:
        return loss, kl, ce, torch.zeros_like(loss)
    feature = hidden_state_loss(out.hidden_states[1:], target.hidden_states[1:])
    return loss + config.hidden_weight * feature, kl, ce, feature


def _train_step(
    model, teacher, ids, optimizer, params: list[nn.Parameter], config: HealConfig, amp: torch.dtype | None
) -> float:
    """One optimizer step on the batch ``ids``; returns its loss."""
    optimizer.zero_grad(set_to_none=True)
    loss, *_ = _batch_loss(model, teacher, ids, config, amp)
    if not torch.isfinite(loss):
        raise ValueError(f"healing diverged (loss {float(loss)}); lower the learning rate")
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, CLIP_NORM)
    optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def _evaluate(model, teacher, ids: torch.Tensor, config: HealConfig, amp) -> dict[str, float]:
    """Mean held-out loss, KL, cross-entropy and hidden-state error over ``ids`` (batches of
    ``batch_size``)."""
    totals = torch.zeros(4, dtype=torch.float64)
    for chunk in ids.split(config.batch_size):
        parts = _batch_loss(model, teacher, chunk, config, amp)
        totals += torch.tensor([float(p) for p in parts], dtype=torch.float64) * len(chunk)
    loss, kl, ce, hidden = (totals / len(ids)).tolist()
    return {"heldout_loss": loss, "heldout_kl": kl, "heldout_ce": ce, "heldout_hidden": hidden}


def _lr_at(step: int, steps: int, peak: float) -> float:
    """Linear warmup, then cosine decay from ``peak`` to ``FINAL_LR_FRACTION · peak`` (step counts from 0)."""
    warmup = max(1, round(WARMUP_FRACTION * steps))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))


def split_tokens(ids: Any, config: HealConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(training, held-out) sequences: the first ceil(tokens / seq_len) rows and the last held-out rows."""
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2:
        raise ValueError(
            f"heal needs calibration token ids (samples, seq_len); got {type(ids).__name__}; build them with "
            "lowrank.calibration.pipeline.calibration_tokens(config.calibration, tokenizer)"
        )
    samples, seq_len = ids.shape
    n_train = config.training_sequences(seq_len)
    if seq_len < 2 or samples < n_train + config.heldout_sequences:
        raise ValueError(
            f"calibration holds {samples} x {seq_len} tokens; healing {config.tokens:,} tokens with "
            f"{config.heldout_sequences} held-out sequences needs {n_train + config.heldout_sequences} "
            f"sequences of >= 2 tokens; lower tokens or give more calibration samples"
        )
    return ids[:n_train], ids[samples - config.heldout_sequences :]


def heal(
    model: nn.Module,
    teacher: nn.Module,
    input_ids: torch.Tensor,
    config: HealConfig,
    *,
    device: torch.device | str | None = None,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune ``model`` in place against ``teacher`` (the healing step; see the module docstring).

    Args:
        model: the compressed causal LM; only :func:`trainable_parameters` change.
        teacher: a causal LM with the same vocabulary, already on ``device`` (only run under ``no_grad``).
        input_ids: calibration token ids ``(samples, seq_len)``: the first ceil(tokens / seq_len) rows
            train, the last ``heldout_sequences`` rows measure the held-out loss.
        config: the healing settings.
        device: where to train (default: the model's device); the model returns to its own afterwards.
        checkpoint_dir: save progress there every ``checkpoint_minutes`` and resume from it.
        progress: show a progress bar with the running loss.

    Returns:
        Details: steps, tokens trained, held-out loss before / after (the restored best) / at the last
        evaluation, a short training-loss curve, every held-out evaluation (step, loss, cross-entropy),
        trainable parameter count, wall time.

    Raises:
        ValueError: (one line) mismatched vocabularies, too few calibration sequences, nothing to train,
            or a diverging loss; :class:`CheckpointError` (a ``ValueError``) for a damaged checkpoint or
            one of another run.
    """
    train_ids, heldout_ids = split_tokens(input_ids, config)
    if vocab_size(teacher) != vocab_size(model):
        raise ValueError(
            f"teacher and student vocabularies differ ({vocab_size(teacher)} vs {vocab_size(model)} tokens); "
            "heal against the model the student was compressed from"
        )
    config = dataclasses.replace(config, trainable=resolve_trainable(model, config.trainable))
    params = trainable_parameters(model, config.trainable)
    if not params:
        raise ValueError("nothing to train: the model has no compressed modules; use trainable='all'")
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        model.to(device)
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        return _fit(
            model,
            teacher,
            train_ids.to(device),
            heldout_ids.to(device),
            params,
            config,
            autocast_dtype(config.precision, device),
            config.learning_rate or default_learning_rate(model, config.trainable),
            checkpoint_dir,
            progress,
        )
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.to(home)


def _fit(
    model, teacher, train_ids, heldout_ids, params, config: HealConfig, amp, lr, checkpoint_dir, progress
):
    start = time.perf_counter()
    # what the run computes: the resolved compute dtype, not the precision asked for ('auto' resolves per
    # machine), and the learning rate used
    settings = {k: v for k, v in config.to_dict().items() if k not in ("checkpoint_minutes", "precision")}
    settings.update(compute="float32" if amp is None else dtype_name(amp), peak_learning_rate=lr)
    key = fingerprint(settings, train_ids, heldout_ids, *params.values())
    ckpt = HealCheckpoint(checkpoint_dir, key, settings)
    optimizer = torch.optim.AdamW(params.values(), lr=lr, weight_decay=0.0)
    best = {n: p.detach().clone() for n, p in params.items()}
    order = torch.randperm(len(train_ids), generator=torch.Generator().manual_seed(config.seed))
    batches = order.split(config.batch_size)
    state = ckpt.load(params, optimizer, best) or HealProgress()
    resumed_at = state.step
    if not state.evals:
        _track(state, model, teacher, heldout_ids, params, best, config, amp)
    saved = time.monotonic()
    bar = tqdm(total=len(batches), initial=state.step, desc="heal", unit="step", disable=not progress)
    try:
        while state.step < len(batches) and not state.stopped:
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(state.step, len(batches), lr)
            ids = train_ids[batches[state.step].to(train_ids.device)]
            state.losses.append(
                _train_step(model, teacher, ids, optimizer, list(params.values()), config, amp)
            )
            state.step += 1
            bar.update(1)
            if state.step % config.eval_every == 0 or state.step == len(batches):
                _track(state, model, teacher, heldout_ids, params, best, config, amp)
            bar.set_postfix(
                loss=f"{sum(state.losses[-10:]) / len(state.losses[-10:]):.4f}",
                heldout=f"{state.evals[-1]['heldout_loss']:.4f}",
            )
            if time.monotonic() - saved >= 60 * config.checkpoint_minutes:
                ckpt.save(params, optimizer, best, _elapsed(state, start))
                saved = time.monotonic()
    finally:
        bar.close()
    state = _elapsed(state, start)
    ckpt.save(params, optimizer, best, state)
    last = state.evals[-1]["heldout_loss"]
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(best[name])
    return _details(state, config, train_ids, params, last, resumed_at, amp, lr)


def _elapsed(state: HealProgress, start: float) -> HealProgress:
    return dataclasses.replace(state, elapsed_s=state.elapsed_s + time.perf_counter() - start)


def _track(state: HealProgress, model, teacher, heldout_ids, params, best, config: HealConfig, amp) -> None:
    """Evaluate on the held-out sequences; keep the best state; stop after ``patience`` misses."""
    record = {"step": state.step, **_evaluate(model, teacher, heldout_ids, config, amp)}
    state.evals.append(record)
    if record["heldout_loss"] < state.best_loss:
        state.best_loss, state.bad_evals = record["heldout_loss"], 0
        for name, p in params.items():
            best[name] = p.detach().clone()
    elif state.step > 0:
        state.bad_evals += 1
        state.stopped = state.bad_evals >= config.patience
        if state.stopped:
            logger.info("held-out loss has not improved for %d evaluations: stopping", config.patience)


def _details(state: HealProgress, config, train_ids, params, last, resumed_at, amp, lr) -> dict[str, Any]:
    first = state.evals[0]
    best = min(state.evals, key=lambda e: e["heldout_loss"])
    stride = max(1, math.ceil(len(state.losses) / 20))
    return {
        "teacher": config.teacher,
        "trainable": config.trainable,
        "compute_dtype": "float32" if amp is None else dtype_name(amp),
        "learning_rate": lr,
        "trainable_parameters": sum(p.numel() for p in params.values()),
        "steps": state.step,
        "steps_planned": math.ceil(len(train_ids) / config.batch_size),
        "stopped_early": state.stopped,
        "tokens_trained": min(state.step * config.batch_size, len(train_ids)) * train_ids.shape[1],
        "heldout_loss_before": _sig(first["heldout_loss"]),
        "heldout_loss_after": _sig(best["heldout_loss"]),
        "heldout_loss_last": _sig(last),
        "heldout_kl_before": _sig(first["heldout_kl"]),
        "heldout_kl_after": _sig(best["heldout_kl"]),
        "heldout_ce_before": _sig(first["heldout_ce"]),
        "heldout_ce_after": _sig(best["heldout_ce"]),
        "heldout_hidden_before": _sig(first.get("heldout_hidden", 0.0)),
        "heldout_hidden_after": _sig(best.get("heldout_hidden", 0.0)),
        "best_step": best["step"],
        "loss_curve": [_sig(x, 4) for x in state.losses[::stride]],
        "heldout_curve": [
            {"step": e["step"], "loss": _sig(e["heldout_loss"]), "ce": _sig(e["heldout_ce"])}
            for e in state.evals
        ],
        "resumed_from_step": resumed_at,
        "train_time_s": round(state.elapsed_s, 3),
    }


def _sig(x: float, digits: int = 6) -> float:
    return float(f"{x:.{digits}g}")
