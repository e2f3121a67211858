"""Text in, token windows out: the built-in corpora, local files, hub datasets and calibration batches."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from lowrank.io.corpora import BUILTIN_CORPORA, corpus_dir
from lowrank.io.files import read_text

__all__ = ["load_text", "tokenize", "calibration_batches", "default_bos_id", "resolve_bos"]

logger = logging.getLogger(__name__)

# our split names -> the usual Hugging Face split names
_HUB_SPLITS = {"calibration": "train", "test": "test"}

#: Short text whose encodings with and without special tokens reveal a prepended BOS.
_BOS_PROBE = "The quick brown fox."


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
        return read_text(corpus_dir(name_or_path) / f"{split}.txt")
    path = Path(name_or_path).expanduser()
    if path.suffix == ".txt" or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"no such text file: {path}")
        if path.suffix != ".txt":
            raise ValueError(
                f"{path}: expected a .txt file, a built-in corpus ({', '.join(BUILTIN_CORPORA)}) "
                "or a datasets name"
            )
        return read_text(path)
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

    BOS is the caller's business: evaluation windows and calibration sequences add it per window
    (:func:`resolve_bos`), since one BOS at the start of a long stream would sit in the first window only.

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


def default_bos_id(tokenizer) -> int | None:
    """The id ``tokenizer`` prepends by default (its BOS), or ``None`` when it prepends nothing.

    Decided by behaviour, not by attributes (many tokenizers define a ``bos_token`` they never add): a short
    text is encoded with and without special tokens; BOS is added when the former is one token followed by
    the latter. A token appended at the end (EOS) is ignored.
    """
    if tokenizer is None:
        return None
    kwargs = dict(return_attention_mask=False, verbose=False)
    plain = tokenizer(_BOS_PROBE, add_special_tokens=False, **kwargs)["input_ids"]
    special = tokenizer(_BOS_PROBE, add_special_tokens=True, **kwargs)["input_ids"]
    if len(special) > len(plain) and list(special[1 : 1 + len(plain)]) == list(plain):
        return int(special[0])
    return None


def resolve_bos(tokenizer, add_bos: bool | None = None) -> int | None:
    """The BOS id to put at the start of every evaluation window and calibration sequence, or ``None``.

    Args:
        tokenizer: Hugging Face tokenizer, or ``None`` (token ids with no tokenizer).
        add_bos: ``None``: as the tokenizer does by default (:func:`default_bos_id`; no BOS without a
            tokenizer); ``True``: always (the tokenizer's default BOS, else its ``bos_token_id``);
            ``False``: never.

    Raises:
        ValueError: ``add_bos=True`` but the tokenizer is missing or has no BOS token.
    """
    if add_bos is False:
        return None
    bos = default_bos_id(tokenizer)
    if add_bos is None or bos is not None:
        return bos
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        name = type(tokenizer).__name__ if tokenizer is not None else "no tokenizer"
        raise ValueError(
            f"add_bos=True needs a tokenizer with a BOS token; got {name} (use add_bos=None or False)"
        )
    return int(bos)


def calibration_batches(
    tokenizer,
    text: str | torch.Tensor,
    n_samples: int,
    seq_len: int,
    *,
    seed: int = 0,
    add_bos: bool | None = None,
) -> torch.Tensor:
    """Draw ``n_samples`` random, non-overlapping windows of ``seq_len`` tokens from ``text``.

    The text is tokenized once (no special tokens); window starts are placed uniformly at random without
    overlap (sorted uniform gaps), then shuffled, all from a ``torch.Generator`` seeded with ``seed``. Where
    the tokenizer adds a BOS by default (see :func:`resolve_bos`), every sequence is BOS followed by a window
    of ``seq_len - 1`` text tokens, so the model is calibrated on the inputs it sees in use; the sequence
    length stays ``seq_len``.

    Args:
        tokenizer: Hugging Face tokenizer (only its BOS convention is used when ``text`` is token ids).
        text: the calibration text, or its token ids ``(N,)``.
        n_samples: number of windows, >= 1.
        seq_len: tokens per sequence, >= 1 (>= 2 with BOS).
        seed: seed of the generator; the same inputs and seed give the same batches.
        add_bos: ``None``: as the tokenizer does; ``True`` / ``False``: force (see :func:`resolve_bos`).

    Returns:
        ids: ``(n_samples, seq_len)`` int64.

    Raises:
        ValueError: non-positive sizes, or the text holds fewer than ``n_samples`` windows of text tokens.
    """
    if n_samples < 1 or seq_len < 1:
        raise ValueError(f"n_samples and seq_len must be >= 1; got n_samples={n_samples}, seq_len={seq_len}")
    bos = resolve_bos(tokenizer, add_bos)
    span = seq_len - (bos is not None)  # text tokens per sequence
    if span < 1:
        raise ValueError(f"seq_len must be >= 2 when every sequence starts with BOS; got seq_len={seq_len}")
    ids = tokenize(tokenizer, text)
    slack = ids.numel() - n_samples * span
    if slack < 0:
        with_bos = " (+1 BOS each)" if bos is not None else ""
        raise ValueError(
            f"text has {ids.numel():,} tokens but {n_samples} samples x {span} tokens{with_bos} need "
            f"{n_samples * span:,}; use fewer or shorter samples or a longer text"
        )
    g = torch.Generator().manual_seed(seed)
    gaps = torch.sort(torch.randint(0, slack + 1, (n_samples,), generator=g)).values
    starts = gaps + torch.arange(n_samples) * span
    starts = starts[torch.randperm(n_samples, generator=g)]
    index = starts[:, None] + torch.arange(span)[None, :]
    if bos is None:
        return ids[index]
    return torch.cat([torch.full((n_samples, 1), bos, dtype=torch.long), ids[index]], dim=1)
