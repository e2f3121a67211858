"""Where a healing step spends its time, in float32 and bfloat16 compute, and what caching the teacher costs.

    python -m benchmarks.heal_step                       # results/heal_step_cpu.{json,md}
    python -m benchmarks.heal_step --steps 1 --batch-size 1 --seq-len 64 --results-dir /tmp/hs  # smoke test

The student is the built-in model with every decoder linear factorized by plain ``svd`` at 20 % removed
(data-free, so the script starts in seconds; the shapes are those healing trains for svd-llm-v2 20 %). One
step is the one ``lowrank.training.healing`` takes: the teacher's forward under ``no_grad``, the student's
forward,
the distillation loss, backward, clipping and the AdamW update, under the autocast of each precision.
Every phase is timed on its own; the median of ``--steps`` steps after one warm-up step is reported.

The teacher's forward is what a cache of its logits would save. The cache sizes are those of exact logits
(the vocabulary times 2 bytes in bfloat16 per token), so a budget of tokens costs ``tokens × vocab × 2``.
The last line printed is one JSON line with device, torch version and git SHA.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

from benchmarks._sweep import Sweep, parser, settings

PHASES = ("teacher_forward", "student_forward", "loss", "backward_and_update")
BUDGETS = (50_000, 200_000, 400_000)


def _parser() -> argparse.ArgumentParser:
    p = parser(__doc__, "heal_step_cpu")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step (HealConfig default 4)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (512)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per precision after one warm-up (3)")
    return p


def _step(student, teacher, ids, params, optimizer, amp) -> dict[str, float]:
    """One healing step, each phase timed."""
    import torch

    from lowrank.training.healing import CLIP_NORM
    from lowrank.training.losses import distillation_loss

    times, clock = {}, time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        times[name], clock = now - clock, now

    with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
        with torch.no_grad():
            teacher_logits = teacher(ids, use_cache=False).logits
        lap("teacher_forward")
        logits = student(ids, use_cache=False).logits
        lap("student_forward")
    loss, _, _ = distillation_loss(logits, teacher_logits, ids, temperature=1.0, kd_weight=0.9)
    lap("loss")
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, CLIP_NORM)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    lap("backward_and_update")
    return times


def _measure(args, student, teacher, amp) -> dict[str, float]:
    import torch

    from lowrank.training.trainable import trainable_parameters

    params = list(trainable_parameters(student).values())
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    torch.manual_seed(0)
    ids = torch.randint(0, student.config.vocab_size, (args.batch_size, args.seq_len))
    runs = [_step(student, teacher, ids, params, optimizer, amp) for _ in range(args.steps + 1)][1:]
    median = {phase: statistics.median(r[phase] for r in runs) for phase in PHASES}
    return {**median, "step": sum(median.values())}


def _markdown(args, results: dict[str, dict[str, float]], vocab: int, env: dict[str, Any]) -> str:
    precisions = list(results)
    lines = [
        f"# Where a healing step spends its time ({args.model}, {env['device_name']})",
        "",
        f"One step on {args.batch_size} × {args.seq_len} tokens, student = every decoder linear factorized "
        f"by `svd` at 20 % of parameters removed; median of {args.steps} steps after one warm-up, seconds.",
        "",
        "| phase | " + " | ".join(precisions) + " | share of the step |",
        "|---|" + "---|" * (len(precisions) + 1),
    ]
    last = precisions[-1]
    for phase in (*PHASES, "step"):
        cells = " | ".join(f"{results[p][phase]:.2f}" for p in precisions)
        lines.append(f"| {phase} | {cells} | {results[last][phase] / results[last]['step']:.0%} ({last}) |")
    if len(precisions) == 2:
        lines += [
            "",
            f"bfloat16 autocast step speed-up: {results['float32']['step'] / results[last]['step']:.2f}×.",
        ]
    lines += [
        "",
        f"Exact teacher logits cached in bfloat16 take {vocab:,} × 2 bytes per token:",
        "",
        "| healing tokens | cache size |",
        "|---|---|",
        *(f"| {b:,} | {b * vocab * 2 / 2**30:.1f} GiB |" for b in BUDGETS),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for name in ("batch_size", "seq_len", "steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)}: must be a positive integer")
    import copy

    import torch

    import lowrank
    from lowrank.methods import SVDConfig, compress
    from lowrank.training.healing import fast_bfloat16

    sweep = Sweep(args, "heal_step", settings(args, "model", "batch_size", "seq_len", "steps"))
    teacher, _ = lowrank.load_model(args.model)
    teacher.eval().requires_grad_(False)
    student = copy.deepcopy(teacher)
    compress(student, SVDConfig(ratio=0.2))
    student.train(False)
    precisions = {"float32": None, **({"bfloat16": torch.bfloat16} if fast_bfloat16("cpu") else {})}

    def measure(spec: dict[str, Any]) -> dict[str, float]:
        print(f"timing {args.steps} steps in {spec['key']}", flush=True)
        return {k: round(v, 3) for k, v in _measure(args, student, teacher, precisions[spec["key"]]).items()}

    sweep.run([{"key": name} for name in precisions], measure)
    vocab = int(teacher.config.vocab_size)
    results = sweep.rows
    payload = {
        "seconds": results,
        "teacher_share": {p: round(r["teacher_forward"] / r["step"], 3) for p, r in results.items()},
        "cache_bytes_per_token_bfloat16": vocab * 2,
    }
    return sweep.finish(payload, lambda p: _markdown(args, p["seconds"], vocab, p["env"]))


if __name__ == "__main__":
    sys.exit(main())
