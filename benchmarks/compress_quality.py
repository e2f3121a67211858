"""Quality of SVD / SVD-LLM / SVD-LLM V2 on the built-in model: perplexity, parameters, time, throughput.

    python -m benchmarks.compress_quality --allocation-study --sequential-spot-checks   # the full run
    python -m benchmarks.compress_quality --ratios 0.2 --keep-fractions 0.8 --windows 2 --out-name smoke
    python -m benchmarks.compress_quality --resume ...        # skip configurations already measured

The model is loaded once and the Gram matrices XᵀX of every targeted linear are collected ONCE on wiki
calibration windows; every non-sequential compression reuses them (deepcopy → compress → evaluate). Each
finished configuration is appended to ``results/<out-name>.partial.json`` so ``--resume`` continues an
interrupted sweep. Conventions: ``ratio`` = fraction of the targeted linear-layer parameters REMOVED
(SVD-LLM); ``r`` = ``keep_singular_fraction`` = fraction of singular values KEPT (the rSVD paper's r).

Writes ``results/<out-name>.json``/``.md`` and ``<out-name>_*.png``; the last line printed is one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from typing import Any

from benchmarks._common import RESULTS_DIR, env_info, final_line, load_partial, write_results

DECOMPOSERS = {  # label -> DecomposerConfig fields
    "svd": {"name": "svd"},
    "rsvd(10,2)": {"name": "rsvd", "oversample": 10, "power_iters": 2},
    "rsvd(20,4)": {"name": "rsvd", "oversample": 20, "power_iters": 4},
}
METHODS = ("svd", "svd-llm", "svd-llm-v2")
RULES = ("uniform", "greedy", "greedy_relative", "greedy_anchored", "log_inverse")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="model (default: smollm2-135m)")
    p.add_argument("--calib-samples", type=int, default=64, help="wiki calibration windows (default 64)")
    p.add_argument("--calib-seq-len", type=int, default=512, help="tokens per calibration window (512)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration draw (default 0)")
    p.add_argument("--windows", type=int, default=3, help="wiki test windows of 512 tokens (default 3)")
    p.add_argument(
        "--windows-shakespeare", type=int, default=2, help="shakespeare test windows of 512 tokens (2)"
    )
    p.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--decomposers", nargs="+", choices=tuple(DECOMPOSERS), default=list(DECOMPOSERS))
    p.add_argument(
        "--keep-fractions",
        type=float,
        nargs="+",
        default=[0.5, 0.6, 0.7, 0.8, 0.9],
        help="the rSVD paper's r sweep (svd-llm; empty list: skip)",
    )
    p.add_argument(
        "--r-decomposers",
        nargs="+",
        choices=tuple(DECOMPOSERS),
        default=["svd", "rsvd(10,2)"],
        help="decomposers of the r sweep (default: the seed's SVD and rSVD(10,2))",
    )
    p.add_argument(
        "--allocation-study",
        action="store_true",
        help="svd-llm-v2 allocation rules study (runs first; the grid's svd-llm-v2 rows then use the rule "
        "with the lowest mean log wiki perplexity)",
    )
    p.add_argument("--allocation-ratios", type=float, nargs="+", default=[0.2, 0.4])
    p.add_argument("--allocation-rules", nargs="+", choices=RULES, default=list(RULES))
    p.add_argument(
        "--sequential-spot-checks",
        action="store_true",
        help="also compress svd-llm-v2 at --spot-ratio sequentially (exact and rsvd(10,2))",
    )
    p.add_argument("--spot-ratio", type=float, default=0.2)
    p.add_argument("--no-throughput", action="store_true", help="skip the CPU throughput measurements")
    p.add_argument("--throughput-repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--resume", action="store_true", help="skip configurations in the partial file")
    p.add_argument("--report-only", action="store_true", help="write the report from the partial file only")
    p.add_argument("--note", action="append", default=[], help="a line for the report's notes (repeatable)")
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--out-name", default="compress_quality_cpu", help="results file stem")
    return p


def plan_configs(args: argparse.Namespace, v2_rule: str | None = None) -> list[dict[str, Any]]:
    """Every configuration in run order: allocation study, grid, r sweep, sequential spot checks."""
    plan = []
    if args.allocation_study:
        for ratio in args.allocation_ratios:
            for rule in args.allocation_rules:
                plan.append(_spec("allocation", "svd-llm-v2", "svd", ratio=ratio, allocation=rule))
    for ratio in args.ratios:
        for method in args.methods:
            for dec in args.decomposers:
                rule = v2_rule if method == "svd-llm-v2" else None
                plan.append(_spec("grid", method, dec, ratio=ratio, allocation=rule))
    for r in args.keep_fractions:
        for dec in args.r_decomposers:
            plan.append(_spec("r_sweep", "svd-llm", dec, keep=r))
    if args.sequential_spot_checks:
        for dec in ("svd", "rsvd(10,2)"):
            rule = v2_rule
            plan.append(
                _spec(
                    "sequential", "svd-llm-v2", dec, ratio=args.spot_ratio, allocation=rule, sequential=True
                )
            )
    return plan


def best_rule(done: dict[str, dict[str, Any]]) -> str | None:
    """The allocation rule with the lowest mean log wiki perplexity over the study's ratios."""
    scores: dict[str, list[float]] = {}
    for c in done.values():
        if c.get("group") == "allocation":
            scores.setdefault(c["allocation"], []).append(math.log(c["perplexity"]["wiki"]["perplexity"]))
    if not scores:
        return None
    return min(scores, key=lambda rule: sum(scores[rule]) / len(scores[rule]))


def _spec(group, method, dec, *, ratio=None, keep=None, allocation=None, sequential=False) -> dict[str, Any]:
    x = f"ratio={ratio}" if ratio is not None else f"r={keep}"
    alloc = f"/{allocation}" if allocation else ""
    key = f"{group}/{method}/{dec}/{x}{alloc}" + ("/sequential" if sequential else "")
    return {
        "key": key,
        "group": group,
        "method": method,
        "decomposer_label": dec,
        "ratio": ratio,
        "keep_singular_fraction": keep,
        "allocation": allocation,
        "calibration": "sequential" if sequential else ("none" if method == "svd" else "non-sequential"),
    }


def make_config(spec: dict[str, Any], args: argparse.Namespace):
    """The method config of one configuration: every field the method's config class has, nothing else."""
    import dataclasses

    from lowrank.methods import config_class

    cls = config_class(spec["method"])
    data: dict[str, Any] = {
        "decomposer": dict(DECOMPOSERS[spec["decomposer_label"]]),
        "ratio": spec["ratio"],
        "keep_singular_fraction": spec["keep_singular_fraction"],
        "allocation": spec["allocation"],
        "calibration": {
            "sequential": spec["calibration"] == "sequential",
            "samples": args.calib_samples,
            "seq_len": args.calib_seq_len,
            "seed": args.seed,
        },
    }
    names = {f.name for f in dataclasses.fields(cls)}
    return cls.from_dict({k: v for k, v in data.items() if k in names and v is not None})


class Runner:
    """Holds the model, the evaluation tokens and the shared Grams; measures one configuration at a time."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        from lowrank.io.data import calibration_batches, load_text, tokenize
        from lowrank.loading.models import load_model
        from lowrank.methods import collect_gram_statistics

        self.args = args
        self.model, tok = load_model(args.model)
        self.eval_ids = {
            "wiki": (tokenize(tok, load_text("wiki", "test")), args.windows),
            "shakespeare": (tokenize(tok, load_text("shakespeare", "test")), args.windows_shakespeare),
        }
        self.calib = calibration_batches(
            tok, load_text("wiki", "calibration"), args.calib_samples, args.calib_seq_len, seed=args.seed
        )
        self._grams = None
        self._collect = lambda: collect_gram_statistics(self.model, self.calib)
        self.torch = torch

    @property
    def grams(self):
        if self._grams is None:
            start = time.perf_counter()
            self._grams = self._collect()
            self.gram_seconds = round(time.perf_counter() - start, 2)
        return self._grams

    def evaluate(self, model) -> dict[str, Any]:
        from lowrank.evaluation import perplexity

        out = {}
        for corpus, (ids, windows) in self.eval_ids.items():
            start = time.perf_counter()
            r = perplexity(model, None, ids, seq_len=512, max_windows=windows, progress=False)
            out[corpus] = {**r.to_dict(), "seconds": round(time.perf_counter() - start, 2)}
        return out

    def speed(self, model) -> dict[str, Any]:
        from lowrank.evaluation import throughput

        r = throughput(
            model, prompt_len=128, gen_len=32, repeats=self.args.throughput_repeats, progress=False
        )
        return r.to_dict()

    def measure_speed(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Compress a fresh copy again and measure its throughput only."""
        from lowrank.methods import compress

        model = copy.deepcopy(self.model)
        compress(model, make_config(spec, self.args), calibration=self.grams)
        return self.speed(model)

    def measure(self, spec: dict[str, Any], with_speed: bool) -> dict[str, Any]:
        from lowrank.methods import compress

        config = make_config(spec, self.args)
        model = copy.deepcopy(self.model)
        calibration = {"none": None, "non-sequential": None, "sequential": self.calib}[spec["calibration"]]
        if spec["calibration"] == "non-sequential":
            calibration = self.grams
        result = compress(model, config, calibration=calibration)
        record = {**spec, **_summarise(result), "perplexity": self.evaluate(model)}
        if with_speed:
            record["throughput"] = self.speed(model)
        del model
        return record


def _summarise(result) -> dict[str, Any]:
    details = result.details
    allocation = details.get("allocation") or {}
    return {
        "decomposer": details["decomposer"],
        "ratio_params_removed": details["ratio_params_removed"],
        "keep_singular_fraction_achieved": details["keep_singular_fraction"],
        "parameters_before": result.parameters_before,
        "parameters_after": result.parameters_after,
        "parameters_retained": round(result.parameters_after / result.parameters_before, 6),
        "linear_parameters_retained": round(
            details["linear_parameters_after"] / details["linear_parameters_before"], 6
        ),
        "dense_kept": len(details["dense_kept"]),
        "fallbacks": result.fallbacks,
        "decomposer_fallbacks": details.get("decomposer_fallbacks", {}),
        "time_total_s": result.time_total_s,
        "time_decomposition_s": round(result.timings.get("decomposition", 0.0), 4),
        "timings": result.timings,
        "relative_loss_homogeneous": sum(g["relative_loss_homogeneous"] for g in allocation.values()),
        "relative_loss_allocated": sum(g["relative_loss_allocated"] for g in allocation.values()),
        "allocation_groups": allocation,
    }


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": args.model,
        "calib_samples": args.calib_samples,
        "calib_seq_len": args.calib_seq_len,
        "seed": args.seed,
        "windows": args.windows,
        "windows_shakespeare": args.windows_shakespeare,
        "eval_seq_len": 512,
    }


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    import torch

    from lowrank.io.files import write_json
    from lowrank.methods import SVDLLMV2Config

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    started = time.perf_counter()
    partial_path = RESULTS_DIR / f"{args.out_name}.partial.json"
    state = load_partial(partial_path, _settings(args), args.resume or args.report_only)
    done = state["configs"]
    runner = Runner(args)
    if args.report_only:
        return _finish(args, state, runner, load_before, time.perf_counter() - started)
    speed = not args.no_throughput
    if "original" not in done:
        done["original"] = {
            "key": "original",
            "group": "original",
            "perplexity": runner.evaluate(runner.model),
        }
        if speed:
            done["original"]["throughput"] = runner.speed(runner.model)
        write_json(partial_path, state)
    plan = plan_configs(args)
    study = [spec for spec in plan if spec["group"] == "allocation"]
    for i, spec in enumerate(study):
        _run_one(runner, state, spec, f"{i + 1}/{len(study)}", speed, partial_path)
    rule = best_rule(done)
    state["v2_allocation_grid"] = rule or SVDLLMV2Config().allocation
    plan = [spec for spec in plan_configs(args, rule) if spec["group"] != "allocation"]
    for i, spec in enumerate(plan):
        _run_one(runner, state, spec, f"{i + 1}/{len(plan)}", speed, partial_path)
    if speed and "original_end" not in done:  # the machine's speed drifts: bracket the run
        done["original_end"] = {
            "key": "original_end",
            "group": "original",
            "throughput": runner.speed(runner.model),
        }
        write_json(partial_path, state)
    return _finish(args, state, runner, load_before, time.perf_counter() - started)


def _run_one(
    runner: Runner, state: dict[str, Any], spec: dict[str, Any], step: str, speed: bool, path
) -> None:
    from lowrank.io.files import write_json

    done = state["configs"]
    if spec["key"] in done:
        return
    t0 = time.perf_counter()
    twin = _study_twin(done, spec)
    if twin is not None:  # the same compression was measured by the allocation study
        done[spec["key"]] = {**twin, **spec, "reused_from": twin["key"]}
    # throughput: svd-llm-v2 with exact SVD at every ratio of the grid
    with_speed = speed and spec["group"] == "grid" and spec["method"] == "svd-llm-v2"
    with_speed = with_speed and spec["decomposer_label"] == "svd"
    if twin is None:
        done[spec["key"]] = runner.measure(spec, with_speed)
    elif with_speed:  # speed is re-measured beside the other grid rows, not taken from the study
        done[spec["key"]]["throughput"] = runner.measure_speed(spec)
    rec = done[spec["key"]]
    print(
        f"[{step}] {spec['key']}: wiki {rec['perplexity']['wiki']['perplexity']:.4g}, "
        f"shakespeare {rec['perplexity']['shakespeare']['perplexity']:.4g}, compress "
        f"{rec['time_total_s']:.1f} s, {time.perf_counter() - t0:.0f} s in all",
        flush=True,
    )
    write_json(path, state)


def _study_twin(done: dict[str, dict[str, Any]], spec: dict[str, Any]) -> dict[str, Any] | None:
    if spec["group"] != "grid" or spec["method"] != "svd-llm-v2" or spec["decomposer_label"] != "svd":
        return None
    for c in done.values():
        if c.get("group") == "allocation" and (c["ratio"], c["allocation"]) == (
            spec["ratio"],
            spec["allocation"],
        ):
            return c
    return None


def _finish(args, state, runner, load_before, seconds) -> int:
    import torch

    from benchmarks._quality_report import figures, markdown, targets

    env = env_info("cpu")
    payload = {
        "benchmark": "compress_quality",
        "conventions": {
            "ratio": "fraction of the targeted decoder linear-layer parameters REMOVED (SVD-LLM)",
            "keep_singular_fraction": "fraction of singular values KEPT (the rSVD paper's r)",
            "parameters_retained": "whole-model parameters after / before (embeddings included)",
        },
        "settings": state["settings"],
        "calibration_tokens": int(runner.calib.numel()),
        "gram_collection_seconds": getattr(runner, "gram_seconds", None),
        "configs": state["configs"],
        "env": env,
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": {"start": round(load_before[0], 2), "end": round(os.getloadavg()[0], 2)},
        "wall_seconds_this_invocation": round(seconds, 1),
        "notes": args.note,
        "v2_allocation_grid": state.get("v2_allocation_grid"),
        "missing": [
            spec["key"]
            for spec in plan_configs(args, state.get("v2_allocation_grid"))
            if spec["key"] not in state["configs"]
        ],
    }
    payload["targets"] = targets(payload)
    if not args.no_figures:
        payload["figures"] = figures(payload, RESULTS_DIR, args.out_name)
    text = markdown(payload)
    write_results(args.out_name, payload, text)
    print(text)
    orig = state["configs"]["original"]["perplexity"]
    print(
        final_line(
            benchmark="compress_quality",
            device=env["device_name"],
            torch=env["torch"],
            git_sha=env["git_sha"],
            configs=len(state["configs"]) - 1,
            ppl_wiki_original=round(orig["wiki"]["perplexity"], 3),
            targets={t["name"]: t["status"] for t in payload["targets"]},
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
