"""The layer-by-layer driver: calibrate, compress and advance one decoder layer at a time, resumably.

Methods supply two callables and get the protocol of ``lowrank.calibration.capture`` with progress bars,
timings and checkpoints:

* ``requests(index, layer) -> {key: StatRequest}``: what to accumulate for this layer;
* ``process(index, layer, statistics) -> record``: compress the layer in place and return a JSON-able
  record (ranks, losses, fallbacks, …). Replacement modules it swaps in are found automatically.

With ``checkpoint_dir``, after every finished layer the layer's state (safetensors), the descriptions of
its replacement modules and the records/timings so far are saved atomically. A restart with the same
fingerprint (method config, calibration tokens, model config and the weights outside the decoder layers)
rebuilds the finished layers from disk, replays them to regenerate the next layer's inputs (cheaper than
storing activations) and continues. Each record also holds the SHA-256 of the layer's weights before it
was processed (a model whose weights changed is refused) and of its saved file (a missing or damaged
file is recomputed, with every layer after it, never read as "unchanged").
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lowrank.calibration.capture import LayerInputs, capture_layer_inputs, collect_layer_statistics, run_layer
from lowrank.calibration.statistics import Statistic, StatRequest, Timings
from lowrank.io.files import atomic_path, sha256_file, write_json
from lowrank.nn import build_replacement, describe_replacements
from lowrank.nn.architectures import decoder_layers
from lowrank.nn.surgery import replace_module

__all__ = ["run_layerwise", "collect_statistics", "process_statistics", "LayerCheckpoint", "fingerprint"]

logger = logging.getLogger(__name__)

Requests = Callable[[int, nn.Module], dict[str, StatRequest]]
Process = Callable[[int, nn.Module, dict[str, Statistic]], dict[str, Any]]
_FORMAT = 2


def fingerprint(*parts: Any) -> str:
    """SHA-256 of JSON-able parts and tensors (by value), identifying one compression run."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            t = part.detach().cpu().contiguous()
            h.update(repr((tuple(t.shape), str(t.dtype))).encode())
            h.update(t.numpy().tobytes())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()


def state_digest(module: nn.Module) -> str:
    """SHA-256 of a module's state dict (names, shapes, dtypes and values)."""
    return fingerprint(*[part for k, v in sorted(module.state_dict().items()) for part in (k, v)])


def outer_digest(model: nn.Module, layers: nn.ModuleList) -> str:
    """SHA-256 of the parameters and buffers outside the decoder layers (embeddings, final norm, head)."""
    inner = {id(t) for t in layers.state_dict(keep_vars=True).values()}
    outer = [(k, v) for k, v in model.state_dict(keep_vars=True).items() if id(v) not in inner]
    return fingerprint(*[part for k, v in sorted(outer, key=lambda kv: kv[0]) for part in (k, v)])


class LayerCheckpoint:
    """Per-layer checkpoints in a directory: ``layer_0000.safetensors`` … and ``progress.json``."""

    def __init__(self, directory: str | Path, key: str) -> None:
        self.dir = Path(directory)
        self.key = key

    def load(self) -> tuple[list[dict[str, Any]], dict[str, float]]:
        """Records and timings of the finished layers (empty when starting fresh)."""
        path = self.dir / "progress.json"
        if not path.exists():
            return [], {}
        try:
            progress = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(progress, dict) or not isinstance(progress.get("records"), list):
                raise ValueError("not a progress record")
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ValueError(
                f"{path}: damaged checkpoint progress file ({exc}); delete the directory to start afresh"
            ) from None
        if progress.get("fingerprint") != self.key:
            raise ValueError(
                f"checkpoint directory {str(self.dir)!r} belongs to a run with a different configuration, "
                "calibration data or model weights; choose another directory or delete it"
            )
        logger.info("resuming from %s: %d layer(s) already done", self.dir, len(progress["records"]))
        return progress["records"], progress.get("timings", {})

    def save(
        self,
        index: int,
        layer: nn.Module,
        records: list[dict[str, Any]],
        timings: Timings,
        *,
        state: bool = True,
    ) -> None:
        """Save the layer's state (unless ``state=False``: the layer was not changed) and the progress."""
        from safetensors.torch import save_file

        if state:
            tensors = {k: v.detach().cpu().contiguous() for k, v in layer.state_dict().items()}
            with atomic_path(self.path(index)) as tmp:
                save_file(tensors, str(tmp))
                records[-1]["state_sha256"] = sha256_file(tmp)
        write_json(
            self.dir / "progress.json",
            {"format": _FORMAT, "fingerprint": self.key, "records": records, "timings": timings.seconds},
        )

    def path(self, index: int) -> Path:
        return self.dir / f"layer_{index:04d}.safetensors"

    def intact(self, index: int, record: dict[str, Any]) -> bool:
        """Whether the saved state of a finished layer is present and unchanged (or none was saved)."""
        expected = record.get("state_sha256")
        if expected is None:  # a pass that did not change the layer
            return True
        path = self.path(index)
        return path.is_file() and sha256_file(path) == expected

    def restore(self, index: int, layer: nn.Module, record: dict[str, Any]) -> None:
        """Swap in the saved replacement modules and load the layer's saved state strictly."""
        from safetensors.torch import load_file

        if record.get("state_sha256") is None:
            return
        ref = next(layer.parameters())
        for name, desc in record.get("modules", {}).items():
            original = layer.get_submodule(name)
            module = build_replacement(desc, original=original, device=ref.device, dtype=ref.dtype)
            replace_module(layer, name, module)
        state = load_file(str(self.path(index)), device=str(ref.device))
        layer.load_state_dict(state, strict=True)


def run_layerwise(
    model: nn.Module,
    input_ids: torch.Tensor,
    requests: Requests,
    process: Process,
    *,
    sequential: bool = True,
    device: torch.device | str | None = None,
    offload_device: torch.device | str = "cpu",
    batch_size: int = 8,
    checkpoint_dir: str | Path | None = None,
    run_key: Any = None,
    timings: Timings | None = None,
    modifies: bool = True,
    desc: str = "compress",
) -> list[dict[str, Any]]:
    """Calibrate and compress ``model`` layer by layer (in place); return one record per layer.

    Args:
        model: causal LM (weights may stay on CPU; each layer visits ``device`` in turn).
        input_ids: (samples, seq_len) calibration tokens.
        requests, process: see the module docstring.
        sequential: feed each layer the outputs of the already compressed previous layers (SVD-LLM);
            False feeds the original model's activations.
        device: compute device (default: the model's).
        offload_device: where activations wait between layers.
        batch_size: samples per forward chunk.
        checkpoint_dir: enables saving after each layer and resuming.
        run_key: JSON-able description of the run (method config …) for the checkpoint fingerprint.
        timings: accumulates stage times.
        modifies: ``process`` changes the layer (False: checkpoints store records only).
        desc: progress bar label.
    """
    timings = timings if timings is not None else Timings()
    layers = decoder_layers(model)
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    timings.sync = device.type == "cuda"
    ckpt = None
    records: list[dict[str, Any]] = []
    if checkpoint_dir is not None:
        config = getattr(model, "config", None)
        key = fingerprint(
            run_key,
            bool(sequential),
            input_ids,
            config.to_dict() if config is not None else None,
            outer_digest(model, layers),
        )
        ckpt = LayerCheckpoint(checkpoint_dir, key)
        records, saved = ckpt.load()
        for stage, seconds in saved.items():
            timings.add(stage, seconds)
    with timings.measure("calibration_forward"):
        inputs = capture_layer_inputs(
            model, input_ids, batch_size=batch_size, device=device, offload_device=offload_device
        )
    done = len(records)
    for i in tqdm(range(len(layers)), desc=desc, unit="layer", leave=False):
        layer = layers[i].to(device)
        try:
            source = state_digest(layer) if ckpt is not None else None
            if i < done and records[i].get("source_sha256") != source:
                raise ValueError(
                    f"checkpoint directory {str(ckpt.dir)!r} was made from other weights "
                    f"(layer {i} differs); "
                    "choose another directory or delete it"
                )
            if i < done and not ckpt.intact(i, records[i]):
                logger.warning(
                    "checkpoint of layer %d is missing or damaged: recomputing from layer %d", i, i
                )
                done, records = i, records[:i]
            if i < done:
                _replay(layer, i, inputs, records[i], ckpt, sequential, device, timings)
                continue
            stats = collect_layer_statistics(
                layer,
                i,
                inputs,
                requests(i, layer),
                device=device,
                write_outputs=not sequential,
                timings=timings,
            )
            record = process(i, layer, stats)
            del stats
            record["layer"] = i
            record["modules"] = describe_replacements(layer)
            if source is not None:
                record["source_sha256"] = source
            if sequential:
                run_layer(layer, i, inputs, device=device, write_outputs=True, timings=timings)
            records.append(record)
            if ckpt is not None:
                ckpt.save(i, layer, records, timings, state=modifies)
        finally:
            layers[i].to(home)
    return records


def _replay(layer, index, inputs: LayerInputs, record, ckpt, sequential, device, timings) -> None:
    """Restore a finished layer from its checkpoint and advance the activations through it."""
    if not sequential:  # the next inputs are the ORIGINAL layer's outputs
        run_layer(layer, index, inputs, device=device, write_outputs=True, timings=timings)
    ckpt.restore(index, layer, record)
    if sequential:
        run_layer(layer, index, inputs, device=device, write_outputs=True, timings=timings)


def collect_statistics(
    model: nn.Module,
    input_ids: torch.Tensor,
    requests: Requests,
    *,
    device: torch.device | str | None = None,
    offload_device: torch.device | str = "cpu",
    batch_size: int = 8,
    timings: Timings | None = None,
) -> list[dict[str, Statistic]]:
    """Statistics of every layer of the UNCHANGED model (non-sequential mode), kept on ``offload_device``.

    Compute once, then compress at several ratios with ``compress(..., calibration=stats)``.
    """
    collected: list[dict[str, Statistic]] = []

    def keep(index: int, layer: nn.Module, stats: dict[str, Statistic]) -> dict[str, Any]:
        moved: dict[int, Statistic] = {}
        collected.append({k: moved.setdefault(id(s), s.to(offload_device)) for k, s in stats.items()})
        return {}

    run_layerwise(
        model,
        input_ids,
        requests,
        keep,
        sequential=False,
        device=device,
        offload_device=offload_device,
        batch_size=batch_size,
        timings=timings,
        desc="calibrate",
    )
    return collected


def process_statistics(
    model: nn.Module,
    statistics: list[dict[str, Statistic]],
    process: Process,
    *,
    device: torch.device | str | None = None,
    desc: str = "compress",
) -> list[dict[str, Any]]:
    """Apply ``process`` to every layer with precomputed statistics (no forward passes)."""
    layers = decoder_layers(model)
    if len(statistics) != len(layers):
        raise ValueError(f"statistics cover {len(statistics)} layers but the model has {len(layers)}")
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    records = []
    for i in tqdm(range(len(layers)), desc=desc, unit="layer", leave=False):
        layer = layers[i].to(device)
        try:
            record = process(i, layer, statistics[i])
            record["layer"] = i
            record["modules"] = describe_replacements(layer)
            records.append(record)
        finally:
            layers[i].to(home)
    return records
