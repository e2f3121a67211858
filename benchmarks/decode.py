"""Decode speed of compressed KV caches on the built-in model: tokens/s against context and batch, each
method interleaved with the original in the same run.

    python -m benchmarks.decode                                   # the full sweep (resumes with --resume)
    python -m benchmarks.decode --dtypes float32 --contexts 512 --batches 1 2 --steps 2 --repeats 1 \\
        --calib-samples 2 --calib-seq-len 128 --windows 1 --windows-shakespeare 1 --prefill-len 256 \\
        --results-dir /tmp/decode_smoke                           # a smoke test

Methods: the original (transformers' ``DynamicCache``, ``sdpa``); ``mla`` in DeepSeek-V3 layout at the seed's
budget (120 of 384 cached numbers: rotary key 32 + latent 88) and at 50 % (32 + 160), each with its
default ``auto`` path (absorbed attention at decode) and, for the seed budget, forced to the ``expanded``
path to show what absorption buys; ``kv-projection`` (kq keys, wo-aware values) post- and pre-RoPE at
R/d 0.5. Every conversion starts from one calibration pass on wiki calibration text; quality is real:
wiki-test and shakespeare perplexity from real prefills of 512 tokens, in float32.

Timing: decode cost does not depend on what the cache holds, so the cache is **not filled by a real
batch × context prefill** (on this CPU that would take many minutes per model): ``--seed-len`` tokens per
sequence are prefilled for real into a fresh cache of the model's own class and repeated along the sequence
to the context through ``cache.update`` (same cache class, shapes and dtypes as a real prefill). Then
``--steps`` greedy steps are timed; the models take turns round by round, the first round is a warm-up and
the median of ``--repeats`` rounds is reported. Prefill tokens/s: one real forward of ``--prefill-len``
wiki-test tokens at batch 1 into a fresh cache. Peak RSS: the process's resident high-water mark during
one fill + decode (reset before through ``/proc/self/clear_refs``) above the RSS before it.

Conventions: ``decode_ratio`` = decode tokens/s over the original's in the same cell (same dtype, batch,
context, run); ``kv_fraction`` = cached numbers KEPT per token and layer; KV bytes are measured on the
filled cache object (every tensor it holds, over batch × context). Writes ``results/decode_cpu.{json,md}``
and ``decode_cpu.png``; the last line printed is one JSON line.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._common import compressed_copy, kv_statistics, load_for_evaluation, perplexities
from benchmarks._sweep import Sweep, calibration_config, parser, settings
from benchmarks.kv_decode import cache_bytes, decode_seconds, filled_cache

METHODS = {
    "original": None,
    "mla 120": {"method": "mla", "rope_dim": 32, "kv_lora_rank": 88},
    "mla 120 expanded": {"same_as": "mla 120", "decode_path": "expanded"},
    "mla 192": {"method": "mla", "rope_dim": 32, "kv_lora_rank": 160},
    "kv-projection post 0.5": {"method": "kv-projection", "rope": "post", "rank_fraction": 0.5},
    "kv-projection pre 0.5": {"method": "kv-projection", "rope": "pre", "rank_fraction": 0.5},
}
"""Method label → its config fields (``same_as``: the model of another label, timed on another path)."""


def _parser():
    p = parser(
        __doc__, "decode_cpu", figures=True, calibration={"samples": 16, "seq_len": 512}, windows=(4, 2)
    )
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=("float32", "bfloat16"))
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192], help="cached tokens per sequence")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16], help="sequences decoded together")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seed-len", type=int, default=128, help="tokens really prefilled; divides each context")
    p.add_argument("--steps", type=int, default=8, help="timed decode steps (8)")
    p.add_argument("--repeats", type=int, default=2, help="timed rounds after the warm-up round (2)")
    p.add_argument("--prefill-len", type=int, default=2048, help="tokens of the timed real prefill (2048)")
    p.add_argument(
        "--memory-limit-gb", type=float, default=16.0, help="skip cells whose caches would pass this (16)"
    )
    return p


def _config(fields: dict[str, Any], args):
    from lowrank.methods.kv_projection import KVProjectionConfig
    from lowrank.methods.mla import MLAConfig

    fields = dict(fields)
    cls = {"mla": MLAConfig, "kv-projection": KVProjectionConfig}[fields.pop("method")]
    return cls(**fields, calibration=calibration_config(args, sequential=False))


def rss_bytes(field: str = "VmRSS") -> int:
    """The process's resident set size (``VmRSS``) or its high-water mark (``VmHWM``), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} is not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset the resident high-water mark (Linux); False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class Models:
    """The original and its converted copies (one calibration pass), with their real-prefill quality."""

    def __init__(self, args, sweep: Sweep) -> None:
        import torch

        from lowrank.io.data import calibration_batches, load_text
        from lowrank.nn.attention_layout import attention_implementation

        self.args = args
        self.original, self.tokenizer, self.eval_ids = load_for_evaluation(args)
        sweep.once("attn_implementation", lambda: attention_implementation(self.original.config))
        labels = [m for m in args.methods if m != "original"]
        needed = {METHODS[m].get("same_as", m) for m in labels}
        calib = calibration_batches(
            self.tokenizer,
            load_text("wiki", "calibration"),
            args.calib_samples,
            args.calib_seq_len,
            seed=0,
        )
        stats, seconds = kv_statistics(self.original, calib)
        sweep.state["calibration_seconds"] = seconds
        self.models: dict[str, Any] = {"original": self.original}
        conversions = {}
        for label in [m for m in METHODS if m in needed]:
            model, result = compressed_copy(self.original, _config(METHODS[label], args), stats)
            self.models[label] = model
            conversions[label] = {
                "config": result.config,
                "kv_bytes_per_token": result.kv_bytes_per_token_after,
                "conversion_seconds": round(result.time_total_s, 2),
                "fallbacks": result.fallbacks,
            }
            print(f"{label}: converted in {result.time_total_s:.1f} s", flush=True)
        del stats
        sweep.once("conversions", lambda: conversions)
        sweep.once("quality", lambda: self._quality())
        self.dtype = torch.float32

    def _quality(self) -> dict[str, Any]:
        from lowrank.methods import count_parameters

        out = {}
        for label, model in self.models.items():
            out[label] = {
                "perplexity": perplexities(model, self.eval_ids),
                "parameters": count_parameters(model),
            }
            print(f"{label}: {out[label]}", flush=True)
        return out

    def model(self, label: str):
        """The model of ``label`` on its decode path."""
        from lowrank.attention.deepseek_mla import set_decode_path

        spec = METHODS[label] or {}
        model = self.models[spec.get("same_as", label)]
        if "mla" in label:
            set_decode_path(model, spec.get("decode_path", "auto"))
        return model

    def to(self, dtype: str) -> None:
        """Cast every model to ``dtype`` (float32 first, then bfloat16: the cast is one-way)."""
        import torch

        target = getattr(torch, dtype)
        if target != self.dtype:
            for model in self.models.values():
                model.to(target)
            self.dtype = target


def _cell_fits(models: Models, args, batch: int, context: int) -> bool:
    from lowrank.attention.cache import kv_bytes_per_token

    need = kv_bytes_per_token(models.original) * batch * context * (1 + 1 / len(models.models))
    return need <= args.memory_limit_gb * 1e9


def measure_cell(models: Models, args, dtype: str, batch: int, context: int) -> dict[str, Any]:
    """Decode rows of every method at one (dtype, batch, context), interleaved with the original."""
    labels = args.methods
    times: dict[str, list[float]] = {label: [] for label in labels}
    rows: dict[str, dict[str, Any]] = {}
    tokens = batch * context
    for round_index in range(1 + args.repeats):
        for label in labels:
            model = models.model(label)
            gc.collect()
            before = rss_bytes()
            peak_ok = reset_peak_rss()
            cache = filled_cache(model, batch, context, args.seed_len, args.seed)
            filled = cache_bytes(cache)
            seconds = decode_seconds(model, cache, args.steps, args.seed + 1, "cpu")
            if round_index:
                times[label].append(seconds)
            rows[label] = {
                "method": label,
                "dtype": dtype,
                "batch": batch,
                "context": context,
                "cache_class": type(cache).__name__,
                "kv_bytes_per_token": filled / tokens,
                "cache_bytes": filled,
                "peak_rss_above_start_bytes": (rss_bytes("VmHWM") - before) if peak_ok else None,
            }
            del cache
    base = statistics.median(times["original"])
    for label, row in rows.items():
        seconds = statistics.median(times[label])
        row.update(
            decode_seconds=seconds,
            decode_seconds_all=times[label],
            decode_tokens_per_s=batch * args.steps / seconds,
            decode_ratio=base / seconds,
        )
    return {"rows": rows}


def measure_prefill(models: Models, args, dtype: str) -> dict[str, Any]:
    """Tokens/s of one real prefill of ``--prefill-len`` wiki-test tokens at batch 1, interleaved."""
    import torch

    from lowrank.attention.cache import cache_argument, make_cache

    ids = models.eval_ids["wiki"][0][: args.prefill_len].unsqueeze(0)
    times: dict[str, list[float]] = {label: [] for label in args.methods}
    for round_index in range(1 + args.repeats):
        for label in args.methods:
            model = models.model(label)
            cache = make_cache(model)
            with torch.inference_mode():
                start = time.perf_counter()
                model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_argument(model): cache})
                seconds = time.perf_counter() - start
            if round_index:
                times[label].append(seconds)
    base = statistics.median(times["original"])
    return {
        label: {
            "method": label,
            "dtype": dtype,
            "prefill_tokens": ids.shape[1],
            "prefill_tokens_per_s": ids.shape[1] / statistics.median(t),
            "prefill_ratio": base / statistics.median(t),
        }
        for label, t in times.items()
    }


def plan(args) -> list[dict[str, Any]]:
    cells = []
    for dtype in args.dtypes:  # float32 first: models are cast one way
        cells.append({"key": f"{dtype}/prefill", "dtype": dtype, "kind": "prefill"})
        for context in sorted(args.contexts):
            for batch in sorted(args.batches):
                key = f"{dtype}/context={context}/batch={batch}"
                cells.append(
                    {"key": key, "dtype": dtype, "kind": "decode", "context": context, "batch": batch}
                )
    return cells


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if "original" not in args.methods:
        args.methods = ["original", *args.methods]
    if args.dtypes != sorted(args.dtypes, key=["float32", "bfloat16"].index):
        raise SystemExit(f"--dtypes must list float32 before bfloat16; got {args.dtypes}")
    bad = [c for c in args.contexts if c % args.seed_len]
    if bad:
        raise SystemExit(f"--seed-len {args.seed_len} must divide every context; got contexts {bad}")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    args.seed = 0
    sweep = Sweep(args, "decode", settings(args))
    models = None if args.report_only else Models(args, sweep)

    def measure(spec: dict[str, Any]) -> dict[str, Any]:
        models.to(spec["dtype"])
        if spec["kind"] == "prefill":
            return {"rows": measure_prefill(models, args, spec["dtype"])}
        if not _cell_fits(models, args, spec["batch"], spec["context"]):
            return {"skipped": f"caches over --memory-limit-gb {args.memory_limit_gb}"}
        return measure_cell(models, args, spec["dtype"], spec["batch"], spec["context"])

    def describe(row: dict[str, Any]) -> str:
        if "skipped" in row:
            return row["skipped"]
        key = "decode_ratio" if "decode_ratio" in next(iter(row["rows"].values())) else "prefill_ratio"
        return ", ".join(f"{k} {r[key]:.2f}×" for k, r in row["rows"].items() if k != "original")

    cells = plan(args)
    sweep.run(cells, measure, describe)
    from benchmarks._decode_report import figures, markdown, targets

    decode = [
        r
        for c in cells
        if c["kind"] == "decode"
        for r in sweep.rows.get(c["key"], {}).get("rows", {}).values()
    ]
    prefill = [
        r
        for c in cells
        if c["kind"] == "prefill"
        for r in sweep.rows.get(c["key"], {}).get("rows", {}).values()
    ]
    payload = {
        "conventions": {
            "decode_ratio": "decode tokens/s over the original's in the same cell and run",
            "kv_fraction": "cached numbers KEPT per token and layer",
            "kv_bytes_per_token": "bytes of every tensor in the filled cache / (batch × context)",
            "cache_fill": f"{args.seed_len} tokens per sequence prefilled for real, repeated to the context "
            "through cache.update (decode cost does not depend on the content); quality from real prefills",
            "peak_rss_above_start_bytes": "resident high-water mark during one fill + decode above the RSS "
            "before it (every model's weights resident throughout)",
        },
        "attn_implementation": sweep.state.get("attn_implementation"),
        "calibration_seconds": sweep.state.get("calibration_seconds"),
        "conversions": sweep.state.get("conversions"),
        "quality": sweep.state.get("quality"),
        "rows": decode,
        "prefill": prefill,
        "skipped": [c["key"] for c in cells if "skipped" in sweep.rows.get(c["key"], {})],
        "missing": sweep.missing(cells),
    }
    payload["targets"] = targets(payload)
    return sweep.finish(payload, markdown, figures, final=lambda p: {"targets": p["targets"]})


if __name__ == "__main__":
    sys.exit(main())
