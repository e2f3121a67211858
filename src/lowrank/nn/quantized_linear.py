"""A linear layer whose weight is stored quantized: :class:`QuantizedLinear`."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowrank.nn.registry import register_replacement

__all__ = ["QuantizedLinear"]

_BITS_OF = {2: torch.int16, 4: torch.int32, 8: torch.int64}
"""Integer dtype of the same width, used to hold floating stored tensors bit for bit."""


@register_replacement
class QuantizedLinear(nn.Module):
    """``y = x Wᵀ + b`` with ``W`` rebuilt at each call from the tensors a quantization backend stored.

    The stored tensors (packed integers, scales, zero points: see :mod:`lowrank.nn.quantization`) are
    persistent buffers, so the module saves and reloads with the model and its output is reproduced bit
    for bit. Floating stored tensors are held as integers of the same width (``scale`` in float16 is an
    int16 buffer), so casting the model (``model.half()``, loading in another dtype) never changes what
    is stored or how many bytes it takes. ``weight`` is the dequantized matrix (read-only); the bias, if
    any, is an ordinary parameter in the model's dtype.

    Args:
        in_features, out_features: the shape of the layer.
        bits, group_size, backend: how the weight was quantized.
        stored: ``{name: (shape, dtype)}`` of the backend's tensors.
        bias: whether the layer has a bias.
        device, dtype: where the buffers live; the dtype of the bias and of the dequantized weight.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bits: int,
        group_size: int,
        backend: str,
        stored: dict[str, tuple[tuple[int, ...], torch.dtype]],
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.backend = bits, group_size, backend
        self.stored_dtypes = {name: dt for name, (_, dt) in stored.items()}
        for name, (shape, dt) in stored.items():
            holder = _BITS_OF[dt.itemsize] if dt.is_floating_point else dt
            self.register_buffer(name, torch.zeros(shape, dtype=holder, device=device))
        dtype = dtype or torch.get_default_dtype()
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self._compute_dtype = dtype

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, bits: int, group_size: int, backend) -> QuantizedLinear:
        """Quantize ``linear`` with ``backend`` (a :class:`lowrank.nn.quantization.Backend`)."""
        w = linear.weight
        stored = backend.quantize(w, bits, group_size)
        module = cls(
            linear.in_features,
            linear.out_features,
            bits=bits,
            group_size=group_size,
            backend=backend.name,
            stored={name: (tuple(t.shape), t.dtype) for name, t in stored.items()},
            bias=linear.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            for name, t in stored.items():
                module.get_buffer(name).copy_(t.view(module.get_buffer(name).dtype))
            if linear.bias is not None:
                module.bias.copy_(linear.bias)
        return module

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """The backend's tensors in their own dtypes (views of the buffers)."""
        return {name: self.get_buffer(name).view(dt) for name, dt in self.stored_dtypes.items()}

    def stored_bytes(self) -> int:
        """Bytes of the stored tensors (packed weight, scales, zero points; the bias is a parameter)."""
        return sum(
            self.get_buffer(name).numel() * self.get_buffer(name).element_size()
            for name in self.stored_dtypes
        )

    def represented_parameters(self) -> int:
        """The out × in weights it stands for (held as stored tensors, not parameters)."""
        return self.in_features * self.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (out × in), in the dtype of the bias / the model."""
        from lowrank.nn.quantization import get_backend

        return get_backend(self.backend).dequantize(
            self.stored_tensors(),
            self.bits,
            self.group_size,
            (self.out_features, self.in_features),
            self.compute_dtype,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), self.bias)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the dequantized weight: the model's (it follows ``.to(dtype)``, ``.half()``)."""
        return self._compute_dtype

    def _apply(self, fn, recurse=True):
        # the stored tensors are integers, which casts leave alone; ask the cast what it does to a float
        self._compute_dtype = fn(torch.empty(0, dtype=self._compute_dtype)).dtype
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, backend={self.backend}, bias={self.bias is not None}"
        )

    # -- serialization protocol (see lowrank.nn.registry) --------------------------------------
    def replacement_spec(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bits": self.bits,
            "group_size": self.group_size,
            "backend": self.backend,
            "bias": self.bias is not None,
            "stored": {
                name: {"shape": list(self.get_buffer(name).shape), "dtype": str(dt).removeprefix("torch.")}
                for name, dt in self.stored_dtypes.items()
            },
        }

    @classmethod
    def from_spec(
        cls,
        spec: dict[str, Any],
        *,
        original: nn.Module | None = None,
        model_config: Any = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> QuantizedLinear:
        from lowrank.nn.quantization import get_backend

        backend = get_backend(spec.get("backend"))  # an unknown backend: a one-line error at load time
        try:
            stored = {
                name: (tuple(int(n) for n in s["shape"]), _dtype(s["dtype"]))
                for name, s in spec["stored"].items()
            }
            shape = (int(spec["out_features"]), int(spec["in_features"]))
            backend.check_stored(stored, int(spec["bits"]), int(spec["group_size"]), shape)
            return cls(
                int(spec["in_features"]),
                int(spec["out_features"]),
                bits=int(spec["bits"]),
                group_size=int(spec["group_size"]),
                backend=str(spec["backend"]),
                stored=stored,
                bias=bool(spec["bias"]),
                device=device,
                dtype=dtype,
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(
                f"QuantizedLinear spec is missing or has a malformed field ({exc}): {spec!r}"
            ) from None


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in a QuantizedLinear spec")
    return dt
