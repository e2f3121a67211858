"""Scale: SVD-LLM on a Llama-2-7B-shaped random model, exact SVD vs randomized SVD in one run.

    python -m benchmarks.compress_scale --device cuda          # 32 layers, 256 × 2048 tokens, one GPU
    python -m benchmarks.compress_scale --device cpu --layers 1 --calib-samples 24 --seq-len 512
    python -m benchmarks.compress_scale --device cpu --shape smoke --layers 2 --calib-samples 4 \
        --seq-len 128 --results-dir /tmp/scale_smoke          # checks the script in seconds

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
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._common import RESULTS_DIR, env_info, final_line, write_results
from benchmarks._random_llama import FULL_LAYERS, FULL_SHAPE, SHAPES, build_model, device_tag
from benchmarks._scale_report import markdown, per_layer, projection

FULL_SAMPLES, FULL_SEQ = 256, 2048


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cpu", "cuda"), help="compute device (default: cuda)")
    p.add_argument("--shape", default=FULL_SHAPE, choices=tuple(SHAPES), help="model shape (llama2-7b)")
    p.add_argument("--layers", type=int, default=FULL_LAYERS, help="decoder layers (default: 32)")
    p.add_argument("--calib-samples", type=int, default=FULL_SAMPLES, help="calibration sequences")
    p.add_argument("--seq-len", type=int, default=FULL_SEQ, help="tokens per calibration sequence")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward chunk")
    p.add_argument("--method", default="svd-llm", choices=("svd-llm", "svd-llm-v2"))
    p.add_argument("--ratio", type=float, default=0.2, help="fraction of linear parameters REMOVED")
    p.add_argument("--decomposers", default="svd,rsvd", help="comma-separated, run in this order")
    p.add_argument("--oversample", type=int, default=10, help="rsvd oversampling p")
    p.add_argument("--power-iters", type=int, default=2, help="rsvd power iterations q")
    p.add_argument("--gram-dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--compute-dtype", default="float32", choices=("float32", "float64"))
    p.add_argument(
        "--tf32",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="allow TF32 in float32 matrix products on CUDA (Gram accumulation, rSVD sketches; default on)",
    )
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--offload-device", default="cpu", help="where activations wait between layers")
    p.add_argument("--init-std", type=float, default=0.02, help="std of the Gaussian weights")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and calibration tokens")
    p.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=True, help="time kernels")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--name", default=None, help="results name (default: compress_scale_<device>)")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the results are written")
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
            "calibration": {
                "samples": args.calib_samples,
                "seq_len": args.seq_len,
                "batch_size": args.batch_size,
                "stat_dtype": args.gram_dtype,
                "offload_device": args.offload_device,
            },
            "compute_dtype": args.compute_dtype,
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
    losses = {name: m.get("loss") for name, m in result.modules.items()}
    record = {
        "decomposer": result.details["decomposer"],
        "build_seconds": round(build_s, 2),
        "timings": result.timings,
        "per_layer": per_layer(result.timings, args.layers),
        "peak_accelerator_bytes": peak,
        "peak_host_rss_bytes_so_far": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "ratio_params_removed": result.details["ratio_params_removed"],
        "keep_singular_fraction": result.details["keep_singular_fraction"],
        "ranks": {m["kind"]: m["rank"] for m in result.modules.values()},
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
    started = time.perf_counter()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was requested but torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    tf32 = args.device == "cuda" and args.tf32
    dtype = getattr(torch, args.dtype)
    shape = SHAPES[args.shape]
    tokens = calibration_tokens(args.calib_samples, args.seq_len, shape["vocab_size"], args.seed)
    name = args.name or f"compress_scale_{device_tag(args.device)}"
    env = env_info(args.device)
    size = (args.shape, args.layers, args.calib_samples, args.seq_len)
    reduced = size != (FULL_SHAPE, FULL_LAYERS, FULL_SAMPLES, FULL_SEQ)
    warm_up(args.device)
    payload: dict[str, Any] = {
        "benchmark": "compress_scale",
        "reduced": reduced,
        "model": {"shape": args.shape, **shape, "num_hidden_layers": args.layers, "dtype": args.dtype},
        "init": f"Gaussian N(0, {args.init_std}²) for every weight matrix and embedding, RMSNorm weights 1",
        "calibration": {"samples": args.calib_samples, "seq_len": args.seq_len, "tokens": tokens.numel()},
        "settings": {k: v for k, v in vars(args).items() if k not in ("name", "results_dir")}
        | {"tf32_used": tf32},
        "ratio_convention": "ratio = fraction of targeted linear-layer parameters removed (SVD-LLM)",
        "torch_threads": torch.get_num_threads(),
        "load_average_1min_start": round(os.getloadavg()[0], 2),
        "runs": {},
        "env": env,
    }
    for decomposer in args.decomposers.split(","):
        print(f"[{decomposer}] compressing {args.layers} layer(s) with {tokens.numel()} calibration tokens")
        payload["runs"][decomposer] = compress_once(args, decomposer, tokens, dtype)
        print(f"[{decomposer}] {payload['runs'][decomposer]['timings']}")
        _finish(payload, args, name, started, final=False)
    if args.kernels:
        print("timing decomposition kernels")
        payload["kernels"] = time_kernels(args)
    return _finish(payload, args, name, started, final=True)


def _finish(
    payload: dict[str, Any], args: argparse.Namespace, name: str, started: float, *, final: bool
) -> int:
    runs = payload["runs"]
    if "svd" in runs and "rsvd" in runs:
        svd, rsvd = runs["svd"]["timings"], runs["rsvd"]["timings"]
        payload["speedup_exact_over_rsvd"] = {
            "total": round(svd["total"] / rsvd["total"], 3),
            "decomposition": round(svd["decomposition"] / max(rsvd["decomposition"], 1e-9), 3),
        }
    payload["projection"] = projection(payload, FULL_LAYERS, FULL_SAMPLES * FULL_SEQ)
    payload["load_average_1min_end"] = round(os.getloadavg()[0], 2)
    payload["wall_seconds"] = round(time.perf_counter() - started, 1)
    text = markdown(payload)
    write_results(name, payload, text, args.results_dir)
    if not final:
        return 0
    print(text)
    env = payload["env"]
    fields = {f"total_s_{k}": r["timings"]["total"] for k, r in runs.items()}
    print(
        final_line(
            benchmark="compress_scale",
            device=env["device_name"],
            torch=env["torch"],
            git_sha=env["git_sha"],
            layers=args.layers,
            tokens=payload["calibration"]["tokens"],
            **fields,
            speedup=payload.get("speedup_exact_over_rsvd", {}).get("total"),
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
