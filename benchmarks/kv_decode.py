"""Long-context decode with compressed KV caches: a Llama-2-7B-shaped random model converted by ``mla``
(31 % of the cache kept) and by ``kv-projection`` (post-RoPE, R/d 0.5), decode tokens/s at batch 16 with
8k cached tokens, interleaved with the original.

    python -m benchmarks.kv_decode --device cuda               # bf16, 32 layers, batch 16 × 8,192 tokens
    python -m benchmarks.kv_decode --device cpu --shape smoke --layers 2 --batch-size 2 --context 256 \\
        --seed-len 32 --steps 4 --repeats 1 --calib-samples 2 --calib-seq-len 128 \\
        --results-dir /tmp/kv_decode_smoke                     # a smoke test

Conversion: the statistics both methods ask for are collected once on the unchanged model from
``--calib-samples`` × ``--calib-seq-len`` random token ids (``_common.kv_statistics``: the weights are
random too, the point is time, not quality) and each method converts a copy (``_common.compressed_copy``,
the methods' defaults otherwise: ``mla`` keeps 8 rotary features chosen by 2-norm and one whitened joint
latent; ``kv-projection`` uses ``kq`` keys and ``wo-aware`` values). ``mla`` factors with rSVD (10, 2) by
default (``--mla-decomposer``): the decomposer changes the latent's values, not the modules or the cache,
and the exact one spends device time on 1,024 float64 SVDs that the decode speed does not depend on.

Cache fill: decode cost does not depend on what the cache holds, so instead of a real prefill of
batch × context tokens each model prefills ``--seed-len`` random tokens per sequence into a fresh cache of
its own class (:func:`lowrank.attention.cache.make_cache`), and every layer's cached tensors are repeated
along the
sequence up to ``--context`` through the Cache API (``cache.update``): the cache class, shapes and dtypes a
real prefill leaves, at a fraction of the device time. Then ``--steps`` greedy decode steps are timed
(device synchronised); the models take turns round by round, the first round is a warm-up, and the median
of ``--repeats`` rounds is reported.

Conventions: ``kv fraction`` = cached K/V numbers KEPT per token and layer (``mla``: (rope_dim + kv_rank)
/ (2 · head_dim); ``kv-projection``: R/d); KV bytes per token are measured on the filled cache (every
tensor it holds, over batch × context) and compared with :func:`lowrank.attention.cache.kv_bytes_per_token`;
``× original`` = decode tokens/s over the original's in the same run. Writes
``<results-dir>/kv_decode_<device>.json`` and ``.md``; the last line printed is one JSON line with the
device, torch version and git SHA.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from typing import Any

from benchmarks._common import compressed_copy, kv_statistics
from benchmarks._random_llama import (
    SHAPES,
    add_arguments,
    build_model,
    describe,
    device_tag,
)
from benchmarks._sweep import Sweep, parser, settings


def _parser() -> argparse.ArgumentParser:
    p = parser(__doc__, None, device="cuda", model=None, calibration={"samples": 16, "seq_len": 1024})
    add_arguments(p, "token ids")
    p.add_argument("--mla-fraction", type=float, default=0.3125, help="mla kv_fraction KEPT (0.3125)")
    p.add_argument("--mla-decomposer", default="rsvd", choices=("rsvd", "svd"), help="mla's SVD (rsvd)")
    p.add_argument("--rank-fraction", type=float, default=0.5, help="kv-projection R/d KEPT (0.5)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences decoded together (16)")
    p.add_argument("--context", type=int, default=8192, help="cached tokens per sequence (8192)")
    p.add_argument("--seed-len", type=int, default=128, help="tokens really prefilled; divides --context")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps (32)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up round (3)")
    return p


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def filled_cache(model, batch: int, context: int, seed_len: int, seed: int):
    """A fresh cache of ``model``'s class holding ``context`` tokens per sequence: ``seed_len`` prefilled
    for real, the rest copies of them appended through ``cache.update`` (and, for pre-RoPE projected
    layers, the positions 0 … context − 1 they are rebuilt at)."""
    import torch

    from lowrank.attention.cache import cache_argument, make_cache

    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (batch, seed_len), generator=gen).to(device)
    cache = make_cache(model)
    with torch.inference_mode():
        model(input_ids=prompt, use_cache=True, logits_to_keep=1, **{cache_argument(model): cache})
        copies = context // seed_len - 1
        for index, layer in enumerate(cache.layers):
            keys, values = layer.keys, layer.values
            cache.update(keys.repeat(1, 1, copies, 1), values.repeat(1, 1, copies, 1), index)
        positions = getattr(cache, "positions", {})  # ProjectedKVCache: pre-RoPE layers keep positions
        for index in positions:
            positions[index] = torch.arange(context, dtype=torch.int32, device=device).expand(
                positions[index].shape[0], -1
            )
    return cache


def cache_bytes(cache) -> int:
    """Bytes of every key/value tensor the cache's layers hold."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def decode_seconds(model, cache, steps: int, seed: int, device: str) -> float:
    """Wall time of ``steps`` greedy decode steps through ``cache`` (device synchronised)."""
    import torch

    from lowrank.attention.cache import cache_argument

    batch = cache.layers[0].keys.shape[0]
    vocab = model.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, 1), generator=gen).to(device)
    name = cache_argument(model)
    with torch.inference_mode():
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            logits = model(input_ids=ids, use_cache=True, **{name: cache}).logits
            ids = logits[:, -1].argmax(dim=-1, keepdim=True)
        _sync(device)
    return time.perf_counter() - start


def convert(model, stats, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """The converted copies by label, and what each conversion reported."""
    from lowrank.methods.kv_projection import KVProjectionConfig
    from lowrank.methods.mla import MLAConfig

    configs = {
        f"mla {args.mla_fraction:g}": MLAConfig(
            partial_rope="mha2mla",
            kv_fraction=args.mla_fraction,
            decomposer=args.mla_decomposer,
            calibration={"sequential": False},
        ),
        f"kv-projection post R/d {args.rank_fraction:g}": KVProjectionConfig(
            rank_fraction=args.rank_fraction, rope="post", calibration={"sequential": False}
        ),
    }
    models, records = {}, {}
    for label, config in configs.items():
        models[label], result = compressed_copy(model, config, stats)
        fraction = next(v for k, v in result.details.items() if k.startswith("kv_fraction"))
        records[label] = {
            "method": result.method,
            "config": result.config,
            "kv_fraction": fraction,
            "conversion_seconds": round(result.time_total_s, 2),
            "fallbacks": result.fallbacks,
        }
        print(f"{label}: kv fraction {fraction}, converted in {result.time_total_s:.1f} s", flush=True)
    return models, records


def measure(models: dict[str, Any], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Decode time of every model, interleaved round by round; the first round is a warm-up."""
    import torch

    from lowrank.attention.cache import kv_bytes_per_token

    cuda = args.device == "cuda"
    tokens = args.batch_size * args.context
    times: dict[str, list[float]] = {name: [] for name in models}
    out: dict[str, dict[str, Any]] = {}
    for round_index in range(1 + args.repeats):
        for name, model in models.items():
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            cache = filled_cache(model, args.batch_size, args.context, args.seed_len, args.seed)
            filled = cache_bytes(cache)
            seconds = decode_seconds(model, cache, args.steps, args.seed + 1, args.device)
            if round_index:
                times[name].append(seconds)
            out[name] = {
                "cache_class": type(cache).__name__,
                "cache_bytes_filled": filled,
                "kv_bytes_per_token_measured": filled / tokens,
                "kv_bytes_per_token_analytic": kv_bytes_per_token(model),
                "peak_device_bytes": torch.cuda.max_memory_allocated() if cuda else None,
            }
            del cache
            gc.collect()
        print(f"round {round_index}{' (warm-up)' if not round_index else ''} done", flush=True)
    base = statistics.median(times["original"])
    for name, record in out.items():
        seconds = statistics.median(times[name])
        record.update(
            decode_seconds=seconds,
            decode_seconds_all=times[name],
            ms_per_step=1000 * seconds / args.steps,
            decode_tokens_per_s=args.batch_size * args.steps / seconds,
            decode_vs_original=base / seconds,
        )
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.out_name = args.out_name or f"kv_decode_{device_tag(args.device)}"
    if args.context % args.seed_len:
        raise SystemExit(f"--seed-len {args.seed_len} must divide --context {args.context}")

    import torch

    from lowrank.nn.attention_layout import attention_implementation

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was requested but torch.cuda.is_available() is False")
    sweep = Sweep(args, "kv_decode", settings(args), device=args.device)
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    original = build_model(
        args.shape,
        args.layers,
        dtype,
        args.init_std,
        args.seed,
        args.device,
        device=args.device,
        max_positions=args.context + args.steps,
    )
    build_s = round(time.perf_counter() - t0, 1)
    gen = torch.Generator().manual_seed(args.seed + 2)
    shape = (args.calib_samples, args.calib_seq_len)
    ids = torch.randint(0, original.config.vocab_size, shape, generator=gen)
    stats, stats_s = kv_statistics(original, ids)
    print(f"model built in {build_s} s, calibration statistics in {stats_s} s", flush=True)
    converted, conversions = convert(original, stats, args)
    del stats
    models = {"original": original, **converted}
    sweep.run([{"key": "decode"}], lambda spec: measure(models, args))
    results = sweep.rows["decode"]
    payload = {
        "model": {
            "shape": args.shape,
            **SHAPES[args.shape],
            "max_position_embeddings": original.config.max_position_embeddings,
            "num_hidden_layers": args.layers,
            "dtype": args.dtype,
            "attn_implementation": attention_implementation(original.config),
        },
        "conventions": {
            "kv_fraction": "cached K/V numbers KEPT per token and layer (mla: (rope_dim + kv_rank) / "
            "(2 head_dim); kv-projection: R/d)",
            "kv_bytes_per_token_measured": "bytes of every tensor in the filled cache / (batch × context)",
            "decode_vs_original": "decode tokens/s over the original's, interleaved in the same run",
            "peak_device_bytes": "torch.cuda.max_memory_allocated during one fill + decode, with all "
            "models' weights resident",
            "cache_fill": f"{args.seed_len} tokens per sequence prefilled for real, repeated along the "
            f"sequence to {args.context} through cache.update (decode cost does not depend on the content)",
        },
        "workload": {
            "batch_size": args.batch_size,
            "context": args.context,
            "seed_len": args.seed_len,
            "steps": args.steps,
            "repeats": args.repeats,
        },
        "calibration": {"tokens": ids.numel(), "random_token_ids": True, "seconds": stats_s},
        "build_seconds": build_s,
        "conversions": conversions,
        "results": results,
    }
    return sweep.finish(
        payload,
        markdown,
        final=lambda p: {
            "decode_tokens_per_s": {n: round(r["decode_tokens_per_s"], 1) for n, r in results.items()},
            "decode_vs_original": {n: round(r["decode_vs_original"], 3) for n, r in results.items()},
        },
    )


def markdown(p: dict[str, Any]) -> str:
    from lowrank.cli._common import format_table

    env, m, w = p["env"], p["model"], p["workload"]
    rows = []
    for name, r in p["results"].items():
        c = p["conversions"].get(name, {"kv_fraction": 1.0, "conversion_seconds": None})
        rows.append(
            (
                name,
                r["cache_class"],
                c["kv_fraction"],
                round(r["kv_bytes_per_token_measured"]),
                round(r["kv_bytes_per_token_analytic"]),
                round(r["cache_bytes_filled"] / 1e9, 2),
                round(r["ms_per_step"], 2),
                round(r["decode_tokens_per_s"], 1),
                round(r["decode_vs_original"], 3),
                "–" if r["peak_device_bytes"] is None else round(r["peak_device_bytes"] / 1e9, 1),
                "–" if c["conversion_seconds"] is None else c["conversion_seconds"],
            )
        )
    headers = (
        "model",
        "cache class",
        "kv fraction",
        "KV B/token",
        "analytic",
        "cache GB",
        "ms/step",
        "decode tok/s",
        "× original",
        "peak GB",
        "convert s",
    )
    cal = p["calibration"]
    return (
        "\n\n".join(
            [
                f"# Long-context decode with compressed KV caches: {m['shape']}-shaped random model on "
                f"{env['device_name']}",
                f"{m['num_hidden_layers']} decoder layers of {describe(m)} in {m['dtype']} "
                f"(max_position_embeddings {m['max_position_embeddings']}), attention "
                f"`{m['attn_implementation']}`. torch {env['torch']}, transformers {env['transformers']}, "
                f"git {env['git_sha']}; script wall time {p['wall_seconds']:.0f} s.",
                f"Decode of {w['steps']} greedy steps at batch {w['batch_size']} with {w['context']:,} "
                f"cached tokens per sequence; median of {w['repeats']} rounds (models interleaved, after a "
                f"warm-up round). **The cache is not filled by a real {w['batch_size']} × "
                f"{w['context']:,} prefill**: {w['seed_len']} tokens per sequence are prefilled for real and "
                "repeated along the sequence through `cache.update` (same cache class, shapes and dtypes; "
                "decode cost does not depend on the content).",
                f"Conversions from {cal['tokens']:,} random calibration token ids ({cal['seconds']} s for "
                "the shared statistics; weights are random too: time, not quality). `kv fraction` = cached "
                "K/V numbers KEPT per token and layer (mla: (rope_dim + kv_rank) / (2 · head_dim); "
                "kv-projection: R/d). `KV B/token` = bytes of the filled cache / (batch × context); "
                "`analytic` = `lowrank.attention.cache.kv_bytes_per_token`. "
                "`× original` = decode tokens/s over "
                "the original's. `peak GB` = the device's peak during one fill + decode, every model's "
                "weights resident.",
                "## Measured",
                format_table(rows, headers),
                "Every cache here is a `DynamicCache` (the compressed ones store codes): each decode step "
                "appends by concatenation, so it reads and rewrites every layer's whole cache besides "
                "attending over it; decode time at long context follows the cache bytes.",
            ]
        )
        + "\n"
    )


if __name__ == "__main__":
    sys.exit(main())
