"""KV codecs, the modules inside :class:`~lowrank.attention.wrapper.ProjectedAttention` that decide what the
cache stores, and their registry.

A codec subclasses :class:`KVCodec`, registers itself with :func:`register_codec`, and implements

* ``encode(keys, values, rope_tables) -> (key_codes, value_codes)``: what the cache stores for new rotated
  keys and values;
* ``attend(queries, key_codes, value_codes, rope_tables, keys_decoded=...) -> (q, k, v)``: what the
  attention function computes with (queries mapped into the codes' space, up-projections absorbed);
* ``decode(outputs)``: each head's attention output back to head_dim before o_proj;
* ``cached_numbers() -> int``: numbers cached per token and layer (over all KV heads);
* ``codec_spec() -> dict`` and ``from_codec_spec(spec, device=, dtype=)``: its shape, for saving;
* attributes ``num_kv_heads`` and ``head_dim`` (the layer's original cache shape).

:class:`KVCodec` gives the optional rest of the contract its defaults (no positions kept, nothing folded,
healing as the method's other replaced modules); a codec overrides what it needs. A saved model records
the codec by its registered name, so a new codec is loadable once its module is imported.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch
from torch import nn

__all__ = ["KVCodec", "register_codec", "codec_class", "codec_names", "CODEC_METHODS"]

CODEC_METHODS = ("encode", "attend", "decode", "cached_numbers", "codec_spec", "from_codec_spec")


class KVCodec(nn.Module):
    """Base of the KV codecs: the optional part of the contract (see the module docstring), with defaults.

    Subclasses implement :data:`CODEC_METHODS` and override what applies to them.
    """

    needs_positions: bool = False
    """The cache must keep each token's position: keys are rebuilt before RoPE, by
    ``decode_rotated_keys(codes, cos, sin)``, which such a codec then implements."""
    fused_keys: bool = False
    """Keys arrive from ``k_proj`` as codes of the un-rotated keys (a map folded into it): not rotated."""
    folded: tuple[str, ...] = ()
    """Names of the layer's projections that carry folded maps of this codec (they train with it)."""
    key_width: int | None = None
    """Per-head width of what ``k_proj`` gives, when a fold changed it (``None``: ``head_dim``)."""
    value_width: int | None = None
    """Per-head width of what ``v_proj`` gives (and per query head of what ``o_proj`` takes)."""

    def decode_rotated_keys(self, codes: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not rebuild keys before RoPE")

    def fold_into(self, projections: dict[str, nn.Module], layer: Any) -> dict[str, nn.Module]:
        """Fold the codec's maps into the layer's ``k_proj``/``v_proj``/``o_proj`` (``projections``) where
        its algebra allows; return the projections to swap in. Default: nothing folds."""
        return {}

    def folded_shapes(self, projections: dict[str, nn.Module]) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of each folded projection, to rebuild the layer before loading."""
        return {}

    def healing_scope(self) -> str:
        """What heals with the codec (see :mod:`lowrank.nn.registry`): ``'replaced'``, the codec alone."""
        return "replaced"

    def healing_learning_rate(self, trainable: str) -> float | None:
        """Peak learning rate for healing under ``trainable``; ``None``: the method's default."""
        return None


_CODECS: dict[str, type[KVCodec]] = {}

C = TypeVar("C", bound=type[KVCodec])


def register_codec(cls: C) -> C:
    """Class decorator: make ``cls`` a KV codec, saved and rebuilt under its class name."""
    missing = [name for name in CODEC_METHODS if not callable(getattr(cls, name, None))]
    if missing or not (isinstance(cls, type) and issubclass(cls, KVCodec)):
        raise TypeError(
            f"a KV codec must subclass lowrank.attention.codecs.KVCodec and implement "
            f"{', '.join(CODEC_METHODS)}; {cls!r} lacks {', '.join(missing) or 'the KVCodec base'}"
        )
    _CODECS[cls.__name__] = cls
    return cls


def codec_class(name: str) -> type[KVCodec]:
    """The registered codec called ``name``.

    Raises:
        ValueError: no codec of that name is registered (the message lists the registered ones).
    """
    try:
        return _CODECS[name]
    except KeyError:
        raise ValueError(f"unknown KV codec {name!r}; known: {', '.join(sorted(_CODECS))}") from None


def codec_names() -> list[str]:
    """Names of the registered codecs."""
    return sorted(_CODECS)
