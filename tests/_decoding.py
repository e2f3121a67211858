"""Logits of a whole sequence, uncached and through the model's own KV cache, for exactness checks."""

from __future__ import annotations

import torch

from lowrank.attention.cache import make_cache


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits of every position from one cache-free forward pass."""
    with torch.no_grad():
        return model(ids).logits


def decoded(model, ids: torch.Tensor, prompt: int = 16):
    """Logits of every position from a prefill of ``prompt`` tokens then one-token steps; and the cache."""
    cache = make_cache(model)
    with torch.no_grad():
        out = [model(ids[:, :prompt], cache=cache, use_cache=True).logits]
        for t in range(prompt, ids.shape[1]):
            out.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    return torch.cat(out, dim=1), cache
