"""KV-cache projections on the built-in model: perplexity, KV bytes per token and decode speed per method.

    python -m benchmarks.kv_projection                      # the full run (results/kv_projection_cpu.*)
    python -m benchmarks.kv_projection --report-only        # rewrite the report from the partial file
    python -m benchmarks.kv_projection --resume             # continue an interrupted run
    python -m benchmarks.kv_projection --max-configs 2 --calib-samples 2 --calib-seq-len 128 \\
        --windows 1 --windows-shakespeare 1 --eval-seq-len 128 --prompt-len 64 --gen-len 2 \\
        --results-dir /tmp/kv_smoke                         # a smoke test in a few minutes

The model is loaded once and the per-head attention Grams (pre- and post-RoPE, :class:`AttentionGrams`) of
the UNCHANGED model are collected ONCE on wiki calibration windows; every configuration compresses a deep
copy from them (non-sequential calibration) and is evaluated on the same held-out windows as the baseline.
Each finished configuration is written to ``<results-dir>/<out-name>.partial.json`` so ``--resume``
continues. Decode speed at ``--prompt-len`` cached tokens is measured first (right after the baseline's
perplexity), interleaved with the baseline (:func:`lowrank.evaluation.paired_throughput`), and reported as
ratios to it. ``--mla-fractions`` adds rows of the ``mla`` method (its defaults) at the same KV bytes.

Conventions: R/d = cached dimensions kept per KV head (keys, and values unless keys only); KV bytes per
token are measured on the real cache object after a forward pass (:func:`lowrank.evaluation.memory_report`).
The last line printed is one JSON line with device, torch version and git SHA.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._common import RESULTS_DIR, compressed_copy, env_info, final_line, kv_statistics, open_run

KEY_METHODS = ("k-svd", "eigen", "kq", "kq-sum")
SPEED_DEFAULT = ["kq/KV-wo-aware/post/uniform/R=0.5", "kq/KV-wo-aware/pre/uniform/R=0.5"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib-samples", type=int, default=16, help="wiki calibration windows (default 16)")
    p.add_argument("--calib-seq-len", type=int, default=512, help="tokens per calibration window (512)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration draw (default 0)")
    p.add_argument("--windows", type=int, default=2, help="wiki test windows (default 2)")
    p.add_argument("--windows-shakespeare", type=int, default=1, help="shakespeare test windows (1)")
    p.add_argument("--eval-seq-len", type=int, default=512, help="tokens per evaluation window (512)")
    p.add_argument("--rank-fractions", type=float, nargs="+", default=[0.75, 0.5, 0.25], help="R/d values")
    p.add_argument("--methods", nargs="+", choices=KEY_METHODS, default=list(KEY_METHODS))
    p.add_argument(
        "--mla-fractions",
        type=float,
        nargs="*",
        default=[0.75, 0.5, 0.25],
        help="kv_fraction of the MLA rows at the same KV bytes (MLAConfig defaults otherwise; empty: none)",
    )
    p.add_argument(
        "--only",
        nargs="*",
        default=None,
        help="measure only configurations whose key starts with one of these prefixes",
    )
    p.add_argument("--max-configs", type=int, default=None, help="measure only the first N configurations")
    p.add_argument(
        "--speed-configs", nargs="*", default=SPEED_DEFAULT, help="config keys timed against the baseline"
    )
    p.add_argument("--prompt-len", type=int, default=2048, help="cached tokens before decoding (2048)")
    p.add_argument("--gen-len", type=int, default=8, help="decoded tokens per timed run (8)")
    p.add_argument("--speed-repeats", type=int, default=1, help="interleaved timed rounds (1)")
    p.add_argument("--no-throughput", action="store_true", help="skip the decode-speed measurement")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--resume", action="store_true", help="skip configurations in the partial file")
    p.add_argument("--report-only", action="store_true", help="write the report from the partial file only")
    p.add_argument("--note", action="append", default=[], help="a line for the report's notes (repeatable)")
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--out-name", default="kv_projection_cpu", help="results file stem")
    return p


def _spec(kv: str, R: float, *, keys_only=False, value="wo-aware", rope="post", alloc="uniform") -> dict:
    cached = "K" if keys_only else f"KV-{value}"
    return {
        "key": f"{kv}/{cached}/{rope}/{alloc}/R={R}",
        "kv_method": kv,
        "value_method": None if keys_only else value,
        "keys_only": keys_only,
        "rope": rope,
        "rank_allocation": alloc,
        "rank_fraction": R,
    }


def _mla_spec(fraction: float) -> dict[str, Any]:
    """MLA (partial RoPE + whitened joint latent: the defaults) keeping ``fraction`` of the KV numbers."""
    return {
        "key": f"mla/rope_dim=8,2-norm,joint,whiten/R={fraction}",
        "kv_method": "mla",
        "value_method": None,
        "keys_only": False,
        "rope": "partial",
        "rank_allocation": "uniform",
        "rank_fraction": fraction,
    }


def plan_configs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every configuration in run order, the most informative first (an interrupted run still says most)."""
    Rs, methods = args.rank_fractions, args.methods
    plan = [_spec(kv, R) for R in Rs for kv in methods]  # keys + W_O-aware values, post-RoPE, uniform
    plan += [_mla_spec(f) for f in args.mla_fractions]
    plan += [_spec(kv, R, rope="pre") for R in Rs for kv in ("k-svd", "kq") if kv in methods]
    plan += [_spec("kq", R, alloc="budget") for R in Rs if "kq" in methods]
    plan += [_spec(kv, R, keys_only=True) for R in Rs for kv in methods]
    plan += [_spec("kq", R, value="v-svd") for R in Rs if "kq" in methods]
    if args.only is not None:
        plan = [s for s in plan if any(s["key"].startswith(prefix) for prefix in args.only)]
    return plan[: args.max_configs] if args.max_configs else plan


def make_config(spec: dict[str, Any]):
    from lowrank.methods.kv_projection import KVProjectionConfig
    from lowrank.methods.mla import MLAConfig

    if spec["kv_method"] == "mla":
        return MLAConfig(kv_fraction=spec["rank_fraction"], whiten=True, calibration={"sequential": False})

    return KVProjectionConfig(
        kv_method=spec["kv_method"],
        value_method=spec["value_method"] or "wo-aware",
        rank_fraction=spec["rank_fraction"],
        keys_only=spec["keys_only"],
        rope=spec["rope"],
        rank_allocation=spec["rank_allocation"],
        calibration={"sequential": False},
    )


class Runner:
    """Holds the model, the evaluation tokens and the shared attention Grams."""

    def __init__(self, args: argparse.Namespace) -> None:
        from lowrank.io.data import calibration_batches, load_text, tokenize
        from lowrank.loading.models import load_model

        self.args = args
        self.model, self.tokenizer = load_model(args.model)
        self.eval_ids = {
            "wiki": (tokenize(self.tokenizer, load_text("wiki", "test")), args.windows),
            "shakespeare": (
                tokenize(self.tokenizer, load_text("shakespeare", "test")),
                args.windows_shakespeare,
            ),
        }
        self.calib = calibration_batches(
            self.tokenizer,
            load_text("wiki", "calibration"),
            args.calib_samples,
            args.calib_seq_len,
            seed=args.seed,
        )
        self._stats = None
        self.stats_seconds = None

    @property
    def stats(self):
        """The shared calibration statistics (:func:`_common.kv_statistics`), collected on first use."""
        if self._stats is None:
            self._stats, self.stats_seconds = kv_statistics(self.model, self.calib)
        return self._stats

    def evaluate(self, model) -> dict[str, Any]:
        from lowrank.evaluation import memory_report, perplexity

        out: dict[str, Any] = {"perplexity": {}}
        for corpus, (ids, windows) in self.eval_ids.items():
            start = time.perf_counter()
            r = perplexity(
                model,
                self.tokenizer,
                ids,
                seq_len=self.args.eval_seq_len,
                max_windows=windows,
                progress=False,
            )
            out["perplexity"][corpus] = {**r.to_dict(), "seconds": round(time.perf_counter() - start, 1)}
        mem = memory_report(model, tokens=64)
        out["kv_bytes_per_token"] = mem.kv_cache_bytes_per_token
        out["kv_cache_class"] = mem.kv_cache_class
        out["parameters"] = mem.parameters
        return out

    def compressed(self, spec: dict[str, Any]):
        """A compressed deep copy of the model and the compression result."""
        return compressed_copy(self.model, make_config(spec), self.stats)

    def measure(self, spec: dict[str, Any]) -> dict[str, Any]:
        model, result = self.compressed(spec)
        record = {**spec, **_summarise(result), **self.evaluate(model)}
        del model
        return record


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _summarise(result) -> dict[str, Any]:
    """Ranks and calibration errors (relative squared errors, mean over layers and KV heads)."""
    mods = result.modules.values()
    if result.method == "mla":
        return {
            "kv_fraction_kept": result.details["kv_fraction (KV-cache numbers KEPT)"],
            "kv_rank": result.details["kv_rank (latent numbers per KV head)"],
            "mla_relative_loss": result.details["mean_relative_loss"],
            "logit_error_calibration": None,
            "epsilon_gap_calibration": None,
            "value_error_calibration": None,
            "compress_seconds": round(result.time_total_s, 1),
        }
    return {
        "key_ranks": result.details["key_ranks"],
        "value_ranks": result.details["value_ranks"],
        "kv_fraction_kept": result.details[
            "kv_fraction (cached K+V dimensions KEPT in the projected layers)"
        ],
        "logit_error_calibration": _mean([e for m in mods for e in m["logit_error_squared_relative"]]),
        "epsilon_gap_calibration": _mean([e for m in mods for e in m["epsilon_gap_relative"]]),
        "value_error_calibration": _mean(
            [e for m in mods for e in m.get("value_error_squared_relative", [])]
        ),
        "compress_seconds": round(result.time_total_s, 1),
    }


def measure_speed(runner: Runner, keys: list[str], plan: list[dict[str, Any]]) -> dict[str, Any]:
    """Decode/prefill speed of the baseline and ``keys``, interleaved, with ratios to the baseline."""
    from lowrank.evaluation import paired_throughput

    specs = {s["key"]: s for s in plan}
    models = {"baseline": runner.model}
    for key in keys:
        models[key] = runner.compressed(specs[key])[0]
    a = runner.args
    res = paired_throughput(
        models, prompt_len=a.prompt_len, gen_len=a.gen_len, repeats=a.speed_repeats, progress=False
    )
    base = res["baseline"]
    return {
        name: {
            **r.to_dict(),
            "decode_ratio": r.decode_tokens_per_s / base.decode_tokens_per_s,
            "prefill_ratio": r.prefill_tokens_per_s / base.prefill_tokens_per_s,
        }
        for name, r in res.items()
    }


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("model", "calib_samples", "calib_seq_len", "seed", "windows", "windows_shakespeare")
    return {**{k: getattr(args, k) for k in keys}, "eval_seq_len": args.eval_seq_len}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    from lowrank.io.files import write_json

    state, partial, load_before, started = open_run(args, _settings(args))
    done = state["configs"]
    runner = Runner(args)
    plan = plan_configs(args)
    if not args.report_only:
        if "baseline" not in done:
            done["baseline"] = {"key": "baseline", **runner.evaluate(runner.model)}
            write_json(partial, state)
        speed_keys = [k for k in args.speed_configs if k in {s["key"] for s in plan}]
        if not args.no_throughput and speed_keys and "throughput" not in state:  # first: the scarcest row
            runner.stats  # the calibration pass is timed on its own  # noqa: B018
            t0 = time.perf_counter()
            state["throughput"] = measure_speed(runner, speed_keys, plan)
            state["throughput_seconds"] = round(time.perf_counter() - t0, 1)
            state["calibration_seconds"] = runner.stats_seconds
            write_json(partial, state)
            print(f"decode speed measured in {state['throughput_seconds']:.0f} s", flush=True)
        for i, spec in enumerate(plan):
            if spec["key"] in done:
                continue
            t0 = time.perf_counter()
            done[spec["key"]] = rec = runner.measure(spec)
            state["calibration_seconds"] = state.get("calibration_seconds") or runner.stats_seconds
            write_json(partial, state)
            print(
                f"[{i + 1}/{len(plan)}] {spec['key']}: wiki {rec['perplexity']['wiki']['perplexity']:.4g}, "
                f"shakespeare {rec['perplexity']['shakespeare']['perplexity']:.4g}, "
                f"{rec['kv_bytes_per_token']:.0f} B/token, "
                f"logit err {rec['logit_error_calibration'] or 0:.4f}, "
                f"{time.perf_counter() - t0:.0f} s",
                flush=True,
            )
    return _finish(args, state, runner, plan, load_before, time.perf_counter() - started)


def _finish(args, state, runner, plan, load_before, seconds) -> int:
    import torch

    from benchmarks._kv_report import figure, markdown
    from lowrank.io.files import write_json, write_text

    env = env_info("cpu")
    if not args.report_only:  # every invocation's wall time, so a resumed run reports its total
        state.setdefault("invocation_seconds", []).append(round(seconds, 1))
        write_json(args.results_dir / f"{args.out_name}.partial.json", state)
    payload = {
        "benchmark": "kv_projection",
        "conventions": {
            "R/d": "cached dimensions kept per KV head (keys; values too unless keys only)",
            "kv_bytes_per_token": "bytes of every tensor in the model's real cache after a 64-token forward "
            "pass, per token (lowrank.evaluation.memory_report)",
            "logit_error_calibration": "‖K Qᵀ − K A Bᵀ Qᵀ‖²/‖K Qᵀ‖² over the calibration tokens, every query "
            "head of the KV group kept, mean over layers and KV heads (squared relative error)",
            "epsilon_gap_calibration": "the seed's ε (k-svd minus attention-optimal error bound) divided by "
            "‖K Qᵀ‖², same averaging",
            "decode_ratio": "decode tokens/s over the baseline's, interleaved in the same run",
        },
        "settings": state["settings"],
        "calibration_tokens": int(runner.calib.numel()),
        "calibration_seconds": state.get("calibration_seconds"),
        "configs": state["configs"],
        "throughput": state.get("throughput"),
        "throughput_workload": {"prompt_len": args.prompt_len, "gen_len": args.gen_len},
        "throughput_seconds": state.get("throughput_seconds"),
        "env": env,
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": None
        if args.report_only
        else {"start": round(load_before[0], 2), "end": round(os.getloadavg()[0], 2)},
        "wall_seconds": round(sum(state.get("invocation_seconds", [])), 1),
        "invocation_seconds": state.get("invocation_seconds", []),
        "notes": args.note,
        "missing": [s["key"] for s in plan if s["key"] not in state["configs"]],
    }
    if not args.no_figures:
        payload["figures"] = [figure(payload, args.results_dir, args.out_name)]
    text = markdown(payload)
    write_json(args.results_dir / f"{args.out_name}.json", payload)
    write_text(args.results_dir / f"{args.out_name}.md", text)
    print(text)
    base = state["configs"]["baseline"]
    speed = {k: round(v["decode_ratio"], 3) for k, v in (state.get("throughput") or {}).items()}
    print(
        final_line(
            benchmark="kv_projection",
            device=env["device_name"],
            torch=env["torch"],
            git_sha=env["git_sha"],
            configs=len(state["configs"]) - 1,
            ppl_wiki_baseline=round(base["perplexity"]["wiki"]["perplexity"], 3),
            kv_bytes_per_token_baseline=base["kv_bytes_per_token"],
            decode_ratio=speed,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
