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
import sys
import time
from typing import Any

from benchmarks._common import CalibratedRunner, kv_final
from benchmarks._kv_report import figure, markdown
from benchmarks._sweep import Sweep, parser
from benchmarks._tables import ppl

KEY_METHODS = ("k-svd", "eigen", "kq", "kq-sum")
SPEED_DEFAULT = ["kq/KV-wo-aware/post/uniform/R=0.5", "kq/KV-wo-aware/pre/uniform/R=0.5"]


def _parser():
    p = parser(
        __doc__,
        "kv_projection_cpu",
        figures=True,
        calibration={"samples": 16, "seq_len": 512, "seed": 0},
        windows=(2, 1),
    )
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
        return MLAConfig(
            partial_rope="mha2mla",
            kv_fraction=spec["rank_fraction"],
            whiten=True,
            calibration={"sequential": False},
        )

    return KVProjectionConfig(
        kv_method=spec["kv_method"],
        value_method=spec["value_method"] or "wo-aware",
        rank_fraction=spec["rank_fraction"],
        keys_only=spec["keys_only"],
        rope=spec["rope"],
        rank_allocation=spec["rank_allocation"],
        calibration={"sequential": False},
    )


class Runner(CalibratedRunner):
    """The shared model, tokens and attention statistics; measures one configuration."""

    def evaluate(self, model) -> dict[str, Any]:
        from lowrank.evaluation import memory_report

        mem = memory_report(model, tokens=64)
        return {
            "perplexity": self.perplexity(model, self.args.eval_seq_len),
            "kv_bytes_per_token": mem.kv_cache_bytes_per_token,
            "kv_cache_class": mem.kv_cache_class,
            "parameters": mem.parameters,
        }

    def measure(self, spec: dict[str, Any]) -> dict[str, Any]:
        model, result = self.compressed(make_config(spec))
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
            "kv_fraction_kept": result.details["kv_fraction"],
            "kv_rank": result.details["kv_rank"],
            "mla_relative_loss": result.details["mean_relative_loss"],
            "logit_error_calibration": None,
            "epsilon_gap_calibration": None,
            "value_error_calibration": None,
            "compress_seconds": round(result.time_total_s, 1),
        }
    return {
        "key_ranks": result.details["key_ranks"],
        "value_ranks": result.details["value_ranks"],
        "kv_fraction_kept": result.details["kv_fraction"],
        "logit_error_calibration": _mean(
            [e for m in mods for e in m.metrics["logit_error_squared_relative"]]
        ),
        "epsilon_gap_calibration": _mean([e for m in mods for e in m.metrics["epsilon_gap_relative"]]),
        "value_error_calibration": _mean(
            [e for m in mods for e in m.metrics.get("value_error_squared_relative", [])]
        ),
        "compress_seconds": round(result.time_total_s, 1),
    }


def measure_speed(runner: Runner, keys: list[str], plan: list[dict[str, Any]]) -> dict[str, Any]:
    """Decode/prefill speed of the baseline and ``keys``, interleaved, with ratios to the baseline."""
    from lowrank.evaluation import paired_throughput

    specs = {s["key"]: s for s in plan}
    models = {"baseline": runner.model}
    for key in keys:
        models[key] = runner.compressed(make_config(specs[key]))[0]
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
    keys = ("model", "calib_samples", "calib_seq_len", "windows", "windows_shakespeare")
    return {**{k: getattr(args, k) for k in keys}, "seed": args.calib_seed, "eval_seq_len": args.eval_seq_len}


def _describe(rec: dict[str, Any]) -> str:
    return (
        f"wiki {ppl(rec):.4g}, shakespeare {ppl(rec, 'shakespeare'):.4g}, {rec['kv_bytes_per_token']:.0f} "
        f"B/token, logit err {rec['logit_error_calibration'] or 0:.4f}"
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    sweep = Sweep(args, "kv_projection", _settings(args))
    runner = Runner(args)
    plan = plan_configs(args)
    sweep.run([{"key": "baseline"}], lambda spec: {"key": "baseline", **runner.evaluate(runner.model)})
    speed_keys = [k for k in args.speed_configs if k in {s["key"] for s in plan}]
    if not args.no_throughput and speed_keys:  # first: the scarcest row
        sweep.once("throughput", lambda: _timed_speed(sweep, runner, speed_keys, plan))
    sweep.run(plan, runner.measure, _describe)
    return sweep.finish(
        {
            "conventions": CONVENTIONS,
            "calibration_tokens": int(runner.calib.numel()),
            "calibration_seconds": sweep.state.get("calibration_seconds") or runner.stats_seconds,
            "configs": sweep.rows,
            "throughput": sweep.state.get("throughput"),
            "throughput_workload": {"prompt_len": args.prompt_len, "gen_len": args.gen_len},
            "throughput_seconds": sweep.state.get("throughput_seconds"),
            "missing": sweep.missing(plan),
        },
        markdown,
        lambda p, out_dir, stem: [figure(p, out_dir, stem)],
        lambda p: {
            **kv_final(p),
            "decode_ratio": {k: round(v["decode_ratio"], 3) for k, v in (p["throughput"] or {}).items()},
        },
    )


def _timed_speed(sweep: Sweep, runner: Runner, keys: list[str], plan: list[dict[str, Any]]) -> dict[str, Any]:
    runner.stats  # the calibration pass is timed on its own  # noqa: B018
    sweep.state["calibration_seconds"] = runner.stats_seconds
    start = time.perf_counter()
    speed = measure_speed(runner, keys, plan)
    sweep.state["throughput_seconds"] = round(time.perf_counter() - start, 1)
    print(f"decode speed measured in {sweep.state['throughput_seconds']:.0f} s", flush=True)
    return speed


CONVENTIONS = {
    "R/d": "cached dimensions kept per KV head (keys; values too unless keys only)",
    "kv_bytes_per_token": "bytes of every tensor in the model's real cache after a 64-token forward "
    "pass, per token (lowrank.evaluation.memory_report)",
    "logit_error_calibration": "‖K Qᵀ − K A Bᵀ Qᵀ‖²/‖K Qᵀ‖² over the calibration tokens, every query "
    "head of the KV group kept, mean over layers and KV heads (squared relative error)",
    "epsilon_gap_calibration": "the seed's ε (k-svd minus attention-optimal error bound) divided by "
    "‖K Qᵀ‖², same averaging",
    "decode_ratio": "decode tokens/s over the baseline's, interleaved in the same run",
}


if __name__ == "__main__":
    sys.exit(main())
