"""Llama-shaped causal LMs with seeded Gaussian weights, for the benchmarks that need a model of real size.

Compression time, inference speed and memory depend on the shapes only, so a model with Llama-2-7B's
shapes and random weights stands in for the real one: nothing to download or carry. ``smoke`` is a
model of the same structure a few MB in size, for checking the scripts on a CPU.
"""

from __future__ import annotations

import re
from typing import Any

#: Shapes by name (``num_hidden_layers`` is chosen per run; 32 for the full Llama-2-7B).
SHAPES: dict[str, dict[str, Any]] = {
    "llama2-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
    "smoke": dict(
        hidden_size=256,
        intermediate_size=688,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
}
FULL_SHAPE, FULL_LAYERS = "llama2-7b", 32


def add_arguments(parser: Any, seeded: str) -> None:
    """The random model's flags: ``--shape``, ``--layers``, ``--dtype``, ``--init-std`` and ``--seed`` (of
    the weights and ``seeded``)."""
    parser.add_argument("--shape", default=FULL_SHAPE, choices=tuple(SHAPES), help="model shape (llama2-7b)")
    parser.add_argument("--layers", type=int, default=FULL_LAYERS, help="decoder layers (default: 32)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--init-std", type=float, default=0.02, help="std of the Gaussian weights")
    parser.add_argument("--seed", type=int, default=0, help=f"seed of the weights and {seeded}")


def describe(shape: dict[str, Any]) -> str:
    """``hidden 4096 / MLP 11008 / 32 heads / 32 KV heads / vocab 32000``."""
    return (
        f"hidden {shape['hidden_size']} / MLP {shape['intermediate_size']} / "
        f"{shape['num_attention_heads']} heads / {shape['num_key_value_heads']} KV heads / "
        f"vocab {shape['vocab_size']}"
    )


def device_tag(device: str) -> str:
    """``cpu``, or the GPU model in lower case (``h100``, ``h200``…), else ``cuda``."""
    import torch

    if device == "cpu":
        return "cpu"
    found = re.search(r"\b([A-Z]{1,2}\d{2,4})\b", torch.cuda.get_device_name())
    return found.group(1).lower() if found else "cuda"


def build_model(
    shape: str,
    layers: int,
    dtype,
    std: float,
    seed: int,
    init_device: str,
    *,
    device: str = "cpu",
    max_positions: int | None = None,
):
    """A ``LlamaForCausalLM`` of ``SHAPES[shape]`` with ``layers`` layers in ``dtype`` on ``device``.

    Built on the meta device, allocated empty in ``dtype`` and filled one tensor at a time with
    N(0, ``std``²) weights (RMSNorm weights 1), drawn in float32 on ``init_device`` from one seeded
    generator, so the weights do not depend on where the model lives and the full float32 model is never
    materialised. ``max_positions`` raises ``max_position_embeddings`` (a longer context than the shape's;
    RoPE itself has no limit).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = dict(SHAPES[shape])
    if max_positions is not None:
        dims["max_position_embeddings"] = max(dims["max_position_embeddings"], max_positions)
    config = LlamaConfig(**dims, num_hidden_layers=layers)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to(dtype).to_empty(device=device)
    rotary = type(model.model.rotary_emb)(config=config)  # float32 buffers, recomputed
    model.model.rotary_emb = rotary.to(device)
    gen = torch.Generator(device=init_device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                w = torch.empty(param.shape, device=init_device).normal_(0.0, std, generator=gen)
                param.copy_(w.to(dtype))
    return model.eval()
