"""fastadapt::rope: rotary position embedding of q and k, in place.

The op reads a precomputed table ``cos_sin [max_pos, D]`` (float32): row ``p`` holds
``cos(p * f_i)`` for the ``D/2`` frequencies ``f_i``, then ``sin(p * f_i)``. Build it once per
model with :func:`fastadapt_ops.models.rope.rope_cos_sin` (base, scaling). Token ``t`` of q/k is
rotated by row ``positions[t]``: every pair ``(a, b)`` becomes ``(a cos - b sin, b cos + a sin)``,
where the pairs are ``(i, i + D/2)`` (rotate-half, HF/NeoX layout) or, with ``interleaved=True``,
``(2i, 2i + 1)`` (GPT-J / llama.cpp layout), and pair ``i`` uses frequency ``f_i``.
"""
from __future__ import annotations

from typing import Tuple

import torch


def rope(
    q: torch.Tensor,  # [T, H_q, D] float32 | bfloat16 | float16, updated in place; last dim contiguous
    k: torch.Tensor,  # [T, H_kv, D] q's dtype, updated in place; last dim contiguous
    positions: torch.Tensor,  # [T] int32 | int64, each in [0, max_pos)
    cos_sin: torch.Tensor,  # [max_pos, D] float32: cos then sin of position * frequency
    interleaved: bool = False,
) -> None:
    """Rotate q and k in place (fp32 math, their dtype kept). q and k may be strided views, e.g.
    ``qkv[:, :nq].view(T, H_q, D)`` of a fused QKV projection: no copies are made."""
    torch.ops.fastadapt.rope.default(q, k, positions, cos_sin, interleaved)


def rope_reference(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
    interleaved: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """float64 oracle of :func:`rope`: returns the rotated ``(q, k)`` in float64 and leaves the
    inputs untouched."""
    D = q.shape[-1]
    half = D // 2
    cs = cos_sin.double()[positions.long()]  # [T, D]
    c, s = cs[:, None, :half], cs[:, None, half:]  # [T, 1, D/2]

    def rot(x):
        x = x.double()
        if interleaved:
            a, b = x[..., 0::2], x[..., 1::2]
            return torch.stack([a * c - b * s, b * c + a * s], -1).reshape(x.shape)
        a, b = x[..., :half], x[..., half:]
        return torch.cat([a * c - b * s, b * c + a * s], -1)

    return rot(q), rot(k)


@torch.library.register_fake("fastadapt::rope")
def _rope_fake(q, k, positions, cos_sin, interleaved=False):
    torch._check(q.dim() == 3 and k.dim() == 3, lambda: "fastadapt::rope: q and k must be 3-D")
    torch._check(k.shape[0] == q.shape[0] and k.shape[2] == q.shape[2],
                 lambda: "fastadapt::rope: k must be [T, H_kv, D] like q")
    torch._check(cos_sin.dim() == 2 and cos_sin.shape[1] == q.shape[2],
                 lambda: "fastadapt::rope: cos_sin must be [max_pos, D]")
    return None
