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
import os
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._common import RESULTS_DIR, compressed_copy, env_info, final_line, kv_statistics, open_run

DECOMPOSERS = {  # label -> DecomposerConfig fields
    "svd": {"name": "svd"},
    "rsvd": {"name": "rsvd", "oversample": 10, "power_iters": 2},
}
SEED = {"rope_dim": 8, "kv_rank": 32, "rope_selection": "2-norm", "latent": "joint"}
"""The seed's setting (MHA2MLA's): 8 rotary features and a joint latent of 32 per KV head."""
SELECTIONS = ("2-norm", "high", "low", "uniform")
SPEED_KEYS = ("svd/plain", "rsvd/plain", "svd/whiten")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib-samples", type=int, default=32, help="wiki calibration windows (default 32)")
    p.add_argument("--calib-seq-len", type=int, default=512, help="tokens per calibration window (512)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration draw (default 0)")
    p.add_argument("--windows", type=int, default=8, help="wiki test windows of 512 tokens (default 8)")
    p.add_argument("--windows-shakespeare", type=int, default=4, help="shakespeare test windows (4)")
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
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--resume", action="store_true", help="skip configurations in the partial file")
    p.add_argument("--report-only", action="store_true", help="write the report from the partial file only")
    p.add_argument("--note", action="append", default=[], help="a line for the report's notes (repeatable)")
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--out-name", default="mla_cpu", help="results file stem")
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
        rope_dim=spec["rope_dim"],
        rope_selection=spec["rope_selection"],
        kv_rank=spec["kv_rank"],
        latent=spec["latent"],
        whiten=spec["whiten"],
        decomposer=dict(DECOMPOSERS[spec["decomposer_label"]]),
        calibration={"sequential": False},
    )


class Runner:
    """Holds the model, the evaluation tokens and the shared calibration statistics."""

    def __init__(self, args: argparse.Namespace) -> None:
        from lowrank.io.data import calibration_batches, load_text, tokenize
        from lowrank.loading.models import load_model

        self.args = args
        self.model, self.tokenizer = load_model(args.model)
        tok = self.tokenizer
        self.eval_ids = {
            "wiki": (tokenize(tok, load_text("wiki", "test")), args.windows),
            "shakespeare": (tokenize(tok, load_text("shakespeare", "test")), args.windows_shakespeare),
        }
        self.calib = calibration_batches(
            tok, load_text("wiki", "calibration"), args.calib_samples, args.calib_seq_len, seed=args.seed
        )
        self._stats = None
        self.stats_seconds = None

    @property
    def stats(self):
        """The shared calibration statistics (:func:`_common.kv_statistics`), collected on first use."""
        if self._stats is None:
            self._stats, self.stats_seconds = kv_statistics(self.model, self.calib)
        return self._stats

    def predicted_kv_bytes(self, cached_per_head: int) -> int:
        """layers × kv_heads × cached numbers per KV head × element size."""
        c = self.model.config
        size = next(self.model.parameters()).element_size()
        return c.num_hidden_layers * c.num_key_value_heads * cached_per_head * size

    def evaluate(self, model, cached_per_head: int) -> dict[str, Any]:
        from lowrank.evaluation import memory_report, perplexity

        out: dict[str, Any] = {"perplexity": {}}
        for corpus, (ids, windows) in self.eval_ids.items():
            start = time.perf_counter()
            r = perplexity(model, self.tokenizer, ids, seq_len=512, max_windows=windows, progress=False)
            out["perplexity"][corpus] = {**r.to_dict(), "seconds": round(time.perf_counter() - start, 1)}
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

    def compressed(self, spec: dict[str, Any]):
        """A compressed deep copy of the model and the compression result."""
        return compressed_copy(self.model, make_config(spec), self.stats)

    def measure(self, spec: dict[str, Any]) -> dict[str, Any]:
        model, result = self.compressed(spec)
        details = result.details
        cached = details["rope_dim (rotary features kept per KV head)"]
        cached += details["kv_rank (latent numbers per KV head)"]
        record = {
            **spec,
            "kv_fraction": details["kv_fraction (KV-cache numbers KEPT)"],
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
    converted = {k: runner.compressed(specs[k])[0] for k in {*SPEED_KEYS, *a.long_keys} if k in specs}
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
    keys = ("model", "calib_samples", "calib_seq_len", "seed", "windows", "windows_shakespeare")
    return {**{k: getattr(args, k) for k in keys}, "eval_seq_len": 512}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    from lowrank.io.files import write_json

    state, partial, load_before, started = open_run(args, _settings(args))
    done = state["configs"]
    runner = Runner(args)
    plan = plan_configs(args)
    if not args.report_only:
        if "baseline" not in done:
            head_dim = runner.model.config.hidden_size // runner.model.config.num_attention_heads
            head_dim = getattr(runner.model.config, "head_dim", None) or head_dim
            done["baseline"] = {"key": "baseline", **runner.evaluate(runner.model, 2 * head_dim)}
            write_json(partial, state)
        for i, spec in enumerate(plan):
            if spec["key"] in done:
                continue
            t0 = time.perf_counter()
            try:
                rec = runner.measure(spec)
            except (ValueError, RuntimeError) as err:  # a setting the method refuses: record it, go on
                state.setdefault("errors", {})[spec["key"]] = f"{type(err).__name__}: {err}"
                write_json(partial, state)
                print(f"[{i + 1}/{len(plan)}] {spec['key']}: {state['errors'][spec['key']]}", flush=True)
                continue
            done[spec["key"]] = rec
            state["calibration_seconds"] = state.get("calibration_seconds") or runner.stats_seconds
            write_json(partial, state)
            print(
                f"[{i + 1}/{len(plan)}] {spec['key']}: wiki {rec['perplexity']['wiki']['perplexity']:.4g}, "
                f"shakespeare {rec['perplexity']['shakespeare']['perplexity']:.4g}, "
                f"{rec['kv_bytes_per_token']:.0f} B/token (predicted {rec['kv_bytes_predicted']}), "
                f"convert {rec['conversion_seconds']:.2f} s, {time.perf_counter() - t0:.0f} s",
                flush=True,
            )
        if not args.no_throughput and "throughput" not in state:
            t0 = time.perf_counter()
            state["throughput"] = measure_speed(runner, plan)
            state["throughput_seconds"] = round(time.perf_counter() - t0, 1)
            write_json(partial, state)
    return _finish(args, state, runner, plan, load_before, time.perf_counter() - started)


def _finish(args, state, runner, plan, load_before, seconds) -> int:
    import torch

    from benchmarks._mla_report import figure, markdown, targets
    from lowrank.io.files import write_json, write_text

    env = env_info("cpu")
    if not args.report_only:  # every invocation's wall time, so a resumed run reports its total
        state.setdefault("invocation_seconds", []).append(round(seconds, 1))
        load = {"start": round(load_before[0], 2), "end": round(os.getloadavg()[0], 2)}
        state.setdefault("invocation_load_average_1min", []).append(load)
        write_json(args.results_dir / f"{args.out_name}.partial.json", state)
    payload = {
        "benchmark": "mla",
        "conventions": {
            "kv_fraction": "cached K/V numbers KEPT per token and layer: (rope_dim + kv_rank) / (2·head_dim)",
            "kv_rank": "latent numbers cached per token and KV head (split: key + value latents)",
            "kv_bytes_per_token": "bytes of every tensor in the model's real cache after a 64-token forward "
            "pass, per token (lowrank.evaluation.memory_report)",
            "kv_bytes_predicted": "layers × kv_heads × (rope_dim + kv_rank) × element size",
            "conversion_seconds": "the compress call alone (result.time_total_s); the shared calibration "
            "pass is timed apart (calibration_seconds)",
            "ratios": "speed ratios are against the baseline measured interleaved in the same run",
        },
        "settings": state["settings"],
        "calibration_tokens": int(runner.calib.numel()),
        "calibration_seconds": state.get("calibration_seconds"),
        "configs": state["configs"],
        "throughput": state.get("throughput"),
        "throughput_seconds": state.get("throughput_seconds"),
        "env": env,
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": state.get("invocation_load_average_1min", []),
        "wall_seconds": round(sum(state.get("invocation_seconds", [])), 1),
        "invocation_seconds": state.get("invocation_seconds", []),
        "notes": args.note,
        "missing": [s["key"] for s in plan if s["key"] not in state["configs"]],
        "errors": state.get("errors", {}),
    }
    payload["targets"] = targets(payload)
    if not args.no_figures:
        payload["figures"] = [f for f in [figure(payload, args.results_dir, args.out_name)] if f]
    text = markdown(payload)
    write_json(args.results_dir / f"{args.out_name}.json", payload)
    write_text(args.results_dir / f"{args.out_name}.md", text)
    print(text)
    base = state["configs"]["baseline"]
    print(
        final_line(
            benchmark="mla",
            device=env["device_name"],
            torch=env["torch"],
            git_sha=env["git_sha"],
            configs=len(state["configs"]) - 1,
            ppl_wiki_baseline=round(base["perplexity"]["wiki"]["perplexity"], 3),
            kv_bytes_per_token_baseline=base["kv_bytes_per_token"],
            targets={t["name"]: t["status"] for t in payload["targets"]},
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
