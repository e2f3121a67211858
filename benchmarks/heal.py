"""Healing on the built-in model: perplexity before and after a distillation fine-tune, per method and budget.

    python -m benchmarks.heal                                  # the full grid (results/heal_cpu.*)
    python -m benchmarks.heal --tokens 50000 --configs 0 1     # a subset: budgets and configuration indices
    python -m benchmarks.heal --resume                         # continue an interrupted run
    python -m benchmarks.heal --report-only                    # rewrite the report from the partial file
    python -m benchmarks.heal --configs 0 --tokens 50000 --source teacher   # on text the original samples
    python -m benchmarks.heal --configs 0 --tokens 50000 --temperatures 1 2 --kd-weights 0.9 1  # objectives
    python -m benchmarks.heal --configs 3 --tokens 50000 --hidden-weights 0 1   # with hidden-state matching
    python -m benchmarks.heal --configs 0 --tokens 2048 --calib-samples 2 --calib-seq-len 128 \\
        --windows 1 --windows-shakespeare 1 --heldout-sequences 2 --results-dir /tmp/heal_smoke  # smoke test

For every configuration (a compression method at one setting) the script compresses a fresh copy of the
model once, measures its perplexity, then for every token budget heals a copy of the compressed model
against the original (``lowrank.training.healing.heal``, the teacher in memory, ``HealConfig`` defaults unless
given) and measures it again, on the same wiki-test and shakespeare windows as the original in the same
run. Healing trains on the wiki ``calibration`` split, disjoint from the ``test`` split evaluated here,
or with ``--source teacher`` on sequences the original samples itself (``lowrank.training.teacher_text``,
cached);
shakespeare is out of domain and never trained on. Budgets run in ascending order over all configurations,
so an interrupted run has the small budgets of every configuration first; each finished (configuration,
budget) is written to ``<results-dir>/<out-name>.partial.json`` and ``--resume`` continues from it. The
run's own scratch lives in ``<results-dir>/<out-name>.work/``: every compressed model (``compressed/``,
reloaded on ``--resume`` so a resumed run heals exactly the same weights) and the checkpoint of the
healing run in progress (``checkpoints/``, saved every ``HealConfig.checkpoint_minutes``, removed when
the run finishes), so ``--resume`` continues a long run from its last checkpoint, not from its start.

Recovered fraction = (ln ppl_compressed − ln ppl_healed) / (ln ppl_compressed − ln ppl_original): 1 is the
original's perplexity, 0 no gain; the target is at least 0.5. Weight bytes and KV-cache bytes per token are
measured after healing and must equal the compressed model's. The last line printed is one JSON line with
device, torch version and git SHA.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import itertools
import re
import sys
import time
from typing import Any

from benchmarks._common import load_for_evaluation, perplexities
from benchmarks._heal_report import objective_defaults
from benchmarks._heal_report import reference_key as _reference_key
from benchmarks._sweep import Sweep, parser, settings
from lowrank.training.healing import PRECISIONS, SOURCES
from lowrank.training.trainable import TRAINABLE

CONFIGS: list[tuple[str, dict[str, Any]]] = [
    # measured with the uniform allocation (before "auto" became svd-llm-v2's default)
    ("svd-llm-v2 20 % removed", {"method": "svd-llm-v2", "ratio": 0.2, "allocation": "uniform"}),
    ("svd-llm-v2 40 % removed", {"method": "svd-llm-v2", "ratio": 0.4, "allocation": "uniform"}),
    ("mla seed (31.25 % KV)", {"method": "mla", "partial_rope": "mha2mla", "rope_dim": 8, "kv_rank": 32}),
    ("mla 50 % KV", {"method": "mla", "partial_rope": "mha2mla", "rope_dim": 8, "kv_rank": 56}),
    (
        "kv-projection kq pre-RoPE R/d 0.5",
        {"method": "kv-projection", "kv_method": "kq", "rope": "pre", "rank_fraction": 0.5},
    ),
    # the DeepSeek-layout conversion at the seed's budget (120 numbers: rope 32 + latent 88): with
    # TransMLA's settings, then with mla's defaults (chosen on calibration text), each named in full
    (
        "mla rorope 32 + 88, TransMLA's freqfold 1 + kv latent (31.25 % KV)",
        {
            "method": "mla",
            "partial_rope": "rorope",
            "rope_dim": 32,
            "kv_lora_rank": 88,
            "freqfold": 1,
            "latent_objective": "kv",
        },
    ),
    (
        "mla rorope 32 + 88, default freqfold 4 + attention latent (31.25 % KV)",
        {
            "method": "mla",
            "partial_rope": "rorope",
            "rope_dim": 32,
            "kv_lora_rank": 88,
            "freqfold": 4,
            "latent_objective": "attention",
        },
    ),
]
TARGET = 0.5
# the distillation objective's fields, as result keys name them
_SHORT = {"kd_weight": "kd", "temperature": "T", "hidden_weight": "h"}


def _parser() -> argparse.ArgumentParser:
    p = parser(__doc__, "heal_cpu", calibration={"samples": 32, "seq_len": 512}, windows=(8, 4))
    p.add_argument(
        "--configs",
        type=int,
        nargs="+",
        default=None,
        help=f"indices into the configuration list (0–{len(CONFIGS) - 1}; default: all)",
    )
    p.add_argument(
        "--tokens",
        type=int,
        nargs="+",
        default=[50_000, 200_000, 400_000],
        help="healing token budgets (default 50000 200000 400000)",
    )
    p.add_argument(
        "--learning-rates",
        type=float,
        nargs="+",
        default=None,
        help="peak learning rates to compare (default: HealConfig's)",
    )
    p.add_argument(
        "--trainable",
        nargs="+",
        default=["auto"],
        choices=TRAINABLE,
        help="what trains, each compared (HealConfig.trainable; default auto, recorded as what it means)",
    )
    p.add_argument(
        "--kd-weights",
        type=float,
        nargs="+",
        default=None,
        help="distillation weights w to compare (HealConfig.kd_weight; 1 − w goes to cross-entropy)",
    )
    p.add_argument(
        "--temperatures",
        type=float,
        nargs="+",
        default=None,
        help="distillation temperatures to compare (HealConfig.temperature)",
    )
    p.add_argument(
        "--hidden-weights",
        type=float,
        nargs="+",
        default=None,
        help="weights of the hidden-state term to compare (HealConfig.hidden_weight; 0: logits only)",
    )
    p.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="healing compute (HealConfig.precision; default auto: bfloat16 where the CPU has it natively)",
    )
    p.add_argument(
        "--source",
        default="corpus",
        choices=SOURCES,
        help="healing text (HealConfig.source): wiki calibration text, or sequences the original samples",
    )
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (HealConfig default)")
    p.add_argument(
        "--heldout-sequences", type=int, default=None, help="held-out sequences (HealConfig default)"
    )
    p.add_argument(
        "--checkpoint-minutes",
        type=float,
        default=None,
        help="save the healing run in progress this often (HealConfig default; --resume continues it)",
    )
    return p


def _heal_overrides(args) -> dict[str, Any]:
    names = ("batch_size", "heldout_sequences")
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def _slug(text: str) -> str:
    """``text`` as one file name: runs of anything but letters, digits, '.', '=' and '-' become '_'."""
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", text).strip("_")


class _Run:
    """The original model, its tokenizer, the evaluation windows and the compressed models (made once)."""

    def __init__(self, args) -> None:
        self.args = args
        self.model, self.tokenizer, self.eval_ids = load_for_evaluation(args)
        self.work = args.results_dir / f"{args.out_name}.work"
        self._compressed: dict[int, tuple[Any, dict[str, Any]]] = {}

    def measure(self, model) -> dict[str, Any]:
        from lowrank.evaluation import memory_report
        from lowrank.methods import weight_bytes

        kv = memory_report(model).kv_cache_bytes_per_token
        return {
            "perplexity": perplexities(model, self.eval_ids, self.tokenizer),
            "weight_bytes": weight_bytes(model),
            "kv_bytes_per_token": kv,
        }

    def compressed(self, index: int) -> tuple[Any, dict[str, Any]]:
        """The model compressed with configuration ``index`` and its measurements (made on first use, kept
        in the work folder; ``--resume`` reloads it from there, its compression time then unknown)."""
        if index not in self._compressed:
            from lowrank.calibration.layerwise import fingerprint
            from lowrank.calibration.pipeline import calibration_tokens
            from lowrank.loading.serialization import is_compressed_dir, load_compressed, save_compressed
            from lowrank.methods import compress, config_from_dict

            calibration = {"samples": self.args.calib_samples, "seq_len": self.args.calib_seq_len}
            settings = {**CONFIGS[index][1], "calibration": calibration}
            digest = fingerprint(self.args.model, settings)[:12]
            saved = self.work / "compressed" / f"{_slug(CONFIGS[index][0])}-{digest}"
            if self.args.resume and is_compressed_dir(saved):
                model, _ = load_compressed(saved)
                info = {"compress_seconds": None, **self.measure(model)}
            else:
                model = copy.deepcopy(self.model)
                start = time.perf_counter()
                config = config_from_dict(settings)
                compress(model, config, calibration=calibration_tokens(config.calibration, self.tokenizer))
                info = {"compress_seconds": round(time.perf_counter() - start, 1), **self.measure(model)}
                save_compressed(model, saved)
            self._compressed[index] = (model, info)
        return self._compressed[index]

    def heal_config(
        self,
        tokens: int,
        learning_rate: float | None = None,
        trainable: str = "replaced",
        objective: dict[str, float] | None = None,
    ):
        """``HealConfig`` of one run; ``objective`` overrides ``kd_weight``, ``temperature`` and
        ``hidden_weight``."""
        from lowrank.methods import HealConfig

        overrides = _heal_overrides(self.args)  # in the settings a resumed run must match; the next is not
        if self.args.checkpoint_minutes is not None:
            overrides["checkpoint_minutes"] = self.args.checkpoint_minutes
        return HealConfig(
            teacher=self.args.model,
            tokens=tokens,
            learning_rate=learning_rate,
            trainable=trainable,
            **(objective or {}),
            precision=self.args.precision,
            source=self.args.source,
            calibration={"seq_len": self.args.calib_seq_len},
            **overrides,
        )

    def text(self, config) -> tuple[Any, float]:
        """(token ids healing trains on, seconds to make them): wiki calibration sequences, or for
        ``source='teacher'`` as many sequences sampled by the original (kept in the cache directory)."""
        from lowrank.calibration.pipeline import calibration_tokens
        from lowrank.training.teacher_text import teacher_sequences

        if config.source == "corpus":
            return calibration_tokens(config.calibration, self.tokenizer), 0.0
        start = time.perf_counter()
        cal = config.calibration
        ids = teacher_sequences(self.model, cal.samples, cal.seq_len, seed=config.seed)
        return ids, round(time.perf_counter() - start, 1)

    def heldout_ce(self, tokens: int, compute: str, source: str = "corpus") -> float:
        """The original model's cross-entropy on the held-out sequences of a ``tokens`` budget, computed
        under the same autocast as healing's held-out evaluations (their reference point)."""
        import torch

        from lowrank.training.healing import autocast_dtype, split_tokens
        from lowrank.training.losses import distillation_loss

        config = dataclasses.replace(self.heal_config(tokens), source=source)
        _, heldout = split_tokens(self.text(config)[0], config)
        total = 0.0
        amp = autocast_dtype(compute, "cpu")
        for chunk in heldout.split(config.batch_size):
            with torch.no_grad(), torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
                logits = self.model(chunk, use_cache=False).logits
            _, _, ce = distillation_loss(logits, None, chunk, temperature=1.0, kd_weight=0.0)
            total += float(ce) * len(chunk)
        return total / len(heldout)

    def healed(
        self,
        index: int,
        key: str,
        tokens: int,
        learning_rate: float,
        trainable: str,
        objective: dict[str, float],
    ) -> dict[str, Any]:
        """Heal a copy of compressed model ``index`` (checkpointed in the work folder under ``key``: a
        ``--resume`` continues from the last checkpoint, a fresh run starts afresh) and measure it."""
        from lowrank.training.checkpoints import CHECKPOINT_FILE, CheckpointError
        from lowrank.training.healing import heal

        compressed, _ = self.compressed(index)
        config = self.heal_config(tokens, learning_rate, trainable, objective)
        ids, sample_seconds = self.text(config)
        student = copy.deepcopy(compressed)
        checkpoints = self.work / "checkpoints" / _slug(f"{CONFIGS[index][0]}-{key}")
        if not self.args.resume:
            (checkpoints / CHECKPOINT_FILE).unlink(missing_ok=True)
        start = time.perf_counter()
        try:
            details = heal(student, self.model, ids, config, checkpoint_dir=checkpoints)
        except CheckpointError as e:  # only a --resume finds one: a fresh run deleted it above
            raise SystemExit(f"{e}; or run without --resume to heal {key} afresh") from None
        wall = round(time.perf_counter() - start, 1)
        (checkpoints / CHECKPOINT_FILE).unlink(missing_ok=True)  # finished: the result goes into the partial
        with contextlib.suppress(OSError):  # file; a stray temporary file only keeps the empty folder
            checkpoints.rmdir()
        return {
            "tokens": tokens,
            "learning_rate": learning_rate,
            "source": config.source,
            "kd_weight": config.kd_weight,
            "temperature": config.temperature,
            "hidden_weight": config.hidden_weight,
            "sample_seconds": sample_seconds,
            # a run resumed from a checkpoint took its training time over several invocations
            "heal_seconds": wall if details["resumed_from_step"] == 0 else round(details["train_time_s"], 1),
            "git_sha": self.args.code_sha,
            "details": details,
            **self.measure(student),
        }


def _key(
    tokens: int, learning_rate: float, compute_dtype: str, trainable: str, source: str, objective: dict
) -> str:
    """Results key of one run; what is at its default is left out, so earlier keys stay valid."""
    return (
        f"{tokens}@lr={learning_rate:g}"
        + ("" if compute_dtype == "float32" else f"@{compute_dtype}")
        + ("" if trainable == "replaced" else f"@{trainable}")
        + ("" if source == "corpus" else f"@{source}")
        + "".join(f"@{_SHORT[n]}={v:g}" for n, v in objective.items() if v != objective_defaults()[n])
    )


def _objectives(args) -> list[dict[str, float]]:
    """Every (kd_weight, temperature, hidden_weight) to compare, HealConfig's defaults where not given."""
    defaults = objective_defaults()
    given = {
        "kd_weight": args.kd_weights,
        "temperature": args.temperatures,
        "hidden_weight": args.hidden_weights,
    }
    choices = [given[n] or [defaults[n]] for n in given]
    return [dict(zip(given, values, strict=True)) for values in itertools.product(*choices)]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    indices = args.configs if args.configs is not None else list(range(len(CONFIGS)))
    if bad := [i for i in indices if not 0 <= i < len(CONFIGS)]:
        raise SystemExit(f"--configs {bad}: indices must be in 0–{len(CONFIGS) - 1}")
    if bad := [t for t in args.tokens if t < 1]:
        raise SystemExit(f"--tokens {bad}: budgets must be positive integers")
    from lowrank.methods import HealConfig

    for objective in _objectives(args):  # HealConfig's own checks, before any compute
        try:
            HealConfig(teacher=args.model, **objective)
        except ValueError as e:
            raise SystemExit(f"--kd-weights / --temperatures / --hidden-weights: {e}") from None
    keys = ("model", "calib_samples", "calib_seq_len", "windows", "windows_shakespeare")
    sweep = Sweep(args, "heal", {**settings(args, *keys), "heal": _heal_overrides(args)})
    if not args.report_only:
        _measure(args, sweep, indices)
    if "original" not in sweep.state:
        raise SystemExit(f"nothing measured yet in {sweep.partial}")
    from benchmarks._heal_report import report

    markdown, rows, figure = report(sweep.state, args.results_dir / f"{args.out_name}_perplexity.png", TARGET)
    payload = {"original": sweep.state["original"], "configs": sweep.rows, "summary": rows}
    final = {"measured": len(rows), "figure": str(figure) if figure else None}
    sweep.finish(payload, lambda p: markdown, final=lambda p: final)
    return 0 if all(r["structure_unchanged"] for r in rows) else 1


def _measure(args: argparse.Namespace, sweep: Sweep, indices: list[int]) -> None:
    """The original, every compressed model, every healing run, then the held-out references."""
    from lowrank.core.dtypes import dtype_name
    from lowrank.training.healing import autocast_dtype
    from lowrank.training.trainable import default_learning_rate, resolve_trainable

    run = _Run(args)
    sweep.once("original", lambda: run.measure(run.model))
    for index in indices:  # compressed figures first: cheap, and every budget needs them
        entry = sweep.rows.setdefault(CONFIGS[index][0], {"config": CONFIGS[index][1], "healed": {}})
        if "compressed" not in entry:
            entry["compressed"] = run.compressed(index)[1]
            sweep.save()
    amp = autocast_dtype(args.precision, "cpu")
    compute = "float32" if amp is None else dtype_name(amp)
    runs = [
        (tokens, index, trainable)
        for tokens in sorted(args.tokens)
        for index in indices
        for trainable in dict.fromkeys(resolve_trainable(run.compressed(index)[0], t) for t in args.trainable)
    ]
    for tokens, index, trainable in runs:
        default = default_learning_rate(run.compressed(index)[0], trainable)
        for lr, objective in itertools.product(args.learning_rates or [default], _objectives(args)):
            entry = sweep.rows[CONFIGS[index][0]]
            key = _key(tokens, lr, compute, trainable, args.source, objective)
            if key in entry["healed"]:
                continue
            print(f"healing {CONFIGS[index][0]}: {tokens:,} tokens, {key}", flush=True)
            entry["healed"][key] = run.healed(index, key, tokens, lr, trainable, objective)
            sweep.save()
    references = sweep.state["original"].setdefault("heldout_ce", {})
    for entry in sweep.rows.values():  # the reference of every run, earlier ones included
        for h in entry["healed"].values():
            ref = _reference_key(h)
            if ref not in references:
                compute = h["details"].get("compute_dtype", "float32")
                references[ref] = run.heldout_ce(h["tokens"], compute, h.get("source", "corpus"))
                sweep.save()


if __name__ == "__main__":
    sys.exit(main())
