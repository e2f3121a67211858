"""Text in, token windows out: the built-in corpora, local files, hub datasets and calibration batches."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from lowrank.corpora import BUILTIN_CORPORA, corpus_dir

__all__ = ["load_text", "tokenize", "calibration_batches"]

logger = logging.getLogger(__name__)

# our split names -> the usual Hugging Face split names
_HUB_SPLITS = {"calibration": "train", "test": "test"}


def load_text(name_or_path: str, split: str = "test") -> str:
    """Return the text of a corpus split.

    Args:
        name_or_path: a built-in corpus (``'wiki'``, ``'shakespeare'``), a local ``.txt`` file (read
            whole; ``split`` is ignored), or a Hugging Face ``datasets`` name ``'name[:config]'``
            (needs the ``datasets`` package and network access; rows of its text column are joined
            with blank lines).
        split: ``'calibration'`` or ``'test'`` (built-ins list the splits they offer).

    Returns:
        The text, as one string.

    Raises:
        ValueError: unknown corpus or split (the message lists what is valid).
        FileNotFoundError: a path that looks like a file does not exist.
    """
    if name_or_path in BUILTIN_CORPORA:
        splits = BUILTIN_CORPORA[name_or_path]
        if split not in splits:
            raise ValueError(
                f"corpus {name_or_path!r} has no split {split!r}; valid splits: {', '.join(splits)}"
            )
        return (corpus_dir(name_or_path) / f"{split}.txt").read_text(encoding="utf-8")
    path = Path(name_or_path).expanduser()
    if path.suffix == ".txt" or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"no such text file: {path}")
        if path.suffix != ".txt":
            raise ValueError(
                f"{path}: expected a .txt file, a built-in corpus ({', '.join(BUILTIN_CORPORA)}) "
                "or a datasets name"
            )
        return path.read_text(encoding="utf-8")
    return _load_hub_text(name_or_path, split)


def _load_hub_text(name: str, split: str) -> str:
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"{name!r} is neither a built-in corpus ({', '.join(BUILTIN_CORPORA)}) nor a local .txt file; "
            "loading it as a Hugging Face dataset needs `pip install datasets` (extra 'hub')"
        ) from None
    if split not in _HUB_SPLITS:
        raise ValueError(f"split must be one of {', '.join(_HUB_SPLITS)}; got {split!r}")
    dataset_name, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(dataset_name, config or None, split=_HUB_SPLITS[split])
    except Exception as exc:  # network, unknown name, missing split: one readable line
        raise ValueError(f"could not load dataset {name!r} split {_HUB_SPLITS[split]!r}: {exc}") from exc
    columns = [c for c, f in ds.features.items() if getattr(f, "dtype", None) == "string"]
    if not columns:
        raise ValueError(f"dataset {name!r} has no string column; columns: {', '.join(ds.column_names)}")
    column = "text" if "text" in columns else columns[0]
    return "\n\n".join(ds[column])


def tokenize(tokenizer, text: str | torch.Tensor) -> torch.Tensor:
    """Token ids of ``text`` as a 1-D LongTensor (no special tokens added); a tensor passes through.

    Args:
        tokenizer: a Hugging Face tokenizer (unused when ``text`` is already a tensor).
        text: a string, or token ids of shape ``(N,)`` or ``(1, N)``.

    Returns:
        ids: ``(N,)`` int64.
    """
    if isinstance(text, torch.Tensor):
        if text.dim() == 2 and text.shape[0] == 1:
            text = text[0]
        if text.dim() != 1 or text.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"token ids must be an integer tensor of shape (N,) or (1, N); got "
                f"{tuple(text.shape)} {text.dtype}"
            )
        return text.long()
    if not isinstance(text, str):
        raise ValueError(f"text must be a str or a LongTensor of token ids; got {type(text).__name__}")
    if tokenizer is None:
        raise ValueError("a tokenizer is needed to evaluate raw text (pass token ids to skip it)")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_batches(
    tokenizer,
    text: str | torch.Tensor,
    n_samples: int,
    seq_len: int,
    *,
    seed: int = 0,
) -> torch.Tensor:
    """Draw ``n_samples`` random, non-overlapping windows of ``seq_len`` tokens from ``text``.

    The text is tokenized once; window starts are placed uniformly at random without overlap
    (sorted uniform gaps), then shuffled, all from a ``torch.Generator`` seeded with ``seed``.

    Args:
        tokenizer: Hugging Face tokenizer (unused when ``text`` is token ids).
        text: the calibration text, or its token ids ``(N,)``.
        n_samples: number of windows, >= 1.
        seq_len: tokens per window, >= 1.
        seed: seed of the generator; the same inputs and seed give the same batches.

    Returns:
        ids: ``(n_samples, seq_len)`` int64.

    Raises:
        ValueError: non-positive sizes, or the text holds fewer than ``n_samples * seq_len`` tokens.
    """
    if n_samples < 1 or seq_len < 1:
        raise ValueError(f"n_samples and seq_len must be >= 1; got n_samples={n_samples}, seq_len={seq_len}")
    ids = tokenize(tokenizer, text)
    slack = ids.numel() - n_samples * seq_len
    if slack < 0:
        raise ValueError(
            f"text has {ids.numel():,} tokens but {n_samples} samples x {seq_len} tokens need "
            f"{n_samples * seq_len:,}; use fewer or shorter samples or a longer text"
        )
    g = torch.Generator().manual_seed(seed)
    gaps = torch.sort(torch.randint(0, slack + 1, (n_samples,), generator=g)).values
    starts = gaps + torch.arange(n_samples) * seq_len
    starts = starts[torch.randperm(n_samples, generator=g)]
    index = starts[:, None] + torch.arange(seq_len)[None, :]
    return ids[index]
