"""MHA/GQA → MLA conversion on the built-in model: the seed's Table 2, plus sweeps of the kept KV fraction,
``rope_dim``, the RoPE selection and joint vs split latents.

    python -m benchmarks.mla                          # the full run (results/mla_cpu.*)
    python -m benchmarks.mla --resume                 # continue an interrupted run
    python -m benchmarks.mla --windows 1 --windows-shakespeare 1 --configs 2 --calib-samples 4 \\
        --speed-repeats 1 --long-prompt-len 256 --out-name mla_smoke --results-dir /tmp/mla_smoke

The model is loaded once and the statistics the ``mla`` method asks for — the per-head attention Grams
(``2-norm`` RoPE selection) and the input Gram of ``k_proj`` (``--whiten``) — are collected ONCE on the
unchanged model over wiki calibration windows and timed apart; every configuration compresses a deep copy
from them (non-sequential calibration), so its conversion time is the method's own. Each finished
configuration is written to ``<results-dir>/<out-name>.partial.json`` so ``--resume`` continues. Speed
(prefill and greedy decode, batch 1) is measured last for the seed's setting, every model interleaved with
the baseline (:func:`lowrank.evaluation.paired_throughput`), and reported as ratios to it.

Conventions: kv_fraction = cached K/V numbers kept per token and layer, (rope_dim + kv_rank) / (2 · head_dim);
KV bytes per token are measured on the real cache after a forward pass (``memory_report``) and compared
with the prediction layers × kv_heads × (rope_dim + kv_rank) × element size. The last line printed is one
JSON line with device, torch version and git SHA.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from benchmarks._common import CalibratedRunner, kv_final
from benchmarks._mla_figures import figure
from benchmarks._mla_report import markdown, targets
from benchmarks._sweep import Sweep, parser
from benchmarks._tables import ppl

DECOMPOSERS = {  # label -> DecomposerConfig fields
    "svd": {"name": "svd"},
    "rsvd": {"name": "rsvd", "oversample": 10, "power_iters": 2},
}
SEED = {"rope_dim": 8, "kv_rank": 32, "rope_selection": "2-norm", "latent": "joint"}
"""The seed's setting (MHA2MLA's): 8 rotary features and a joint latent of 32 per KV head."""
SELECTIONS = ("2-norm", "high", "low", "uniform")
SPEED_KEYS = ("svd/plain", "rsvd/plain", "svd/whiten")


def _parser():
    calibration = {"samples": 32, "seq_len": 512, "seed": 0}
    p = parser(__doc__, "mla_cpu", figures=True, calibration=calibration, windows=(8, 4))
    p.add_argument(
        "--fractions", type=float, nargs="+", default=[0.5, 0.3125, 0.25, 0.125], help="kv_fraction sweep"
    )
    p.add_argument("--rope-dims", type=int, nargs="+", default=[0, 4, 8, 16], help="rope_dim sweep")
    p.add_argument(
        "--sweep-decomposers",
        nargs="+",
        choices=tuple(DECOMPOSERS),
        default=["svd"],
        help="decomposers of the kv_fraction sweep (plain and whitened each; default: exact SVD)",
    )
    p.add_argument("--configs", type=int, default=None, help="measure only the first N configurations")
    p.add_argument("--short-prompt-len", type=int, default=128)
    p.add_argument("--short-gen-len", type=int, default=32)
    p.add_argument("--long-prompt-len", type=int, default=2048, help="cached tokens before decoding (2048)")
    p.add_argument("--long-gen-len", type=int, default=16)
    p.add_argument("--speed-repeats", type=int, default=2, help="interleaved timed rounds (2)")
    p.add_argument(
        "--long-keys",
        nargs="*",
        default=["svd/plain"],
        help="configurations timed at the long context (default: exact SVD; rSVD and --whiten build the "
        "same modules and cache)",
    )
    p.add_argument("--no-throughput", action="store_true", help="skip the speed measurements")
    return p


def _spec(dec: str = "svd", whiten: bool = False, **setting: Any) -> dict[str, Any]:
    s = {**SEED, **setting}
    seed_setting = s == SEED
    key = f"{dec}/{'whiten' if whiten else 'plain'}"
    if not seed_setting:
        key += f"/{s['latent']}/{s['rope_selection']}/rope={s['rope_dim']}/r={s['kv_rank']}"
    return {"key": key, "decomposer_label": dec, "whiten": whiten, "seed_setting": seed_setting, **s}


def plan_configs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every configuration in run order (the seed's Table 2 first), each effective setting once."""
    d = 64  # head_dim of the built-in model; rank = kept numbers per KV head minus the rotary ones
    plan = [_spec(dec, w) for w in (False, True) for dec in ("svd", "rsvd")]
    plan.append(_spec(kv_rank=2 * d - SEED["rope_dim"]))  # full latent rank: the cost of partial RoPE alone
    for dec in args.sweep_decomposers:
        for w in (False, True):
            plan += [_spec(dec, w, kv_rank=round(f * 2 * d) - 8) for f in args.fractions]
    kept = SEED["rope_dim"] + SEED["kv_rank"]  # 40 of 128 numbers per KV head: 31.25 %
    for w in (False, True):  # unwhitened first: the whitened rows were added to the plan after them
        plan += [_spec(whiten=w, rope_dim=r, kv_rank=kept - r) for r in args.rope_dims]
        plan += [_spec(whiten=w, rope_selection=sel) for sel in SELECTIONS]
        plan += [_spec(whiten=w, latent="split")]
    unique = list({s["key"]: s for s in plan}.values())
    return unique[: args.configs] if args.configs else unique


def make_config(spec: dict[str, Any]):
    from lowrank.methods.mla import MLAConfig

    return MLAConfig(
        partial_rope="mha2mla",
        rope_dim=spec["rope_dim"],
        rope_selection=spec["rope_selection"],
        kv_rank=spec["kv_rank"],
        latent=spec["latent"],
        whiten=spec["whiten"],
        decomposer=dict(DECOMPOSERS[spec["decomposer_label"]]),
        calibration={"sequential": False},
    )


class Runner(CalibratedRunner):
    """The shared model, tokens and calibration statistics; measures one configuration."""

    def predicted_kv_bytes(self, cached_per_head: int) -> int:
        """layers × kv_heads × cached numbers per KV head × element size."""
        c = self.model.config
        size = next(self.model.parameters()).element_size()
        return c.num_hidden_layers * c.num_key_value_heads * cached_per_head * size

    def evaluate(self, model, cached_per_head: int) -> dict[str, Any]:
        from lowrank.evaluation import memory_report

        out: dict[str, Any] = {"perplexity": self.perplexity(model)}
        mem = memory_report(model, tokens=64)
        predicted = self.predicted_kv_bytes(cached_per_head)
        out.update(
            parameters=mem.parameters,
            kv_cache_class=mem.kv_cache_class,
            kv_bytes_per_token=mem.kv_cache_bytes_per_token,
            kv_bytes_predicted=predicted,
            kv_bytes_exact=mem.kv_cache_bytes_per_token == predicted,
        )
        return out

    def measure(self, spec: dict[str, Any]) -> dict[str, Any]:
        model, result = self.compressed(make_config(spec))
        details = result.details
        cached = details["rope_dim"]
        cached += details["kv_rank"]
        record = {
            **spec,
            "kv_fraction": details["kv_fraction"],
            "cached_per_kv_head": cached,
            "mean_relative_loss": details["mean_relative_loss"],
            "fallbacks": result.fallbacks,
            "conversion_seconds": result.time_total_s,
            "timings": result.timings,
            **self.evaluate(model, cached),
        }
        del model
        return record


def measure_speed(runner: Runner, plan: list[dict[str, Any]]) -> dict[str, Any]:
    """Prefill/decode speed of the baseline and the seed-setting models, interleaved, at two workloads."""
    from lowrank.evaluation import paired_throughput

    specs = {s["key"]: s for s in plan}
    a = runner.args
    converted = {
        k: runner.compressed(make_config(specs[k]))[0] for k in {*SPEED_KEYS, *a.long_keys} if k in specs
    }
    workloads = {
        "short": (a.short_prompt_len, a.short_gen_len, SPEED_KEYS),
        "long": (a.long_prompt_len, a.long_gen_len, a.long_keys),
    }
    out: dict[str, Any] = {}
    for name, (prompt, gen, keys) in workloads.items():
        models = {"baseline": runner.model, **{k: converted[k] for k in keys if k in converted}}
        t0 = time.perf_counter()
        res = paired_throughput(
            models, prompt_len=prompt, gen_len=gen, repeats=a.speed_repeats, progress=False
        )
        base = res["baseline"]
        out[name] = {
            "prompt_len": prompt,
            "gen_len": gen,
            "seconds": round(time.perf_counter() - t0, 1),
            "models": {
                k: {
                    **r.to_dict(),
                    "decode_ratio": r.decode_tokens_per_s / base.decode_tokens_per_s,
                    "prefill_ratio": r.prefill_tokens_per_s / base.prefill_tokens_per_s,
                }
                for k, r in res.items()
            },
        }
        print(
            f"speed {name} ({prompt}+{gen}): "
            + ", ".join(f"{k} decode ×{v['decode_ratio']:.3f}" for k, v in out[name]["models"].items()),
            flush=True,
        )
    return out


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("model", "calib_samples", "calib_seq_len", "windows", "windows_shakespeare")
    return {**{k: getattr(args, k) for k in keys}, "seed": args.calib_seed, "eval_seq_len": 512}


def _describe(rec: dict[str, Any]) -> str:
    return (
        f"wiki {ppl(rec):.4g}, shakespeare {ppl(rec, 'shakespeare'):.4g}, {rec['kv_bytes_per_token']:.0f} "
        f"B/token (predicted {rec['kv_bytes_predicted']}), convert {rec['conversion_seconds']:.2f} s"
    )


def _baseline(runner: Runner) -> dict[str, Any]:
    config = runner.model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {"key": "baseline", **runner.evaluate(runner.model, 2 * head_dim)}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    sweep = Sweep(args, "mla", _settings(args))
    runner = Runner(args)
    plan = plan_configs(args)
    sweep.run([{"key": "baseline"}], lambda spec: _baseline(runner))
    sweep.run(plan, runner.measure, _describe, refused=(ValueError, RuntimeError))
    sweep.state["calibration_seconds"] = sweep.state.get("calibration_seconds") or runner.stats_seconds
    if not args.no_throughput:
        start = time.perf_counter()
        sweep.once("throughput", lambda: measure_speed(runner, plan))
        sweep.state.setdefault("throughput_seconds", round(time.perf_counter() - start, 1))
    payload = {
        "conventions": CONVENTIONS,
        "calibration_tokens": int(runner.calib.numel()),
        "calibration_seconds": sweep.state.get("calibration_seconds"),
        "configs": sweep.rows,
        "throughput": sweep.state.get("throughput"),
        "throughput_seconds": sweep.state.get("throughput_seconds"),
        "missing": sweep.missing(plan),
        "errors": sweep.state.get("errors", {}),
    }
    payload["targets"] = targets({**payload, "settings": sweep.state["settings"]})
    return sweep.finish(
        payload,
        markdown,
        lambda p, out_dir, stem: [figure(p, out_dir, stem)],
        lambda p: {
            **kv_final(p),
            "targets": {t["name"]: t["status"] for t in p["targets"]},
        },
    )


CONVENTIONS = {
    "kv_fraction": "cached K/V numbers KEPT per token and layer: (rope_dim + kv_rank) / (2·head_dim)",
    "kv_rank": "latent numbers cached per token and KV head (split: key + value latents)",
    "kv_bytes_per_token": "bytes of every tensor in the model's real cache after a 64-token forward "
    "pass, per token (lowrank.evaluation.memory_report)",
    "kv_bytes_predicted": "layers × kv_heads × (rope_dim + kv_rank) × element size",
    "conversion_seconds": "the compress call alone (result.time_total_s); the shared calibration "
    "pass is timed apart (calibration_seconds)",
    "ratios": "speed ratios are against the baseline measured interleaved in the same run",
}


if __name__ == "__main__":
    sys.exit(main())
