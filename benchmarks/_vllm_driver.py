"""Greedy tokens of one exported directory from stock transformers and from vLLM, in the vLLM venv.

Run by :mod:`benchmarks.serve_vllm` with the vLLM venv's interpreter, as a script (it imports neither
lowrank nor the benchmarks package, so what loads the export is stock code only)::

    python benchmarks/_vllm_driver.py EXPORT_DIR PROMPTS_JSON OUT_JSON

PROMPTS_JSON: ``{"prompts": [[token ids], ...], "max_new_tokens": N, "dtype": "float32"}``. OUT_JSON gets
each engine's new tokens per prompt, its load and generation seconds and versions.
"""

from __future__ import annotations

import json
import os
import sys
import time


def transformers_tokens(directory: str, prompts: list[list[int]], new: int, dtype: str) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, DynamicCache

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, dtype)).eval()
    loaded = time.perf_counter() - start
    out = []
    start = time.perf_counter()
    with torch.no_grad():
        for ids in prompts:
            cache = DynamicCache(config=model.config)
            x = torch.tensor([ids])
            gen = model.generate(
                x, max_new_tokens=new, min_new_tokens=new, do_sample=False, past_key_values=cache
            )
            out.append(gen[0, len(ids) :].tolist())
    return {
        "engine": f"transformers {transformers.__version__}",
        "class": type(model).__name__,
        "tokens": out,
        "load_seconds": loaded,
        "generate_seconds": time.perf_counter() - start,
    }


def vllm_tokens(directory: str, prompts: list[list[int]], new: int, dtype: str, memory: float) -> dict:
    import vllm
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(
        model=directory,
        dtype=dtype,
        block_size=16,  # the CPU MLA kernel's only block size
        max_model_len=max(map(len, prompts)) + new,
        enforce_eager=True,
        seed=0,
        gpu_memory_utilization=memory,  # on the CPU backend: the share of CPU memory reserved
    )
    loaded = time.perf_counter() - start
    params = SamplingParams(temperature=0.0, max_tokens=new, min_tokens=new, ignore_eos=True)
    start = time.perf_counter()
    results = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    backend = None
    try:  # which attention backend served the layers (best effort: the engine's own record)
        config = llm.llm_engine.vllm_config
        backend = str(getattr(config.attention_config, "backend", None))
    except AttributeError:
        pass
    return {
        "engine": f"vllm {vllm.__version__}",
        "attention_backend_setting": backend,
        "tokens": [list(r.outputs[0].token_ids) for r in results],
        "load_seconds": loaded,
        "generate_seconds": seconds,
    }


def main() -> int:
    directory, prompts_path, out_path = sys.argv[1:4]
    engine_directory = sys.argv[4] if len(sys.argv) > 4 else directory  # the export made for vLLM's ε
    with open(prompts_path) as f:
        spec = json.load(f)
    prompts, new, dtype = spec["prompts"], int(spec["max_new_tokens"]), spec.get("dtype", "float32")
    result = {"transformers": transformers_tokens(directory, prompts, new, dtype)}
    result["vllm"] = vllm_tokens(engine_directory, prompts, new, dtype, float(spec["memory_fraction"]))
    result["lowrank_imported"] = "lowrank" in sys.modules
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
