"""Where the bytes go: parameters, decoder linear layers, weights, and the KV cache measured for real."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from lowrank.attention.cache import cache_argument, make_cache
from lowrank.nn.architectures import decoder_layers

__all__ = ["MemoryReport", "memory_report", "tensor_bytes"]


@dataclass(frozen=True)
class MemoryReport:
    """Outcome of :func:`memory_report`."""

    parameters: int
    """All parameters (shared/tied tensors counted once; a quantized layer counts the weights it stores)."""
    decoder_linear_parameters: int
    """Parameters of every ``nn.Linear`` inside the decoder layers (low-rank factor pairs included)."""
    weight_bytes: int
    """Bytes of all parameters in their current dtypes (shared tensors counted once) plus the stored
    tensors of quantized layers (packed weights, scales, zero points)."""
    buffer_bytes: int
    """Bytes of registered buffers (rotary tables, …), not counting the quantized weights."""
    kv_cache_bytes_per_token: float
    """Bytes held by the model's cache (:func:`lowrank.attention.cache.make_cache`: the installed class, else
    ``DynamicCache``) after a real forward pass filled it, divided by batch x tokens."""
    kv_cache_class: str
    """Class name of the cache that was measured."""
    kv_cache_tokens: int
    """Tokens in the forward pass the cache was measured on."""

    def to_dict(self) -> dict:
        return asdict(self)


def _unique(tensors) -> list[torch.Tensor]:
    seen, out = set(), []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def tensor_bytes(obj: Any, *, max_depth: int = 8) -> int:
    """Bytes of every tensor storage reachable from ``obj``, each storage counted once.

    Walks lists, tuples, sets, dicts and the attributes (``__dict__`` / ``__slots__``) of arbitrary
    objects, so any cache class is measured the same way. 0-dim tensors (scalar bookkeeping such as a
    sliding-window length) are skipped. Modules are not entered (a cache that keeps a
    reference to a layer is not charged for its weights). Storage is counted whole: a preallocated
    (static) cache is charged for what it allocated, not for what it has filled.
    """
    seen_objects: set[int] = set()
    seen_storages: set[tuple[str, int]] = set()
    total = 0
    stack: list[tuple[Any, int]] = [(obj, 0)]
    while stack:
        item, depth = stack.pop()
        if item is None or id(item) in seen_objects or depth > max_depth:
            continue
        seen_objects.add(id(item))
        if isinstance(item, torch.Tensor):
            if item.dim() == 0:  # scalar bookkeeping (lengths, window sizes), not cached data
                continue
            storage = item.untyped_storage()
            key = (str(item.device), storage.data_ptr())
            if key not in seen_storages:
                seen_storages.add(key)
                total += storage.nbytes()
        elif isinstance(item, nn.Module | str | bytes | int | float | bool | torch.dtype | torch.device):
            continue
        elif isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list | tuple | set | frozenset):
            stack.extend((v, depth + 1) for v in item)
        else:
            attrs = dict(getattr(item, "__dict__", {}))
            for slot in getattr(type(item), "__slots__", ()):
                if hasattr(item, slot):
                    attrs[slot] = getattr(item, slot)
            stack.extend((v, depth + 1) for v in attrs.values())
    return total


def _decoder_linear_parameters(model: nn.Module) -> int:
    from lowrank.nn.quantized_linear import QuantizedLinear

    params, quantized = [], 0
    for layer in decoder_layers(model):
        for module in layer.modules():
            if isinstance(module, nn.Linear):
                params.extend(module.parameters(recurse=False))
            elif isinstance(module, QuantizedLinear):
                params.extend(module.parameters(recurse=False))
                quantized += module.in_features * module.out_features
    return sum(p.numel() for p in _unique(params)) + quantized


@torch.inference_mode()
def _kv_cache_bytes(model: nn.Module, tokens: int, batch_size: int) -> tuple[float, str]:
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch_size, tokens), generator=g).to(device)
    cache = make_cache(model)
    model(input_ids=ids, use_cache=True, **{cache_argument(model): cache})
    if cache.get_seq_length() != tokens:
        raise ValueError(
            f"{type(model).__name__} did not fill the {type(cache).__name__} it was given "
            f"({cache.get_seq_length()} of {tokens} tokens cached)"
        )
    return tensor_bytes(cache) / (batch_size * tokens), type(cache).__name__


def memory_report(model: nn.Module, *, tokens: int = 64, batch_size: int = 1) -> MemoryReport:
    """Parameter counts, weight bytes and the KV-cache footprint measured on a real forward pass.

    Args:
        model: a causal LM with decoder layers known to :mod:`lowrank.nn.architectures`.
        tokens: length of the random prompt whose cache is measured (>= 1).
        batch_size: prompts in that forward pass (>= 1).

    Returns:
        :class:`MemoryReport`; ``kv_cache_bytes_per_token`` is bytes / (batch_size x tokens) of every
        tensor reachable from the cache the forward pass filled: a fresh
        :func:`lowrank.attention.cache.make_cache` (the installed cache class, else ``DynamicCache``). It
        equals
        :func:`lowrank.attention.cache.kv_bytes_per_token`.
    """
    if tokens < 1 or batch_size < 1:
        raise ValueError(f"tokens and batch_size must be >= 1; got tokens={tokens}, batch_size={batch_size}")
    from lowrank.nn.accounting import count_parameters, stored_bytes, weight_bytes

    kv_bytes, kv_class = _kv_cache_bytes(model, tokens, batch_size)
    return MemoryReport(
        parameters=count_parameters(model),
        decoder_linear_parameters=_decoder_linear_parameters(model),
        weight_bytes=weight_bytes(model),
        buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()) - stored_bytes(model),
        kv_cache_bytes_per_token=kv_bytes,
        kv_cache_tokens=tokens,
        kv_cache_class=kv_class,
    )
