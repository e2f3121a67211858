"""Perplexity by the WikiText-2 protocol: one token stream, non-overlapping windows, every token counted.

Windows start with BOS where the model's tokenizer adds one by default (docs/evaluation.md).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lowrank.io.data import resolve_bos, tokenize

__all__ = ["PerplexityResult", "NonFiniteLogitsError", "perplexity"]

logger = logging.getLogger(__name__)


class NonFiniteLogitsError(FloatingPointError):
    """The model produced NaN or infinite logits; nothing is dropped, the evaluation stops."""


@dataclass(frozen=True)
class PerplexityResult:
    """Outcome of :func:`perplexity`."""

    perplexity: float
    """exp(nll)."""
    nll: float
    """Mean negative log-likelihood (nats) over every predicted token."""
    tokens_evaluated: int
    """Number of predicted tokens: windows x (seq_len - 1), with or without BOS."""
    windows: int
    """Number of windows evaluated."""
    seq_len: int
    """Tokens per window as the model sees it (BOS included)."""
    bos: bool = False
    """Whether every window started with BOS (then it holds BOS + ``seq_len - 1`` text tokens, each one
    predicted; without BOS it holds ``seq_len`` text tokens, the first of which is context only)."""

    def to_dict(self) -> dict:
        return asdict(self)


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def perplexity(
    model: torch.nn.Module,
    tokenizer,
    text: str | torch.Tensor,
    *,
    seq_len: int = 512,
    max_windows: int | None = None,
    batch_size: int = 1,
    add_bos: bool | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``text`` (WikiText-2 protocol).

    The text is tokenized once (no special tokens) and cut into non-overlapping windows (the remainder is
    not evaluated); each window is scored independently and the NLL is averaged over every predicted
    token, ``seq_len - 1`` per window. Logits are upcast to float32 for the loss.

    Without BOS a window is ``seq_len`` consecutive text tokens (``N // seq_len`` windows; the first token of
    each is context only). With BOS (where the tokenizer adds one by default, see
    :func:`lowrank.io.data.resolve_bos`) a window is BOS followed by ``seq_len - 1`` text tokens
    (``N // (seq_len - 1)`` windows) and every text token of the window is predicted; BOS itself never is.

    Args:
        model: causal LM returning ``.logits`` of shape ``(batch, seq_len, vocab)``.
        tokenizer: Hugging Face tokenizer (only its BOS convention is used when ``text`` is token ids).
        text: the evaluation text, or token ids ``(N,)`` / ``(1, N)``.
        seq_len: window length in tokens, >= 2.
        max_windows: evaluate only the first this many windows (``None``: all).
        batch_size: windows per forward pass.
        add_bos: ``None``: start windows with BOS as the tokenizer does by default (no BOS for token ids
            without a tokenizer); ``True`` / ``False``: force it.
        device: where to run; defaults to the device of the model's parameters.
        progress: show a progress bar.

    Returns:
        :class:`PerplexityResult`.

    Raises:
        ValueError: bad sizes, or fewer than ``seq_len`` tokens.
        NonFiniteLogitsError: a window produced NaN/inf logits (the message names the window).

    References:
        The evaluation of GPTQ / SVD-LLM on WikiText-2 (``ppl_eval`` with non-overlapping windows).
    """
    if seq_len < 2 or batch_size < 1:
        raise ValueError(
            f"need seq_len >= 2 and batch_size >= 1; got seq_len={seq_len}, batch_size={batch_size}"
        )
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be >= 1, or None for every window; got max_windows={max_windows}")
    bos = resolve_bos(tokenizer, add_bos)
    ids = tokenize(tokenizer, text)
    span = seq_len - (bos is not None)  # text tokens per window
    n_windows = ids.numel() // span
    if n_windows == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {span} text tokens")
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    windows = ids[: n_windows * span].view(n_windows, span)
    if bos is not None:
        windows = torch.cat([torch.full((n_windows, 1), bos, dtype=torch.long), windows], dim=1)
    device = torch.device(device) if device is not None else _model_device(model)
    total_nll = 0.0
    starts = range(0, n_windows, batch_size)
    for start in tqdm(starts, desc=f"perplexity (seq {seq_len})", unit="batch", disable=not progress):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        _check_finite(logits, start, span)
        loss = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += float(loss)
    tokens = n_windows * (seq_len - 1)
    nll = total_nll / tokens
    return PerplexityResult(
        perplexity=math.exp(nll),
        nll=nll,
        tokens_evaluated=tokens,
        windows=n_windows,
        seq_len=seq_len,
        bos=bos is not None,
    )


def _check_finite(logits: torch.Tensor, first_window: int, span: int) -> None:
    finite = torch.isfinite(logits).flatten(1).all(dim=1)
    if bool(finite.all()):
        return
    bad = first_window + int((~finite).nonzero()[0, 0])
    raise NonFiniteLogitsError(
        f"non-finite logits in window {bad} (tokens {bad * span}..{(bad + 1) * span - 1}); "
        "the model is numerically broken on this input, no windows were dropped"
    )
