"""Pure-PyTorch reference of ``fastadapt::qlinear`` (float64 oracle and fallback).

The reference documents the semantics of the op, serves as the oracle of the tests, and is the
fallback for devices without a kernel. It dequantizes the whole weight, so it is neither fast
nor lean: never use it on a hot path.
"""

from __future__ import annotations

from typing import Optional

import torch

from .qformats import dequantize, validate_qlinear_args

__all__ = ["qlinear_reference", "quantize_activations_int8", "round_half_away"]

def round_half_away(v: torch.Tensor) -> torch.Tensor:
    """Round to nearest, ties away from zero (C ``roundf``); ``torch.round`` ties to even."""
    return torch.sign(v) * torch.floor(v.abs() + 0.5)


def quantize_activations_int8(x: torch.Tensor):
    """The kernel's activation quantization for ``act_quant="int8"`` (per token, as in DGQ).

    x: ``[M, K]``, any float dtype; computed in float32. Per row::

        scale = max|x_row| / 127                                 (float32)
        xq    = clamp(round_half_away(x / scale), -127, 127)     (x / scale in float32; 0 if scale == 0)

    Returns ``(xq, scale)``: xq ``int8 [M, K]``, scale ``float32 [M]``.
    """
    x32 = x.to(torch.float32)
    scale = x32.abs().amax(dim=-1) / 127.0  # [M] fp32
    s = scale.unsqueeze(-1)
    v = torch.where(s > 0, x32 / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(x32))
    xq = round_half_away(v).clamp_(-127, 127).to(torch.int8)
    return xq, scale


def qlinear_reference(
    x: torch.Tensor,  # [..., K]
    qdata: torch.Tensor,  # [N, row_bytes] uint8
    scales: Optional[torch.Tensor],  # [N, K // group_size] or None (GGUF)
    zeros: Optional[torch.Tensor],  # [N, K // group_size] uint8 or None
    bias: Optional[torch.Tensor],  # [N] or None
    fmt: str,
    in_features: int,
    group_size: int,
    act_quant: str = "none",
    *,
    return_float64: bool = False,
) -> torch.Tensor:  # [..., N]
    """``y = x . dequant(W)^T (+ bias)`` computed in float64.

    The dense weight is :func:`fastadapt_ops.ops.qformats.dequantize` in float64 (exact values of
    the packed format). ``act_quant="none"``: x is used as given. ``act_quant="int8"``: x is
    first replaced by ``scale_x * xq`` from :func:`quantize_activations_int8` (per token); the
    result is then ``scale_x * sum(w * xq)``. The kernels compute each weight group's integer
    dot product exactly and apply the fp32 scales (group, then token) in fp32, so they match
    this reference up to fp32 rounding of the scale products and of the accumulation.

    Returns ``[..., N]`` in x's dtype, or float64 with ``return_float64=True``.
    """
    validate_qlinear_args(
        x, qdata, scales, zeros, bias, fmt, in_features, group_size, act_quant, allow_float64=True
    )
    K = in_features
    N = qdata.shape[0]
    lead = x.shape[:-1]
    w = dequantize(qdata, scales, zeros, fmt, (N, K), group_size, dtype=torch.float64)  # [N, K]
    x2 = x.reshape(-1, K)  # [M, K]
    if act_quant == "int8":
        xq, sx = quantize_activations_int8(x2)
        x64 = xq.to(torch.float64) * sx.to(torch.float64).unsqueeze(-1)
    else:
        x64 = x2.to(torch.float64)
    y = x64 @ w.t()  # [M, N]
    if bias is not None:
        y = y + bias.to(torch.float64)
    y = y.reshape(*lead, N)
    return y if return_float64 else y.to(x.dtype)
