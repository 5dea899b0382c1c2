"""fastadapt::silu_mul: the SwiGLU activation of a fused gate/up projection,
``silu(x[..., :F]) * x[..., F:]`` with ``silu(g) = g / (1 + exp(-g))``, in one pass."""
from __future__ import annotations

from typing import Optional

import torch


def silu_mul(
    x: torch.Tensor,  # [..., 2F] float32 | bfloat16 | float16: gate [F] then up [F]
    out: Optional[torch.Tensor] = None,  # [..., F], x's dtype, contiguous
) -> torch.Tensor:  # [..., F] in x's dtype
    """``silu(gate) * up`` in fp32, rounded once to x's dtype. Non-finite inputs behave as torch's
    ``F.silu(g) * u`` does in fp32 (``silu(-inf)`` is NaN, ``silu(+inf)`` is +inf, NaN stays NaN).
    Negative gates are computed as ``g e^g / (1 + e^g)``, so the tiny results that torch's
    ``g / (1 + e^-g)`` flushes to -0 (``g`` in about [-91.8, -88.7], where ``e^-g`` overflows fp32)
    keep their true value."""
    if out is None:
        return torch.ops.fastadapt.silu_mul.default(x)
    torch.ops.fastadapt.silu_mul.out(x, out=out)
    return out


def silu_mul_reference(x: torch.Tensor) -> torch.Tensor:
    """float64 oracle of :func:`silu_mul` (float64 result)."""
    F = x.shape[-1] // 2
    g, u = x[..., :F].double(), x[..., F:].double()
    e = torch.exp(-g.abs())
    return torch.where(g < 0, g * e, g) / (1 + e) * u


@torch.library.register_fake("fastadapt::silu_mul")
def _silu_mul_fake(x):
    torch._check(x.shape[-1] % 2 == 0, lambda: "fastadapt::silu_mul: x's last dim must be even")
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))  # fresh, contiguous


@torch.library.register_fake("fastadapt::silu_mul.out")
def _silu_mul_out_fake(x, *, out):
    torch._check(tuple(out.shape) == (*x.shape[:-1], x.shape[-1] // 2),
                 lambda: "fastadapt::silu_mul: out has the wrong shape")
    return None
