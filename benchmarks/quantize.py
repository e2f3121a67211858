"""Low-rank plus quantization at equal memory on the built-in model: perplexity against weight bytes.

    python -m benchmarks.quantize                     # the full grid (results/quantize_cpu.*)
    python -m benchmarks.quantize --resume            # continue an interrupted run
    python -m benchmarks.quantize --report-only       # rewrite the report from the partial file
    python -m benchmarks.quantize --bits 4 --combo-bits 4 --ratios 0.2 --calib-samples 2 \\
        --calib-seq-len 128 --windows 1 --windows-shakespeare 1 --results-dir /tmp/quant_smoke  # smoke test

Points, each measured on the same wiki-test and shakespeare windows as the original in the same run:
quantization alone (``quantize``: HQQ through :mod:`lowrank.nn.quantization`, group size 64, scales and zero
points in float16) at every ``--bits``; ``svd-llm-v2`` at every ``--ratios`` (float32 factors); and each
of those followed by ``quantize`` at every ``--combo-bits``. The svd-llm-v2 models share one Gram pass over
the unchanged model (non-sequential calibration).

Bytes: ``weight_bytes`` = every parameter in its dtype plus every tensor a quantized layer stores (packed
weights, scales, zero points); ``linear bytes`` = the part the methods change (the decoder's linear
layers), i.e. ``weight_bytes`` minus the embeddings, norms and output head, which stay float32 in every
point. Ratio convention: svd-llm-v2 ``ratio`` = fraction of the decoder-linear parameters REMOVED.
The last line printed is one JSON line with device, torch version and git SHA.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._common import (
    RESULTS_DIR,
    env_info,
    final_line,
    load_for_evaluation,
    open_run,
    perplexities,
    record_run,
    write_results,
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument(
        "--bits",
        type=int,
        nargs="+",
        default=[1, 2, 3, 4, 8],
        help="bit widths of quantize alone (1 2 3 4 8)",
    )
    p.add_argument(
        "--combo-bits",
        type=int,
        nargs="+",
        default=[2, 3, 4, 8],
        help="bit widths after svd-llm-v2 (2 3 4 8)",
    )
    p.add_argument("--group-size", type=int, default=64, help="quantization group size (64)")
    p.add_argument(
        "--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.4, 0.6], help="svd-llm-v2 ratios removed"
    )
    p.add_argument("--calib-samples", type=int, default=32, help="svd-llm-v2 calibration sequences (32)")
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--windows", type=int, default=4, help="wiki test windows of 512 tokens (4)")
    p.add_argument("--windows-shakespeare", type=int, default=2, help="shakespeare windows of 512 tokens (2)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--resume", action="store_true", help="continue from the partial file")
    p.add_argument("--report-only", action="store_true", help="only rewrite the report from the partial file")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--out-name", default="quantize_cpu")
    return p


def decoder_linear_bytes(model) -> int:
    """Bytes of the linear layers inside the decoder layers (dense, factor or quantized)."""
    from torch import nn

    from lowrank.nn import QuantizedLinear
    from lowrank.nn.architectures import decoder_layers

    total = 0
    for layer in decoder_layers(model):
        for module in layer.modules():
            if isinstance(module, nn.Linear):
                total += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
            elif isinstance(module, QuantizedLinear):
                total += module.stored_bytes()
                total += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
    return total


class _Run:
    def __init__(self, args) -> None:
        self.args = args
        self.model, self.tokenizer, self.eval_ids = load_for_evaluation(args)
        self._grams = None
        self._lowrank: dict[float, Any] = {}

    def measure(self, model, seconds: float | None = None) -> dict[str, Any]:
        from lowrank.methods import weight_bytes

        return {
            "perplexity": perplexities(model, self.eval_ids, self.tokenizer),
            "weight_bytes": weight_bytes(model),
            "linear_bytes": decoder_linear_bytes(model),
            "compress_seconds": seconds,
        }

    def lowrank(self, ratio: float):
        """The model compressed by svd-llm-v2 at ``ratio`` (from the shared Grams; made on first use)."""
        from lowrank.calibration.pipeline import calibration_tokens
        from lowrank.methods import collect_gram_statistics, compress, config_from_dict

        if ratio not in self._lowrank:
            calibration = {
                "samples": self.args.calib_samples,
                "seq_len": self.args.calib_seq_len,
                "sequential": False,
            }
            config = config_from_dict({"method": "svd-llm-v2", "ratio": ratio, "calibration": calibration})
            if self._grams is None:
                self._grams = collect_gram_statistics(
                    self.model, calibration_tokens(config.calibration, self.tokenizer), config
                )
            model = copy.deepcopy(self.model)
            start = time.perf_counter()
            compress(model, config, calibration=self._grams)
            self._lowrank[ratio] = (model, round(time.perf_counter() - start, 1))
        return self._lowrank[ratio]

    def point(self, ratio: float | None, bits: int | None) -> dict[str, Any]:
        from lowrank.methods import compress, config_from_dict

        if ratio is None:
            model, seconds = self.model, 0.0
        else:
            model, seconds = self.lowrank(ratio)
        if bits is not None:
            model = copy.deepcopy(model)
            start = time.perf_counter()
            config = {"method": "quantize", "bits": bits, "group_size": self.args.group_size}
            result = compress(model, config_from_dict(config))
            seconds += round(time.perf_counter() - start, 1)
            details = result.details
        else:
            details = {}
        return {"ratio": ratio, "bits": bits, **self.measure(model, seconds), "quantize": details}


def _key(ratio: float | None, bits: int | None) -> str:
    return f"ratio={ratio if ratio is not None else 0:g}/bits={bits if bits is not None else 'float32'}"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = {
        "model": args.model,
        "group_size": args.group_size,
        "calib_samples": args.calib_samples,
        "calib_seq_len": args.calib_seq_len,
        "windows": args.windows,
        "windows_shakespeare": args.windows_shakespeare,
    }
    state, partial, load_before, started = open_run(args, settings)
    if not args.report_only:
        from lowrank.io.files import write_json

        run = _Run(args)
        plan = [(None, None)] + [(None, b) for b in args.bits]
        for ratio in args.ratios:
            plan += [(ratio, None)] + [(ratio, b) for b in args.combo_bits]
        for ratio, bits in plan:
            key = _key(ratio, bits)
            if key in state["configs"]:
                continue
            print(f"measuring {key}", flush=True)
            state["configs"][key] = run.point(ratio, bits)
            write_json(partial, state)
        record_run(state, args, started)
        write_json(partial, state)
    if not state["configs"]:
        raise SystemExit(f"nothing measured yet in {partial}")
    from benchmarks._quant_report import report

    env = env_info("cpu")
    markdown, summary, figure = report(state, args.results_dir / f"{args.out_name}_pareto.png")
    print(markdown)
    payload = {
        "settings": settings,
        "env": env,
        "load_average_at_start": load_before,
        "points": state["configs"],
        "summary": summary,
        "last_measuring_run": state.get("last_measuring_run"),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    write_results(args.out_name, payload, markdown, args.results_dir)
    print(
        final_line(
            device=env["device_name"],
            torch=env["torch"],
            git_sha=env["git_sha"],
            points=len(state["configs"]),
            figure=str(figure) if figure else None,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
