"""Packed low-bit weight formats of ``fastadapt::qlinear``, defined in pure PyTorch.

This module is the Python definition of the layouts in ``csrc/cpu/kernels/qformat.h``; the C++
and CUDA kernels read the same bytes, so every function here is bit-exact with that header.

A quantized weight ``W`` of shape ``[N, K]`` (out_features, in_features) is stored row by row::

    qdata  uint8 [N, row_bytes(fmt, K)]   packed codes (int formats) or raw GGUF blocks
    scales [N, K // group_size]           fp32 | fp16 | bf16, int formats only (None for GGUF)
    zeros  uint8 [N, K // group_size]     int formats only; None = symmetric (zero = 2^(b-1))

Int formats (``int2 | int3 | int4 | int8``): codes ``q`` in ``[0, 2^b - 1]``,
``w = scale * (q - zero)``. ``K`` is a multiple of 32 and of ``group_size``; ``group_size`` is a
positive multiple of 32 dividing ``K`` (``group_size == K`` is per-channel). Along ``K`` a row is a
sequence of 32-code chunks of ``4 * b`` bytes:

    int8: 32 bytes, byte j = q[j]
    int4: 16 bytes, byte j = q[j] | q[j+16] << 4                                   (j < 16)
    int2:  8 bytes, byte j = q[j] | q[j+8] << 2 | q[j+16] << 4 | q[j+24] << 6      (j < 8)
    int3: 12 bytes: the low two bits of every code in the int2 layout (8 bytes), then a
          little-endian uint32 whose bit i is bit 2 of q[i] (4 bytes)

GGUF formats (``q4_0 | q4_1 | q8_0 | q4_k | q6_k``) are llama.cpp's blocks, unchanged, laid
along ``K`` (fp16 fields little-endian)::

    q4_0 (32 values, 18 B): d, qs[16]                  w = d * (nibble - 8)
    q4_1 (32 values, 20 B): d, m, qs[16]               w = d * nibble + m
    q8_0 (32 values, 34 B): d, int8 qs[32]             w = d * q
    q4_k (256 values, 144 B): d, dmin, scales[12], qs[128]
          8 sub-blocks of 32: w = (d * sc_j) * nibble - (dmin * m_j), 6-bit sc_j/m_j
    q6_k (256 values, 210 B): ql[128], qh[64], int8 scales[16], d
          16 sub-blocks of 16: w = (d * sc_j) * (q6 - 32)

For GGUF formats ``scales`` and ``zeros`` are None and ``group_size`` is the block size (32 or
256) or 0.

Every check raises ``ValueError`` whose message begins with ``"fastadapt::qlinear:"`` and names
the offending argument.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple

import torch

__all__ = [
    "QFormatInfo",
    "FORMATS",
    "INT_FORMATS",
    "GGUF_FORMATS",
    "SCALE_DTYPES",
    "ACT_QUANT_MODES",
    "CHUNK",
    "format_info",
    "normalize_fmt",
    "int_format",
    "row_bytes",
    "num_groups",
    "pack_int",
    "unpack_int",
    "decode_gguf",
    "dequantize",
    "random_packed_weight",
    "validate_fmt",
    "validate_group_size",
    "validate_packed",
    "validate_qlinear_args",
]

_PREFIX = "fastadapt::qlinear: "

#: codes are packed in chunks of this many values along K (int formats)
CHUNK = 32


@dataclasses.dataclass(frozen=True)
class QFormatInfo:
    """One packed weight format (mirrors the ``QFormat`` enum of qformat.h)."""

    name: str  # "int4", "q4_1", ...
    code: int  # value of the C++ enum QFormat
    bits: int  # width of one code: 2/3/4/8 for int formats; 4, 4, 8, 4, 6 for the GGUF ones
    block_values: int  # values per block (int formats: the 32-code chunk)
    block_bytes: int  # bytes per block
    is_gguf: bool

    @property
    def bits_per_weight(self) -> float:
        """Bits per weight of qdata alone (GGUF: everything; int formats: codes only)."""
        return self.block_bytes * 8.0 / self.block_values


FORMATS = {
    "int2": QFormatInfo("int2", 2, 2, 32, 8, False),
    "int3": QFormatInfo("int3", 3, 3, 32, 12, False),
    "int4": QFormatInfo("int4", 4, 4, 32, 16, False),
    "int8": QFormatInfo("int8", 8, 8, 32, 32, False),
    "q4_0": QFormatInfo("q4_0", 100, 4, 32, 18, True),
    "q4_1": QFormatInfo("q4_1", 101, 4, 32, 20, True),
    "q8_0": QFormatInfo("q8_0", 102, 8, 32, 34, True),
    "q4_k": QFormatInfo("q4_k", 103, 4, 256, 144, True),
    "q6_k": QFormatInfo("q6_k", 104, 6, 256, 210, True),
}
INT_FORMATS = ("int2", "int3", "int4", "int8")
GGUF_FORMATS = ("q4_0", "q4_1", "q8_0", "q4_k", "q6_k")
SCALE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ACT_QUANT_MODES = ("none", "int8")
_X_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _err(msg: str) -> ValueError:
    return ValueError(_PREFIX + msg)


# ---------------------------------------------------------------------------------------------
# format table helpers
# ---------------------------------------------------------------------------------------------
def normalize_fmt(fmt, arg: str = "fmt") -> str:
    """Canonical (lower-case) format name; accepts e.g. ``"Q4_1"`` or a GGUF type enum."""
    name = getattr(fmt, "name", fmt)  # gguf.GGMLQuantizationType
    if not isinstance(name, str):
        raise _err(f"{arg} must be a str, one of {', '.join(FORMATS)}; got {fmt!r}")
    key = name.strip().lower()
    if key not in FORMATS:
        raise _err(f"{arg} must be one of {', '.join(FORMATS)}; got {fmt!r}")
    return key


def format_info(fmt, arg: str = "fmt") -> QFormatInfo:
    """The :class:`QFormatInfo` of ``fmt`` (case-insensitive); ValueError if unknown."""
    return FORMATS[normalize_fmt(fmt, arg)]


validate_fmt = format_info


def int_format(bits: int, arg: str = "bits") -> str:
    """``"int{bits}"`` for bits in {2, 3, 4, 8}; ValueError otherwise."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in (2, 3, 4, 8):
        raise _err(f"{arg} must be one of 2, 3, 4, 8; got {bits!r}")
    return f"int{bits}"


def row_bytes(fmt, K: int) -> int:
    """Bytes of one packed row of ``K`` values (``K`` a multiple of the block size)."""
    info = format_info(fmt)
    if K % info.block_values:
        raise _err(f"in_features ({K}) must be a multiple of {info.block_values} for {info.name}")
    return K // info.block_values * info.block_bytes


def num_groups(K: int, group_size: int) -> int:
    return K // group_size


def validate_group_size(fmt, K: int, group_size: int, arg: str = "group_size") -> int:
    """Check ``group_size`` for a ``[*, K]`` weight; returns the effective group size.

    Int formats: a positive multiple of 32 dividing ``K`` (``K`` itself = per-channel).
    GGUF formats carry their scales in the blocks: ``group_size`` must be the block size
    (32 or 256) or ``0`` ("unused"), as the C++ op checks; the block size is returned.
    """
    info = format_info(fmt)
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise _err(f"{arg} must be an int; got {group_size!r}")
    if info.is_gguf:
        if group_size not in (0, info.block_values):
            raise _err(
                f"{arg} must be {info.block_values} (or 0: unused) for GGUF format "
                f"{info.name}; got {group_size}"
            )
        return info.block_values
    if group_size <= 0 or group_size % CHUNK:
        raise _err(f"{arg} must be a positive multiple of {CHUNK}; got {group_size}")
    if K % group_size:
        raise _err(f"{arg} ({group_size}) must divide in_features ({K})")
    return group_size


def _validate_K(fmt, K: int, arg: str = "in_features") -> QFormatInfo:
    info = format_info(fmt)
    if isinstance(K, bool) or not isinstance(K, int) or K <= 0:
        raise _err(f"{arg} must be a positive int; got {K!r}")
    mult = max(CHUNK, info.block_values)
    if K % mult:
        raise _err(f"{arg} ({K}) must be a multiple of {mult} for format {info.name}")
    return info


def _check_group_tensor(name, t, dtypes, dtype_names, N, G, dev) -> None:
    """A per-group tensor (scales or zeros): a tensor of one of `dtypes`, shape [N, G], on dev."""
    if not isinstance(t, torch.Tensor):
        raise _err(f"{name} must be a tensor; got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise _err(f"{name} must be {dtype_names}; got {t.dtype}")
    if tuple(t.shape) != (N, G):
        raise _err(
            f"{name} must have shape [out_features, in_features // group_size] = [{N}, {G}]; "
            f"got {list(t.shape)}"
        )
    if t.device != dev:
        raise _err(f"{name} must be on the device of qdata ({dev}); got {t.device}")


def validate_packed(
    qdata: torch.Tensor,
    scales: Optional[torch.Tensor],
    zeros: Optional[torch.Tensor],
    fmt,
    shape: Sequence[int],
    group_size: int,
) -> QFormatInfo:
    """Check a packed weight (qdata, scales, zeros) of logical ``shape = (N, K)``.

    Returns the format info. Raises ValueError naming the argument on any mismatch.
    """
    info = format_info(fmt)
    if len(tuple(shape)) != 2:
        raise _err(f"shape must be (out_features, in_features); got {tuple(shape)!r}")
    N, K = (int(s) for s in shape)
    if N < 0:
        raise _err(f"out_features must be >= 0; got {N}")
    _validate_K(info.name, K)
    gs = validate_group_size(info.name, K, group_size)
    if not isinstance(qdata, torch.Tensor):
        raise _err(f"qdata must be a tensor; got {type(qdata).__name__}")
    if qdata.dtype != torch.uint8:
        raise _err(f"qdata must be uint8; got {qdata.dtype}")
    rb = row_bytes(info.name, K)
    if qdata.dim() != 2 or tuple(qdata.shape) != (N, rb):
        raise _err(
            f"qdata must have shape [out_features, row_bytes] = [{N}, {rb}] for {info.name} "
            f"with in_features={K}; got {list(qdata.shape)}"
        )
    dev = qdata.device
    if info.is_gguf:
        if scales is not None:
            raise _err(f"scales must be None for GGUF format {info.name} (scales are in the blocks)")
        if zeros is not None:
            raise _err(f"zeros must be None for GGUF format {info.name}")
        return info
    G = K // gs
    if scales is None:
        raise _err(f"scales is required for format {info.name}")
    _check_group_tensor("scales", scales, SCALE_DTYPES, "float32, float16 or bfloat16", N, G, dev)
    if zeros is not None:
        _check_group_tensor("zeros", zeros, (torch.uint8,), "uint8", N, G, dev)
    return info


def validate_qlinear_args(
    x: torch.Tensor,
    qdata: torch.Tensor,
    scales: Optional[torch.Tensor],
    zeros: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    fmt,
    in_features: int,
    group_size: int,
    act_quant: str = "none",
    *,
    allow_float64: bool = False,
) -> QFormatInfo:
    """Every argument check of ``fastadapt::qlinear``; returns the format info.

    ``x`` is ``[..., in_features]`` in fp32/fp16/bf16 (fp64 too with ``allow_float64``, which
    only the reference accepts). ``bias`` is None or a floating ``[out_features]`` tensor.
    """
    info = format_info(fmt)
    if not isinstance(act_quant, str) or act_quant not in ACT_QUANT_MODES:
        raise _err(f"act_quant must be one of {', '.join(ACT_QUANT_MODES)}; got {act_quant!r}")
    _validate_K(info.name, in_features)
    validate_group_size(info.name, in_features, group_size)
    if not isinstance(x, torch.Tensor):
        raise _err(f"x must be a tensor; got {type(x).__name__}")
    ok = _X_DTYPES + ((torch.float64,) if allow_float64 else ())
    if x.dtype not in ok:
        raise _err(f"x must be one of {', '.join(str(d) for d in ok)}; got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise _err(f"x must have shape [..., in_features={in_features}]; got {list(x.shape)}")
    if not isinstance(qdata, torch.Tensor):
        raise _err(f"qdata must be a tensor; got {type(qdata).__name__}")
    if qdata.dim() != 2:
        raise _err(f"qdata must be 2-D [out_features, row_bytes]; got {list(qdata.shape)}")
    N = int(qdata.shape[0])
    validate_packed(qdata, scales, zeros, info.name, (N, in_features), group_size)
    if qdata.device != x.device:
        raise _err(f"qdata must be on the device of x ({x.device}); got {qdata.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise _err(f"bias must be a tensor or None; got {type(bias).__name__}")
        if not bias.is_floating_point():
            raise _err(f"bias must be a floating tensor; got {bias.dtype}")
        if tuple(bias.shape) != (N,):
            raise _err(f"bias must have shape [out_features={N}]; got {list(bias.shape)}")
        if bias.device != x.device:
            raise _err(f"bias must be on the device of x ({x.device}); got {bias.device}")
    return info


# ---------------------------------------------------------------------------------------------
# int formats: pack / unpack (chunks of 32 codes along K)
# ---------------------------------------------------------------------------------------------
def _check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in (2, 3, 4, 8):
        raise _err(f"bits must be one of 2, 3, 4, 8; got {bits!r}")
    return bits


def _pack2(c: torch.Tensor) -> torch.Tensor:
    # c: [N, C, 32] uint8 codes < 4 -> [N, C, 8]; byte j = c[j] | c[j+8]<<2 | c[j+16]<<4 | c[j+24]<<6
    c = c.reshape(*c.shape[:-1], 4, 8)
    return c[..., 0, :] | (c[..., 1, :] << 2) | (c[..., 2, :] << 4) | (c[..., 3, :] << 6)


def _unpack2(b: torch.Tensor) -> torch.Tensor:
    # b: [N, C, 8] -> [N, C, 32]
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).view(4, 1)
    return ((b.unsqueeze(-2) >> shifts) & 3).flatten(-2)


def pack_int(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes ``uint8 [N, K]`` (each < 2^bits, K a multiple of 32) -> ``uint8 [N, K*bits//8]``.

    Layout per 32-code chunk as in qformat.h (see the module docstring).
    """
    bits = _check_bits(bits)
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        raise _err(f"codes must be a uint8 tensor; got {getattr(codes, 'dtype', type(codes))}")
    if codes.dim() != 2:
        raise _err(f"codes must be 2-D [N, K]; got {list(codes.shape)}")
    N, K = codes.shape
    if K % CHUNK:
        raise _err(f"codes: K ({K}) must be a multiple of {CHUNK}")
    if codes.numel() and int(codes.max()) >= (1 << bits):
        raise _err(f"codes must be < 2^bits = {1 << bits}; got max {int(codes.max())}")
    c = codes.reshape(N, K // CHUNK, CHUNK)
    if bits == 8:
        out = c.clone()
    elif bits == 4:
        out = c[..., :16] | (c[..., 16:] << 4)
    elif bits == 2:
        out = _pack2(c)
    else:  # bits == 3
        low = _pack2(c & 3)  # [N, C, 8]
        hb = ((c >> 2) & 1).reshape(N, K // CHUNK, 4, 8)  # bit i of the uint32 = bit 2 of q[i]
        w = (1 << torch.arange(8, device=c.device, dtype=torch.int32)).to(torch.uint8)
        high = (hb * w).sum(-1, dtype=torch.int32).to(torch.uint8)  # [N, C, 4], byte b = bits 8b..8b+7
        out = torch.cat([low, high], dim=-1)
    return out.reshape(N, K * bits // 8).contiguous()


def unpack_int(packed: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    """Inverse of :func:`pack_int`: ``uint8 [N, K*bits//8]`` -> codes ``uint8 [N, K]``."""
    bits = _check_bits(bits)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise _err(f"qdata must be a uint8 tensor; got {getattr(packed, 'dtype', type(packed))}")
    if isinstance(K, bool) or not isinstance(K, int) or K <= 0 or K % CHUNK:
        raise _err(f"in_features must be a positive multiple of {CHUNK}; got {K!r}")
    if packed.dim() != 2 or packed.shape[1] != K * bits // 8:
        raise _err(
            f"qdata must have shape [N, {K * bits // 8}] for int{bits} with in_features={K}; "
            f"got {list(packed.shape)}"
        )
    N = packed.shape[0]
    C = K // CHUNK
    p = packed.reshape(N, C, 4 * bits)
    if bits == 8:
        out = p
    elif bits == 4:
        out = torch.cat([p & 0xF, p >> 4], dim=-1)
    elif bits == 2:
        out = _unpack2(p)
    else:
        low = _unpack2(p[..., :8])  # [N, C, 32]
        sh = torch.arange(8, dtype=torch.uint8, device=p.device)
        hb = ((p[..., 8:].unsqueeze(-1) >> sh) & 1).flatten(-2)  # [N, C, 32]
        out = low | (hb << 2)
    return out.reshape(N, K).contiguous()


# ---------------------------------------------------------------------------------------------
# GGUF block decoders (llama.cpp dequantize_row_* semantics)
# ---------------------------------------------------------------------------------------------
def _f16(b: torch.Tensor) -> torch.Tensor:
    # b: [nb, 2] uint8 (little-endian fp16) -> [nb, 1] float16
    return b.contiguous().view(torch.float16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dec_q4_0(b: torch.Tensor, ct: torch.dtype) -> torch.Tensor:
    d = _f16(b[:, 0:2]).to(ct)  # [nb, 1]
    qs = b[:, 2:18]
    q = torch.cat([qs & 0xF, qs >> 4], dim=-1).to(torch.int16) - 8  # [nb, 32]
    return d * q.to(ct)


def _dec_q4_1(b: torch.Tensor, ct: torch.dtype) -> torch.Tensor:
    d = _f16(b[:, 0:2]).to(ct)
    m = _f16(b[:, 2:4]).to(ct)
    qs = b[:, 4:20]
    q = torch.cat([qs & 0xF, qs >> 4], dim=-1)
    return d * q.to(ct) + m


def _dec_q8_0(b: torch.Tensor, ct: torch.dtype) -> torch.Tensor:
    d = _f16(b[:, 0:2]).to(ct)
    q = b[:, 2:34].contiguous().view(torch.int8)
    return d * q.to(ct)


def q4_k_scale_min(sc12: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Unpack the 12 scale bytes of Q4_K blocks ``[nb, 12]`` -> 6-bit (scales, mins) ``[nb, 8]``.

    llama.cpp ``get_scale_min_k4``: for j < 4 ``sc = s[j] & 63, m = s[j+4] & 63``; for j >= 4
    ``sc = (s[j+4] & 15) | (s[j-4] >> 6) << 4``, ``m = (s[j+4] >> 4) | (s[j] >> 6) << 4``.
    """
    a, bb, c = sc12[:, 0:4], sc12[:, 4:8], sc12[:, 8:12]
    sc = torch.cat([a & 63, (c & 0xF) | ((a >> 6) << 4)], dim=-1)
    mn = torch.cat([bb & 63, (c >> 4) | ((bb >> 6) << 4)], dim=-1)
    return sc, mn


def _dec_q4_k(b: torch.Tensor, ct: torch.dtype) -> torch.Tensor:
    nb = b.shape[0]
    d = _f16(b[:, 0:2]).to(ct)  # [nb, 1]
    dmin = _f16(b[:, 2:4]).to(ct)
    sc, mn = q4_k_scale_min(b[:, 4:16])
    dl = (d * sc.to(ct)).unsqueeze(-1)  # [nb, 8, 1]
    ml = (dmin * mn.to(ct)).unsqueeze(-1)
    qs = b[:, 16:144].reshape(nb, 4, 1, 32)
    # 64-value chunk j: low nibbles -> sub-block 2j, high nibbles -> sub-block 2j+1
    q = torch.cat([qs & 0xF, qs >> 4], dim=2).reshape(nb, 8, 32)
    return (dl * q.to(ct) - ml).reshape(nb, 256)


def _dec_q6_k(b: torch.Tensor, ct: torch.dtype) -> torch.Tensor:
    nb = b.shape[0]
    ql = b[:, 0:128].reshape(nb, 2, 1, 2, 32)  # half h: ql[64h : 64h+64]
    qh = b[:, 128:192].reshape(nb, 2, 1, 32)  # half h: qh[32h : 32h+32]
    sc = b[:, 192:208].contiguous().view(torch.int8)  # [nb, 16], one per 16 values
    d = _f16(b[:, 208:210]).to(ct)  # [nb, 1]
    # value 128h + 32k + l (k = 0..3): low nibble of ql[l] / ql[l+32] for k = 0 / 1, high nibble
    # of ql[l] / ql[l+32] for k = 2 / 3; two high bits from qh[l] >> 2k
    lo = torch.cat([ql & 0xF, ql >> 4], dim=2).reshape(nb, 2, 4, 32)
    sh = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).view(4, 1)
    hi = (qh >> sh) & 3  # [nb, 2, 4, 32]
    q = (lo | (hi << 4)).to(torch.int16) - 32
    dl = (d * sc.to(ct)).unsqueeze(-1)  # [nb, 16, 1]
    return (dl * q.reshape(nb, 16, 16).to(ct)).reshape(nb, 256)


_GGUF_DECODERS = {
    "q4_0": _dec_q4_0,
    "q4_1": _dec_q4_1,
    "q8_0": _dec_q8_0,
    "q4_k": _dec_q4_k,
    "q6_k": _dec_q6_k,
}


def decode_gguf(qdata: torch.Tensor, fmt, K: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode raw GGUF blocks ``uint8 [N, row_bytes]`` (or flat) -> ``[N, K]`` in ``dtype``.

    With ``dtype=float32`` the arithmetic is float32 in llama.cpp's order, so the result equals
    ``gguf.quants.dequantize`` bit for bit. With ``float64`` the exact values are computed
    (every product of an fp16 scale and a small code is exact in float64). Other dtypes are
    computed in float32 and rounded.
    """
    info = format_info(fmt)
    if not info.is_gguf:
        raise _err(f"fmt must be a GGUF format for decode_gguf; got {info.name}")
    _validate_K(info.name, K)
    if qdata.dtype != torch.uint8:
        raise _err(f"qdata must be uint8; got {qdata.dtype}")
    rb = row_bytes(info.name, K)
    if qdata.numel() % rb:
        raise _err(f"qdata size ({qdata.numel()}) must be a multiple of row_bytes ({rb})")
    N = qdata.numel() // rb
    blocks = qdata.reshape(N * (K // info.block_values), info.block_bytes)
    ct = _compute_dtype(dtype)
    w = _GGUF_DECODERS[info.name](blocks, ct)
    return w.reshape(N, K).to(dtype)


# ---------------------------------------------------------------------------------------------
# dequantize (any format)
# ---------------------------------------------------------------------------------------------
def dequantize(
    qdata: torch.Tensor,
    scales: Optional[torch.Tensor],
    zeros: Optional[torch.Tensor],
    fmt,
    shape: Sequence[int],
    group_size: int,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Dense weight ``[N, K]`` of a packed weight (``shape = (N, K)``), in ``dtype``.

    Int formats: ``w = scale * (q - zero)`` (zero = 2^(b-1) when ``zeros`` is None), computed in
    float64 when ``dtype`` is float64, else in float32 then rounded to ``dtype``.
    GGUF formats: see :func:`decode_gguf`.
    """
    info = validate_packed(qdata, scales, zeros, fmt, shape, group_size)
    N, K = (int(s) for s in shape)
    if info.is_gguf:
        return decode_gguf(qdata, info.name, K, dtype)
    gs = group_size
    ct = _compute_dtype(dtype)
    q = unpack_int(qdata, info.bits, K).to(torch.int16).view(N, K // gs, gs)
    if zeros is None:
        qz = q - (1 << (info.bits - 1))
    else:
        qz = q - zeros.to(torch.int16).unsqueeze(-1)
    w = scales.to(ct).unsqueeze(-1) * qz.to(ct)
    return w.reshape(N, K).to(dtype)


# ---------------------------------------------------------------------------------------------
# random valid weights (tests everywhere use this)
# ---------------------------------------------------------------------------------------------
def _rand_f16_bytes(shape, lo: float, hi: float, generator, signed: bool) -> torch.Tensor:
    # random finite fp16 values with |v| in [lo, hi), as raw bytes [..., 2]
    v = lo + (hi - lo) * torch.rand(shape, generator=generator)
    if signed:
        sign = torch.randint(0, 2, shape, generator=generator).float() * 2 - 1
        v = v * sign
    return v.to(torch.float16).view(torch.uint8).reshape(*shape, 2)


def random_packed_weight(
    fmt,
    N: int,
    K: int,
    group_size: Optional[int] = 128,
    scale_dtype: torch.dtype = torch.float16,
    symmetric: bool = False,
    generator: Optional[torch.Generator] = None,
    device=None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Random valid packed weight of any format -> ``(qdata, scales, zeros)``.

    Int formats: uniform random codes, positive scales in ``[0.25, 1) / 2^(b-1)`` (weights of
    order one), random zero points (``zeros`` None when ``symmetric``). ``group_size`` None or
    <= 0 means per-channel (``K``); when ``group_size`` exceeds ``K`` it is clamped to ``K``.
    GGUF formats: random code bytes and random finite fp16 ``d`` / ``dmin`` (and random
    sub-block scales, which are part of the code bytes); ``scales``/``zeros`` are None and
    ``group_size``, ``scale_dtype``, ``symmetric`` are ignored.
    Generated on CPU (deterministic for a given ``generator``), then moved to ``device``.
    """
    info = format_info(fmt)
    if isinstance(N, bool) or not isinstance(N, int) or N < 0:
        raise _err(f"out_features must be an int >= 0; got {N!r}")
    _validate_K(info.name, K)
    g = generator
    if info.is_gguf:
        nb = K // info.block_values
        blocks = torch.randint(0, 256, (N, nb, info.block_bytes), generator=g, dtype=torch.uint8)
        if info.name == "q4_0":
            blocks[..., 0:2] = _rand_f16_bytes((N, nb), 0.02, 0.2, g, True)
        elif info.name == "q4_1":
            blocks[..., 0:2] = _rand_f16_bytes((N, nb), 0.02, 0.2, g, False)
            blocks[..., 2:4] = _rand_f16_bytes((N, nb), 0.5, 1.5, g, True)
        elif info.name == "q8_0":
            blocks[..., 0:2] = _rand_f16_bytes((N, nb), 0.001, 0.01, g, True)
        elif info.name == "q4_k":
            blocks[..., 0:2] = _rand_f16_bytes((N, nb), 5e-4, 5e-3, g, False)
            blocks[..., 2:4] = _rand_f16_bytes((N, nb), 5e-4, 5e-3, g, False)
        else:  # q6_k: d is the last field
            blocks[..., 208:210] = _rand_f16_bytes((N, nb), 5e-5, 5e-4, g, True)
        qdata = blocks.reshape(N, nb * info.block_bytes)
        if device is not None:
            qdata = qdata.to(device)
        return qdata, None, None
    if group_size is None or group_size <= 0 or group_size > K:
        group_size = K
    validate_group_size(info.name, K, group_size)
    if scale_dtype not in SCALE_DTYPES:
        raise _err(f"scale_dtype must be float32, float16 or bfloat16; got {scale_dtype}")
    G = K // group_size
    b = info.bits
    codes = torch.randint(0, 1 << b, (N, K), generator=g, dtype=torch.uint8)
    qdata = pack_int(codes, b)
    scales = ((0.25 + 0.75 * torch.rand((N, G), generator=g)) / (1 << (b - 1))).to(scale_dtype)
    zeros = None
    if not symmetric:
        zeros = torch.randint(0, 1 << b, (N, G), generator=g, dtype=torch.uint8)
    if device is not None:
        qdata = qdata.to(device)
        scales = scales.to(device)
        zeros = zeros.to(device) if zeros is not None else None
    return qdata, scales, zeros
