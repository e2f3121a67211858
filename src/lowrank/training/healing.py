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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lowrank.calibration.layerwise import fingerprint
from lowrank.core.dtypes import dtype_name
from lowrank.io.checked import ChecksumError, load_checked, save_checked
from lowrank.nn.architectures import vocab_size
from lowrank.nn.registry import replacement_modules

#: The heal method's config (:class:`lowrank.methods.heal.HealConfig`). Typed loosely on purpose: the
#: training loop sits below the methods layer and reads only the fields it documents.
HealConfig = Any

__all__ = [
    "heal",
    "CheckpointError",
    "trainable_parameters",
    "resolve_trainable",
    "distillation_loss",
    "hidden_state_loss",
    "split_tokens",
    "autocast_dtype",
    "fast_bfloat16",
    "default_learning_rate",
    "TRAINABLE",
    "PRECISIONS",
    "SOURCES",
]

logger = logging.getLogger(__name__)

TRAINABLE = ("auto", "replaced", "attention", "all")
SOURCES = ("corpus", "teacher")
PRECISIONS = ("auto", "float32", "bfloat16")
WARMUP_FRACTION = 0.05
"""Share of the steps spent warming the learning rate up linearly from zero."""
FINAL_LR_FRACTION = 0.1
"""The cosine decay ends at this fraction of the peak learning rate."""
LEARNING_RATE = 1e-4
"""Peak learning rate when low-rank factors, MLA codecs alone (or everything) train: the best of those
measured on the built-in model (3e-4 diverges on svd-llm-v2 factors; the MLA codec barely moves at 1e-5;
benchmarks/results/heal_cpu.md)."""
CLIP_NORM = 1.0
"""Gradients are clipped to this global norm."""
LOSS_CHUNK_BYTES = 64 * 2**20
"""Bytes of float32 logits per chunk of the loss (:func:`distillation_loss`): 341 tokens of a 49,152-token
vocabulary, 64 of a 262,144-token one. The loss then adds about six chunks of temporaries to the logits'
gradient, whatever the batch (benchmarks/results/heal_loss_cpu.md)."""
_IGNORE = -100  # cross-entropy target of the positions without a next token
_FORMAT = 2  # 2: the file carries its SHA-256 (lowrank.io.checked)
CHECKPOINT_FILE = "heal_state.pt"  # the one file a checkpoint directory holds


class CheckpointError(ValueError):
    """A healing checkpoint that cannot be resumed from: damaged, or saved by another run."""


def resolve_trainable(model: nn.Module, trainable: str = "auto") -> str:
    """What ``trainable='auto'`` means for ``model``: ``attention`` when a replacement module asks for it
    (``healing_scope()``, e.g. an attention converted to partial RoPE), ``replaced`` otherwise; any other
    value is returned as is.

    Measured on the built-in model at the seed's MLA setting (benchmarks/results/heal_cpu.md): with its
    q/k/v/o training too, 200k tokens win back 0.52 of the lost wiki log-perplexity (0.42 at lr 1e-4);
    the codec alone won back 0.19 in 50k tokens, when the q/k/v/o run had cut the held-out cross-entropy
    by 0.87 nats after 20 steps against the codec's 0.51 after 25.
    """
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable must be one of {TRAINABLE}; got {trainable!r}")
    if trainable != "auto":
        return trainable
    scopes = {m.healing_scope() for m in replacement_modules(model) if hasattr(m, "healing_scope")}
    return "attention" if "attention" in scopes else "replaced"


def trainable_parameters(model: nn.Module, trainable: str = "auto") -> dict[str, nn.Parameter]:
    """``{name: parameter}`` that healing trains (tied parameters once, under their first name).

    ``replaced`` and ``attention``: what each registered replacement module offers for that choice
    (``healing_parameters(trainable)``, by default all its parameters): a converted attention offers its
    codec only under ``replaced`` and its q/k/v/o too under ``attention``, which partial RoPE needs.
    ``all``: every parameter. ``auto``: see :func:`resolve_trainable`.
    """
    trainable = resolve_trainable(model, trainable)
    if trainable == "all":
        return dict(model.named_parameters())
    owned: set[int] = set()
    for module in replacement_modules(model):
        offer = getattr(module, "healing_parameters", None)
        owned.update(id(p) for p in (offer(trainable) if offer is not None else module.parameters()))
    return {name: p for name, p in model.named_parameters() if id(p) in owned}


def default_learning_rate(model: nn.Module, trainable: str = "auto") -> float:
    """The peak learning rate a healing run uses when none is given: the rate every replacement module
    names for itself (``healing_learning_rate``, measured: :data:`ATTENTION_LEARNING_RATE` for converted
    attention training whole, :data:`CODEC_LEARNING_RATE` for ``kv-projection`` codecs alone, whose
    closed-form optimum 3e-4 would knock off) when they all agree; :data:`LEARNING_RATE` in every other
    case."""
    trainable = resolve_trainable(model, trainable)
    replaced = replacement_modules(model)
    if trainable == "all" or not replaced:
        return LEARNING_RATE
    rates = {
        m.healing_learning_rate(trainable) if hasattr(m, "healing_learning_rate") else None for m in replaced
    }
    rate = rates.pop() if len(rates) == 1 else None
    return LEARNING_RATE if rate is None else rate


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor | None,
    ids: torch.Tensor,
    *,
    temperature: float,
    kd_weight: float,
    chunk_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Healing objective of one batch, in float32, over chunks of tokens.

    The float32 work over the vocabulary (log-softmax of both distributions, the KL, the cross-entropy)
    runs over chunks of at most ``chunk_bytes`` of float32 logits, and each chunk's gradient with respect
    to the student's logits is computed there and then in closed form (``T · (softmax(z / T) − p_teacher)``
    for the KL term, ``softmax(z) − onehot(next token)`` for the cross-entropy), so backward keeps one
    gradient the size of the logits instead of several float32 copies of batch × seq × vocab.

    Args:
        student, teacher: logits ``(batch, seq, vocab)``; ``teacher`` may be None when ``kd_weight`` is 0.
        ids: the input token ids ``(batch, seq)`` (next-token targets are ``ids[:, 1:]``).
        chunk_bytes: float32 bytes of logits per chunk (default :data:`LOSS_CHUNK_BYTES`).

    Returns:
        ``(loss, kl, ce)``: ``kd_weight · T² · KL + (1 − kd_weight) · CE``, the per-token
        KL(teacher ‖ student) at temperature T (times T²) and the next-token cross-entropy; only ``loss``
        carries a gradient.
    """
    batch, seq, vocab = student.shape
    chunk_bytes = LOSS_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be a positive integer; got {chunk_bytes!r}")
    if seq < 2:
        raise ValueError(f"the healing loss needs sequences of at least 2 tokens; got {seq}")
    targets = torch.full_like(ids, _IGNORE)
    targets[:, :-1] = ids[:, 1:]  # the last position has no next token: it counts for the KL only
    use_teacher = teacher is not None and kd_weight != 0
    return _Distillation.apply(
        student.flatten(0, 1),
        teacher.flatten(0, 1) if use_teacher else None,
        targets.flatten(),
        float(temperature),
        float(kd_weight) if use_teacher else 0.0,
        max(1, chunk_bytes // (4 * vocab)),
        batch * (seq - 1),
    )


class _Distillation(torch.autograd.Function):
    """The healing loss over ``(tokens, vocab)`` logits, chunk by chunk, its gradient computed forward."""

    @staticmethod
    def forward(ctx, student, teacher, targets, temperature, kd_weight, rows, n_ce):
        T, n_kl = temperature, len(targets)
        ce_scale, kl_scale = (1.0 - kd_weight) / n_ce, kd_weight * T / n_kl  # d loss / d logits factors
        grad = torch.empty_like(student) if ctx.needs_input_grad[0] else None
        kl = student.new_zeros((), dtype=torch.float32)
        ce = student.new_zeros((), dtype=torch.float32)
        with torch.autocast(student.device.type, enabled=False):
            for start in range(0, n_kl, rows):
                part = slice(start, start + rows)
                z, y = student[part].float(), targets[part]
                valid = (y != _IGNORE).float()
                y = y.clamp_min(0)[:, None]
                log_p = F.log_softmax(z, dim=-1)
                ce -= (log_p.gather(1, y).squeeze(1) * valid).sum()
                if teacher is not None:
                    log_s = log_p if T == 1.0 else F.log_softmax(z / T, dim=-1)
                    log_t = F.log_softmax(teacher[part].float() / T, dim=-1)
                    p_t = log_t.exp()
                    kl += (p_t * (log_t - log_s)).sum()
                if grad is None:
                    continue
                # cross-entropy: softmax(z) − onehot(y), on positions with a next token
                p = log_p.exp_()
                g = p * (valid * ce_scale)[:, None]
                g.scatter_add_(1, y, (valid * -ce_scale)[:, None])
                if teacher is not None:  # T² · KL at temperature T: T · (softmax(z / T) − p_teacher)
                    p_s = p if T == 1.0 else log_s.exp_()
                    g += (p_s - p_t) * kl_scale
                grad[part] = g
        kl, ce = kl * (T * T) / n_kl, ce / n_ce
        ctx.grad = grad  # an intermediate, not an input or output: kept on ctx, handed over once
        ctx.mark_non_differentiable(kl, ce)
        return kd_weight * kl + (1.0 - kd_weight) * ce, kl, ce

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_kl, _grad_ce):
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError("the healing loss was already backpropagated; it holds one gradient")
        return grad.mul_(grad_loss.to(grad.dtype)), None, None, None, None, None, None


def hidden_state_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """Relative squared error of the residual stream, in float32: the mean over layers and tokens of
    ``‖h_s − h_t‖² / ‖h_t‖²``, each token measured against its own norm in the teacher (so the few tokens
    with massive activations weigh no more than the rest).

    Args:
        student, teacher: hidden states after every decoder layer, one ``(batch, seq, hidden)`` tensor
            a layer (``output_hidden_states`` without the embeddings; transformers gives the last one after
            the final norm), the same count and shapes.
    """
    if len(student) != len(teacher) or not student:
        raise ValueError(
            f"hidden-state distillation needs as many decoder layers in the student as in the teacher; "
            f"got {len(student)} and {len(teacher)}"
        )
    total = student[0].new_zeros((), dtype=torch.float32)
    for s, t in zip(student, teacher, strict=True):
        if s.shape != t.shape:
            raise ValueError(
                f"hidden-state distillation needs equal hidden states; got {tuple(s.shape)} (student) "
                f"and {tuple(t.shape)} (teacher)"
            )
        t = t.float()
        norm = t.pow(2).sum(-1).clamp_min(torch.finfo(torch.float32).tiny)
        total = total + ((s.float() - t).pow(2).sum(-1) / norm).mean()
    return total / len(student)


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


@dataclass
class _Progress:
    """Everything a resumed run needs besides the parameters and the optimizer state."""

    step: int = 0
    best_loss: float = math.inf
    bad_evals: int = 0
    stopped: bool = False
    losses: list[float] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    elapsed_s: float = 0.0


class _Checkpoint:
    """One file holding the trainable state, optimizer, best state and progress, replaced atomically."""

    def __init__(self, directory: Path | None, key: str, settings: dict[str, Any]) -> None:
        self.path = None if directory is None else Path(directory) / CHECKPOINT_FILE
        self.key = key
        self.settings = settings  # saved with the state, to say what differs when a resume is refused

    def save(self, params, optimizer, best, progress: _Progress) -> None:
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

    def load(self, params, optimizer, best) -> _Progress | None:
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
        progress = _Progress(**state["progress"])
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
    ckpt = _Checkpoint(checkpoint_dir, key, settings)
    optimizer = torch.optim.AdamW(params.values(), lr=lr, weight_decay=0.0)
    best = {n: p.detach().clone() for n, p in params.items()}
    order = torch.randperm(len(train_ids), generator=torch.Generator().manual_seed(config.seed))
    batches = order.split(config.batch_size)
    state = ckpt.load(params, optimizer, best) or _Progress()
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


def _elapsed(state: _Progress, start: float) -> _Progress:
    return dataclasses.replace(state, elapsed_s=state.elapsed_s + time.perf_counter() - start)


def _track(state: _Progress, model, teacher, heldout_ids, params, best, config: HealConfig, amp) -> None:
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


def _details(state: _Progress, config, train_ids, params, last, resumed_at, amp, lr) -> dict[str, Any]:
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
