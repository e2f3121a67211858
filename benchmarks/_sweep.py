"""The skeleton every benchmark script runs on: its flags, its run bookkeeping and its finish.

A script builds its parser with :func:`parser` (the shared flags, calibration flags derived from
:class:`~lowrank.calibration.pipeline.CalibrationConfig` the way the CLI derives them), lists its plan (one
dict per row, each with a ``key``) and hands :meth:`Sweep.run` the function that measures one row. A
:class:`Sweep` keeps one state per run: the settings a resumed run must match, the measured rows by key and
what the script measured once (a baseline, a speed table). The partial file
``<results-dir>/<out-name>.partial.json`` is rewritten atomically after every row, ``--resume`` skips the
keys it holds, ``--report-only`` only reports them, and :meth:`Sweep.finish` writes ``<out-name>.json``,
``.md`` and the figures with one provenance block and prints the one JSON line every benchmark ends with.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from benchmarks._common import RESULTS_DIR, env_info, final_line, open_run, write_results

__all__ = ["parser", "settings", "calibration_config", "Sweep"]


def parser(
    doc: str,
    out_name: str | None,
    *,
    resume: bool = True,
    figures: bool = False,
    device: str | None = None,
    model: str | None = "smollm2-135m",
    calibration: dict[str, Any] | None = None,
    windows: tuple[int, int | None] | None = None,
) -> argparse.ArgumentParser:
    """The parser of a benchmark script with the shared flags.

    Args:
        doc: the script's docstring (its first line is the description).
        out_name: the default results file stem (``--out-name``); ``None``: the script sets it after parsing
            (from the device, say).
        resume: add ``--resume`` and ``--report-only``.
        figures: add ``--no-figures``.
        device: add ``--device`` with this default.
        model: add ``--model`` with this default (``None``: no model).
        calibration: add ``--calib-<field>`` for each field of ``CalibrationConfig`` named here, with the
            script's default; help and type come from the config, as in ``lowrank compress``.
        windows: add ``--windows`` and ``--windows-shakespeare`` (test windows of 512 tokens) with these
            defaults (``None``: no shakespeare flag).
    """
    p = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    if model is not None:
        p.add_argument("--model", default=model, help=f"model to measure (default: {model})")
    if device is not None:
        p.add_argument("--device", default=device, help=f"device to measure on (default: {device})")
    if calibration:
        _calibration_flags(p, calibration)
    if windows is not None:
        p.add_argument("--windows", type=int, default=windows[0], help=f"wiki test windows ({windows[0]})")
        if windows[1] is not None:
            text = f"shakespeare test windows ({windows[1]})"
            p.add_argument("--windows-shakespeare", type=int, default=windows[1], help=text)
    run = p.add_argument_group("run", "where results go and how the run is kept (shared by every benchmark)")
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    run.add_argument(
        "--results-dir", type=Path, default=RESULTS_DIR, help="results folder (benchmarks/results)"
    )
    stem = out_name or "set by the script"
    run.add_argument("--out-name", default=out_name, help=f"results file stem (default: {stem})")
    run.add_argument("--note", action="append", default=[], help="a line for the report's notes (repeatable)")
    if resume:
        run.add_argument("--resume", action="store_true", help="skip the rows already in the partial file")
        run.add_argument(
            "--report-only", action="store_true", help="only write the report from the partial file"
        )
    if figures:
        run.add_argument("--no-figures", action="store_true", help="write no PNG figures")
    return p


RUN_FLAGS = ("threads", "results_dir", "out_name", "note", "resume", "report_only", "no_figures")
"""Destinations of the shared run flags: how a run is kept, not what it measures."""


def settings(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """What a resumed run must match: the flags ``names``, or every flag but the run flags when none."""
    if names:
        return {name: getattr(args, name) for name in names}
    return {k: v for k, v in vars(args).items() if k not in RUN_FLAGS}


def _calibration_flags(p: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    from lowrank.calibration.pipeline import CalibrationConfig
    from lowrank.cli._flags import method_flags

    specs = {spec.path[-1]: spec for spec in method_flags(CalibrationConfig, "calib-")}
    group = p.add_argument_group("calibration", "derived from CalibrationConfig (as in lowrank compress)")
    for name, default in defaults.items():
        spec = specs[name]
        kind = spec.kind if spec.kind in (int, float, str) else str
        text = f"{spec.help} (default: {default})".replace("%", "%%")
        group.add_argument(spec.flag, type=kind, default=default, choices=spec.choices, help=text)


def calibration_config(args: argparse.Namespace, **fixed: Any) -> dict[str, Any]:
    """The calibration dict of a method config from the ``--calib-*`` flags given and ``fixed`` fields."""
    prefix = "calib_"
    given = {k[len(prefix) :]: v for k, v in vars(args).items() if k.startswith(prefix)}
    return {**given, **fixed}


class Sweep:
    """One resumable benchmark run: the state kept in the partial file and the finish.

    ``state`` holds ``settings`` (a resumed run must match them, else it starts over), ``configs`` (the
    measured rows by key) and whatever the script stored with :meth:`once`.
    """

    def __init__(self, args: argparse.Namespace, name: str, settings: dict[str, Any], device: str = "cpu"):
        args.resume = getattr(args, "resume", False)
        args.report_only = getattr(args, "report_only", False)
        self.args, self.name, self.device = args, name, device
        self.state, self.partial, self.load_before, self.started = open_run(args, settings)

    @property
    def rows(self) -> dict[str, Any]:
        """The measured rows by key."""
        return self.state["configs"]

    def save(self) -> None:
        """Rewrite the partial file atomically."""
        from lowrank.io.files import write_json

        write_json(self.partial, self.state)

    def once(self, name: str, measure: Callable[[], Any]) -> Any:
        """``state[name]``, measured by ``measure()`` and saved the first time (not when reporting only)."""
        if name not in self.state and not self.args.report_only:
            self.state[name] = measure()
            self.save()
        return self.state.get(name)

    def run(
        self,
        plan: list[dict[str, Any]],
        measure: Callable[[dict[str, Any]], dict[str, Any]],
        describe: Callable[[dict[str, Any]], str] = lambda row: "",
        refused: tuple[type[BaseException], ...] = (),
    ) -> None:
        """Measure every row of ``plan`` not measured yet, saving after each; an exception in ``refused``
        is recorded under ``state["errors"]`` and the sweep goes on."""
        if self.args.report_only:
            return
        for i, spec in enumerate(plan):
            key = spec["key"]
            if key in self.rows:
                continue
            start = time.perf_counter()
            try:
                self.rows[key] = row = measure(spec)
            except refused as err:  # a setting the method refuses: record it, go on
                self.state.setdefault("errors", {})[key] = text = f"{type(err).__name__}: {err}"
                self.save()
                print(f"[{i + 1}/{len(plan)}] {key}: {text}", flush=True)
                continue
            self.save()
            print(
                f"[{i + 1}/{len(plan)}] {key}: {describe(row)} ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )

    def missing(self, plan: Iterable[dict[str, Any]]) -> list[str]:
        """Keys of ``plan`` not measured (yet)."""
        return [spec["key"] for spec in plan if spec["key"] not in self.rows]

    def provenance(self) -> dict[str, Any]:
        """Environment, threads, load and wall time of every measuring invocation, notes."""
        import torch

        return {
            "env": {**env_info(self.device), "git_sha": self.args.code_sha},
            "torch_threads": torch.get_num_threads(),
            "load_average_1min": self.state.get("invocation_load_average_1min", []),
            "wall_seconds": round(sum(self.state.get("invocation_seconds", [])), 1),
            "invocation_seconds": self.state.get("invocation_seconds", []),
            "notes": getattr(self.args, "note", []),
        }

    def finish(
        self,
        payload: dict[str, Any],
        markdown: Callable[[dict[str, Any]], str],
        figures: Callable[[dict[str, Any], Path, str], list[Any]] | None = None,
        final: Callable[[dict[str, Any]], dict[str, Any]] = lambda p: {},
    ) -> int:
        """Note this invocation, write ``<out-name>.json``/``.md`` and the figures, print the report and the
        final JSON line; returns the exit code (0)."""
        args = self.args
        if not args.report_only:  # every invocation's wall time and load, so a resumed run reports its total
            self.state.setdefault("invocation_seconds", []).append(
                round(time.perf_counter() - self.started, 1)
            )
            load = {"start": round(self.load_before[0], 2), "end": round(os.getloadavg()[0], 2)}
            self.state.setdefault("invocation_load_average_1min", []).append(load)
            self.save()
        if not self.rows:
            raise SystemExit(f"nothing measured yet in {self.partial}")
        provenance = {k: v for k, v in self.provenance().items() if k not in payload}  # the script's win
        payload = {"benchmark": self.name, "settings": self.state["settings"], **payload, **provenance}
        if figures is not None and not getattr(args, "no_figures", False):
            written = figures(payload, args.results_dir, args.out_name)
            payload["figures"] = [Path(f).name for f in written if f]  # beside the results: names, no paths
        text = markdown(payload)
        write_results(args.out_name, payload, text, args.results_dir)
        print(text)
        env = payload["env"]
        head = {
            "benchmark": self.name,
            "device": env["device_name"],
            "torch": env["torch"],
            "git_sha": env["git_sha"],
        }
        print(final_line(**head, **final(payload)))
        return 0
