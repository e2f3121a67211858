"""The healing objective: KL distillation plus cross-entropy over chunks of the vocabulary, and the
hidden-state term."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["LOSS_CHUNK_BYTES", "distillation_loss", "hidden_state_loss"]


LOSS_CHUNK_BYTES = 64 * 2**20
"""Bytes of float32 logits per chunk of the loss (:func:`distillation_loss`): 341 tokens of a 49,152-token
vocabulary, 64 of a 262,144-token one. The loss then adds about six chunks of temporaries to the logits'
gradient, whatever the batch (benchmarks/results/heal_loss_cpu.md)."""


_IGNORE = -100  # cross-entropy target of the positions without a next token


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
