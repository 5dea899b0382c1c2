"""fastadapt::rms_norm: RMSNorm over the last dimension, optionally fused with the residual add
of a pre-norm decoder layer (``residual += x`` in place, then the sum is normalised)."""
from __future__ import annotations

from typing import Optional

import torch


def rms_norm(
    x: torch.Tensor,  # [..., D] float32 | bfloat16 | float16
    weight: torch.Tensor,  # [D]
    eps: float,
    residual: Optional[torch.Tensor] = None,  # [..., D], x's dtype, contiguous; updated in place
) -> torch.Tensor:  # [..., D] in x's dtype
    """``y = s * rsqrt(mean(s^2) + eps) * weight`` with ``s = x``, or ``s = residual += x``."""
    return torch.ops.fastadapt.rms_norm.default(x, weight, eps, residual)


def rms_norm_reference(x, weight, eps, residual=None):
    """float64 oracle of :func:`rms_norm`; updates ``residual`` the same way (in its dtype)."""
    if residual is not None:
        residual.copy_((residual.double() + x.double()).to(residual.dtype))
        s = residual.double()
    else:
        s = x.double()
    y = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps) * weight.double()
    return y.to(x.dtype)


@torch.library.register_fake("fastadapt::rms_norm")
def _rms_norm_fake(x, weight, eps, residual=None):
    torch._check(weight.shape == (x.shape[-1],), lambda: "fastadapt::rms_norm: weight must be [D]")
    return x.new_empty(x.shape)  # the kernel returns a fresh contiguous tensor
