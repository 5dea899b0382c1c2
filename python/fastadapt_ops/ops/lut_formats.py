"""Bit-plane weight layout of ``fastadapt::lut_linear`` and its float64 references, in PyTorch.

This module is the Python definition of ``csrc/cpu/kernels/lut_format.h``: pack/unpack here are
bit-exact with what the C++ and CUDA kernels read, and :func:`lut_linear_reference` computes
the kernels' function (they differ from it only by fp32 rounding of the final scale products).

Weight ``W [N, K]`` (out_features, in_features) of ``b`` bits (1..4), codes ``q`` in
``[0, 2^b - 1]``, one scale ``s`` and one *zero offset* ``zo`` per (row, group of ``gs`` values)::

    w = s * (q - z)  with  zo = 2^b - 1 - 2 z     (z may be a half integer: zo is an int8)

Writing every bit of ``q`` as a sign ``sigma_i = 2 bit_i - 1`` in {-1, +1}::

    w = (s / 2) * (sum_i 2^i sigma_i + zo)

Ternary BitNet weights {-1, 0, +1} are 2-bit codes {0, 1, 2} with z = 1 (zo = +1); symmetric
int formats have z = 2^(b-1) (zo = -1); 1-bit sign weights (w = +-s) have z = 1/2 (zo = 0).

Storage (``NB = ceil(N / 32)`` row blocks of 32 rows; padded rows are all zero)::

    planes  uint8   [NB, K / 8, b, 32]  row block, chunk pair, bit plane, byte j
    scales  float32 [NB, K / gs, 32]    s of row 32 rb + r (natural row order inside a block)
    zoffs   int8    [NB, K / gs, 32]    zo, or None: one constant zo for the whole weight

Byte ``j`` of ``planes[rb, cp, i]`` belongs to row ``32 rb + ROW_OF_BYTE[j]``; its low nibble is
the 4-bit index of bit plane ``i`` over ``x[8 cp : 8 cp + 4]`` and its high nibble over
``x[8 cp + 4 : 8 cp + 8]`` (bit e of an index = bit i of the code of value e of the chunk).
``ROW_OF_BYTE[j] = 8 ((j % 16) // 4) + 4 (j // 16) + j % 4`` undoes the interleaving of the
AVX2 inner loop (``vpunpck{l,h}bw`` then ``vpunpck{l,h}wd`` + ``vpmaddwd``), so its four int32
accumulators hold rows 0-7, 8-15, 16-23, 24-31 in order.

Kernel numerics (per row of x, per group g of ``gs`` values; all integer until the last line)::

    a_g   = max|x_g| / 127 (fp32);  xq = clamp(round_half_even(x / a_g), -127, 127) (0 if a_g = 0)
    T_c[p] = sum_{e<4} (bit e of p ? +xq : -xq)[4c + e]        int16, |T| <= 508, T[15-p] = -T[p]
    A_i   = sum_{c in g} T_c[index_i,c]                        (= sum_k sigma_ik xq_k)
    I     = sum_i 2^i A_i + zo * sum_{k in g} xq_k              int32
    y    += (s * (a_g / 2)) * float(I)                          fp32, groups in order; + bias

so ``y = sum_k w_k * a_g xq_k``: exact integer arithmetic on the int8 activations. The only
approximation is the int8 quantization of x (error bound: :func:`activation_error_bound`).
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = [
    "ROW_BLOCK",
    "ROW_OF_BYTE",
    "BITS",
    "row_blocks",
    "pack_planes",
    "unpack_planes",
    "pack_group_tensor",
    "unpack_group_tensor",
    "quantize_activations",
    "dequantize",
    "lut_linear_reference",
    "activation_error_bound",
]

_PREFIX = "fastadapt::lut_linear: "

#: rows per block (one byte lane of a 256-bit register per row)
ROW_BLOCK = 32
BITS = (1, 2, 3, 4)
#: ROW_OF_BYTE[j]: row (inside its block) whose indices byte j of a 32-byte plane unit holds
ROW_OF_BYTE = tuple(8 * ((j % 16) // 4) + 4 * (j // 16) + j % 4 for j in range(32))


def _err(msg: str) -> ValueError:
    return ValueError(_PREFIX + msg)


def row_blocks(N: int) -> int:
    return (N + ROW_BLOCK - 1) // ROW_BLOCK


def _byte_perm(device) -> torch.Tensor:
    return torch.tensor(ROW_OF_BYTE, dtype=torch.long, device=device)


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITS:
        raise _err(f"bits must be one of 1, 2, 3, 4; got {bits!r}")
    return bits


def pack_planes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``uint8 [N, K]`` (< 2^bits, K a multiple of 32) -> planes ``uint8 [NB, K/8, bits, 32]``."""
    bits = _check_bits(bits)
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8 or codes.dim() != 2:
        raise _err(f"codes must be a 2-D uint8 tensor [N, K]; got {getattr(codes, 'dtype', type(codes))}")
    N, K = codes.shape
    if K % 32:
        raise _err(f"codes: K ({K}) must be a multiple of 32")
    if codes.numel() and int(codes.max()) >= (1 << bits):
        raise _err(f"codes must be < 2^bits = {1 << bits}; got max {int(codes.max())}")
    NB = row_blocks(N)
    c = torch.zeros(NB * ROW_BLOCK, K, dtype=torch.uint8, device=codes.device)
    c[:N] = codes
    # [NB, 32 rows, K/8 chunk pairs, 2 chunks, 4 values]
    c = c.view(NB, ROW_BLOCK, K // 8, 2, 4)
    e = torch.arange(4, device=codes.device, dtype=torch.uint8)
    planes = []
    for i in range(bits):
        bit = (c >> i) & 1  # [NB, 32, K/8, 2, 4]
        idx = (bit << e).sum(-1, dtype=torch.uint8)  # [NB, 32, K/8, 2]: 4-bit index per chunk
        byte = idx[..., 0] | (idx[..., 1] << 4)  # [NB, 32 rows, K/8]
        planes.append(byte)
    p = torch.stack(planes, 2)  # [NB, 32 rows, bits, K/8]
    p = p.permute(0, 3, 2, 1)  # [NB, K/8, bits, 32 rows]
    return p[..., _byte_perm(codes.device)].contiguous()  # byte j <- row ROW_OF_BYTE[j]


def unpack_planes(planes: torch.Tensor, bits: int, N: int) -> torch.Tensor:
    """Inverse of :func:`pack_planes`: ``[NB, K/8, bits, 32]`` -> codes ``uint8 [N, K]``."""
    bits = _check_bits(bits)
    NB, KP, b, R = planes.shape
    if b != bits or R != ROW_BLOCK:
        raise _err(f"planes must be [NB, K/8, {bits}, 32]; got {list(planes.shape)}")
    rows = torch.empty_like(planes)
    rows[..., _byte_perm(planes.device)] = planes  # [NB, K/8, bits, 32 rows]
    e = torch.arange(4, device=planes.device, dtype=torch.uint8)
    lo = (rows & 15).unsqueeze(-1) >> e & 1  # [NB, K/8, bits, 32, 4]
    hi = (rows >> 4).unsqueeze(-1) >> e & 1
    bitsv = torch.cat([lo, hi], -1)  # [NB, K/8, bits, 32, 8]: value 8cp + t
    w = (1 << torch.arange(bits, device=planes.device, dtype=torch.uint8)).view(1, 1, bits, 1, 1)
    codes = (bitsv * w).sum(2, dtype=torch.uint8)  # [NB, K/8, 32, 8]
    codes = codes.permute(0, 2, 1, 3).reshape(NB * ROW_BLOCK, KP * 8)
    return codes[:N].contiguous()


def pack_group_tensor(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-(row, group) tensor ``[N, G]`` -> ``[NB, G, 32]`` in ``dtype`` (padded rows 0)."""
    N, G = t.shape
    NB = row_blocks(N)
    out = torch.zeros(NB * ROW_BLOCK, G, dtype=dtype, device=t.device)
    out[:N] = t.to(dtype)
    return out.view(NB, ROW_BLOCK, G).transpose(1, 2).contiguous()


def unpack_group_tensor(t: torch.Tensor, N: int) -> torch.Tensor:
    """Inverse of :func:`pack_group_tensor`: ``[NB, G, 32]`` -> ``[N, G]``."""
    NB, G, R = t.shape
    return t.transpose(1, 2).reshape(NB * R, G)[:N]


def quantize_activations(x: torch.Tensor, group_size: int):
    """The kernels' int8 activations: x ``[M, K]`` -> (xq int32 ``[M, K]``, a fp32 ``[M, G]``).

    ``a = max|x_g| / 127`` in fp32, ``xq = round_half_even(x / a)`` in fp32, clamped to
    [-127, 127]; an all-zero group has ``a = 0`` and ``xq = 0``.
    """
    M, K = x.shape
    G = K // group_size
    xg = x.float().reshape(M, G, group_size)
    a = xg.abs().amax(-1) / 127.0  # [M, G] fp32
    safe = torch.where(a > 0, a, torch.ones_like(a))
    xq = torch.round(xg / safe.unsqueeze(-1)).clamp_(-127, 127)
    xq = torch.where(a.unsqueeze(-1) > 0, xq, torch.zeros_like(xq))
    return xq.reshape(M, K).to(torch.int32), a


def _zoff_matrix(zoffs, zoff, N, G, device):
    if zoffs is None:
        return torch.full((N, G), int(zoff), dtype=torch.float64, device=device)
    return unpack_group_tensor(zoffs, N).double()


def dequantize(planes, scales, zoffs, zoff: int, bits: int, N: int, group_size: int,
               dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Dense ``W [N, K]``: ``w = s/2 * (sum_i 2^i sigma_i + zo)`` (float64 math)."""
    codes = unpack_planes(planes, bits, N).double()  # [N, K]
    K = codes.shape[1]
    G = K // group_size
    s = unpack_group_tensor(scales, N).double()  # [N, G]
    zo = _zoff_matrix(zoffs, zoff, N, G, planes.device)
    # sum_i 2^i sigma_i = 2 q - (2^b - 1)
    v = 2 * codes - ((1 << bits) - 1) + zo.repeat_interleave(group_size, 1)
    return (0.5 * s.repeat_interleave(group_size, 1) * v).to(dtype)


def lut_linear_reference(x, planes, scales, zoffs, bias, bits: int, out_features: int,
                         group_size: int, zoff: int = -1) -> torch.Tensor:
    """float64 oracle of the kernels: ``sum_g s * a_g/2 * I_g`` on the int8 activations.

    x ``[..., K]`` -> ``[..., N]`` in x's dtype. Equal to the kernels up to fp32 rounding.
    """
    K = x.shape[-1]
    N = out_features
    x2 = x.reshape(-1, K)
    xq, a = quantize_activations(x2, group_size)  # [M, K], [M, G]
    M, G = a.shape
    w_int = dequantize(planes, torch.full_like(scales, 2.0), zoffs, zoff, bits, N, group_size)
    # w_int = sum_i 2^i sigma_i + zo (integers), per value
    prod = (xq.double().view(M, 1, G, group_size) * w_int.view(1, N, G, group_size)).sum(-1)
    s = unpack_group_tensor(scales, N).double()  # [N, G]
    y = (prod * s.unsqueeze(0) * (0.5 * a.double()).unsqueeze(1)).sum(-1)  # [M, N]
    if bias is not None:
        y = y + bias.double()
    return y.reshape(*x.shape[:-1], N).to(x.dtype)


def activation_error_bound(x: torch.Tensor, w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Bound on ``|lut_linear(x, W) - x . W^T|`` from the int8 activations, float64 ``[..., N]``.

    Each activation is off by at most half its group's step ``a_g = max|x_g| / 127``, so
    ``|error_n| <= sum_g (a_g / 2) * sum_{k in g} |W[n, k]|`` (plus fp32 rounding of the kernel's
    last multiply-add per group, relative 2^-23 per group term).
    """
    K = x.shape[-1]
    x2 = x.reshape(-1, K).double()
    M = x2.shape[0]
    G = K // group_size
    a = x2.view(M, G, group_size).abs().amax(-1) / 127.0  # [M, G]
    wa = w.double().abs().view(w.shape[0], G, group_size).sum(-1)  # [N, G]
    return (0.5 * a @ wa.t()).reshape(*x.shape[:-1], w.shape[0])
