"""What healing trains, and at which learning rate, as each replacement module answers for itself."""

from __future__ import annotations

from torch import nn

from lowrank.nn.registry import replacement_modules

__all__ = ["LEARNING_RATE", "TRAINABLE", "default_learning_rate", "resolve_trainable", "trainable_parameters"]

TRAINABLE = ("auto", "replaced", "attention", "all")

LEARNING_RATE = 1e-4
"""Peak learning rate when low-rank factors, MLA codecs alone (or everything) train: the best of those
measured on the built-in model (3e-4 diverges on svd-llm-v2 factors; the MLA codec barely moves at 1e-5;
benchmarks/results/heal_cpu.md)."""


def resolve_trainable(model: nn.Module, trainable: str = "auto") -> str:
    """What ``trainable='auto'`` means for ``model``: ``attention`` when a replacement module asks for it
    (``healing_scope()``, e.g. an attention converted to partial RoPE), ``replaced`` otherwise; any other
    value is returned as is.

    Measured on the built-in model at the seed's MLA setting (benchmarks/results/heal_cpu.md): with its
    q/k/v/o training too, 200k tokens win back 0.52 of the lost wiki log-perplexity (0.42 at lr 1e-4);
    the codec alone won back 0.19 in 50k tokens, when the q/k/v/o run had cut the held-out cross-entropy
    by 0.87 nats after 20 steps against the codec's 0.51 after 25.
    """
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable must be one of {TRAINABLE}; got {trainable!r}")
    if trainable != "auto":
        return trainable
    scopes = {m.healing_scope() for m in replacement_modules(model) if hasattr(m, "healing_scope")}
    return "attention" if "attention" in scopes else "replaced"


def trainable_parameters(model: nn.Module, trainable: str = "auto") -> dict[str, nn.Parameter]:
    """``{name: parameter}`` that healing trains (tied parameters once, under their first name).

    ``replaced`` and ``attention``: what each registered replacement module offers for that choice
    (``healing_parameters(trainable)``, by default all its parameters): a converted attention offers its
    codec only under ``replaced`` and its q/k/v/o too under ``attention``, which partial RoPE needs.
    ``all``: every parameter. ``auto``: see :func:`resolve_trainable`.
    """
    trainable = resolve_trainable(model, trainable)
    if trainable == "all":
        return dict(model.named_parameters())
    owned: set[int] = set()
    for module in replacement_modules(model):
        offer = getattr(module, "healing_parameters", None)
        owned.update(id(p) for p in (offer(trainable) if offer is not None else module.parameters()))
    return {name: p for name, p in model.named_parameters() if id(p) in owned}


def default_learning_rate(model: nn.Module, trainable: str = "auto") -> float:
    """The peak learning rate a healing run uses when none is given: the rate every replacement module
    names for itself (``healing_learning_rate``, measured: 3e-4 for MHA2MLA-style attention training whole,
    :data:`~lowrank.attention.wrapper.ATTENTION_LEARNING_RATE`; 1e-4 for the DeepSeek-layout conversion,
    :data:`~lowrank.attention.deepseek_mla.DEEPSEEK_MLA_LEARNING_RATE`; 1e-5 for ``kv-projection`` codecs
    alone, :data:`~lowrank.attention.low_rank_kv.CODEC_LEARNING_RATE`) when they all agree;
    :data:`LEARNING_RATE` in every other case."""
    trainable = resolve_trainable(model, trainable)
    replaced = replacement_modules(model)
    if trainable == "all" or not replaced:
        return LEARNING_RATE
    rates = {
        m.healing_learning_rate(trainable) if hasattr(m, "healing_learning_rate") else None for m in replaced
    }
    rate = rates.pop() if len(rates) == 1 else None
    return LEARNING_RATE if rate is None else rate
