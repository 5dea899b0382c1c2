"""fastadapt::qlinear: y = x . dequant(W)^T (+ bias) without materialising dequant(W).

Formats and byte layouts: csrc/cpu/kernels/qformat.h (pure-PyTorch definition in
``fastadapt_ops.ops.qformats``; float64 oracle in ``fastadapt_ops.ops.reference``).
"""
from __future__ import annotations

from typing import Optional

import torch

_GGUF_BLOCK = {"q4_0": 32, "q4_1": 32, "q8_0": 32, "q4_k": 256, "q6_k": 256}


def qlinear(
    x: torch.Tensor,  # [..., K] float32 | bfloat16 | float16 (CPU); float16 | bfloat16 (CUDA)
    qdata: torch.Tensor,  # [N, row_bytes] uint8
    scales: Optional[torch.Tensor],  # [N, K // group_size] (int formats), else None
    zeros: Optional[torch.Tensor],  # [N, K // group_size] uint8, or None (symmetric / GGUF)
    bias: Optional[torch.Tensor],  # [N] or None
    fmt: str,
    in_features: int,
    group_size: int,
    act_quant: str = "none",
    out: Optional[torch.Tensor] = None,  # [..., N], x's dtype, contiguous
) -> torch.Tensor:  # [..., N] in x's dtype
    """Low-bit linear. ``act_quant="int8"`` quantizes x per 32-block and uses integer dots."""
    if out is None:
        return torch.ops.fastadapt.qlinear.default(
            x, qdata, scales, zeros, bias, fmt, in_features, group_size, act_quant)
    torch.ops.fastadapt.qlinear.out(
        x, qdata, scales, zeros, bias, fmt, in_features, group_size, act_quant, out=out)
    return out


@torch.library.register_fake("fastadapt::qlinear")
def _qlinear_fake(x, qdata, scales, zeros, bias, fmt, in_features, group_size, act_quant="none"):
    torch._check(x.shape[-1] == in_features,
                 lambda: f"fastadapt::qlinear: x must have in_features={in_features} last")
    torch._check(qdata.dim() == 2, lambda: "fastadapt::qlinear: qdata must be 2-D")
    # the kernel returns a fresh contiguous tensor
    return x.new_empty((*x.shape[:-1], qdata.shape[0]))


@torch.library.register_fake("fastadapt::qlinear.out")
def _qlinear_out_fake(x, qdata, scales, zeros, bias, fmt, in_features, group_size,
                      act_quant="none", *, out):
    torch._check(tuple(out.shape) == (*x.shape[:-1], qdata.shape[0]),
                 lambda: "fastadapt::qlinear: out has the wrong shape")
