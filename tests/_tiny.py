"""Offline stand-ins for real assets: a word-level tokenizer over the tiny models' vocabulary, saved dirs."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 256


def tiny_tokenizer():
    """A whitespace word-level tokenizer: ``'w0' … 'w254'`` map to ids 1…255, anything else to 0."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]"] + [f"w{i}" for i in range(VOCAB - 1)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def tiny_text(n_words: int, seed: int = 0) -> str:
    """Random text in the tiny tokenizer's vocabulary: exactly ``n_words`` tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB - 1, (n_words,), generator=g)
    return " ".join(f"w{int(i)}" for i in ids)


def save_tiny_model_dir(path: Path, model_type: str = "llama", seed: int = 0):
    """Save a tiny random model and the tiny tokenizer to ``path`` as a plain HF directory; return it."""
    from conftest import make_tiny_model

    model = make_tiny_model(model_type, seed=seed)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return model
