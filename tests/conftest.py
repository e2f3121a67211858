"""Shared test helpers: tiny random models of every supported family, built offline from configs."""

from __future__ import annotations

import pytest
import torch

#: Families the toolkit supports through the Llama-shaped ArchSpec; every table-driven test covers them
#: (qwen3 and gemma3_text add q/k norms inside attention).
ARCHITECTURES = ("llama", "qwen2", "mistral", "gemma", "gemma2", "qwen3", "gemma3_text")


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: on tiny matrices, with other processes on the machine, LAPACK's
    thread hand-offs cost 100x the math."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_TINY = dict(
    num_hidden_layers=2,
    hidden_size=64,
    intermediate_size=160,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=256,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)


def make_tiny_model(model_type: str = "llama", seed: int = 0, **overrides):
    """A randomly initialised causal LM of ``model_type`` with tiny dimensions, in eval mode, float32."""
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    kwargs = {**_TINY, **overrides}
    config = CONFIG_MAPPING[model_type](**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)  # test-only: transformers' initialisers draw from the global generator
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def random_tokens(batch: int, seq_len: int, vocab: int = _TINY["vocab_size"], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq_len), generator=g)


@pytest.fixture(params=ARCHITECTURES)
def tiny_model(request):
    return make_tiny_model(request.param)
