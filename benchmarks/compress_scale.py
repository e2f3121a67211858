"""Scale: SVD-LLM on a Llama-2-7B-shaped random model, exact SVD vs randomized SVD in one run.

    python benchmarks/compress_scale.py --device cuda          # 32 layers, 256 × 2048 tokens, one GPU
    python benchmarks/compress_scale.py --device cpu --layers 1 --calib-samples 24 --seq-len 512

The model has Llama-2-7B's shapes (hidden 4096, MLP 11008, 32 heads, 32 KV heads, vocab 32000) and
Gaussian weights (std ``--init-std``, norms at 1): flat Marchenko–Pastur spectra, the hard case for a
randomized SVD's accuracy (its run time does not depend on the spectrum). It is built on the meta device
and initialised tensor by tensor in ``--dtype`` on the host, so the full fp32 model is never materialised;
the library moves one decoder layer at a time to ``--device``. Each decomposer compresses a fresh copy
of the same weights (same seed) with the same calibration tokens. Ratios: ``ratio`` is the fraction of
targeted linear-layer parameters REMOVED (SVD-LLM convention).

Writes ``benchmarks/results/compress_scale_<device>.json`` and ``.md`` (after every run, so a run cut
short keeps what finished); the last line printed is one JSON line with the device, torch version and
git SHA.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import re
import resource
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import env_info, final_line, write_results  # noqa: E402
from _scale_report import markdown, per_layer, projection  # noqa: E402

#: Llama-2-7B shapes (``num_hidden_layers`` comes from ``--layers``).
LLAMA2_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
FULL_LAYERS, FULL_SAMPLES, FULL_SEQ = 32, 256, 2048


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cpu", "cuda"), help="compute device (default: cuda)")
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
    return p


def device_tag(device: str) -> str:
    """``cpu``, or the GPU model in lower case (``h100``, ``a100``…), else ``cuda``."""
    import torch

    if device == "cpu":
        return "cpu"
    found = re.search(r"\b([A-Z]{1,2}\d{2,4})\b", torch.cuda.get_device_name())
    return found.group(1).lower() if found else "cuda"


def build_model(layers: int, dtype, std: float, seed: int, init_device: str):
    """A Llama-2-7B-shaped ``LlamaForCausalLM`` on the CPU in ``dtype`` with seeded Gaussian weights.

    Built on the meta device, allocated empty in ``dtype`` and filled one tensor at a time (drawn in
    float32 on ``init_device`` from one seeded generator, so the result does not depend on the host).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**LLAMA2_7B, num_hidden_layers=layers)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to(dtype).to_empty(device="cpu")
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # float32 buffers, recomputed
    gen = torch.Generator(device=init_device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                w = torch.empty(param.shape, device=init_device).normal_(0.0, std, generator=gen)
                param.copy_(w.to(dtype))
    return model.eval()


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
    model = build_model(args.layers, dtype, args.init_std, args.seed, args.device)
    build_s = time.perf_counter() - start
    config = method_config(args, decomposer)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    result = compress(model, config, calibration=tokens, device=args.device)
    peak = torch.cuda.max_memory_allocated() if cuda else None
    probe = tokens[:1, :64]
    with torch.no_grad():
        logits = model(input_ids=probe, use_cache=False).logits
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
        "weights_on_host_after": all(p.device.type == "cpu" for p in model.parameters()),
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

    from lowrank.benchmarking._timing import sync
    from lowrank.linalg import get_decomposer
    from lowrank.linalg.allocation import rank_for_ratio

    h, f = LLAMA2_7B["hidden_size"], LLAMA2_7B["intermediate_size"]
    shapes = {
        "q/k/v/o (4096×4096)": (h, h, 4),
        "gate/up (11008×4096)": (f, h, 2),
        "down (4096×11008)": (h, f, 1),
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
    tokens = calibration_tokens(args.calib_samples, args.seq_len, LLAMA2_7B["vocab_size"], args.seed)
    name = args.name or f"compress_scale_{device_tag(args.device)}"
    env = env_info(args.device)
    reduced = (args.layers, args.calib_samples, args.seq_len) != (FULL_LAYERS, FULL_SAMPLES, FULL_SEQ)
    warm_up(args.device)
    payload: dict[str, Any] = {
        "benchmark": "compress_scale",
        "reduced": reduced,
        "model": {**LLAMA2_7B, "num_hidden_layers": args.layers, "dtype": args.dtype},
        "init": f"Gaussian N(0, {args.init_std}²) for every weight matrix and embedding, RMSNorm weights 1",
        "calibration": {"samples": args.calib_samples, "seq_len": args.seq_len, "tokens": tokens.numel()},
        "settings": {k: v for k, v in vars(args).items() if k not in ("name",)} | {"tf32_used": tf32},
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
    write_results(name, payload, text)
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
