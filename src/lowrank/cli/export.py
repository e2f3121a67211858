"""``lowrank export``: write a converted model in a standard layout another program loads.

``lowrank export MODEL --format deepseek-v3 --out DIR`` writes a model whose every layer was converted
by ``lowrank compress --method mla`` (``--partial-rope rorope``, the default) as a stock
``DeepseekV3ForCausalLM`` directory: ``AutoModelForCausalLM.from_pretrained(DIR)`` loads it with plain
transformers (see :mod:`lowrank.loading.export_deepseek`); ``--engine vllm`` lays it out for vLLM instead.
"""

from __future__ import annotations

import argparse

from lowrank.cli._common import add_model_arguments

__all__ = ["register", "run", "ENGINES", "FORMATS"]

FORMATS = ("deepseek-v3",)
ENGINES = ("transformers", "vllm")
"""``lowrank.loading.export_deepseek.ENGINES``, repeated so that building the parser imports no torch."""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a converted model in a standard layout (deepseek-v3: loads in stock transformers)",
        description=(
            "Write a model saved by 'lowrank compress --method mla' (partial RoPE 'rorope') as a stock "
            "DeepSeek-V3 checkpoint that transformers loads without lowrank. The latent RMSNorm is made "
            "exactly linear; lowrank.json in the output records the epsilon it assumes and the bound checked."
        ),
    )
    add_model_arguments(p)
    p.add_argument("model_path", nargs="?", metavar="MODEL", help="the converted model (same as --model)")
    p.add_argument("--format", required=True, choices=FORMATS, help="output layout")
    p.add_argument("--out", required=True, help="directory to write (new or empty; checked before any work)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="allow --out to replace a non-empty directory that this toolkit did not write",
    )
    p.add_argument(
        "--engine",
        default="transformers",
        choices=ENGINES,
        help="the program that will load the export (default transformers). vllm: interleaved rotary "
        "pairs, an untied lm_head, the latent norm's epsilon = rms_norm_eps and the RoPE written as YaRN of "
        "factor 1 (the same rotation; vLLM 0.32's CPU rotary kernel mis-rotates MLA queries under the "
        "default RoPE); add --kv-lora-rank 512 for vLLM's CPU MLA kernel (it takes only 512 + rotary 64)",
    )
    p.add_argument(
        "--check-tokens",
        type=int,
        default=2048,
        help="wiki calibration tokens on which the latent's mean square is measured and recorded (0: none)",
    )
    p.add_argument(
        "--latent-norm-eps",
        type=float,
        default=None,
        help="epsilon of the engine's latent RMSNorm (default: the engine's; transformers 1e-6)",
    )
    p.add_argument(
        "--rope-interleave",
        action="store_true",
        default=None,
        help="write the rotary rows in interleaved pair order (config rope_interleave=true; vLLM's CPU MLA "
        "kernel needs it); the model is the same",
    )
    p.add_argument(
        "--kv-lora-rank",
        type=int,
        default=None,
        metavar="R",
        help="pad the latent with zeros to R (>= the converted width; vLLM's CPU MLA kernel takes only 512): "
        "the same model, R minus the converted width more cached numbers per token and layer",
    )
    p.add_argument(
        "--untie-embeddings",
        action="store_true",
        default=None,
        help="write lm_head as its own copy of the embeddings (vLLM's DeepSeek-V3 model does not tie them)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lowrank.io.files import check_output_dir
    from lowrank.loading.export_deepseek import export_deepseek_v3
    from lowrank.loading.models import load_model

    name = args.model_path or args.model
    check_output_dir(args.out, overwrite=args.overwrite)
    if args.check_tokens < 0:
        raise ValueError(f"--check-tokens must be >= 0; got {args.check_tokens}")
    if args.kv_lora_rank is not None and args.kv_lora_rank < 1:
        raise ValueError(f"--kv-lora-rank must be >= 1; got {args.kv_lora_rank}")
    model, tokenizer = load_model(name, trust_remote_code=args.trust_remote_code)
    ids = None
    if args.check_tokens:
        from lowrank.io.data import calibration_batches, load_text

        seq = min(512, args.check_tokens)
        ids = calibration_batches(
            tokenizer, load_text("wiki", "calibration"), max(1, args.check_tokens // seq), seq, seed=0
        )
    out = export_deepseek_v3(
        model,
        args.out,
        tokenizer=tokenizer,
        calibration=ids,
        engine=args.engine,
        epsilon=args.latent_norm_eps,
        rope_interleave=args.rope_interleave,
        kv_lora_rank=args.kv_lora_rank,
        untie_embeddings=args.untie_embeddings,
        overwrite=args.overwrite,
    )
    loads = "vLLM" if args.engine == "vllm" else "transformers' AutoModelForCausalLM"
    print(f"wrote {out} (deepseek-v3 for {args.engine}; loads with {loads})")
    return 0
