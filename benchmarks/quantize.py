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
from typing import Any

from benchmarks._common import load_for_evaluation, perplexities
from benchmarks._sweep import Sweep, calibration_config, parser


def _parser() -> argparse.ArgumentParser:
    p = parser(__doc__, "quantize_cpu", calibration={"samples": 32, "seq_len": 512}, windows=(4, 2))
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
            calibration = calibration_config(self.args, sequential=False)
            # uniform ranks: the shared Grams come without the token ids the auto allocation trains on
            config = config_from_dict(
                {"method": "svd-llm-v2", "ratio": ratio, "allocation": "uniform", "calibration": calibration}
            )
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


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Quantization alone, then each ratio of svd-llm-v2 alone and quantized."""
    points = [(None, None)] + [(None, b) for b in args.bits]
    for ratio in args.ratios:
        points += [(ratio, None)] + [(ratio, b) for b in args.combo_bits]
    return [{"key": _key(ratio, bits), "ratio": ratio, "bits": bits} for ratio, bits in points]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    keys = ("model", "group_size", "calib_samples", "calib_seq_len", "windows", "windows_shakespeare")
    sweep = Sweep(args, "quantize", {k: getattr(args, k) for k in keys})
    if not args.report_only:
        run = _Run(args)
        sweep.run(plan(args), lambda spec: run.point(spec["ratio"], spec["bits"]))
    from benchmarks._quant_report import report

    markdown, summary, figure = report(sweep.state, args.results_dir / f"{args.out_name}_pareto.png")
    final = {"points": len(sweep.rows), "figure": str(figure) if figure else None}
    return sweep.finish({"points": sweep.rows, "summary": summary}, lambda p: markdown, final=lambda p: final)


if __name__ == "__main__":
    sys.exit(main())
