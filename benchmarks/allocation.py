"""Rank allocation from the end loss against uniform ranks (svd-llm-v2) on the built-in model.

    python -m benchmarks.allocation                 # the full sweep (resumes with --resume)
    python -m benchmarks.allocation --ratios 0.4 --windows 1 --windows-shakespeare 1 --out-name smoke

The input Grams are collected ONCE on wiki calibration windows (non-sequential), and the whitened factors
of every target are computed once from them; every allocation truncates those factors at its ranks, so
the rows differ by the allocation alone. The ``measured`` probes (each group truncated alone at a few
ranks) do not depend on the ratio and are measured once; its allocation seconds count them in full.
``auto`` (what ``allocation='auto'`` does) takes, at each ratio, the candidate with the lowest held-out KL.
Every rule sees calibration text only: its training part (the first sequences) and a held-out part
(extra sequences drawn past the ones the Grams use) that selects hyper-parameters. The wiki test split
and shakespeare are used for the perplexities only.

Conventions: ``ratio`` = fraction of the targeted decoder linear-layer parameters REMOVED (SVD-LLM).
Writes ``results/<out-name>.json``/``.md`` and ``<out-name>_*.png``; the last line printed is one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._common import (
    RESULTS_DIR,
    env_info,
    final_line,
    load_for_evaluation,
    load_partial,
    open_run,
    perplexities,
    record_run,
    write_results,
)

RULES = ("uniform", "measured", "depth", "learned", "auto")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument(
        "--calib-samples", type=int, default=24, help="wiki calibration windows for the Grams (24)"
    )
    p.add_argument("--calib-seq-len", type=int, default=256, help="tokens per calibration window (256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration draw (default 0)")
    p.add_argument("--windows", type=int, default=8, help="wiki test windows of 512 tokens (default 8)")
    p.add_argument("--windows-shakespeare", type=int, default=4, help="shakespeare test windows of 512 (4)")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.4, 0.6])
    p.add_argument("--rules", nargs="+", choices=RULES, default=list(RULES))
    p.add_argument("--train-samples", type=int, default=None, help="calibration sequences the rules train on")
    p.add_argument("--heldout-samples", type=int, default=None, help="held-out calibration sequences")
    p.add_argument("--alloc-seq-len", type=int, default=None, help="tokens of those sequences")
    p.add_argument("--group-layers", type=int, default=None, help="layers per group (measured, learned)")
    p.add_argument("--mask-steps", type=int, default=None, help="training steps of the learned positions")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--resume", action="store_true", help="skip configurations in the partial file")
    p.add_argument("--report-only", action="store_true", help="write the report from the partial file only")
    p.add_argument("--note", action="append", default=[], help="a line for the report's notes (repeatable)")
    p.add_argument(
        "--merge",
        type=Path,
        nargs="*",
        default=[],
        help="partial files of runs with the same settings (e.g. other ratios in another process) whose "
        "configurations join this one's",
    )
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--out-name", default="allocation_cpu", help="results file stem")
    return p


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": args.model,
        "calib_samples": args.calib_samples,
        "calib_seq_len": args.calib_seq_len,
        "seed": args.seed,
        "windows": args.windows,
        "windows_shakespeare": args.windows_shakespeare,
        "eval_seq_len": 512,
        "loss_allocation": _alloc_config(args).to_dict(),
    }


def _alloc_config(args: argparse.Namespace):
    """The library's :class:`LossAllocationConfig` defaults (what a user of ``allocation=`` gets), with
    the flags given on the command line in their place."""
    from lowrank.methods.allocation import LossAllocationConfig

    flags = {
        "train_samples": args.train_samples,
        "heldout_samples": args.heldout_samples,
        "seq_len": args.alloc_seq_len,
        "group_layers": args.group_layers,
        "mask_steps": args.mask_steps,
    }
    return LossAllocationConfig(**{k: v for k, v in flags.items() if v is not None})


class Runner:
    """The model, the evaluation tokens, the calibration split, the Grams and the whitened factors."""

    def __init__(self, args: argparse.Namespace) -> None:
        from lowrank.io.data import calibration_batches, load_text

        self.args = args
        self.alloc = _alloc_config(args)
        self.model, self.tokenizer, self.eval_ids = load_for_evaluation(args)
        extra = self.alloc.heldout_samples
        self.calib = calibration_batches(
            self.tokenizer,
            load_text("wiki", "calibration"),
            args.calib_samples + extra,
            args.calib_seq_len,
            seed=args.seed,
        )
        self._bank: dict[str, Any] | None = None
        self._refs: dict[str, Any] | None = None
        self.seconds: dict[str, float] = {}

    def config(self, ratio: float):
        from lowrank.methods import SVDLLMV2Config

        return SVDLLMV2Config(ratio=ratio, calibration={"sequential": False}, loss_allocation=self.alloc)

    def problem(self, ratio: float, group: bool):
        from lowrank.methods.allocation.problem import build_problem
        from lowrank.methods.common import plan_targets
        from lowrank.methods.svd_llm_v2 import rank_bounds

        config = self.config(ratio)
        plan = plan_targets(self.model, config)
        return build_problem(plan, lambda t: rank_bounds(t, config), self.alloc.group_layers if group else 1)

    def bank(self) -> dict[str, Any]:
        """Grams (non-sequential) and whitened factors up to the largest rank any ratio allows."""
        if self._bank is None:
            from lowrank.methods import collect_gram_statistics
            from lowrank.methods.allocation.problem import factor_bank

            t0 = time.perf_counter()
            stats = collect_gram_statistics(self.model, self.calib[: self.args.calib_samples])
            self.seconds["grams"] = round(time.perf_counter() - t0, 1)
            t0 = time.perf_counter()
            self._bank = factor_bank(self.model, self.problem(min(self.args.ratios), False), stats.per_layer)
            self.seconds["factors"] = round(time.perf_counter() - t0, 1)
        return self._bank

    def refs(self) -> dict[str, Any]:
        """(ids, original logits) of the rules' training and held-out calibration text, computed once."""
        if self._refs is None:
            from lowrank.methods.allocation import calibration_split
            from lowrank.methods.allocation.factors import reference_logits

            train, heldout = calibration_split(self.calib, self.alloc)
            b = self.alloc.batch_size
            self._refs = {
                "train": (train, reference_logits(self.model, train, b)),
                "heldout": (heldout, reference_logits(self.model, heldout, b)),
            }
        return self._refs

    def compressed(self, ranks: dict[str, int]):
        """A copy of the model with every target truncated at its rank from the shared factors."""
        from lowrank.nn import LowRankLinear
        from lowrank.nn.surgery import replace_module

        model = copy.deepcopy(self.model)
        for name, k in ranks.items():
            f = self.bank()[name]
            linear = model.get_submodule(name)
            replace_module(model, name, LowRankLinear.from_linear(linear, f.B[:k], f.A[:, :k]))
        return model


def allocate(runner: Runner, state: dict[str, Any], rule: str, ratio: float) -> dict[str, Any]:
    """Ranks of ``rule`` at ``ratio`` with the held-out KL and the rule's own details."""
    from lowrank.methods.allocation.depth import depth_allocation
    from lowrank.methods.allocation.factors import masked, mean_kl
    from lowrank.methods.allocation.learned import learned_allocation
    from lowrank.methods.allocation.measured import (
        knapsack_ranks,
        loss_curves,
        predicted_loss,
        probe_losses,
    )
    from lowrank.methods.allocation.problem import set_ranks

    a = runner.alloc
    problem = runner.problem(ratio, rule in ("measured", "learned"))
    refs = runner.refs()
    details: dict[str, Any] = {}
    runner.bank()  # shared setup, timed on its own (setup_seconds)
    t0 = time.perf_counter()
    with masked(runner.model, problem.targets, runner.bank()) as installed:
        if rule == "uniform":
            ranks = problem.homogeneous
        elif rule == "depth":
            ranks, details = depth_allocation(
                runner.model, installed, problem, refs["heldout"], slopes=a.depth_slopes,
                batch_size=a.batch_size,
            )  # fmt: skip
        elif rule == "learned":
            ranks, details = learned_allocation(
                runner.model, installed, problem, refs["train"], refs["heldout"], steps=a.mask_steps,
                lr=a.mask_lr, temperature=a.mask_temperature, eval_every=a.eval_every, seed=a.seed,
                batch_size=a.batch_size,
            )  # fmt: skip
        else:
            if "probes" not in state:  # ratio-free: probe once, count it in every measured row
                p0 = time.perf_counter()
                table = probe_losses(
                    runner.model, installed, problem, *refs["train"], a.probe_ratios, a.batch_size
                )
                state["probes"] = {"table": [{str(k): v for k, v in r.items()} for r in table]}
                state["probes"]["seconds"] = round(time.perf_counter() - p0, 1)
            table = [{int(k): v for k, v in r.items()} for r in state["probes"]["table"]]
            curves = loss_curves(problem, table)
            ranks = knapsack_ranks(problem, curves, options=a.knapsack_options, units=a.knapsack_units)
            details["additivity"] = {}
            for label, ks in (("chosen", ranks), ("uniform", problem.homogeneous)):
                set_ranks(installed, problem, ks)
                details["additivity"][label] = {
                    "predicted_kl": predicted_loss(curves, ks),
                    "measured_kl": mean_kl(runner.model, *refs["train"], a.batch_size),
                }
        set_ranks(installed, problem, ranks)
        heldout = mean_kl(runner.model, *refs["heldout"], a.batch_size)
    seconds = time.perf_counter() - t0 + (state["probes"]["seconds"] if rule == "measured" else 0.0)
    if "heldout_kl" in details:  # the rule's own selection scores (per slope, per evaluation step)
        details["selection_heldout_kl"] = details.pop("heldout_kl")
    return {
        "ranks": problem.to_targets(ranks),
        "heldout_kl": heldout,
        "allocation_seconds": round(seconds, 1),
        "spent": sum(k * c for k, c in zip(ranks, problem.unit_costs, strict=True)),
        "budget": problem.budget,
        **details,
    }


def auto_row(done: dict[str, Any], ratio: float) -> dict[str, Any]:
    """``auto`` at ``ratio``: the candidate rule with the lowest held-out KL, as ``allocation='auto'``
    chooses (the same KL on the same held-out text); its ranks, and so its perplexities, are that rule's,
    and its allocation seconds are the three rules' together."""
    from lowrank.methods.allocation import CANDIDATE_RULES

    rows = {r: done.get(f"{r}/ratio={ratio}") for r in CANDIDATE_RULES}
    if any(row is None for row in rows.values()):
        raise SystemExit(f"auto at ratio {ratio} needs the rows of {CANDIDATE_RULES} first")
    chosen = min(rows, key=lambda r: rows[r]["heldout_kl"])
    keep = ("ranks", "heldout_kl", "spent", "budget", "perplexity")
    return {
        **{k: rows[chosen][k] for k in keep},
        "chosen": chosen,
        "candidates": {r: {"heldout_kl": row["heldout_kl"]} for r, row in rows.items()},
        "allocation_seconds": round(sum(row["allocation_seconds"] for row in rows.values()), 1),
    }


def plan_configs(args: argparse.Namespace) -> list[tuple[str, float]]:
    """(rule, ratio) in run order: the target ratios 0.4 and 0.2 first, every rule at each."""
    order = sorted(args.ratios, key=lambda r: (r not in (0.4, 0.2), -r))
    return [(rule, ratio) for ratio in order for rule in args.rules]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    from lowrank.io.files import write_json

    state, partial, load_before, started = open_run(args, _settings(args))
    done = state["configs"]
    for other in args.merge:
        merged = load_partial(other, state["settings"], resume=True)
        done.update({k: v for k, v in merged["configs"].items() if k not in done})
        print(f"merged {len(merged['configs'])} configurations from {other}")
    runner = Runner(args)
    if not args.report_only:
        if "original" not in done:
            done["original"] = {"key": "original", "perplexity": perplexities(runner.model, runner.eval_ids)}
            write_json(partial, state)
        for i, (rule, ratio) in enumerate(plan_configs(args)):
            key = f"{rule}/ratio={ratio}"
            if key in done:
                continue
            t0 = time.perf_counter()
            if rule == "auto":
                record = {"key": key, "allocation": rule, "ratio": ratio, **auto_row(done, ratio)}
            else:
                record = {
                    "key": key,
                    "allocation": rule,
                    "ratio": ratio,
                    **allocate(runner, state, rule, ratio),
                }
                model = runner.compressed(record["ranks"])
                record["perplexity"] = perplexities(model, runner.eval_ids)
            record["wiki"], record["shakespeare"] = (record["perplexity"][c] for c in ("wiki", "shakespeare"))
            done[key] = record
            state["setup_seconds"] = {**state.get("setup_seconds", {}), **runner.seconds}
            record_run(state, args, started)
            write_json(partial, state)
            print(
                f"[{i + 1}/{len(plan_configs(args))}] {key}: wiki {record['wiki']:.4g}, shakespeare "
                f"{record['shakespeare']:.4g}, held-out KL {record['heldout_kl']:.4f}, allocation "
                f"{record['allocation_seconds']:.0f} s, {time.perf_counter() - t0:.0f} s in all",
                flush=True,
            )
    return _finish(args, state, runner, load_before)


def _finish(args, state, runner, load_before) -> int:
    from benchmarks._allocation_report import figures, markdown, targets

    env = env_info("cpu")
    payload = {
        "benchmark": "allocation",
        "conventions": {
            "ratio": "fraction of the targeted decoder linear-layer parameters REMOVED (SVD-LLM)",
            "heldout_kl": "per-token KL(original ‖ compressed) on held-out calibration text (wiki "
            "calibration split, sequences the Grams did not see)",
            "allocation_seconds": "time to choose the ranks (probes counted in full for measured; the Grams "
            "and whitened factors, shared by every rule, are in setup_seconds)",
        },
        "settings": state["settings"],
        "calibration_tokens": int(runner.calib[: args.calib_samples].numel()),
        "setup_seconds": state.get("setup_seconds"),
        "probes": state.get("probes"),
        "configs": state["configs"],
        "rows": [c for k, c in state["configs"].items() if k != "original"],
        "env": env,
        "last_measuring_run": state.get("last_measuring_run"),
        "load_average_1min": {"start": round(load_before[0], 2), "end": round(os.getloadavg()[0], 2)},
        "notes": args.note,
        "missing": [
            f"{r}/ratio={x}" for r, x in plan_configs(args) if f"{r}/ratio={x}" not in state["configs"]
        ],
    }
    payload["targets"] = targets(payload)
    if not args.no_figures:
        payload["figures"] = figures(payload, args.results_dir, args.out_name)
    text = markdown(payload)
    write_results(args.out_name, payload, text, args.results_dir)
    print(text)
    orig = state["configs"]["original"]["perplexity"]
    print(
        final_line(
            benchmark="allocation",
            device=env["device_name"],
            torch=env["torch"],
            git_sha=env["git_sha"],
            configs=len(payload["rows"]),
            ppl_wiki_original=round(orig["wiki"], 3),
            targets=payload["targets"]["summary"],
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
