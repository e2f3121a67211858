"""Memory and time of the healing loss: chunked with its gradient in closed form, against plain autograd.

    python -m benchmarks.heal_loss                                   # results/heal_loss_cpu.{json,md}
    python -m benchmarks.heal_loss --vocab 1000 --batch-size 1 --seq-len 64 --results-dir /tmp/hl  # smoke

``lowrank.training.losses.distillation_loss`` (KL at T = 1 with weight 0.9 plus cross-entropy) forward and
backward
on random student and teacher logits of the shape healing sees, ``(batch, seq, vocab)``, for the
vocabularies of common model families. ``autograd``: the same objective written with torch functions over
the whole batch and differentiated by autograd (how healing computed it before it was chunked, the
baseline); ``chunked``: ``distillation_loss`` as healing runs it (``LOSS_CHUNK_BYTES`` of float32 logits a
chunk, the gradient computed with the loss). Each (vocabulary, mode) runs in a fresh process, so its peak
memory is its own: on CPU the peak resident set size, on CUDA the peak allocated bytes, minus the same
measure once the input logits exist. That extra includes the gradient of the student's logits, which
backward through the model needs either way. Time: median of ``--repeats`` after one warm-up. The last
line printed is one JSON line with device, torch version and git SHA.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks._sweep import Sweep, parser, settings
from benchmarks._tables import gib

VOCABS = {49_152: "SmolLM2", 128_256: "Llama 3", 151_936: "Qwen2"}
MODES = ("autograd", "chunked")


def _parser() -> argparse.ArgumentParser:
    p = parser(__doc__, "heal_loss_cpu", device="cpu", model=None)
    p.add_argument("--vocab", type=int, nargs="+", default=list(VOCABS), help="vocabulary sizes")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step (HealConfig default 4)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (512)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="logits dtype")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up (3)")
    p.add_argument("--child", nargs=2, metavar=("VOCAB", "MODE"), help=argparse.SUPPRESS)
    return p


def _peak(device: str) -> int:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _child(args) -> dict[str, float]:
    """One (vocabulary, mode) in this process: extra peak bytes and median seconds of forward + backward."""
    import torch

    from lowrank.training.losses import distillation_loss

    vocab, mode = int(args.child[0]), args.child[1]
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch_size, args.seq_len, vocab)
    # filled in place: no temporary copy raises the peak before the loss runs
    student = torch.empty(shape, dtype=dtype).normal_(0.0, 3.0, generator=gen).to(args.device)
    teacher = torch.empty(shape, dtype=dtype).normal_(0.0, 3.0, generator=gen).to(args.device)
    student.requires_grad_(True)
    ids = torch.randint(vocab, shape[:2], generator=gen).to(args.device)
    before = _peak(args.device)
    loss_fn = _autograd_loss if mode == "autograd" else distillation_loss
    seconds = []
    for _ in range(args.repeats + 1):
        start = time.perf_counter()
        loss, _, _ = loss_fn(student, teacher, ids, temperature=1.0, kd_weight=0.9)
        loss.backward()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize(args.device)
        seconds.append(time.perf_counter() - start)
        student.grad = None
    return {
        "extra_bytes": _peak(args.device) - before,
        "seconds": statistics.median(seconds[1:]),
        "loss": float(loss),
    }


def _autograd_loss(student, teacher, ids, *, temperature: float, kd_weight: float):
    """The baseline: the healing objective over the whole batch in float32, differentiated by autograd."""
    import torch.nn.functional as F

    z, T = student.float(), temperature
    ce = F.cross_entropy(z[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    log_s = F.log_softmax(z / T, dim=-1).flatten(0, 1)
    log_t = F.log_softmax(teacher.float() / T, dim=-1).flatten(0, 1)
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * (T * T)
    return kd_weight * kl + (1.0 - kd_weight) * ce, kl, ce


def _run(args, vocab: int, mode: str) -> dict[str, float]:
    argv = [sys.executable, "-m", "benchmarks.heal_loss", "--child", str(vocab), mode]
    for name in ("batch_size", "seq_len", "dtype", "repeats", "device", "threads"):
        value = getattr(args, name)
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    out = subprocess.run(argv, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"vocab {vocab}, {mode}: the measuring process failed ({tail})")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _markdown(args, rows: list[dict], env: dict) -> str:
    lines = [
        f"# Memory and time of the healing loss ({env['device_name']})",
        "",
        f"`distillation_loss` forward + backward on {args.batch_size} × {args.seq_len} tokens of "
        f"{args.dtype} logits (student and teacher), KL weight 0.9, T = 1. Extra memory = peak above the "
        "input logits (it includes the student logits' gradient); autograd = the objective over the whole "
        "batch, differentiated by autograd (the baseline); chunked = `distillation_loss`, "
        "`LOSS_CHUNK_BYTES` of float32 logits a chunk, its gradient computed with the loss. Time: median of "
        f"{args.repeats} after a warm-up. One logits tensor of this shape in float32 is given for scale.",
        "",
        "| vocabulary | logits, float32 | extra memory, autograd | extra memory, chunked "
        "| chunked / autograd | seconds, autograd | seconds, chunked | time ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        w, c = r["autograd"], r["chunked"]
        name = VOCABS.get(r["vocab"])
        lines.append(
            f"| {r['vocab']:,}{f' ({name})' if name else ''} | {gib(r['logits_bytes'], unit=' GiB')} | "
            f"{gib(w['extra_bytes'], unit=' GiB')} | {gib(c['extra_bytes'], unit=' GiB')} | "
            f"{c['extra_bytes'] / max(1, w['extra_bytes']):.2f} | "
            f"{w['seconds']:.2f} | {c['seconds']:.2f} | {c['seconds'] / w['seconds']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.child:
        print(json.dumps(_child(args)))
        return 0
    for name in ("batch_size", "seq_len", "repeats"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)}: must be a positive integer")
    if bad := [v for v in args.vocab if v < 2]:
        raise SystemExit(f"--vocab {bad}: vocabularies need at least 2 tokens")
    keys = ("vocab", "batch_size", "seq_len", "dtype", "repeats", "threads")
    sweep = Sweep(args, "heal_loss", settings(args, *keys), device=args.device)

    def measure(spec: dict) -> dict:
        vocab = spec["vocab"]
        print(f"vocabulary {vocab:,}", flush=True)
        row = {"vocab": vocab, "logits_bytes": args.batch_size * args.seq_len * vocab * 4}
        return {**row, **{mode: _run(args, vocab, mode) for mode in MODES}}

    plan = [{"key": f"vocab={vocab}", "vocab": vocab} for vocab in args.vocab]
    sweep.run(plan, measure)
    rows = [sweep.rows[spec["key"]] for spec in plan if spec["key"] in sweep.rows]
    return sweep.finish({"rows": rows}, lambda p: _markdown(args, p["rows"], p["env"]))


if __name__ == "__main__":
    sys.exit(main())
