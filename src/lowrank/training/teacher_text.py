"""Text a model writes itself: sequences sampled from a causal LM, for data-free distillation.

Healing a compressed model on sequences its teacher samples (``HealConfig.source='teacher'``) trains the
student on the teacher's own distribution instead of one corpus, with no text at all. On the built-in
model it heals less than corpus text, in the corpus's domain and out of it (docs/healing.md).

Each sequence is the BOS token (when the model has one), one token drawn uniformly from the vocabulary
(what spreads the sequences over topics), then tokens sampled from the model's full softmax at
``temperature`` through a KV cache.

Sampling is seeded, so the same model, settings and seed give the same sequences on the same device and
threads. :func:`teacher_sequences` keeps them in the cache directory under a key of the model's weights and
the settings, written batch by batch: an interrupted run resumes after its last finished batch and a
second healing run against the same teacher reuses them.

References:
    Liu et al., "LLM-QAT: Data-Free Quantization Aware Training for Large Language Models", 2023
    (distilling on sequences the full-precision model generates, first token drawn at random).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from lowrank.attention.cache import cache_argument, make_cache
from lowrank.calibration.layerwise import fingerprint, state_digest
from lowrank.io.assets import cache_dir
from lowrank.io.checked import load_checked, save_checked
from lowrank.nn.architectures import vocab_size

__all__ = ["sample_sequences", "teacher_sequences"]

logger = logging.getLogger(__name__)

_FORMAT = 2  # 2: the file carries its SHA-256 (lowrank.io.checked)


def _special_ids(model: nn.Module) -> set[int]:
    ids: set[int] = set()
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(model.config, name, None)
        ids.update(value if isinstance(value, list | tuple) else [value] if value is not None else [])
    return {int(i) for i in ids}


def _bos_id(model: nn.Module) -> int | None:
    bos = getattr(model.config, "bos_token_id", None)
    return int(bos[0] if isinstance(bos, list | tuple) else bos) if bos is not None else None


def _check(samples: int, seq_len: int, temperature: float, batch_size: int) -> None:
    for name, value, low in (("samples", samples, 1), ("seq_len", seq_len, 2), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature!r}")
    if not math.isfinite(temperature):
        raise ValueError(f"temperature must be finite; got {temperature!r}")


@torch.no_grad()
def _sample_batch(
    model: nn.Module, first: torch.Tensor, seq_len: int, temperature: float, generator
) -> torch.Tensor:
    """Continue the prefixes ``first`` (batch, prefix) to ``seq_len`` tokens by sampling from ``model``."""
    cache_kw = cache_argument(model)
    cache = make_cache(model)
    ids = first
    logits = model(ids, use_cache=True, **{cache_kw: cache}).logits[:, -1]
    steps = [ids]
    for remaining in range(seq_len - ids.shape[1], 0, -1):
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        token = torch.multinomial(probs, 1, generator=generator)
        steps.append(token)
        if remaining > 1:
            logits = model(token, use_cache=True, **{cache_kw: cache}).logits[:, -1]
    return torch.cat(steps, dim=1)


def _batches(
    model: nn.Module, samples: int, seq_len: int, seed: int, temperature: float, batch_size: int, start: int
):
    """Yield the batches of sequences ``start …`` (each from its own seeded generators)."""
    device = next(model.parameters()).device
    vocab, bos = vocab_size(model), _bos_id(model)
    special = _special_ids(model)
    allowed = torch.tensor([i for i in range(vocab) if i not in special])
    was_training = model.training
    model.eval()
    try:
        for b in range(start, samples, batch_size):
            n = min(batch_size, samples - b)
            index = b // batch_size
            draw = torch.randint(len(allowed), (n, 1), generator=torch.Generator().manual_seed(seed + index))
            first = allowed[draw]
            if bos is not None:
                first = torch.cat([torch.full((n, 1), bos), first], dim=1)
            generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)
            yield _sample_batch(model, first.to(device), seq_len, temperature, generator).cpu()
    finally:
        model.train(was_training)


def sample_sequences(
    model: nn.Module,
    samples: int,
    seq_len: int,
    *,
    seed: int = 0,
    temperature: float = 1.0,
    batch_size: int = 64,
    progress: bool = True,
) -> torch.Tensor:
    """``samples`` sequences of ``seq_len`` tokens that ``model`` writes (see the module docstring).

    Args:
        model: a causal LM, on the device to sample on (run in eval mode, under ``no_grad``).
        samples: sequences; ``seq_len``: tokens per sequence, BOS included.
        seed: seed of the set; batch b draws from generators seeded by (seed, b), so a batch can be made
            again on its own.
        temperature: sampling temperature of the softmax (1: the model's own distribution).
        batch_size: sequences sampled together.

    Returns:
        Token ids ``(samples, seq_len)`` on the CPU.
    """
    _check(samples, seq_len, temperature, batch_size)
    out = []
    with tqdm(total=samples * seq_len, desc="sample", unit="tok", disable=not progress) as bar:
        for part in _batches(model, samples, seq_len, seed, temperature, batch_size, 0):
            out.append(part)
            bar.update(part.numel())
    return torch.cat(out)


def teacher_sequences(
    model: nn.Module,
    samples: int,
    seq_len: int,
    *,
    seed: int = 0,
    temperature: float = 1.0,
    batch_size: int = 64,
    directory: str | Path | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """:func:`sample_sequences`, kept on disk batch by batch and reused (see the module docstring).

    Args:
        directory: where the sequences are kept (default: ``synthetic/`` in the cache directory): one file
            per model weights and settings, rewritten atomically after each batch.

    Returns:
        Token ids ``(samples, seq_len)``: the first ``samples`` rows of the stored set, which grows by
        whole batches when it holds fewer (a stored partial last batch is made again whole).
    """
    _check(samples, seq_len, temperature, batch_size)
    directory = Path(directory) if directory is not None else cache_dir() / "synthetic"
    key = fingerprint(_FORMAT, state_digest(model), seq_len, seed, float(temperature), batch_size)[:24]
    path = directory / f"{key}.pt"
    stored = torch.empty(0, seq_len, dtype=torch.long)
    if path.is_file():
        stored = _read_stored(path, seq_len, vocab_size(model))
    if len(stored) >= samples:
        return stored[:samples].clone()
    start = len(stored) - len(stored) % batch_size
    if start:
        logger.info("reusing %d of the teacher's %d sequences from %s", start, samples, path)
    directory.mkdir(parents=True, exist_ok=True)
    total = math.ceil(samples / batch_size) * batch_size
    parts = [stored[:start]]
    with tqdm(
        total=total * seq_len, initial=start * seq_len, desc="sample", unit="tok", disable=not progress
    ) as bar:
        for part in _batches(model, total, seq_len, seed, temperature, batch_size, start):
            parts.append(part)
            save_checked(torch.cat(parts), path)
            bar.update(part.numel())
    return torch.cat(parts)[:samples]


def _read_stored(path: Path, seq_len: int, vocab: int) -> torch.Tensor:
    """The stored token ids at ``path``, checked: SHA-256, shape ``(n, seq_len)``, ids in ``[0, vocab)``."""
    stored = load_checked(path, "stored sequences", "remove it to sample again")
    if not isinstance(stored, torch.Tensor) or stored.ndim != 2 or stored.shape[1] != seq_len:
        raise ValueError(f"{path} does not hold (n, {seq_len}) token ids; remove it to sample again")
    if stored.dtype != torch.long or (stored.numel() and (stored.min() < 0 or stored.max() >= vocab)):
        raise ValueError(f"{path} holds token ids outside [0, {vocab}); remove it to sample again")
    return stored
