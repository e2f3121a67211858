"""One evaluation report (quality, speed, memory) as a flat dict, shared by commands and benchmarks."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from lowrank.evaluation.memory import memory_report
from lowrank.evaluation.perplexity import perplexity
from lowrank.evaluation.throughput import throughput

__all__ = ["evaluate_model", "report_rows"]

logger = logging.getLogger(__name__)

#: (key, label) pairs shown by :func:`report_rows`, in order.
_ROWS = (
    ("perplexity", "perplexity"),
    ("nll", "mean NLL (nats/token)"),
    ("tokens_evaluated", "tokens evaluated"),
    ("windows", "windows x seq_len"),
    ("bos", "BOS at window start"),
    ("parameters", "parameters"),
    ("decoder_linear_parameters", "decoder linear parameters"),
    ("weight_bytes", "weight bytes"),
    ("kv_cache_bytes_per_token", "KV-cache bytes / token (measured)"),
    ("kv_cache_class", "KV-cache class"),
    ("prefill_tokens_per_s", "prefill tokens/s"),
    ("decode_tokens_per_s", "decode tokens/s"),
    ("peak_memory_bytes", "peak memory bytes"),
)


def evaluate_model(
    model: torch.nn.Module,
    tokenizer,
    text: str | torch.Tensor,
    *,
    seq_len: int = 512,
    max_windows: int | None = None,
    batch_size: int = 1,
    add_bos: bool | None = None,
    run_throughput: bool = True,
    prompt_len: int = 128,
    gen_len: int = 64,
    repeats: int = 3,
    kv_tokens: int = 64,
    progress: bool = True,
) -> dict[str, Any]:
    """Perplexity, memory and (optionally) throughput of ``model`` in one flat, JSON-ready dict.

    Args:
        model: causal LM, already on its device and in eval mode.
        tokenizer: its tokenizer (unused when ``text`` is token ids).
        text: evaluation text or token ids ``(N,)``.
        seq_len, max_windows, batch_size, add_bos: passed to :func:`lowrank.evaluation.perplexity`.
        run_throughput: measure prefill/decode speed (keys are ``None`` otherwise).
        prompt_len, gen_len, repeats: passed to :func:`lowrank.evaluation.throughput` (batch size 1).
        kv_tokens: prompt length of the forward pass whose cache :func:`memory_report` measures.
        progress: show progress bars.

    Returns:
        Keys ``perplexity, nll, tokens_evaluated, windows, seq_len, bos, parameters,
        decoder_linear_parameters, weight_bytes, buffer_bytes, kv_cache_bytes_per_token, kv_cache_class,
        prefill_tokens_per_s, decode_tokens_per_s, peak_memory_bytes, peak_memory_kind, device, dtype,
        eval_seconds`` and the throughput workload.
    """
    start = time.perf_counter()
    param = next(model.parameters())
    ppl = perplexity(
        model,
        tokenizer,
        text,
        seq_len=seq_len,
        max_windows=max_windows,
        batch_size=batch_size,
        add_bos=add_bos,
        progress=progress,
    )
    report: dict[str, Any] = {**ppl.to_dict(), **memory_report(model, tokens=kv_tokens).to_dict()}
    report.update(
        prefill_tokens_per_s=None,
        decode_tokens_per_s=None,
        peak_memory_bytes=None,
        peak_memory_kind=None,
    )
    if run_throughput:
        tp = throughput(model, prompt_len=prompt_len, gen_len=gen_len, repeats=repeats, progress=progress)
        report.update(
            prefill_tokens_per_s=tp.prefill_tokens_per_s,
            decode_tokens_per_s=tp.decode_tokens_per_s,
            peak_memory_bytes=tp.peak_memory_bytes,
            peak_memory_kind=tp.peak_memory_kind,
            throughput_workload={
                "batch_size": tp.batch_size,
                "prompt_len": prompt_len,
                "gen_len": gen_len,
                "repeats": repeats,
            },
        )
    report.update(
        device=str(param.device),
        dtype=str(param.dtype).removeprefix("torch."),
        eval_seconds=round(time.perf_counter() - start, 2),
    )
    return report


def report_rows(report: dict[str, Any]) -> list[tuple[str, Any]]:
    """(label, value) rows of a report for a two-column table; absent or ``None`` values show as '-'."""
    rows = []
    for key, label in _ROWS:
        value = report.get(key)
        if key == "windows" and value is not None:
            value = f"{value} x {report.get('seq_len')}"
        if isinstance(value, bool):
            value = "yes" if value else "no"
        if key == "peak_memory_bytes" and value is not None:
            label = f"{label} ({report.get('peak_memory_kind')})"
        rows.append((label, "-" if value is None else value))
    return rows
