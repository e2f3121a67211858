"""The registry of KV codecs: the modules inside :class:`~lowrank.attention.wrapper.ProjectedAttention` that
decide what the cache stores.

A codec class registers itself with :func:`register_codec` and implements

* ``encode(keys, values, rope_tables) -> (key_codes, value_codes)``: what the cache stores for new rotated
  keys and values;
* ``attend(queries, key_codes, value_codes, rope_tables, keys_decoded=...) -> (q, k, v)``: what the
  attention function computes with (queries mapped into the codes' space, up-projections absorbed);
* ``decode(outputs)``: each head's attention output back to head_dim before o_proj;
* ``cached_numbers() -> int``: numbers cached per token and layer (over all KV heads);
* ``codec_spec() -> dict`` and ``from_codec_spec(spec, device=, dtype=)``: its shape, for saving;
* attributes ``num_kv_heads`` and ``head_dim`` (the layer's original cache shape).

Optional: ``needs_positions`` (true when the cache must keep each token's position, because keys are
rebuilt before RoPE; such a codec also has ``decode_rotated_keys(codes, cos, sin)``, which the cache calls to
rebuild and rotate them)
[False]; ``healing_scope()`` and ``healing_learning_rate(trainable)`` (see
:mod:`lowrank.nn.registry`) [``'replaced'``, ``None``]; folding into the layer's dense projections:
``fold_into(projections, layer) -> {name: new projection}`` (the wrapper swaps them in), ``folded`` (names
of the projections that carry the codec's maps; they train with it under ``'replaced'``),
``folded_shapes(projections)`` (their shapes, to rebuild the layer before loading), ``key_width`` and
``value_width`` (per-head widths of what ``k_proj``/``v_proj`` give) and ``fused_keys`` (keys arrive as
codes, not rotated) [no folding]. A saved model records the codec by its registered name, so a new codec
is loadable once its module is imported.
"""

from __future__ import annotations

from typing import TypeVar

from torch import nn

__all__ = ["register_codec", "codec_class", "codec_names", "CODEC_METHODS"]

CODEC_METHODS = ("encode", "attend", "decode", "cached_numbers", "codec_spec", "from_codec_spec")
_CODECS: dict[str, type[nn.Module]] = {}

C = TypeVar("C", bound=type[nn.Module])


def register_codec(cls: C) -> C:
    """Class decorator: make ``cls`` a KV codec, saved and rebuilt under its class name."""
    missing = [name for name in CODEC_METHODS if not callable(getattr(cls, name, None))]
    if missing or not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(
            f"a KV codec must be an nn.Module with {', '.join(CODEC_METHODS)}; {cls!r} lacks "
            f"{', '.join(missing) or 'nn.Module'}"
        )
    _CODECS[cls.__name__] = cls
    return cls


def codec_class(name: str) -> type[nn.Module]:
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
