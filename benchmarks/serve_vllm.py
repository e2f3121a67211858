"""A DeepSeek-layout export of the built-in model served by vLLM (CPU): greedy tokens against transformers'.

    make serve-vllm                                   # makes .venv-vllm (about 3.5 GB), then runs:
    python -m benchmarks.serve_vllm --vllm-python .venv-vllm/bin/python

The built-in model is converted by ``mla`` (``--partial-rope rorope``) with a rotary key of 64 and every
position-free direction kept (latent 320 = 384 − 64, position-free queries of 64), and exported as stock
DeepSeek-V3 laid out for vLLM (``lowrank export --engine vllm --kv-lora-rank 512``): interleaved pairs, an
untied ``lm_head`` (vLLM's DeepSeek-V3 model does not tie it), the RoPE written as YaRN of factor 1 (the same
rotation; vLLM's CPU rotary kernel mis-rotates MLA queries under the default RoPE, see
``vllm_rope_check.py``, which this benchmark also runs) and, for the only shape vLLM's CPU MLA kernel takes,
the latent padded with zeros to 512 beside the rotary key of 64, block size 16. 512 + 64 = 576 cached
numbers per token and layer is above the original's 384: this is a correctness check of the layout in a
serving engine, not a saving.

In the vLLM venv, by a driver that imports neither lowrank nor this package (``_vllm_driver.py``): stock
transformers greedy-decodes every prompt from the export with ``DynamicCache``, then vLLM's offline ``LLM``
does the same (temperature 0, ``ignore_eos``), both in float32. Prompts: the first ``--prompt-len`` tokens of
``--prompts`` windows spread over wiki-test and shakespeare. lowrank's own runtime decodes them too (the
converted model before export). Reported: prompts whose new tokens all agree, tokens agreeing before the
first difference, and the position of each first difference.

Conventions: ``prompt_match_rate`` = prompts with identical new tokens / prompts; ``token_match_rate`` =
new tokens before each prompt's first difference / all new tokens. Writes
``results/serve_vllm_cpu.{json,md}``; the last line printed is one JSON line.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks._common import compressed_copy, kv_statistics, load_for_evaluation, perplexities
from benchmarks._sweep import RUN_FLAGS, Sweep, calibration_config, parser, settings

ENGINE_SHAPE = {"rope_dim": 64, "kv_lora_rank": 512}
"""vLLM's CPU MLA kernel: latent 512 + rotary key 64 (head_dim 576), interleaved pairs, block size 16."""


def _parser():
    p = parser(__doc__, "serve_vllm_cpu", calibration={"samples": 16, "seq_len": 512}, windows=(4, 2))
    p.add_argument("--vllm-python", required=True, help="the interpreter of a venv with vllm-cpu installed")
    p.add_argument("--prompts", type=int, default=12, help="prompts (12: 8 wiki-test, 4 shakespeare)")
    p.add_argument("--prompt-len", type=int, default=48, help="prompt tokens (48)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="greedy tokens per prompt (32)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds the vLLM driver may take (1800)")
    p.add_argument(
        "--memory-fraction",
        type=float,
        default=0.25,
        help="share of the machine's memory vLLM reserves (its gpu_memory_utilization, which on the CPU "
        "backend reserves CPU memory and refuses to start when that much is not free; 0.25)",
    )
    return p


def prompts(eval_ids: dict[str, tuple[Any, int]], count: int, length: int) -> list[list[int]]:
    """``count`` prompts of ``length`` tokens: two thirds from wiki-test, the rest from shakespeare, each
    from its own evenly spaced position."""
    wiki = max(1, round(count * 2 / 3))
    out = []
    for corpus, n in (("wiki", wiki), ("shakespeare", count - wiki)):
        ids = eval_ids[corpus][0]
        step = (ids.numel() - length) // max(n, 1)
        out += [ids[i * step : i * step + length].tolist() for i in range(n)]
    return out


def agreement(reference: list[list[int]], other: list[list[int]]) -> dict[str, Any]:
    """Prompt- and token-level agreement of two engines' new tokens (see the module docstring)."""
    first = []
    for a, b in zip(reference, other, strict=True):
        diff = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        first.append(diff if diff is not None or len(a) == len(b) else min(len(a), len(b)))
    total = sum(map(len, reference))
    agreed = sum(len(a) if d is None else d for a, d in zip(reference, first, strict=True))
    return {
        "prompt_match_rate": sum(d is None for d in first) / len(first),
        "token_match_rate": agreed / total,
        "first_difference": first,
    }


def lowrank_tokens(model, batch: list[list[int]], new: int) -> list[list[int]]:
    import torch

    out = []
    with torch.no_grad():
        for ids in batch:
            gen = model.generate(torch.tensor([ids]), max_new_tokens=new, min_new_tokens=new, do_sample=False)
            out.append(gen[0, len(ids) :].tolist())
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    vllm_python = Path(args.vllm_python)
    if not vllm_python.is_file():
        raise SystemExit(f"--vllm-python {vllm_python} does not exist; make serve-vllm creates .venv-vllm")
    import torch

    from lowrank.io.data import calibration_batches, load_text
    from lowrank.loading.export_deepseek import LATENT_NORM_EPS, engine_settings, export_deepseek_v3
    from lowrank.methods import MLAConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    measured = [k for k in vars(args) if k not in RUN_FLAGS and k != "vllm_python"]  # a path of this machine
    sweep = Sweep(args, "serve_vllm", settings(args, *measured))
    original, tokenizer, eval_ids = load_for_evaluation(args)
    if "serve" not in sweep.rows:  # a resumed run reports what it measured
        calib = calibration_batches(
            tokenizer, load_text("wiki", "calibration"), args.calib_samples, args.calib_seq_len, seed=0
        )
        vllm_eps = engine_settings("vllm", original.config.rms_norm_eps)["epsilon"]
        stats, _ = kv_statistics(original, calib)
        full = 2 * 3 * 64 - ENGINE_SHAPE["rope_dim"]  # every position-free direction of the built-in model
        config = MLAConfig(
            rope_dim=ENGINE_SHAPE["rope_dim"],
            kv_lora_rank=full,
            qk_nope_dim=64,
            calibration=calibration_config(args, sequential=False),
        )
        model, result = compressed_copy(original, config, stats)
        batch = prompts(eval_ids, args.prompts, args.prompt_len)
        sweep.once(
            "quality",
            lambda: {
                "original": perplexities(original, eval_ids),
                "converted": perplexities(model, eval_ids),
            },
        )
        ours = lowrank_tokens(model, batch, args.max_new_tokens)
        with tempfile.TemporaryDirectory() as tmp:
            # vLLM's DeepSeek model builds kv_a_layernorm with rms_norm_eps; transformers' with 1e-6. The
            # δ-scaled latent makes the norm linear with gain sqrt(ε)/δ, so transformers reads the vLLM
            # layout with its own ε: the two exports differ in that one number.
            out, engine_out = Path(tmp) / "export", Path(tmp) / "export-vllm"
            for directory, epsilon in ((out, LATENT_NORM_EPS), (engine_out, vllm_eps)):
                export_deepseek_v3(
                    model,
                    directory,
                    tokenizer=tokenizer,
                    calibration=calib[:4],
                    engine="vllm",
                    kv_lora_rank=ENGINE_SHAPE["kv_lora_rank"],
                    epsilon=epsilon,
                )
            manifest = json.loads((engine_out / "lowrank.json").read_text())
            spec = {
                "prompts": batch,
                "max_new_tokens": args.max_new_tokens,
                "dtype": "float32",
                "memory_fraction": args.memory_fraction,
            }
            (Path(tmp) / "prompts.json").write_text(json.dumps(spec))
            driver = Path(__file__).with_name("_vllm_driver.py")
            run = subprocess.run(
                [
                    str(vllm_python),
                    str(driver),
                    str(out),
                    f"{tmp}/prompts.json",
                    f"{tmp}/tokens.json",
                    str(engine_out),
                ],
                capture_output=True,
                text=True,
                timeout=args.timeout,
            )
            if run.returncode != 0:
                raise SystemExit(f"the vLLM driver failed (rc {run.returncode}):\n{run.stderr[-4000:]}")
            engines = json.loads((Path(tmp) / "tokens.json").read_text())
        check = subprocess.run(
            [str(vllm_python), str(Path(__file__).with_name("vllm_rope_check.py"))],
            capture_output=True,
            text=True,
            timeout=args.timeout,
        )
        if check.returncode != 0:
            raise SystemExit(f"vllm_rope_check.py failed (rc {check.returncode}):\n{check.stderr[-4000:]}")
        rope_check = json.loads(check.stdout.strip().splitlines()[-1])
        stock = engines["transformers"]["tokens"]
        sweep.rows["serve"] = {
            "conversion": {
                "config": result.config,
                "seconds": round(result.time_total_s, 1),
                "kv_bytes_per_token": result.kv_bytes_per_token_after,
            },
            "export": {
                "cached_numbers_per_token_and_layer": manifest["cached_numbers_per_token_and_layer"],
                "latent": manifest["latent"],
                "rope_interleave": manifest["rope_interleave"],
                "rope_parameters": manifest["rope_parameters"],
                "latent_norm_eps": {"transformers": LATENT_NORM_EPS, "vllm": vllm_eps},
            },
            "engines": {
                name: {f: v for f, v in engine.items() if f != "tokens"}
                for name, engine in engines.items()
                if name in ("transformers", "vllm")
            },
            "driver_imported_lowrank": engines["lowrank_imported"],
            "vllm_rope_check": rope_check,
            "vllm_vs_transformers": agreement(stock, engines["vllm"]["tokens"]),
            "transformers_vs_lowrank": agreement(ours, stock),
            "vllm_vs_lowrank": agreement(ours, engines["vllm"]["tokens"]),
            "tokens": {"lowrank": ours, "transformers": stock, "vllm": engines["vllm"]["tokens"]},
        }
        sweep.save()
    payload = {"quality": sweep.state["quality"], "vllm_rope_check": None, **sweep.rows["serve"]}
    payload["prompts"] = args.prompts
    payload["conventions"] = {
        "prompt_match_rate": "prompts whose new tokens are all identical / prompts",
        "token_match_rate": "new tokens before each prompt's first difference / all new tokens",
    }
    return sweep.finish(
        payload,
        markdown,
        final=lambda p: {
            "prompt_match_rate": p["vllm_vs_transformers"]["prompt_match_rate"],
            "token_match_rate": p["vllm_vs_transformers"]["token_match_rate"],
        },
    )


def _rope_form(parameters: dict[str, Any] | None) -> str:
    """How the export writes its RoPE (absent from results made before it was recorded)."""
    if not parameters:
        return "a RoPE form these results do not record"
    if parameters.get("rope_type") == "yarn":
        return f"YaRN of factor {parameters['factor']:g} (θ = {parameters['rope_theta']:g})"
    return f"the default RoPE (θ = {parameters['rope_theta']:g})"


def _rope_check_text(check: dict[str, Any] | None) -> str:
    """What ``vllm_rope_check.py`` found in this vLLM (absent from results made before it ran)."""
    if not check:
        return "vllm_rope_check.py was not run with these results."
    e = check["errors"]
    return (
        f"vllm_rope_check.py in vLLM {check['vllm']} (a 3-D query of 7 tokens × 9 heads × 64, as MLA passes "
        f"it; largest error against a float64 reference): default RoPE ({e['default']['class']}) "
        f"{e['default']['query']:.2e} on the query, {e['default']['key']:.2e} on the key; DeepSeek YaRN of "
        f"factor 1 ({e['deepseek_yarn factor 1']['class']}) {e['deepseek_yarn factor 1']['query']:.2e}. "
        "The export writes the second form, which stock transformers computes bit for bit as the default."
    )


def markdown(p: dict[str, Any]) -> str:
    from lowrank.cli._common import format_table

    env, s = p["env"], p["settings"]
    rows = [
        (name, f"{r['prompt_match_rate']:.3f}", f"{r['token_match_rate']:.3f}", str(r["first_difference"]))
        for name, r in (
            ("vLLM vs transformers", p["vllm_vs_transformers"]),
            ("transformers vs lowrank", p["transformers_vs_lowrank"]),
            ("vLLM vs lowrank", p["vllm_vs_lowrank"]),
        )
    ]
    engines = [
        (e["engine"], f"{e['load_seconds']:.1f}", f"{e['generate_seconds']:.1f}")
        for e in p["engines"].values()
    ]
    q = p["quality"]
    return "\n\n".join(
        [
            f"# The DeepSeek-V3 export served by vLLM on {env['device_name']}",
            f"{s['model']} converted by mla rorope (rotary key 64, latent 320, position-free queries 64; "
            f"wiki {q['original']['wiki']:.2f} → {q['converted']['wiki']:.2f}, shakespeare "
            f"{q['original']['shakespeare']:.2f} → {q['converted']['shakespeare']:.2f}), exported with the "
            f"latent padded to {p['export']['latent']['written']}, interleaved rotary pairs and the RoPE "
            f"written as {_rope_form(p['export'].get('rope_parameters'))}: "
            f"{p['export']['cached_numbers_per_token_and_layer']} cached numbers per token and layer, above "
            "the original's 384 (a correctness check of the layout in an engine, not a saving). "
            f"{p['prompts']} prompts of {s['prompt_len']} tokens, {s['max_new_tokens']} greedy tokens each, "
            f"float32. torch {env['torch']}, git {env['git_sha']}.",
            "Two exports of the same conversion, differing only in the latent norm's assumed ε (the δ-scaled "
            "latent makes kv_a_layernorm linear with gain √ε/δ): transformers builds that norm with "
            f"ε = {p['export']['latent_norm_eps']['transformers']:g}, vLLM 0.32 with the config's "
            f"rms_norm_eps = {p['export']['latent_norm_eps']['vllm']:g}; each engine loads the export made "
            "for its ε.",
            _rope_check_text(p["vllm_rope_check"]),
            "The driver that ran transformers and vLLM imported lowrank: "
            f"{'yes' if p['driver_imported_lowrank'] else 'no'}.",
            format_table(rows, ["comparison", "prompt match", "token match", "first difference per prompt"]),
            "`prompt match` = prompts with identical new tokens / prompts; `token match` = new tokens before "
            "each prompt's first difference / all new tokens; `None` = no difference.",
            format_table(engines, ["engine", "load s", "generate s"]),
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
