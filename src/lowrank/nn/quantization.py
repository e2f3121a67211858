"""Weight quantization through a maintained library, behind one small adapter per library.

A backend turns a dense weight into the tensors it stores (packed integers, scales, zero points) and back
into a dense weight. The toolkit keeps those tensors as plain buffers of
:class:`lowrank.nn.QuantizedLinear`, so a quantized model saves to safetensors and reloads with the same
logits, whatever the library does with its own module classes. Adding a library means one more
:class:`Backend` subclass registered in :data:`BACKENDS`.

The one backend is HQQ (half-quadratic quantization; ``pip install 'lowrank-llm[quant]'``): it needs no
calibration data, packs 1/2/3/4/8-bit weights on a CPU, and dequantizes with public pure-PyTorch functions.
docs/quantization.md gives the measurements behind that choice.

References:
    Badri & Shaji, "Half-Quadratic Quantization of Large Machine Learning Models", 2023 (HQQ).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

__all__ = ["Backend", "HQQBackend", "BACKENDS", "get_backend", "Quantized"]

Quantized = dict[str, torch.Tensor]
"""The tensors a backend stores for one weight matrix, by name."""


class Backend:
    """Adapter of one quantization library (subclass, set the ClassVars, implement the two methods)."""

    name: ClassVar[str]
    package: ClassVar[str]
    """The distribution to install, with the version this adapter was written and tested against."""
    bits: ClassVar[tuple[int, ...]]
    """Bit widths the library packs."""

    def __init__(self, scale_dtype: torch.dtype = torch.float16) -> None:
        self.scale_dtype = scale_dtype
        """dtype in which scales and zero points are stored."""

    def check(self, bits: int, group_size: int) -> None:
        """Refuse settings the library does not support (one-line ``ValueError``)."""
        if bits not in self.bits:
            raise ValueError(
                f"bits={bits} is not supported by the {self.name} backend; choose one of "
                f"{', '.join(map(str, self.bits))}"
            )

    def version(self) -> str:
        try:
            return importlib.metadata.version(self.package.split("==")[0])
        except importlib.metadata.PackageNotFoundError:
            raise ValueError(
                f"the {self.name} quantization backend needs the {self.package.split('==')[0]} package: "
                f"pip install '{self.package}' (or: pip install 'lowrank-llm[quant]')"
            ) from None

    def quantize(self, weight: torch.Tensor, bits: int, group_size: int) -> Quantized:
        """The tensors that store ``weight`` (out × in) at ``bits`` per weight, groups of ``group_size``."""
        raise NotImplementedError

    def dequantize(
        self, stored: Quantized, bits: int, group_size: int, shape: tuple[int, int], dtype: torch.dtype
    ) -> torch.Tensor:
        """The dense weight of ``shape`` in ``dtype`` rebuilt from :meth:`quantize`'s tensors."""
        raise NotImplementedError

    def check_stored(
        self, stored: dict[str, tuple[tuple[int, ...], torch.dtype]], bits: int, group_size: int, shape
    ) -> None:
        """Refuse (one-line ``ValueError``) stored tensors whose shapes or dtypes cannot be what
        :meth:`quantize` makes of a ``shape`` weight at ``bits`` and ``group_size``: a manifest that
        claims other settings than the tensors it describes."""
        raise NotImplementedError


class HQQBackend(Backend):
    """HQQ: per-group asymmetric quantization with the scale and zero point fitted by half-quadratic
    optimization, no calibration data; ``hqq.core.quantize.Quantizer`` does the work.

    HQQ groups the flattened weight (a group may run across rows when ``in_features`` is not a multiple of
    the group size) and packs whole rows of groups, so the flattened weight is zero-padded to a multiple
    of 4 groups (8 at 1 bit) and the padding cropped after dequantization. Scales and zero points are
    stored in float16, as HQQ keeps them on a GPU (``scale_dtype`` may keep float32).
    """

    name = "hqq"
    package = "hqq==0.2.8.post1"
    bits = (1, 2, 3, 4, 8)
    PAD_GROUPS = {1: 8}
    """The flattened weight is padded to a multiple of this many groups: the packing's row unit (8 rows
    per byte at 1 bit), else 4 (2 bits: 4 rows per byte; enough for every other width)."""

    def check(self, bits: int, group_size: int) -> None:
        super().check(bits, group_size)
        if group_size < 8 or group_size % 8:
            raise ValueError(f"group_size must be a positive multiple of 8 for hqq; got {group_size}")

    def _quantizer(self):
        return _hqq(self)

    def quantize(self, weight: torch.Tensor, bits: int, group_size: int) -> Quantized:
        self.check(bits, group_size)
        Quantizer, BaseQuantizeConfig = self._quantizer()
        params = BaseQuantizeConfig(nbits=bits, group_size=group_size, axis=1)["weight_quant_params"]
        flat = weight.detach().float().reshape(-1)
        unit = self.PAD_GROUPS.get(bits, 4) * group_size
        flat = F.pad(flat, (0, -flat.numel() % unit))
        W_q, meta = Quantizer.quantize(
            flat.reshape(-1, group_size), **params, compute_dtype=torch.float32, device=str(weight.device)
        )
        # clone: HQQ's optimizer runs under inference_mode, whose tensors cannot join autograd later
        return {
            "W_q": W_q.clone(),
            "scale": meta["scale"].to(self.scale_dtype).clone(),
            "zero": meta["zero"].to(self.scale_dtype).clone(),
        }

    def check_stored(
        self, stored: dict[str, tuple[tuple[int, ...], torch.dtype]], bits: int, group_size: int, shape
    ) -> None:
        self.check(bits, group_size)
        unit = self.PAD_GROUPS.get(bits, 4) * group_size
        groups = -(-shape[0] * shape[1] // unit) * unit // group_size
        rows = -(-groups // 10) if bits == 3 else groups * bits // 8  # 3 bits: 10 values per int32
        expected = {
            "W_q": ((rows, group_size), torch.int32 if bits == 3 else torch.uint8),
            "scale": ((groups, 1), None),
            "zero": ((groups, 1), None),
        }
        if set(stored) != set(expected):
            raise ValueError(f"hqq stores {sorted(expected)}; the manifest lists {sorted(stored)}")
        for name, (want_shape, want_dtype) in expected.items():
            got_shape, got_dtype = stored[name]
            wrong_dtype = not got_dtype.is_floating_point if want_dtype is None else got_dtype != want_dtype
            if tuple(got_shape) != want_shape or wrong_dtype:
                raise ValueError(
                    f"stored tensor {name!r} {tuple(got_shape)} {got_dtype} is not what hqq stores for a "
                    f"{shape[0]} x {shape[1]} weight at bits={bits}, group_size={group_size} "
                    f"({want_shape} {want_dtype or 'float'}): the manifest's settings do not match the "
                    "tensors"
                )
        if stored["scale"][1] != stored["zero"][1]:
            raise ValueError("hqq stores scale and zero in one dtype; the manifest lists two")

    def dequantize(
        self, stored: Quantized, bits: int, group_size: int, shape: tuple[int, int], dtype: torch.dtype
    ) -> torch.Tensor:
        Quantizer, _ = self._quantizer()
        groups = stored["scale"].shape[0]
        packing = Quantizer.bit_to_packing[bits]
        meta = {
            "nbits": bits,
            "group_size": group_size,
            "shape": torch.Size((groups, group_size)),
            "scale": stored["scale"].float(),
            "zero": stored["zero"].float(),
            "axis": 1,
            "packing": packing,
            "unpack_view_dtype": Quantizer.unpack_view_dtype[packing],
            "view_as_float": False,
            "compute_dtype": torch.float32,
        }
        flat = Quantizer.dequantize(stored["W_q"], meta).reshape(-1)
        return flat[: shape[0] * shape[1]].reshape(shape).to(dtype)


@functools.cache
def _hqq_module() -> tuple[type, Any]:
    from hqq.core.quantize import BaseQuantizeConfig, Quantizer

    return Quantizer, BaseQuantizeConfig


def _hqq(backend: Backend) -> tuple[type, Any]:
    """HQQ's ``Quantizer`` and ``BaseQuantizeConfig`` (a one-line install hint when HQQ is missing)."""
    if importlib.util.find_spec("hqq") is None:
        backend.version()  # raises the install hint
    return _hqq_module()


BACKENDS: dict[str, type[Backend]] = {"hqq": HQQBackend}


def get_backend(name: str, *, scale_dtype: torch.dtype = torch.float16) -> Backend:
    """The backend called ``name`` (one-line ``ValueError`` for an unknown one)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown quantization backend {name!r}; available: {', '.join(sorted(BACKENDS))}")
    return BACKENDS[name](scale_dtype=scale_dtype)
