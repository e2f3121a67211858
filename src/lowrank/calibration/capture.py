"""Calibration: token ids in, per-layer statistics out, one decoder layer at a time.

The protocol (SVD-LLM's, also GPTQ's): run the embedding once and capture what decoder layer 0 receives
(hidden states and the keyword arguments every layer is called with: attention masks, position
embeddings, position ids), then for each layer

1. move the layer to the compute device, run it over every calibration chunk with hooks that accumulate
   the requested statistics (e.g. :class:`InputGram`: XᵀX of a linear's input over ALL tokens);
2. hand the statistics to ``process_layer`` (the method), which compresses the layer in place;
3. re-run the compressed layer to produce the next layer's inputs (``sequential=True``), or keep the
   original layer's outputs computed in step 1 (``sequential=False``);
4. move the layer back; with a checkpoint directory, save its state and a progress record atomically.

Layer inputs live on ``offload_device`` (CPU by default) and are overwritten in place by the outputs,
so peak accelerator memory is one layer plus one chunk's activations.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowrank.calibration.statistics import (
    Statistic,
    StatRequest,
    Timings,
)
from lowrank.nn.architectures import decoder_layers, get_arch_spec
from lowrank.nn.surgery import get_module, replace_module

__all__ = [
    "LayerInputs",
    "capture_layer_inputs",
    "collect_layer_statistics",
    "run_layer",
    "check_calibration_size",
    "MIN_TOKENS_PER_FEATURE",
]

logger = logging.getLogger(__name__)

#: Warn when calibration tokens < this × the largest input dimension of a target linear: a Gram matrix
#: of an n-dimensional input needs n independent tokens to be full rank at all, and a few times n to
#: estimate the covariance well (SVD-LLM users got perplexity 4629 from 8 × 2048 tokens on 11008-dim inputs).
MIN_TOKENS_PER_FEATURE = 4


def check_calibration_size(tokens: int, max_input_dim: int) -> bool:
    """Log a warning and return False when ``tokens < MIN_TOKENS_PER_FEATURE · max_input_dim``."""
    need = MIN_TOKENS_PER_FEATURE * max_input_dim
    if tokens < need:
        logger.warning(
            "calibration has %d tokens (samples × seq_len) for inputs of dimension up to %d; at least %d "
            "(%d × the dimension) are recommended, otherwise Gram matrices are rank deficient or noisy",
            tokens,
            max_input_dim,
            need,
            MIN_TOKENS_PER_FEATURE,
        )
        return False
    return True


# --------------------------------------------------------------------------------------- timings


# ------------------------------------------------------------------------------------ statistics


# ----------------------------------------------------------------------------------- layer inputs
#: keyword arguments through which a layer receives the KV cache (dropped: calibration runs without one)
_CACHE_KWARGS = ("past_key_values", "past_key_value", "cache")


class _StopForward(Exception):
    """Raised by the last catcher to end the capture forward pass before the LM head."""


class _Catcher(nn.Module):
    """Stands in for a decoder layer during capture: records its call, returns the input unchanged."""

    def __init__(self, index: int, sink: list, last: bool, original: nn.Module) -> None:
        super().__init__()
        self.index, self.last = index, last
        object.__setattr__(self, "_sink", sink)
        object.__setattr__(self, "_original", original)  # unregistered: stays where it is

    def __getattr__(self, name: str) -> Any:  # models may read layer attributes (attention_type, …)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_original"), name)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._sink.append((self.index, hidden_states, args, kwargs))
        if self.last:
            raise _StopForward
        return hidden_states


def _move(obj: Any, device: torch.device | str, memo: dict[int, Any]) -> Any:
    """Move tensors nested in tuples/lists/dicts, copying each distinct tensor once."""
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = obj.detach().to(device)
        return memo[id(obj)]
    if isinstance(obj, (tuple, list)):
        return type(obj)(_move(o, device, memo) for o in obj)
    if isinstance(obj, dict):
        return {k: _move(v, device, memo) for k, v in obj.items()}
    return obj


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and not isinstance(a, torch.Tensor) and a == b


@dataclass
class LayerInputs:
    """Calibration activations at the current layer boundary.

    ``hidden[c]``: chunk c's hidden states (batch, seq, hidden) on the offload device, overwritten by
    each layer's outputs. ``calls[i][c]``: the (args, kwargs) layer i is called with for chunk c
    (identical objects are shared across layers and chunks).
    """

    hidden: list[torch.Tensor]
    calls: list[list[tuple[tuple[Any, ...], dict[str, Any]]]]

    @property
    def tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    offload_device: torch.device | str = "cpu",
) -> LayerInputs:
    """Run the model up to its first decoder layer and record every layer's call arguments.

    Every decoder layer is temporarily replaced by a catcher (the last one stops the forward pass), so
    only the embedding, rotary and mask code run; per-layer arguments such as Gemma-2's alternating
    sliding-window masks are captured exactly as the model would pass them.

    Args:
        model: a causal LM with a Llama-like layout (see ``lowrank.nn.architectures``).
        input_ids: (samples, seq_len) token ids.
        batch_size: samples per chunk.
        device: compute device (default: the device of the model's parameters).
        offload_device: where captured tensors are kept.
    """
    if input_ids.ndim != 2 or input_ids.shape[0] < 1:
        raise ValueError(
            f"calibration input_ids must be (samples, seq_len); got shape {tuple(input_ids.shape)}"
        )
    spec = get_arch_spec(model)
    layers = decoder_layers(model, spec)
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    count = len(layers)
    originals = list(layers)
    sink: list = []
    hidden: list[torch.Tensor] = []
    calls: list[list] = [[] for _ in range(count)]
    try:
        for i, layer in enumerate(originals):
            replace_module(model, f"{spec.layers}.{i}", _Catcher(i, sink, i == count - 1, layer))
        model.to(device)
        for start in range(0, input_ids.shape[0], batch_size):
            sink.clear()
            with contextlib.suppress(_StopForward):
                model(input_ids=input_ids[start : start + batch_size].to(device), use_cache=False)
            if len(sink) != count:
                raise RuntimeError(
                    f"captured {len(sink)} of {count} decoder layer calls; the model skipped layers"
                )
            memo: dict[int, Any] = {}
            hidden.append(sink[0][1].detach().to(offload_device))
            for i, _, args, kwargs in sink:
                kwargs = {k: v for k, v in kwargs.items() if k not in _CACHE_KWARGS}
                if "use_cache" in kwargs:
                    kwargs["use_cache"] = False
                call = (_move(args, offload_device, memo), _move(kwargs, offload_device, memo))
                prev = calls[i][-1] if calls[i] else None
                calls[i].append(prev if prev is not None and _same(prev, call) else call)
    finally:
        for i, layer in enumerate(originals):
            replace_module(model, f"{spec.layers}.{i}", layer)
        model.to(home)
    return LayerInputs(hidden=hidden, calls=calls)


# ------------------------------------------------------------------------------- running a layer
def _output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_layer(
    layer: nn.Module,
    index: int,
    inputs: LayerInputs,
    *,
    device: torch.device | str,
    write_outputs: bool,
    timings: Timings | None = None,
) -> None:
    """Run ``layer`` (already on ``device``) over every chunk; optionally overwrite ``inputs.hidden``."""
    timings = timings or Timings()
    for c, h in enumerate(inputs.hidden):
        args, kwargs = inputs.calls[index][c]
        memo: dict[int, Any] = {}
        with timings.measure("calibration_forward"):
            out = _output(layer(h.to(device), *_move(args, device, memo), **_move(kwargs, device, memo)))
            if write_outputs:
                inputs.hidden[c] = out.to(h.device)


@torch.no_grad()
def collect_layer_statistics(
    layer: nn.Module,
    index: int,
    inputs: LayerInputs,
    requests: dict[str, StatRequest],
    *,
    device: torch.device | str,
    write_outputs: bool = False,
    timings: Timings | None = None,
) -> dict[str, Statistic]:
    """Accumulate ``requests`` over all chunks through forward hooks (removed in ``finally``).

    Each statistic attaches itself with :meth:`Statistic.attach` (by default one forward hook on its
    module); everything it attached is removed in ``finally``, also when a forward pass fails.

    Input statistics of modules fed the very same tensor (q/k/v, gate/up) are accumulated once and
    shared. With ``write_outputs`` the layer's outputs replace ``inputs.hidden`` (non-sequential mode).

    Returns:
        ``{key: statistic}`` for every key of ``requests``.
    """
    timings = timings or Timings()
    stats = {key: req.make() for key, req in requests.items()}
    alias: dict[str, str] = {}
    seen: list[tuple[torch.Tensor, str]] = []
    first = [True]

    def make_hook(key: str) -> Callable:
        stat = stats[key]

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if key in alias:
                return
            start = time.perf_counter()
            if stat.shares_input and args and first[0]:
                for tensor, other in seen:
                    if (
                        tensor is args[0]
                        and type(stats[other]) is type(stat)
                        and vars(stats[other]).get("dtype") == vars(stat).get("dtype")
                    ):
                        alias[key] = other
                        return
                seen.append((args[0], key))
            stat.update(module, args, output, kwargs)
            if timings.sync:
                torch.cuda.synchronize()
            timings.add("gram_accumulation", time.perf_counter() - start)
            timings.add("calibration_forward", -(time.perf_counter() - start))

        return hook

    handles = []
    try:
        for key, req in requests.items():
            handles.extend(stats[key].attach(get_module(layer, req.module), make_hook(key)))
        for c in range(len(inputs.hidden)):
            sub = LayerInputs(hidden=inputs.hidden[c : c + 1], calls=[[inputs.calls[index][c]]])
            run_layer(layer, 0, sub, device=device, write_outputs=write_outputs, timings=timings)
            inputs.hidden[c] = sub.hidden[0]
            first[0] = False
            seen.clear()
    finally:
        for handle in handles:
            handle.remove()
    for key, other in alias.items():
        stats[key] = stats[other]
    return stats
