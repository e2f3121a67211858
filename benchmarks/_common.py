"""Helpers shared by the benchmark scripts: provenance (git SHA, environment), result files, the run state
under :class:`benchmarks._sweep.Sweep` (``open_run``, ``load_partial``) and measurements several scripts
make (a calibrated runner with shared statistics, perplexities, compressed copies).

Every benchmark prints a table and ends with one JSON line carrying the device, torch version and git
SHA (``final_line``), and writes its results under ``benchmarks/results/`` atomically. This module imports
nothing from ``benchmarks`` at import time, so scripts written before the package (``sys.path`` on this
folder, ``from _common import ...``) still run; :mod:`benchmarks._tables` re-exports ``save_figure``.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

__all__ = [
    "RESULTS_DIR",
    "CalibratedRunner",
    "compressed_copy",
    "device_name",
    "env_info",
    "final_line",
    "git_sha",
    "kv_final",
    "kv_statistics",
    "load_for_evaluation",
    "load_partial",
    "open_run",
    "perplexities",
    "record_run",
    "save_figure",
    "write_results",
]

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def git_sha(short: bool = False) -> str | None:
    """The repository's HEAD commit (with ``-dirty`` when the tree has changes), or ``None`` outside git.

    ``LOWRANK_GIT_SHA`` in the environment overrides it (as in ``lowrank bench rsvd``): the commit of a
    copy of the tree measured on a machine without the repository.
    """
    if os.environ.get("LOWRANK_GIT_SHA"):
        return os.environ["LOWRANK_GIT_SHA"]
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", *(["--short"] if short else []), "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{sha}-dirty" if dirty else sha


def device_name(device: str) -> str:
    """A human-readable name of the device: the GPU model for cuda, else the CPU model and core count."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def env_info(device: str = "cpu") -> dict[str, Any]:
    """Provenance of a benchmark run: device, library versions, git SHA."""
    import torch
    import transformers

    info = {
        "device": device,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "git_sha": git_sha(),
    }
    if device.startswith("cuda"):
        info["cuda_alloc_conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    return info


def write_results(
    name: str, payload: dict[str, Any], markdown: str | None = None, directory: Path = RESULTS_DIR
) -> Path:
    """Write ``<directory>/<name>.json`` (and ``.md`` when given) atomically; ``results/`` by default."""
    from lowrank.io.files import write_json, write_text

    path = Path(directory) / f"{name}.json"
    write_json(path, payload)
    if markdown is not None:
        write_text(Path(directory) / f"{name}.md", markdown)
    return path


def record_run(state: dict[str, Any], args: Any, started: float) -> None:
    """Note in a resumable run's state how the last measuring invocation ran (environment, threads, time),
    so a later ``--report-only`` still reports it."""
    import time

    state["last_measuring_run"] = {
        "env": {**env_info("cpu"), "git_sha": args.code_sha},  # the commit noted by open_run
        "threads": getattr(args, "threads", None),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


def final_line(**fields: Any) -> str:
    """The one JSON line every benchmark prints last."""
    return json.dumps(fields, sort_keys=False, default=str)


def load_partial(path: Path, settings: dict[str, Any], resume: bool) -> dict[str, Any]:
    """The resume state of a benchmark: the partial file when resuming with the same settings, else empty."""
    if resume and path.is_file():
        data = json.loads(path.read_text())
        if data.get("settings") == settings:
            return data
        print(f"partial results were measured with other settings ({data.get('settings')}); starting over")
    return {"settings": settings, "configs": {}}


def open_run(args: Any, settings: dict[str, Any]) -> tuple[dict[str, Any], Path, tuple[float, ...], float]:
    """Start a resumable benchmark run: torch threads, the results folder and the resume state; notes in
    ``args.code_sha`` the commit measuring now (a commit made while a long run goes on is not it).

    Returns:
        (state, partial file, 1/5/15-minute load averages at the start, start time).
    """
    import time

    import torch

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    load_before, started = os.getloadavg(), time.perf_counter()
    args.code_sha = git_sha()
    args.results_dir.mkdir(parents=True, exist_ok=True)
    partial = args.results_dir / f"{args.out_name}.partial.json"
    state = load_partial(partial, settings, args.resume or args.report_only)
    return state, partial, load_before, started


def kv_statistics(model: Any, ids: Any) -> tuple[Any, float]:
    """Non-sequential statistics of every layer of the unchanged ``model`` with both keys the KV methods
    request (``attention``: per-head Grams, ``input``: the k_proj input Gram for ``mla``'s whitening), so
    every ``kv-projection`` and ``mla`` configuration compresses from one calibration pass.

    Returns:
        (``CalibrationStatistics``, seconds taken).
    """
    import time

    from lowrank.calibration.attention_stats import attention_request
    from lowrank.calibration.pipeline import CalibrationConfig, collect_calibration_statistics
    from lowrank.calibration.statistics import InputGram, StatRequest
    from lowrank.nn.architectures import get_arch_spec

    cal = CalibrationConfig(sequential=False, samples=ids.shape[0], seq_len=ids.shape[1])
    k_path = get_arch_spec(model).linears["k"]

    def requests(index: int, layer: Any) -> dict[str, Any]:
        return {
            "attention": attention_request(model, dtype=cal.dtype),
            "input": StatRequest(k_path, lambda: InputGram(cal.dtype)),
        }

    start = time.perf_counter()
    stats = collect_calibration_statistics(model, ids, requests, cal)
    return stats, round(time.perf_counter() - start, 1)


def compressed_copy(model: Any, config: Any, statistics: Any) -> tuple[Any, Any]:
    """A deep copy of ``model`` compressed with ``config`` from shared statistics, and the result."""
    import copy

    from lowrank.methods import compress

    copied = copy.deepcopy(model)
    return copied, compress(copied, config, calibration=statistics)


def load_for_evaluation(args: Any) -> tuple[Any, Any, dict[str, tuple[Any, int]]]:
    """``(model, tokenizer, eval_ids)``: ``args.model`` loaded, and the wiki-test and shakespeare token ids
    with the number of 512-token windows to evaluate (``args.windows``, ``args.windows_shakespeare``)."""
    import lowrank
    from lowrank.io.data import tokenize

    model, tokenizer = lowrank.load_model(args.model)
    eval_ids = {
        "wiki": (tokenize(tokenizer, lowrank.load_text("wiki", "test")), args.windows),
        "shakespeare": (
            tokenize(tokenizer, lowrank.load_text("shakespeare", "test")),
            args.windows_shakespeare,
        ),
    }
    return model, tokenizer, eval_ids


def perplexities(model: Any, eval_ids: dict[str, tuple[Any, int]], tokenizer: Any = None) -> dict[str, float]:
    """Perplexity of ``model`` on each corpus of :func:`load_for_evaluation` (windows of 512 tokens; the
    tokenizer decides the BOS token, none without one)."""
    from lowrank.evaluation import perplexity

    return {
        corpus: perplexity(model, tokenizer, ids, seq_len=512, max_windows=n, progress=False).perplexity
        for corpus, (ids, n) in eval_ids.items()
    }


def kv_final(p: dict[str, Any]) -> dict[str, Any]:
    """The final line's fields of a KV sweep: configurations measured, the baseline's wiki perplexity and KV
    bytes per token."""
    from benchmarks._tables import ppl

    base = p["configs"]["baseline"]
    return {
        "configs": len(p["configs"]) - 1,
        "ppl_wiki_baseline": round(ppl(base), 3),
        "kv_bytes_per_token_baseline": base["kv_bytes_per_token"],
    }


class CalibratedRunner:
    """The model, its evaluation windows (:func:`load_for_evaluation`), the wiki calibration tokens
    (``--calib-samples`` × ``--calib-seq-len``, ``--calib-seed``) and the statistics of the unchanged model
    (:meth:`collect`, on first use and timed apart), shared by every configuration of a sweep."""

    def __init__(self, args: Any) -> None:
        from lowrank.io.data import calibration_batches, load_text

        self.args = args
        self.model, self.tokenizer, self.eval_ids = load_for_evaluation(args)
        calib = load_text("wiki", "calibration")
        self.calib = calibration_batches(
            self.tokenizer, calib, args.calib_samples, args.calib_seq_len, seed=args.calib_seed
        )
        self._stats = None
        self.stats_seconds: float | None = None

    def collect(self) -> Any:
        """The statistics every configuration compresses from (default: :func:`kv_statistics`)."""
        return kv_statistics(self.model, self.calib)[0]

    @property
    def stats(self) -> Any:
        import time

        if self._stats is None:
            start = time.perf_counter()
            self._stats = self.collect()
            self.stats_seconds = round(time.perf_counter() - start, 1)
        return self._stats

    def perplexity(self, model: Any, seq_len: int = 512, bos: bool = True) -> dict[str, dict[str, Any]]:
        """The perplexity report of ``model`` on each corpus with the seconds it took (``bos``: the
        tokenizer decides the BOS token; false: none)."""
        import time

        from lowrank.evaluation import perplexity

        tokenizer = self.tokenizer if bos else None
        out = {}
        for corpus, (ids, windows) in self.eval_ids.items():
            start = time.perf_counter()
            r = perplexity(model, tokenizer, ids, seq_len=seq_len, max_windows=windows, progress=False)
            out[corpus] = {**r.to_dict(), "seconds": round(time.perf_counter() - start, 1)}
        return out

    def compressed(self, config: Any) -> tuple[Any, Any]:
        """A deep copy of the model compressed with ``config`` from the shared statistics, and the result."""
        return compressed_copy(self.model, config, self.stats)


def save_figure(fig: Any, path: Path, dpi: int = 110) -> Path:
    """Lay out, write atomically as PNG, and close a matplotlib figure; return ``path``."""
    import matplotlib.pyplot as plt

    from lowrank.io.files import atomic_path

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    return path
