"""Export a Llama-family model converted by ``mla`` (``partial_rope='rorope'``) as stock DeepSeek-V3.

The written directory loads with ``AutoModelForCausalLM.from_pretrained(DIR)`` in plain transformers (no
lowrank import, no ``trust_remote_code``): ``model_type="deepseek_v3"``, ``num_key_value_heads =
num_attention_heads``, ``q_lora_rank=None``, every MLP dense (``first_k_dense_replace = num_hidden_layers``),
``num_mtp_layers=0``, ``rope_interleave=False`` (rotate-half order, as the conversion computes) and the
source's tied embeddings. The softmax scale is already folded into ``q_proj`` by the conversion.

**Engines.** ``engine`` lays the export out for the program that will load it (:func:`engine_settings`):
``"transformers"`` (the defaults above) or ``"vllm"`` (vLLM 0.32's DeepSeek-V3 model: interleaved rotary
pairs, an untied ``lm_head``, the latent norm's ε = ``rms_norm_eps`` and the RoPE written as YaRN of factor
1). Each setting can also be given on its own:

* ``rope_interleave=True`` permutes the rotary rows of ``q_proj`` and ``kv_a_proj_with_mqa`` from rotate-half
  order (pair i = features i, i + ρ/2) to interleaved order (pair i = features 2i, 2i + 1), which
  DeepSeek's interleaved RoPE maps back before rotating, so the scores are the same.
* ``kv_lora_rank=R`` pads the latent with R − r zero rows in ``kv_a_proj_with_mqa`` and zero columns in
  ``kv_b_proj``: the same model, with R − r more cached numbers per token and layer (vLLM's CPU MLA kernel
  takes only 512 + 64).
* ``untie_embeddings=True`` writes ``lm_head`` as its own tensor: vLLM 0.32's DeepSeek-V3 model builds an
  ``lm_head`` of its own and never ties it to the embeddings, so a tied checkpoint would serve an
  uninitialised output layer there.
* ``identity_yarn=True`` writes ``rope_parameters`` as ``{"rope_type": "yarn", "factor": 1.0, ...}``: YaRN
  of factor 1 interpolates no frequency and scales nothing, and stock transformers computes it bit for bit
  as the default RoPE. vLLM 0.32 on the CPU needs it: its default-RoPE class rotates with the
  ``rotary_embedding`` kernel, which reads a (tokens, heads, dim) query as tokens·heads rows and turns the
  row of token t, head h by ``positions[t·heads + h]`` (past the end of ``positions`` for most rows)
  instead of ``positions[t]``, so in DeepSeek's MLA (whose query is 3-D) only the first token's first head
  is rotated right; its YaRN class rotates in PyTorch. ``benchmarks/vllm_rope_check.py`` reproduces both.

**The latent RMSNorm.** DeepSeek normalises the latent (``kv_a_layernorm``, RMSNorm with ε = 1e-6 in
transformers) before ``kv_b_proj``; the conversion's latent is a plain linear image of the input. The export
scales the latent rows of ``kv_a_proj_with_mqa`` by δ and sets the norm's weight to √ε/δ: the norm computes
``(√ε/δ) · δc / sqrt(mean((δc)²) + ε) = c / sqrt(1 + δ² mean(c²)/ε)``, which is c to float precision when
``δ² mean(c²) ≪ ε``. δ is chosen from a bound that holds for every input: the attention's input is the
output of an RMSNorm of weight w, so ‖x‖ ≤ max|w| · √n, and ``mean(c²) ≤ ‖L‖₂² max|w|² n / r``. The manifest
(``lowrank.json``) records δ, the bound's ratio ``δ² mean(c²)/ε`` (≤ ``ratio``) and, when calibration tokens
are given, the largest ratio measured on them. fp16 would underflow such small latents: export in fp32 or
bf16.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank.attention.deepseek_mla import DeepseekLatentAttention
from lowrank.io.files import atomic_dir, check_output_dir, write_json
from lowrank.loading.serialization import file_digest
from lowrank.nn import dense_weight
from lowrank.nn.architectures import decoder_layers, get_arch_spec
from lowrank.nn.attention_layout import attention_info, attention_shape
from lowrank.nn.surgery import get_module

__all__ = [
    "ENGINES",
    "LATENT_NORM_EPS",
    "deepseek_v3_problem",
    "engine_settings",
    "export_deepseek_v3",
    "stock_rope_theta",
]

#: ε of transformers' ``DeepseekV3Attention.kv_a_layernorm`` (its RMSNorm default; not ``rms_norm_eps``).
LATENT_NORM_EPS = 1e-6
EXPORTABLE = ("llama", "mistral")
#: The programs an export can be laid out for (``export_deepseek_v3(engine=...)``).
ENGINES = ("transformers", "vllm")


def engine_settings(engine: str, rms_norm_eps: float) -> dict[str, Any]:
    """What loading in ``engine`` needs of a DeepSeek-V3 export whose config has ``rms_norm_eps``:
    ``epsilon`` (the ε the engine builds ``kv_a_layernorm`` with: transformers its RMSNorm default 1e-6,
    vLLM 0.32 ``rms_norm_eps``), ``rope_interleave`` (vLLM's DeepSeek model always rotates interleaved
    pairs), ``untie_embeddings`` (vLLM's never ties ``lm_head``) and ``identity_yarn`` (vLLM's CPU rotary
    kernel mis-rotates a 3-D query; see the module docstring)."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}; got {engine!r}")
    vllm = engine == "vllm"
    return {
        "epsilon": float(rms_norm_eps) if vllm else LATENT_NORM_EPS,
        "rope_interleave": vllm,
        "untie_embeddings": vllm,
        "identity_yarn": vllm,
    }


def deepseek_v3_problem(model: nn.Module) -> str | None:
    """Why ``model`` cannot be written as a stock DeepSeek-V3 checkpoint (one line), or ``None``."""
    config = model.config.get_text_config(decoder=True)
    if config.model_type not in EXPORTABLE:
        return (
            f"model_type {config.model_type!r} has no stock DeepSeek-V3 equivalent (its norms, scalings or "
            f"soft-capping differ); exportable: {', '.join(EXPORTABLE)}"
        )
    layers = decoder_layers(model)
    spec = get_arch_spec(model)
    kinds = [type(get_module(layer, spec.attention)).__name__ for layer in layers]
    wrong = [i for i, k in enumerate(kinds) if k != DeepseekLatentAttention.__name__]
    if wrong:
        return (
            f"layer {wrong[0]} attention is {kinds[wrong[0]]}; export needs every layer converted by "
            "mla with partial_rope='rorope'"
        )
    info = attention_info(model)
    if any(w is not None for w in info.sliding_window) or not all(info.rope):
        return "sliding-window or RoPE-free layers are not expressible in stock DeepSeek-V3"
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        return f"rope_type {rope.get('rope_type')!r} is not exportable; only the default RoPE is"
    sizes = {
        (m.kv_lora_rank, m.qk_rope_head_dim, m.qk_nope_head_dim, tuple(m.rope_frequencies.tolist()))
        for m in model.modules()
        if isinstance(m, DeepseekLatentAttention)
    }
    if len(sizes) != 1:
        return "layers have different latent or rotary sizes; DeepSeek-V3 has one per model"
    frequencies = next(iter(sizes))[3]
    if _ladder_stride(frequencies) is None:
        return (
            f"the rotary key turns at frequencies {list(frequencies)}, not one ladder j·s from 0; "
            "stock DeepSeek-V3 has only such ladders"
        )
    if getattr(config, "mlp_bias", False) or getattr(config, "attention_bias", False):
        return "biases in the MLP or attention are not exportable"
    return None


def _ladder_stride(frequencies: tuple[int, ...] | list[int]) -> int | None:
    """``s`` when the kept frequency indices are ``0, s, 2s, …``, else ``None``."""
    stride = frequencies[1] if len(frequencies) > 1 else 1
    ok = stride >= 1 and list(frequencies) == [j * stride for j in range(len(frequencies))]
    return stride if ok else None


def stock_rope_theta(theta: float, head_dim: int, frequencies: list[int]) -> float:
    """The base of a stock rotary key of width ``2·len(frequencies)`` that turns at the source's
    frequencies ``frequencies`` (indices ``j·s`` of the source's ``head_dim/2``): ``θ^(2·s·len/head_dim)``,
    since ``θ'^(−2j/ρ) = θ^(−2js/d)`` exactly when ``θ' = θ^(sρ/d)``."""
    stride = _ladder_stride(frequencies)
    if stride is None:
        raise ValueError(f"frequencies {list(frequencies)} are not one ladder j·s from 0")
    return float(theta) ** (stride * 2 * len(frequencies) / head_dim)


def _rope_parameters(
    source: Any, head_dim: int, module: DeepseekLatentAttention, identity_yarn: bool
) -> dict[str, Any]:
    """The export's ``rope_parameters``: the default RoPE at the stock base that turns the conversion's
    frequencies, or the same rotation written as YaRN of factor 1 (``identity_yarn``)."""
    theta = stock_rope_theta(source.rope_parameters["rope_theta"], head_dim, module.rope_frequencies.tolist())
    if not identity_yarn:
        return {"rope_type": "default", "rope_theta": theta}
    return {
        "rope_type": "yarn",
        "factor": 1.0,
        "original_max_position_embeddings": source.max_position_embeddings,
        "rope_theta": theta,
    }


def _latent_bound(module: DeepseekLatentAttention, norm: nn.Module) -> float:
    """An upper bound of mean(c²) over every input: ‖L‖₂² · max|w_norm|² · n / r."""
    L = module.kv_a_proj_with_mqa.weight[: module.kv_lora_rank].detach().to(torch.float64)
    w = norm.weight.detach().to(torch.float64).abs().max()
    n = L.shape[1]
    return float(torch.linalg.matrix_norm(L, ord=2) ** 2 * w**2 * n / module.kv_lora_rank)


def _measured_mean_square(model: nn.Module, modules: list[DeepseekLatentAttention], ids: torch.Tensor):
    """Largest mean(c²) of each layer's latent over the tokens ``ids``."""
    peaks = [0.0] * len(modules)
    handles = []
    for i, module in enumerate(modules):
        r = module.kv_lora_rank

        def hook(mod, args, out, i=i, r=r):
            peaks[i] = max(peaks[i], float(out[..., :r].double().square().mean(-1).max()))

        handles.append(module.kv_a_proj_with_mqa.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(ids.to(next(model.parameters()).device))
    finally:
        for handle in handles:
            handle.remove()
    return peaks


def _interleaved(rows: int) -> torch.Tensor:
    """Row order taking rotate-half pairs (i, i + rows/2) to interleaved pairs (2i, 2i + 1)."""
    half = torch.arange(rows // 2)
    return torch.stack([half, half + rows // 2], dim=-1).flatten()


def _engine_layout(module: DeepseekLatentAttention, delta: float, width: int, interleave: bool):
    """(q_proj, kv_a_proj_with_mqa, kv_b_proj) weights as written: latent rows scaled by δ and padded with
    zeros to ``width`` (zero columns in kv_b), rotary rows interleaved when asked."""
    r, rope = module.kv_lora_rank, module.qk_rope_head_dim
    q = module.q_proj.weight.detach()
    kv_a = module.kv_a_proj_with_mqa.weight.detach()
    kv_b = module.kv_b_proj.weight.detach()
    latent, rotary = kv_a[:r] * delta, kv_a[r:]
    if interleave:
        order = _interleaved(rope)
        rotary = rotary[order]
        heads = q.view(module.num_heads, module.qk_head_dim, -1)
        q = torch.cat([heads[:, : module.qk_nope_head_dim], heads[:, module.qk_nope_head_dim :][:, order]], 1)
        q = q.reshape(-1, heads.shape[-1])
    kv_a = torch.cat([latent, latent.new_zeros(width - r, latent.shape[1]), rotary])
    kv_b = torch.cat([kv_b, kv_b.new_zeros(kv_b.shape[0], width - r)], dim=1)
    return q, kv_a, kv_b


def export_deepseek_v3(
    model: nn.Module,
    out_dir: str | Path,
    *,
    tokenizer: Any = None,
    calibration: torch.Tensor | None = None,
    ratio: float = 1e-6,
    engine: str = "transformers",
    epsilon: float | None = None,
    rope_interleave: bool | None = None,
    kv_lora_rank: int | None = None,
    untie_embeddings: bool | None = None,
    identity_yarn: bool | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (every layer converted by ``mla`` with ``partial_rope='rorope'``) as a stock
    ``DeepseekV3ForCausalLM`` directory.

    Args:
        model: the converted model (fp32 or bf16).
        out_dir: new or empty directory, or an earlier export (replaced atomically).
        tokenizer: saved alongside when given.
        calibration: token ids (b, t) on which the latent's mean square is measured and recorded.
        ratio: the bound's ``δ² mean(c²) / ε`` (how far below ε the latent stays; default 1e-6).
        engine: the program that will load the export (:data:`ENGINES`); it sets the next four settings
            that are left ``None`` (:func:`engine_settings`).
        epsilon: the latent norm's ε the export assumes (transformers: 1e-6).
        rope_interleave: write the rotary rows in interleaved pair order (see the module docstring).
        kv_lora_rank: pad the latent with zeros to this width (≥ the conversion's; default: as converted).
        untie_embeddings: write ``lm_head.weight`` as its own copy of the input embeddings and
            ``tie_word_embeddings=False`` (vLLM's DeepSeek-V3 model ignores tied embeddings).
        identity_yarn: write the RoPE as YaRN of factor 1 (the same rotation; see the module docstring).
        overwrite: also replace a non-empty directory this toolkit did not write.

    Returns:
        The directory.

    Raises:
        ValueError: the model is not exportable (one line naming why), or ``out_dir`` is unusable.
    """
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    problem = deepseek_v3_problem(model)
    if problem is not None:
        raise ValueError(f"cannot export as deepseek-v3: {problem}")
    source = model.config.get_text_config(decoder=True)
    given = {
        "epsilon": epsilon,
        "rope_interleave": rope_interleave,
        "untie_embeddings": untie_embeddings,
        "identity_yarn": identity_yarn,
    }
    layout = {
        name: default if given[name] is None else given[name]
        for name, default in engine_settings(engine, source.rms_norm_eps).items()
    }
    epsilon = layout["epsilon"]
    if not 0 < ratio < 1e-2 or not epsilon > 0:
        raise ValueError(f"ratio must be in (0, 0.01) and epsilon > 0; got {ratio}, {epsilon}")
    dtype = next(model.parameters()).dtype
    if dtype == torch.float16:
        raise ValueError("float16 underflows the scaled latent; export in float32 or bfloat16")
    first_attention = get_module(decoder_layers(model)[0], get_arch_spec(model).attention)
    width = kv_lora_rank or first_attention.kv_lora_rank
    if width < first_attention.kv_lora_rank:
        raise ValueError(
            f"kv_lora_rank {kv_lora_rank} is below the converted latent's {first_attention.kv_lora_rank}; "
            "pass a width at least that large (the latent can be padded, not cut)"
        )
    out = check_output_dir(out_dir, overwrite=overwrite)
    shape = attention_shape(source)
    layers = decoder_layers(model)
    attention = get_arch_spec(model).attention
    modules = [get_module(layer, attention) for layer in layers]
    first = modules[0]
    config = DeepseekV3Config(
        vocab_size=source.vocab_size,
        hidden_size=source.hidden_size,
        intermediate_size=source.intermediate_size,
        moe_intermediate_size=source.intermediate_size,
        num_hidden_layers=source.num_hidden_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_heads,
        n_shared_experts=1,
        n_routed_experts=1,
        n_group=1,
        topk_group=1,
        num_experts_per_tok=1,
        first_k_dense_replace=source.num_hidden_layers,
        num_mtp_layers=0,
        kv_lora_rank=width,
        q_lora_rank=None,
        qk_rope_head_dim=first.qk_rope_head_dim,
        qk_nope_head_dim=first.qk_nope_head_dim,
        v_head_dim=first.v_head_dim,
        hidden_act=source.hidden_act,
        max_position_embeddings=source.max_position_embeddings,
        rms_norm_eps=source.rms_norm_eps,
        tie_word_embeddings=bool(getattr(source, "tie_word_embeddings", False))
        and not layout["untie_embeddings"],
        rope_parameters=_rope_parameters(source, shape.head_dim, first, layout["identity_yarn"]),
        rope_interleave=layout["rope_interleave"],
        attention_bias=False,
        attention_dropout=0.0,
        bos_token_id=source.bos_token_id,
        eos_token_id=source.eos_token_id,
        pad_token_id=source.pad_token_id,
    )
    measured = _measured_mean_square(model, modules, calibration) if calibration is not None else None
    with torch.device("meta"):
        target = DeepseekV3ForCausalLM(config)
    state: dict[str, torch.Tensor] = {}
    records = []
    inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    state["model.embed_tokens.weight"] = inner.embed_tokens.weight
    state["model.norm.weight"] = inner.norm.weight
    if not config.tie_word_embeddings:
        state["lm_head.weight"] = model.get_output_embeddings().weight.detach().clone()
    for i, (layer, module) in enumerate(zip(layers, modules, strict=True)):
        p = f"model.layers.{i}."
        bound = _latent_bound(module, layer.input_layernorm)
        delta = math.sqrt(ratio * epsilon / max(bound, 1e-300))
        q, kv_a, kv_b = _engine_layout(module, delta, width, layout["rope_interleave"])
        state.update(
            {
                p + "input_layernorm.weight": layer.input_layernorm.weight,
                p + "post_attention_layernorm.weight": layer.post_attention_layernorm.weight,
                p + "self_attn.q_proj.weight": q,
                p + "self_attn.kv_a_proj_with_mqa.weight": kv_a,
                p + "self_attn.kv_a_layernorm.weight": torch.full(
                    (width,), math.sqrt(epsilon) / delta, dtype=dtype
                ),
                p + "self_attn.kv_b_proj.weight": kv_b,
                p + "self_attn.o_proj.weight": dense_weight(module.o_proj),
                **{
                    p + f"mlp.{n}.weight": dense_weight(getattr(layer.mlp, n))
                    for n in ("gate_proj", "up_proj", "down_proj")
                },
            }
        )
        record = {"delta": delta, "bound_mean_square": bound, "bound_ratio": delta**2 * bound / epsilon}
        if measured is not None:
            record["calibration_ratio"] = delta**2 * measured[i] / epsilon
        records.append(record)
    state = {k: v.detach().to(dtype).contiguous() for k, v in state.items()}
    target.load_state_dict(state, strict=False, assign=True)
    expected = set(target.state_dict())
    missing = sorted(expected - set(state) - ({"lm_head.weight"} if config.tie_word_embeddings else set()))
    if missing:
        raise ValueError(f"internal: the export left DeepSeek-V3 weights unset: {', '.join(missing[:3])}")
    if config.tie_word_embeddings:
        target.tie_weights()
    manifest = {
        "format": "deepseek-v3",
        "source_model_type": source.model_type,
        "latent_norm": {
            "epsilon_assumed": epsilon,
            "note": "kv_a_layernorm is made linear: latent rows of kv_a_proj_with_mqa scaled by delta, norm "
            "weight sqrt(epsilon)/delta; an engine using another epsilon for this norm changes the model",
            "ratio_target": ratio,
            "layers": records,
        },
        "cached_numbers_per_token_and_layer": width + first.qk_rope_head_dim,
        "latent": {
            "converted": first.kv_lora_rank,
            "written": width,
            "zero_padding": width - first.kv_lora_rank,
        },
        "engine": engine,
        "rope_interleave": layout["rope_interleave"],
        "rope_parameters": config.rope_parameters,
        "tie_word_embeddings": config.tie_word_embeddings,
        "dtype": str(dtype).removeprefix("torch."),
    }
    with atomic_dir(out) as tmp:
        target.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        manifest["files"] = {
            f.relative_to(tmp).as_posix(): file_digest(f) for f in sorted(tmp.rglob("*")) if f.is_file()
        }
        write_json(tmp / "lowrank.json", manifest)
    return out
