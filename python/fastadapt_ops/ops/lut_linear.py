"""fastadapt::lut_linear: lookup-table low-bit linear (T-MAC style) over bit-plane weights.

Layout, numerics and float64 reference: :mod:`fastadapt_ops.ops.lut_formats`. The weight object
and the conversion from our int formats: :mod:`fastadapt_ops.quant.lut`.
"""
from __future__ import annotations

from typing import Optional

import torch


def lut_linear(
    x: torch.Tensor,  # [..., K] float32 | bfloat16 | float16
    planes: torch.Tensor,  # uint8 [ceil(N/32), K/8, bits, 32]
    scales: torch.Tensor,  # float32 [ceil(N/32), K/group_size, 32]
    zoffs: Optional[torch.Tensor],  # int8 [ceil(N/32), K/group_size, 32] or None (zoff for all)
    bias: Optional[torch.Tensor],  # [N] or None
    bits: int,
    out_features: int,
    group_size: int,
    zoff: int = -1,
) -> torch.Tensor:  # [..., N] in x's dtype
    """``y = x . W^T (+ bias)`` with ``w = scale/2 * (sum_i 2^i sigma_i + zoff)`` (lut_formats).

    Activations are quantized per group of ``group_size`` to int8 inside the kernel; the error
    this adds is at most ``sum_g (max|x_g| / 254) * sum_{k in g} |W[n, k]|`` per output
    (:func:`fastadapt_ops.ops.lut_formats.activation_error_bound`); everything after that is
    exact integer arithmetic up to one fp32 multiply-add per group.
    """
    return torch.ops.fastadapt.lut_linear.default(
        x, planes, scales, zoffs, bias, bits, out_features, group_size, zoff
    )


@torch.library.register_fake("fastadapt::lut_linear")
def _lut_linear_fake(x, planes, scales, zoffs, bias, bits, out_features, group_size, zoff=-1):
    torch._check(x.shape[-1] == planes.shape[1] * 8, lambda: "fastadapt::lut_linear: planes must be "
                 "[ceil(out_features/32), in_features/8, bits, 32]")
    return x.new_empty((*x.shape[:-1], out_features))  # a fresh contiguous tensor, as the kernel
