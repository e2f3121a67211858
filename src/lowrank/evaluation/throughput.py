"""Prefill and decode speed with a real KV cache, synchronised, median of repeats; peak memory."""

from __future__ import annotations

import inspect
import logging
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from lowrank.attention.cache import cache_argument, make_cache

__all__ = ["ThroughputResult", "throughput", "paired_throughput", "check_workload"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ThroughputResult:
    """Outcome of :func:`throughput` (times are medians over the timed repeats)."""

    prefill_tokens_per_s: float
    """batch_size x prompt_len / prefill time."""
    decode_tokens_per_s: float
    """batch_size x gen_len / decode time (one token per step, greedy, reusing the KV cache)."""
    cache_class: str
    """Class of the KV cache the runs filled (:func:`lowrank.attention.cache.make_cache`)."""
    prefill_seconds: float
    decode_seconds: float
    batch_size: int
    prompt_len: int
    gen_len: int
    repeats: int
    device: str
    peak_memory_bytes: int | None
    """See ``peak_memory_kind``; ``None`` where the device reports nothing."""
    peak_memory_kind: str | None
    """``'cuda_max_memory_allocated'`` (tensors on the GPU during the run) or ``'process_peak_rss'``
    (Linux: peak resident memory of the whole process during the run, weights included, after resetting
    the high-water mark through /proc/self/clear_refs) or ``None``."""

    def to_dict(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM (Linux >= 4.0)
        return True
    except OSError:
        return False


def _rss_peak_bytes() -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@torch.inference_mode()
def _one_run(model, prompt: torch.Tensor, gen_len: int, device: torch.device) -> tuple[float, float]:
    cache, name = make_cache(model), cache_argument(model)
    _sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True, **{name: cache})
    next_ids = out.logits[:, -1].argmax(dim=-1, keepdim=True)
    _sync(device)
    t1 = time.perf_counter()
    for _ in range(gen_len):  # the cache is filled in place
        out = model(input_ids=next_ids, use_cache=True, **{name: cache})
        next_ids = out.logits[:, -1].argmax(dim=-1, keepdim=True)
    _sync(device)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def check_workload(model, batch_size: int, prompt_len: int, gen_len: int, repeats: int, warmup: int) -> None:
    """Refuse (one line) a workload with a length below 1 or past the model's positions."""
    if min(batch_size, prompt_len, gen_len, repeats) < 1 or warmup < 0:
        raise ValueError(
            f"need batch_size, prompt_len, gen_len, repeats >= 1 and warmup >= 0; got "
            f"{batch_size}, {prompt_len}, {gen_len}, {repeats}, {warmup}"
        )
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and prompt_len + gen_len > limit:
        raise ValueError(
            f"prompt_len + gen_len = {prompt_len} + {gen_len} = {prompt_len + gen_len} exceeds the model's "
            f"max_position_embeddings={limit}; use a total of at most {limit}"
        )


def throughput(
    model: torch.nn.Module,
    *,
    batch_size: int = 1,
    prompt_len: int = 128,
    gen_len: int = 64,
    warmup: int = 1,
    repeats: int = 3,
    device: str | torch.device | None = None,
    seed: int = 0,
    progress: bool = True,
) -> ThroughputResult:
    """Measure prefill and greedy-decode throughput on random prompts.

    Each run feeds a ``(batch_size, prompt_len)`` prompt once (prefill), then decodes ``gen_len`` tokens
    one step at a time through the same cache, a fresh :func:`lowrank.attention.cache.make_cache` per run (the
    model's installed cache class, else ``DynamicCache``), passed by keyword. The device is synchronised
    around each timed phase; ``warmup`` untimed runs come first and the median of ``repeats`` timed runs is
    reported.

    Args:
        model: causal LM (moved nowhere: it must already be on ``device``).
        batch_size, prompt_len, gen_len: workload shape (each >= 1).
        warmup: untimed runs (>= 0).
        repeats: timed runs (>= 1).
        device: defaults to the device of the model's parameters.
        seed: seed of the prompt's generator.
        progress: show a progress bar over the runs.

    Returns:
        :class:`ThroughputResult`.

    Raises:
        ValueError: a size below its minimum, or ``prompt_len + gen_len`` above the model's
            ``max_position_embeddings`` (checked before any compute).
    """
    check_workload(model, batch_size, prompt_len, gen_len, repeats, warmup)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (batch_size, prompt_len), generator=g).to(device)
    for _ in range(warmup):
        _one_run(model, prompt, gen_len, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        kind = "cuda_max_memory_allocated"
    else:
        kind = "process_peak_rss" if _reset_rss_peak() else None
    times = [
        _one_run(model, prompt, gen_len, device)
        for _ in tqdm(range(repeats), desc="throughput", unit="run", disable=not progress)
    ]
    if kind == "cuda_max_memory_allocated":
        peak = int(torch.cuda.max_memory_allocated(device))
    else:
        peak = _rss_peak_bytes() if kind else None
        kind = kind if peak is not None else None
    prefill = statistics.median(t[0] for t in times)
    decode = statistics.median(t[1] for t in times)
    return ThroughputResult(
        prefill_tokens_per_s=batch_size * prompt_len / prefill,
        decode_tokens_per_s=batch_size * gen_len / decode,
        cache_class=type(make_cache(model)).__name__,
        prefill_seconds=prefill,
        decode_seconds=decode,
        batch_size=batch_size,
        prompt_len=prompt_len,
        gen_len=gen_len,
        repeats=repeats,
        device=str(device),
        peak_memory_bytes=peak,
        peak_memory_kind=kind,
    )


def paired_throughput(
    models: dict[str, torch.nn.Module],
    *,
    repeats: int = 3,
    progress: bool = True,
    **workload,
) -> dict[str, ThroughputResult]:
    """:func:`throughput` of several models with their timed runs interleaved (A B A B …).

    On a shared or thermally throttled machine the speed drifts over minutes; measuring the models one
    after the other turns that drift into a fake speed-up. Interleaving single runs exposes every model to
    the same conditions, so the ratio between them stays meaningful even when absolute numbers are not.

    Args:
        models: name → causal LM (each already on its device).
        repeats: rounds; every model runs once per round after one warm-up run each.
        progress: show a progress bar over the rounds.
        **workload: ``batch_size``, ``prompt_len``, ``gen_len``, ``device``, ``seed`` of :func:`throughput`.

    Returns:
        name → :class:`ThroughputResult` with the median prefill and decode speeds over the rounds and the
        largest peak memory seen.
    """
    if repeats < 1 or not models:
        raise ValueError(f"need at least one model and repeats >= 1; got {len(models)} model(s), {repeats}")
    defaults = inspect.signature(throughput).parameters
    shape = {k: workload.get(k, defaults[k].default) for k in ("batch_size", "prompt_len", "gen_len")}
    for model in models.values():  # every model's workload is valid before any of them runs
        check_workload(model, **shape, repeats=repeats, warmup=0)
    for model in models.values():
        throughput(model, warmup=0, repeats=1, progress=False, **workload)
    runs: dict[str, list[ThroughputResult]] = {name: [] for name in models}
    for _ in tqdm(range(repeats), desc="throughput (interleaved)", unit="round", disable=not progress):
        for name, model in models.items():
            runs[name].append(throughput(model, warmup=0, repeats=1, progress=False, **workload))
    out = {}
    for name, results in runs.items():
        prefill = statistics.median(r.prefill_seconds for r in results)
        decode = statistics.median(r.decode_seconds for r in results)
        first = results[0]
        peaks = [r.peak_memory_bytes for r in results if r.peak_memory_bytes is not None]
        out[name] = ThroughputResult(
            prefill_tokens_per_s=first.batch_size * first.prompt_len / prefill,
            decode_tokens_per_s=first.batch_size * first.gen_len / decode,
            cache_class=first.cache_class,
            prefill_seconds=prefill,
            decode_seconds=decode,
            batch_size=first.batch_size,
            prompt_len=first.prompt_len,
            gen_len=first.gen_len,
            repeats=repeats,
            device=first.device,
            peak_memory_bytes=max(peaks) if peaks else None,
            peak_memory_kind=first.peak_memory_kind if peaks else None,
        )
    return out
