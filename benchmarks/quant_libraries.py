"""Weight-quantization libraries on the built-in model: perplexity, stored bytes, safetensors reload, CPU.

    python -m benchmarks.quant_libraries             # results/quant_libraries_cpu.{json,md}
    python -m benchmarks.quant_libraries --bits 4 --windows 1 --threads 1 --results-dir /tmp/ql_smoke  # smoke

Every library that imports (hqq, optimum-quanto, torchao; a missing one is reported as not installed)
quantizes, weight-only, every nn.Linear in the decoder layers of a fresh copy of the model at each --bits it
supports, group size 64 where it allows it: ``lowrank quantize`` (HQQ through the project's adapter, scales
and zero points in float16, saved with ``save_compressed``); HQQ's own ``HQQLinear`` (the library alone,
float32 meta); optimum-quanto (``quantize``/``freeze``, group size set to 64); torchao
(``IntxWeightOnlyConfig``, asymmetric, ``PerGroup(64)``). Reported: wiki perplexity, the bytes of the
tensors written for the decoder's layers against the ideal bits × weights / 8 (the integer codes alone say
whether they are really packed), whether a safetensors save and rebuild reproduces the logits bit for bit,
and whether the forward runs on the CPU (under ``torch.inference_mode`` or only ``torch.no_grad``).
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import lowrank
from benchmarks._sweep import Sweep, parser, settings
from lowrank.evaluation import perplexity
from lowrank.io.data import tokenize
from lowrank.loading.serialization import load_compressed, save_compressed
from lowrank.methods import QuantizeConfig, compress
from lowrank.nn import QuantizedLinear
from lowrank.nn.architectures import get_arch_spec

GROUP = 64


def _parser() -> argparse.ArgumentParser:
    p = parser(__doc__, "quant_libraries_cpu", windows=(8, None))
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8], help="bit widths (2 3 4 8)")
    p.add_argument("--libraries", nargs="+", default=list(LIBRARIES), choices=list(LIBRARIES))
    return p


def _modules(model, kind=nn.Linear) -> dict[str, Any]:
    """The modules of type ``kind`` inside the decoder layers, by qualified name."""
    prefix = get_arch_spec(model).layers + "."
    return {n: m for n, m in model.named_modules() if n.startswith(prefix) and isinstance(m, kind)}


def _swap(model, name: str, module) -> None:
    setattr(model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2], module)


def _save_load(tensors: dict[str, torch.Tensor], path: Path, metadata=None) -> dict[str, torch.Tensor]:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return load_file(str(path))


def _sub(tensors: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    return {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}


# Each library: (quantize(model, bits), tensors(model) -> what it writes, reload(...) -> (model, route)).
def _lowrank():
    def tensors(model):
        mods = _modules(model, QuantizedLinear).items()
        return {f"{n}.{k}": v for n, m in mods for k, v in m.stored_tensors().items()}

    def reload(model, bits, original, tmp):
        save_compressed(model, tmp / "model")
        return load_compressed(tmp / "model")[0], "save_compressed → load_compressed"

    return lambda model, bits: compress(model, QuantizeConfig(bits=bits, group_size=GROUP)), tensors, reload


def _hqq():
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    def quantize(model, bits):
        config = BaseQuantizeConfig(nbits=bits, group_size=GROUP, axis=1)
        for name, lin in _modules(model).items():
            _swap(model, name, HQQLinear(lin, config, compute_dtype=torch.float32, device="cpu"))

    def tensors(model):  # HQQLinear's state_dict, encoded for safetensors: W_q, scale, zero, small metadata
        mods = _modules(model, HQQLinear).items()
        return {f"{n}.{k}": v for n, m in mods for k, v in m.state_dict().items() if torch.is_tensor(v)}

    def reload(model, bits, original, tmp):
        loaded, fresh = _save_load(tensors(model), tmp / "hqq.safetensors"), copy.deepcopy(original)
        for name in _modules(model, HQQLinear):
            q = HQQLinear(None, None, compute_dtype=torch.float32, device="cpu", initialize=False)
            q.load_state_dict(_sub(loaded, name))
            _swap(fresh, name, q)
        return fresh, "HQQLinear state_dict → load_state_dict"

    return quantize, tensors, reload


def _quanto():
    from optimum.quanto import QLinear, freeze, quantization_map, requantize
    from optimum.quanto import quantize as quanto_quantize

    def quantize(model, bits):
        quanto_quantize(model, weights=f"qint{bits}", include=list(_modules(model)))
        for m in _modules(model, QLinear).values() if bits != 8 else ():
            m.weight_group_size = GROUP  # quanto's own choice: 128, or 96 where 128 does not divide in
        freeze(model)

    def tensors(model):
        return {f"{n}.{k}": v for n, m in _modules(model, QLinear).items() for k, v in m.state_dict().items()}

    def reload(model, bits, original, tmp):
        loaded, fresh = _save_load(tensors(model), tmp / "quanto.safetensors"), copy.deepcopy(original)
        try:
            requantize(fresh, loaded, quantization_map(model), device=torch.device("cpu"))
            with torch.no_grad():  # quantization_map has no group size: a group-64 model fails here
                fresh(torch.zeros(1, 1, dtype=torch.long))
            return fresh, "requantize()"
        except Exception as exc:  # noqa: BLE001
            fresh = copy.deepcopy(original)
            quantize(fresh, bits)
            for name, m in _modules(fresh, QLinear).items():
                m.load_state_dict(_sub(loaded, name))
            return fresh, f"quantize again + load_state_dict; requantize() fails: {type(exc).__name__}"

    return quantize, tensors, reload


def _torchao():
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict as flatten
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict as unflatten
    from torchao.quantization import IntxWeightOnlyConfig, MappingType, PerGroup, quantize_

    def quantize(model, bits):
        dtype, asym, names = getattr(torch, f"int{bits}"), MappingType.ASYMMETRIC, set(_modules(model))
        config = IntxWeightOnlyConfig(weight_dtype=dtype, granularity=PerGroup(GROUP), mapping_type=asym)
        quantize_(model, config, filter_fn=lambda m, fqn: fqn in names)

    def flat(model):  # <layer>._weight_qdata (codes), _weight_scale, _weight_zero_point; layout as metadata
        return flatten({f"{n}.weight": m.weight for n, m in _modules(model).items()})

    def reload(model, bits, original, tmp):
        tensors, metadata = flat(model)
        loaded, fresh = _save_load(tensors, tmp / "ao.safetensors", metadata), copy.deepcopy(original)
        with safe_open(str(tmp / "ao.safetensors"), "pt") as fh:
            rebuilt, _ = unflatten(loaded, fh.metadata())
        for name, m in _modules(fresh).items():
            m.weight = nn.Parameter(rebuilt[f"{name}.weight"], requires_grad=False)
        return fresh, "torchao.prototype.safetensors flatten → unflatten"

    return quantize, lambda model: flat(model)[0], reload


# key: (label, distribution, factory, bit widths, suffix of the names of the integer codes' tensors)
LIBRARIES: dict[str, tuple[str, str, Any, tuple[int, ...], str]] = {
    "lowrank": ("lowrank quantize (hqq {v}, fp16 meta)", "hqq", _lowrank, (1, 2, 3, 4, 8), "W_q"),
    "hqq": ("hqq {v} HQQLinear (fp32 meta)", "hqq", _hqq, (1, 2, 3, 4, 8), "W_q"),
    "quanto": ("optimum-quanto {v}", "optimum-quanto", _quanto, (2, 4, 8), "_data"),
    "torchao": ("torchao {v} IntxWeightOnly asym", "torchao", _torchao, tuple(range(1, 9)), "qdata"),
}


def _forward(model, probe, no_grad: bool) -> torch.Tensor:
    with torch.no_grad() if no_grad else torch.inference_mode():
        return model(probe).logits.clone()


def _perplexity(model, ids, windows: int, no_grad: bool) -> float:
    fn = perplexity.__wrapped__ if no_grad else perplexity  # __wrapped__: the body without inference_mode
    with torch.no_grad():
        return fn(model, None, ids, seq_len=512, max_windows=windows, progress=False).perplexity


def _error(exc: Exception) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"


def measure(fns, code: str, bits: int, original, ids, windows: int, numel: int) -> dict[str, Any]:
    """Quantize a copy; CPU forward, stored bytes, perplexity, then the safetensors round trip."""
    (quantize, tensors, reload), row = fns, {"ideal_bytes": bits * numel // 8}
    probe, model, stage = ids[:128].unsqueeze(0), copy.deepcopy(original), "quantize"
    start = time.perf_counter()
    try:
        quantize(model, bits)
        row["quantize_seconds"], stage = round(time.perf_counter() - start, 1), "forward"
        try:
            ref, no_grad, row["cpu_forward"] = _forward(model, probe, False), False, "yes"
        except Exception as exc:  # noqa: BLE001
            ref, no_grad = _forward(model, probe, True), True
            row["cpu_forward"] = f"yes, torch.no_grad only (inference_mode: {_error(exc)})"
        sizes = {k: t.numel() * t.element_size() for k, t in tensors(model).items()}
        row["stored_bytes"] = sum(sizes.values())
        row["code_bytes"] = sum(b for k, b in sizes.items() if k.endswith(code))
        start, stage = time.perf_counter(), "perplexity"
        row["wiki_ppl"], row["ppl_no_grad"] = _perplexity(model, ids, windows, no_grad), no_grad
        row["ppl_seconds"] = round(time.perf_counter() - start, 1)
    except Exception as exc:  # noqa: BLE001
        return {**row, "error": f"{stage}: {_error(exc)}"}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            loaded, route = reload(model, bits, original, Path(tmp))
            row["reload_identical"] = bool(torch.equal(ref, _forward(loaded, probe, no_grad)))
            row["reload"] = f"{'yes' if row['reload_identical'] else 'NO'} ({route})"
    except Exception as exc:  # noqa: BLE001
        row["reload_identical"], row["reload"] = False, f"NO: {_error(exc)}"
    return row


def _torchao_int4() -> str:
    """Does torchao's packed 4-bit weight-only format run here (one bfloat16 576→1536 layer)?"""
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    try:
        layer = nn.Sequential(nn.Linear(576, 1536, bias=False, dtype=torch.bfloat16))
        quantize_(layer, Int4WeightOnlyConfig(group_size=GROUP))
        layer(torch.randn(2, 576, dtype=torch.bfloat16))
        return "runs"
    except Exception as exc:  # noqa: BLE001
        return f"fails: {_error(exc)}"


def report(args, rows: list[dict[str, Any]], notes: list[str], numel: int) -> str:
    lines = [
        f"# Weight-quantization libraries on {args.model} (CPU)",
        "",
        f"Weight-only, no calibration data, every nn.Linear in the decoder layers ({numel:,} weights). Wiki "
        f"perplexity on the first {args.windows} test windows of 512 tokens (`lowrank.evaluation.perplexity`)"
        ", the float32 original in the same run. Stored bytes = the tensors written to safetensors for those "
        "layers (codes, scales, zero points, small buffers) against the ideal bits × weights / 8; codes "
        "bits/weight = 8 × bytes of the integer codes alone / weights; packed = within 0.25 bit of the bit "
        "width. Reload = those tensors rebuilt into a fresh model by the route named, logits of a 128-token "
        "probe compared with `torch.equal`. perplexity runs under `torch.inference_mode`; a model whose "
        "forward fails there (CPU forward column) is measured by calling the undecorated function "
        "(`perplexity.__wrapped__`) under `torch.no_grad` instead (ppl marked †).",
        "",
        "| library | bits | group size | wiki ppl | stored bytes (× ideal) | codes bits/weight | packed? "
        "| reload bit-exact | CPU forward | quantize s | ppl s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| {r['library']} | {r['bits']} | {r['group_size']} |"
        if "error" in r:
            lines.append(f"{head} – | – | – | – | – | NO: {r['error']} | – | – |")
            continue
        code_bits, ppl = 8 * r["code_bytes"] / numel, r["wiki_ppl"]
        lines.append(
            f"{head} {f'{ppl:.2f}' if ppl < 1e4 else f'{ppl:.2e}'}{' †' * r['ppl_no_grad']} | "
            f"{r['stored_bytes']:,} ({r['stored_bytes'] / r['ideal_bytes']:.2f}×) | {code_bits:.2f} | "
            f"{'yes' if code_bits <= r['bits'] + 0.25 else 'NO'} | {r.get('reload', '–')} | "
            f"{r['cpu_forward']} | {r.get('quantize_seconds', '–')} | {r['ppl_seconds']} |"
        )
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"


def _plan(args: argparse.Namespace, notes: list[str], versions: dict[str, str]) -> list[dict[str, Any]]:
    """The original, then every installed library at every bit width it supports."""
    plan: list[dict[str, Any]] = [{"key": "original"}]
    for key in args.libraries:
        label, dist, factory, supported, code = LIBRARIES[key]
        try:
            fns, versions[key] = factory(), importlib.metadata.version(dist)
        except ImportError:
            notes.append(f"{key}: {dist} is not installed (pip install {dist}); not measured.")
            continue
        label = label.format(v=versions[key])
        for bits in args.bits:
            if bits not in supported:
                notes.append(f"{label}: {bits}-bit not supported (only {', '.join(map(str, supported))}).")
                continue
            group = ("per-channel (qint8)" if bits == 8 else "64 (set)") if key == "quanto" else str(GROUP)
            row = {"library": label, "bits": bits, "group_size": group}
            plan.append({"key": f"{key}/{bits}", "row": row, "fns": fns, "code": code})
    return plan


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    sweep = Sweep(args, "quant_libraries", settings(args, "model", "bits", "libraries", "windows"))
    original, tokenizer = lowrank.load_model(args.model)
    ids = tokenize(tokenizer, lowrank.load_text("wiki", "test"))
    numel = sum(m.weight.numel() for m in _modules(original).values())
    notes, versions = list(args.note), {}
    plan = _plan(args, notes, versions)

    def measure_one(spec: dict[str, Any]) -> dict[str, Any]:
        if spec["key"] == "original":
            base = {"library": "float32 (original)", "bits": 32, "group_size": "–", "cpu_forward": "yes"}
            base.update(
                ideal_bytes=4 * numel, stored_bytes=4 * numel, code_bytes=4 * numel, ppl_no_grad=False
            )
            start, base["wiki_ppl"] = time.perf_counter(), _perplexity(original, ids, args.windows, False)
            return {**base, "ppl_seconds": round(time.perf_counter() - start, 1)}
        print(f"measuring {spec['row']['library']} {spec['row']['bits']}-bit", flush=True)
        return {
            **spec["row"],
            **measure(spec["fns"], spec["code"], spec["row"]["bits"], original, ids, args.windows, numel),
        }

    sweep.run(plan, measure_one)
    rows = [sweep.rows[spec["key"]] for spec in plan if spec["key"] in sweep.rows]
    if "quanto" in versions:
        notes.append(
            "optimum-quanto: group size set to 64 on each QLinear before `freeze` (its own: 128, or 96 where "
            "128 does not divide in_features); qint8 is per-channel. Its first 2/4-bit forward may build its "
            "C++ unpack extension (once per torch version), outside the timed columns."
        )
    if "torchao" in versions:
        notes.append(
            f"torchao packed 4-bit (`Int4WeightOnlyConfig`, group 64, bfloat16) here: {_torchao_int4()}."
        )
    payload = {"versions": versions, "decoder_linear_weights": numel, "rows": rows, "notes": notes}
    identical = all(r["reload_identical"] for r in rows if "reload_identical" in r)
    final = {"rows": len(rows) - 1, "libraries": versions, "all_reload_identical": identical}
    return sweep.finish(payload, lambda p: report(args, rows, notes, numel), final=lambda p: final)


if __name__ == "__main__":
    sys.exit(main())
