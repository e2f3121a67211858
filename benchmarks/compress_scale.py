"""Scale: SVD-LLM on a Llama-2-7B-shaped random model, exact SVD vs randomized SVD in one run.

    python -m benchmarks.compress_scale --device cuda          # 32 layers, 256 × 2048 tokens, one GPU
    python -m benchmarks.compress_scale --device cpu --layers 1 --calib-samples 24 --calib-seq-len 512
    python -m benchmarks.compress_scale --device cpu --shape smoke --layers 2 --calib-samples 4 \
        --calib-seq-len 128 --results-dir /tmp/scale_smoke          # checks the script in seconds

The model has Llama-2-7B's shapes (hidden 4096, MLP 11008, 32 heads, 32 KV heads, vocab 32000; ``--shape
smoke``: a tiny one of the same structure) and Gaussian weights (std ``--init-std``, norms at 1): flat
Marchenko–Pastur spectra, the hard case for a randomized SVD's accuracy (its run time does not depend on
the spectrum). It is built on the meta device and initialised tensor by tensor in ``--dtype`` on the host
(``_random_llama.build_model``), so the full fp32 model is never materialised; the library moves one
decoder layer at a time to ``--device``. Each decomposer compresses a fresh copy of the same weights
(same seed) with the same calibration tokens. Ratios: ``ratio`` is the fraction of targeted linear-layer
parameters REMOVED (SVD-LLM convention).

Writes ``<results-dir>/compress_scale_<device>.json`` and ``.md`` (``benchmarks/results/`` by default;
after every run, so a run cut short keeps what finished); the last line printed is one JSON line with the
device, torch version and git SHA.
"""

from __future__ import annotations

import argparse
import gc
import logging
import resource
import sys
import time
from typing import Any

from benchmarks._random_llama import FULL_LAYERS, FULL_SHAPE, SHAPES, add_arguments, build_model, device_tag
from benchmarks._scale_report import markdown, per_layer, projection
from benchmarks._sweep import Sweep, calibration_config, parser, settings

FULL_SAMPLES, FULL_SEQ = 256, 2048


def _parser() -> argparse.ArgumentParser:
    calibration = {"samples": FULL_SAMPLES, "seq_len": FULL_SEQ, "batch_size": 8, "stat_dtype": "float32"}
    p = parser(__doc__, None, device="cuda", model=None, calibration={**calibration, "offload_device": "cpu"})
    add_arguments(p, "calibration tokens")
    p.add_argument("--method", default="svd-llm", choices=("svd-llm", "svd-llm-v2"))
    p.add_argument("--ratio", type=float, default=0.2, help="fraction of linear parameters REMOVED")
    p.add_argument("--decomposers", default="svd,rsvd", help="comma-separated, run in this order")
    p.add_argument("--oversample", type=int, default=10, help="rsvd oversampling p")
    p.add_argument("--power-iters", type=int, default=2, help="rsvd power iterations q")
    p.add_argument("--compute-dtype", default="float32", choices=("float32", "float64"))
    p.add_argument(
        "--tf32",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="allow TF32 in float32 matrix products on CUDA (Gram accumulation, rSVD sketches; default on)",
    )
    p.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=True, help="time kernels")
    return p


def calibration_tokens(samples: int, seq_len: int, vocab: int, seed: int):
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, vocab, (samples, seq_len), generator=gen)


def method_config(args: argparse.Namespace, decomposer: str):
    from lowrank.methods import config_from_dict

    return config_from_dict(
        {
            "method": args.method,
            "ratio": args.ratio,
            "decomposer": {
                "name": decomposer,
                "oversample": args.oversample,
                "power_iters": args.power_iters,
                "seed": args.seed,
            },
            "calibration": calibration_config(args),
            "compute_dtype": args.compute_dtype,
            # uniform ranks: the run times the SVD stages, not the end-loss allocation on random weights
            **({"allocation": "uniform"} if args.method == "svd-llm-v2" else {}),
        }
    )


def compress_once(args: argparse.Namespace, decomposer: str, tokens, dtype) -> dict[str, Any]:
    """Build fresh weights, compress them with ``decomposer``, and return the run's record."""
    import torch

    from lowrank import compress

    cuda = args.device == "cuda"
    start = time.perf_counter()
    model = build_model(args.shape, args.layers, dtype, args.init_std, args.seed, args.device)
    build_s = time.perf_counter() - start
    config = method_config(args, decomposer)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    result = compress(model, config, calibration=tokens, device=args.device)
    peak = torch.cuda.max_memory_allocated() if cuda else None
    on_host = all(p.device.type == "cpu" for p in model.parameters())
    model.to(args.device)  # the probe runs on the compute device: a bf16 7B forward on a host CPU is slow
    with torch.no_grad():
        logits = model(input_ids=tokens[:1, :64].to(args.device), use_cache=False).logits
    losses = {name: m.loss for name, m in result.modules.items()}
    record = {
        "decomposer": result.details["decomposer"],
        "build_seconds": round(build_s, 2),
        "timings": result.timings,
        "per_layer": per_layer(result.timings, args.layers),
        "peak_accelerator_bytes": peak,
        "peak_host_rss_bytes_so_far": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "ratio_params_removed": result.details["ratio_params_removed"],
        "keep_singular_fraction": result.details["keep_singular_fraction"],
        "ranks": {m.role: m.rank for m in result.modules.values()},
        "fallbacks": result.fallbacks,
        "decomposer_fallbacks": result.details.get("decomposer_fallbacks", {}),
        "truncation_loss_sum": sum(v for v in losses.values() if v is not None),
        "truncation_loss_layer0": sum(v for k, v in losses.items() if v is not None and ".layers.0." in k),
        "weights_on_host_after": on_host,
        "finite_logits_after": bool(torch.isfinite(logits.float()).all()),
    }
    del model, result, logits
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return record


def time_kernels(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Seconds of one truncated decomposition per shape of a layer (Gaussian input, ``compute_dtype``)."""
    import torch

    from benchmarks._timing import sync
    from lowrank.linalg import get_decomposer
    from lowrank.linalg.allocation import rank_for_ratio

    h, f = SHAPES[args.shape]["hidden_size"], SHAPES[args.shape]["intermediate_size"]
    shapes = {
        f"q/k/v/o ({h}×{h})": (h, h, 4),
        f"gate/up ({f}×{h})": (f, h, 2),
        f"down ({h}×{f})": (h, f, 1),
    }
    dtype = getattr(torch, args.compute_dtype)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    rows = []
    for label, (m, n, per_layer_count) in shapes.items():
        A = torch.randn(m, n, device=args.device, dtype=dtype, generator=gen)
        rank = rank_for_ratio(m, n, args.ratio)
        row = {"shape": label, "m": m, "n": n, "rank": rank, "per_layer": per_layer_count}
        for name in args.decomposers.split(","):
            dec = get_decomposer(
                name, oversample=args.oversample, power_iters=args.power_iters, seed=args.seed
            )
            if args.device == "cuda":  # one untimed call: library loading and workspace allocation
                dec(A, rank)
            sync(args.device)
            t0 = time.perf_counter()
            dec(A, rank)
            sync(args.device)
            row[f"{name}_s"] = round(time.perf_counter() - t0, 3)
        rows.append(row)
        del A
    return rows


def warm_up(device: str) -> None:
    """Load the BLAS/LAPACK (cuBLAS/cuSOLVER) kernels once so that the first timed run pays no set-up."""
    import torch

    A = torch.randn(256, 256, device=device, dtype=torch.float64)
    G = A @ A.T + 256 * torch.eye(256, device=device, dtype=torch.float64)
    L = torch.linalg.cholesky(G)
    torch.linalg.solve_triangular(L, A, upper=False)
    torch.linalg.eigh(G)
    torch.linalg.svd(A.float())
    torch.linalg.qr(A)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.out_name = args.out_name or f"compress_scale_{device_tag(args.device)}"
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was requested but torch.cuda.is_available() is False")
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    tf32 = args.device == "cuda" and args.tf32
    kept = {
        "batch_size": "calib_batch_size",
        "gram_dtype": "calib_stat_dtype",
        "offload_device": "calib_offload_device",
    }
    named = {k: getattr(args, v) for k, v in kept.items()}  # the report's names
    sweep = Sweep(args, "compress_scale", {**settings(args), **named, "tf32_used": tf32}, device=args.device)
    dtype = getattr(torch, args.dtype)
    shape = SHAPES[args.shape]
    tokens = calibration_tokens(args.calib_samples, args.calib_seq_len, shape["vocab_size"], args.seed)
    size = (args.shape, args.layers, args.calib_samples, args.calib_seq_len)
    warm_up(args.device)

    def compress(spec: dict[str, Any]) -> dict[str, Any]:
        print(f"[{spec['key']}] compressing {args.layers} layer(s) with {tokens.numel()} calibration tokens")
        return compress_once(args, spec["key"], tokens, dtype)

    sweep.run([{"key": d} for d in args.decomposers.split(",")], compress, lambda r: str(r["timings"]))
    if args.kernels:
        sweep.once("kernels", lambda: time_kernels(args))
    runs = sweep.rows
    payload: dict[str, Any] = {
        "reduced": size != (FULL_SHAPE, FULL_LAYERS, FULL_SAMPLES, FULL_SEQ),
        "model": {"shape": args.shape, **shape, "num_hidden_layers": args.layers, "dtype": args.dtype},
        "init": f"Gaussian N(0, {args.init_std}²) for every weight matrix and embedding, RMSNorm weights 1",
        "calibration": {
            "samples": args.calib_samples,
            "seq_len": args.calib_seq_len,
            "tokens": tokens.numel(),
        },
        "ratio_convention": "ratio = fraction of targeted linear-layer parameters removed (SVD-LLM)",
        "runs": runs,
        **({"kernels": sweep.state["kernels"]} if "kernels" in sweep.state else {}),
    }
    if "svd" in runs and "rsvd" in runs:
        svd, rsvd = runs["svd"]["timings"], runs["rsvd"]["timings"]
        payload["speedup_exact_over_rsvd"] = {
            "total": round(svd["total"] / rsvd["total"], 3),
            "decomposition": round(svd["decomposition"] / max(rsvd["decomposition"], 1e-9), 3),
        }
    payload["projection"] = projection(payload, FULL_LAYERS, FULL_SAMPLES * FULL_SEQ)
    fields = {f"total_s_{k}": r["timings"]["total"] for k, r in runs.items()}
    speedup = payload.get("speedup_exact_over_rsvd", {}).get("total")
    final = {"layers": args.layers, "tokens": tokens.numel(), **fields, "speedup": speedup}
    return sweep.finish(payload, markdown, final=lambda p: final)


if __name__ == "__main__":
    sys.exit(main())
