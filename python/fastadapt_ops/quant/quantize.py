"""Weight quantizers: round-to-nearest per group, optional clipping search, GGUF blocks.

``quantize_weight(w, ...)`` turns a float ``[out_features, in_features]`` weight into a
:class:`QuantizedWeight` in one of the packed formats of ``fastadapt::qlinear``:

* int formats (``bits`` in 2, 3, 4, 8): per group of ``group_size`` values along K, codes
  ``q = clamp(round(w / s) + z, 0, 2^b - 1)`` with ``w ~ s * (q - z)``;
  asymmetric: ``s = (max(w_max, 0) - min(w_min, 0)) / (2^b - 1)``, ``z = round(-min / s)``
  (0 is always representable, z always fits in b bits);
  symmetric: ``s = 2 max|w| / (2^b - 1)``, ``z = 2^(b-1)`` (all 2^b levels are used).
  The stored scale is rounded *up* to ``scale_dtype`` so the group's range stays covered; hence
  ``|w - dequant(w)| <= s / 2`` for every weight (up to float32 rounding of ``w / s``).
  ``clip_search=True`` also tries shrinking the range by the factors in ``clip_ratios``
  (1.0 down to 0.7) and keeps, per group, the factor with the smallest reconstruction error
  weighted by the activation statistics ``act_scale`` when given (diagonal approximation of the
  output MSE ``E[(dW x)^2] ~ sum_k dW_k^2 E[x_k^2]``). Factor 1.0 is plain RTN, so the search
  is never worse than RTN on that objective.
* GGUF formats: ``q4_0``, ``q4_1``, ``q8_0`` exactly as llama.cpp's reference quantizers
  (``quantize_row_q*_ref``; byte-identical to ``gguf.quants.quantize``); ``q4_k`` and ``q6_k``
  with a simple range-covering round-to-nearest (valid blocks, not llama.cpp's iterative search).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..ops import qformats as qf
from ..ops.reference import round_half_away
from .weight import QuantizedWeight

__all__ = ["quantize_weight", "DEFAULT_CLIP_RATIOS", "quantize_gguf_blocks"]

_P = "quantize_weight: "

#: shrink factors of the per-group range tried by the clipping search (1.0 = plain RTN)
DEFAULT_CLIP_RATIOS = tuple(round(1.0 - 0.02 * i, 2) for i in range(16))  # 1.00 ... 0.70


def _err(msg: str) -> ValueError:
    return ValueError(_P + msg)


def _round_up_to(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Positive ``s`` rounded to ``dtype``, then bumped one ulp up where rounding went down."""
    sq = s.to(dtype)
    low = sq.to(s.dtype) < s
    if bool(low.any()):
        ity = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
               torch.float64: torch.int64}[dtype]
        bumped = (sq.view(ity) + 1).view(dtype)
        sq = torch.where(low, bumped, sq)
    return sq


def _check_weight(w) -> torch.Tensor:
    if not isinstance(w, torch.Tensor):
        raise _err(f"w must be a tensor; got {type(w).__name__}")
    if w.dim() != 2:
        raise _err(f"w must be 2-D [out_features, in_features]; got shape {list(w.shape)}")
    if not w.is_floating_point():
        raise _err(f"w must be a floating tensor; got {w.dtype}")
    if w.shape[1] == 0 or w.shape[1] % qf.CHUNK:
        raise _err(f"w: in_features ({w.shape[1]}) must be a positive multiple of {qf.CHUNK}")
    if not bool(torch.isfinite(w).all()):
        raise _err("w must be finite (found inf or nan)")
    return w


def _resolve_group_size(group_size, K: int) -> int:
    if group_size is None or (isinstance(group_size, int) and not isinstance(group_size, bool) and group_size == -1):
        return K
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise _err(f"group_size must be an int (or -1/None for per-channel); got {group_size!r}")
    if group_size <= 0 or group_size % qf.CHUNK:
        raise _err(f"group_size must be a positive multiple of {qf.CHUNK}, or -1/None; got {group_size}")
    if K % group_size:
        raise _err(f"group_size ({group_size}) must divide in_features ({K})")
    return group_size


def _importance(act_scale, act_scale_kind: str, K: int, device) -> Optional[torch.Tensor]:
    """Per-input-channel weight of the squared error, ``[K]`` float, or None."""
    if act_scale is None:
        return None
    if act_scale_kind not in ("mean_abs", "mean_sq"):
        raise _err(f"act_scale_kind must be 'mean_abs' or 'mean_sq'; got {act_scale_kind!r}")
    if not isinstance(act_scale, torch.Tensor) or not act_scale.is_floating_point():
        raise _err("act_scale must be a floating tensor [in_features]")
    if tuple(act_scale.shape) != (K,):
        raise _err(f"act_scale must have shape [in_features={K}]; got {list(act_scale.shape)}")
    a = act_scale.detach().to(device=device, dtype=torch.float32)
    if not bool(torch.isfinite(a).all()) or bool((a < 0).any()):
        raise _err("act_scale must be finite and >= 0")
    return a * a if act_scale_kind == "mean_abs" else a


def _rtn_groups(wg: torch.Tensor, bits: int, symmetric: bool, ratio, scale_dtype):
    """RTN of groups ``wg [N, G, gs]`` with range shrunk by ``ratio`` (``[N, G, 1]`` or float).

    Returns ``(q int16 [N,G,gs], scale [N,G] in scale_dtype, zero int16 [N,G,1], deq [N,G,gs])``.
    """
    maxq = (1 << bits) - 1
    if symmetric:
        amax = wg.abs().amax(-1, keepdim=True) * ratio
        s = 2.0 * amax / maxq
    else:
        mx = wg.amax(-1, keepdim=True).clamp(min=0) * ratio
        mn = wg.amin(-1, keepdim=True).clamp(max=0) * ratio
        s = (mx - mn) / maxq
    s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero group: any scale reproduces it
    sq = _round_up_to(s, scale_dtype)
    if not bool(torch.isfinite(sq).all()):
        raise _err(f"w: values too large for scale_dtype {scale_dtype}")
    sc = sq.to(wg.dtype)
    if symmetric:
        z = torch.full_like(sc, float(1 << (bits - 1)))
    else:
        z = torch.round(-mn / sc).clamp_(0, maxq)
    q = (torch.round(wg / sc) + z).clamp_(0, maxq)
    deq = sc * (q - z)
    return q.to(torch.int16), sq.squeeze(-1), z.to(torch.int16), deq


def _quantize_int(w, bits, gs, symmetric, scale_dtype, clip_search, imp, clip_ratios):
    N, K = w.shape
    G = K // gs
    ct = torch.float64 if w.dtype == torch.float64 else torch.float32
    wg = w.detach().to(ct).reshape(N, G, gs)
    if clip_search:
        impg = None if imp is None else imp.to(ct).reshape(1, G, gs)
        best_err = None
        best_ratio = None
        for r in clip_ratios:
            *_, deq = _rtn_groups(wg, bits, symmetric, float(r), scale_dtype)
            e = (deq - wg).square()
            if impg is not None:
                e = e * impg
            e = e.sum(-1, keepdim=True)  # [N, G, 1]
            if best_err is None:
                best_err, best_ratio = e, torch.full_like(e, float(r))
            else:
                better = e < best_err
                best_err = torch.where(better, e, best_err)
                best_ratio = torch.where(better, torch.full_like(e, float(r)), best_ratio)
        ratio = best_ratio
    else:
        ratio = 1.0
    q, scales, z, _ = _rtn_groups(wg, bits, symmetric, ratio, scale_dtype)
    qdata = qf.pack_int(q.to(torch.uint8).reshape(N, K), bits)
    zeros = None if symmetric else z.squeeze(-1).to(torch.uint8).contiguous()
    return QuantizedWeight(qdata, scales.contiguous(), zeros, qf.int_format(bits), (N, K), gs, symmetric)


# ---------------------------------------------------------------------------------------------
# GGUF block quantizers. x: [nb, block_values] float32 -> uint8 [nb, block_bytes]
# ---------------------------------------------------------------------------------------------
def _f16_bytes(v: torch.Tensor) -> torch.Tensor:
    # v: [nb] float -> [nb, 2] uint8 (little-endian fp16, round to nearest even)
    return v.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    # q: [nb, 32] codes < 16 -> [nb, 16], byte j = q[j] | q[j+16] << 4
    q = q.to(torch.uint8)
    return q[:, :16] | (q[:, 16:] << 4)


def _q4_0(x):
    idx = x.abs().argmax(-1, keepdim=True)  # first value of largest magnitude, with its sign
    mx = torch.gather(x, -1, idx)
    d = mx / -8.0
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    q = torch.trunc(x * inv + 8.5).clamp_(0, 15)
    return torch.cat([_f16_bytes(d.squeeze(-1)), _pack_nibbles(q)], dim=-1)


def _q4_1(x):
    mn = x.amin(-1, keepdim=True)
    mx = x.amax(-1, keepdim=True)
    d = (mx - mn) / 15.0
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    q = torch.trunc((x - mn) * inv + 0.5).clamp_(0, 15)
    return torch.cat([_f16_bytes(d.squeeze(-1)), _f16_bytes(mn.squeeze(-1)), _pack_nibbles(q)], dim=-1)


def _q8_0(x):
    d = x.abs().amax(-1, keepdim=True) / 127.0
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    q = round_half_away(x * inv).clamp_(-127, 127).to(torch.int8)
    return torch.cat([_f16_bytes(d.squeeze(-1)), q.view(torch.uint8)], dim=-1)


def _safe_div(a, b):
    return torch.where(b > 0, a / torch.where(b > 0, b, torch.ones_like(b)), torch.zeros_like(a))


def _q4_k(x):
    nb = x.shape[0]
    xs = x.reshape(nb, 8, 32)
    minv = (-xs.amin(-1)).clamp(min=0)  # [nb, 8] offset so that x + minv >= 0
    dmin = _round_up_to(minv.amax(-1, keepdim=True) / 63.0, torch.float16).float()  # [nb, 1]
    m = torch.ceil(_safe_div(minv, dmin)).clamp_(0, 63)
    dm = dmin * m  # >= minv
    need = (xs.amax(-1) + dm).clamp(min=0) / 15.0  # sub-block scale covering [-dm, max]
    d = _round_up_to(need.amax(-1, keepdim=True) / 63.0, torch.float16).float()
    sc = torch.ceil(_safe_div(need, d)).clamp_(0, 63)
    ds = (d * sc).unsqueeze(-1)
    q = torch.round(_safe_div(xs + dm.unsqueeze(-1), ds.expand_as(xs))).clamp_(0, 15).to(torch.uint8)
    sc8, m8 = sc.to(torch.uint8), m.to(torch.uint8)
    # 12 scale bytes (inverse of get_scale_min_k4)
    s = torch.empty(nb, 12, dtype=torch.uint8)
    s[:, 0:4] = (sc8[:, 0:4] & 63) | ((sc8[:, 4:8] >> 4) << 6)
    s[:, 4:8] = (m8[:, 0:4] & 63) | ((m8[:, 4:8] >> 4) << 6)
    s[:, 8:12] = (sc8[:, 4:8] & 0xF) | ((m8[:, 4:8] & 0xF) << 4)
    qq = q.reshape(nb, 4, 2, 32)  # 64-value chunk j: sub-block 2j low nibbles, 2j+1 high
    qs = (qq[:, :, 0] | (qq[:, :, 1] << 4)).reshape(nb, 128)
    if not bool(torch.isfinite(d).all() and torch.isfinite(dmin).all()):
        raise _err("w: values too large for fp16 block scales")
    return torch.cat([_f16_bytes(d.squeeze(-1)), _f16_bytes(dmin.squeeze(-1)), s, qs], dim=-1)


def _q6_k(x):
    nb = x.shape[0]
    xs = x.reshape(nb, 16, 16)
    need = xs.abs().amax(-1) / 31.5  # [nb, 16]: codes q - 32 in [-32, 31]
    d = _round_up_to(need.amax(-1, keepdim=True) / 127.0, torch.float16).float()
    sc = torch.ceil(_safe_div(need, d)).clamp_(0, 127)
    ds = (d * sc).unsqueeze(-1)
    q = (torch.round(_safe_div(xs, ds.expand_as(xs))) + 32).clamp_(0, 63).to(torch.uint8)
    q = q.reshape(nb, 2, 4, 32)  # value 128h + 32k + l
    lo, hi = q & 0xF, q >> 4
    ql = torch.cat([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], dim=-1)  # [nb,2,64]
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)  # [nb, 2, 32]
    if not bool(torch.isfinite(d).all()):
        raise _err("w: values too large for fp16 block scales")
    return torch.cat(
        [ql.reshape(nb, 128), qh.reshape(nb, 64), sc.to(torch.int8).view(torch.uint8), _f16_bytes(d.squeeze(-1))],
        dim=-1,
    )


_GGUF_QUANTIZERS = {"q4_0": _q4_0, "q4_1": _q4_1, "q8_0": _q8_0, "q4_k": _q4_k, "q6_k": _q6_k}


def quantize_gguf_blocks(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """Quantize ``w [N, K]`` into raw GGUF blocks ``uint8 [N, row_bytes]`` (computed on CPU)."""
    info = qf.format_info(fmt)
    if not info.is_gguf:
        raise _err(f"fmt must be a GGUF format; got {info.name}")
    N, K = w.shape
    if K % info.block_values:
        raise _err(f"w: in_features ({K}) must be a multiple of {info.block_values} for {info.name}")
    x = w.detach().to(device="cpu", dtype=torch.float32).reshape(-1, info.block_values)
    blocks = _GGUF_QUANTIZERS[info.name](x)
    return blocks.reshape(N, qf.row_bytes(info.name, K)).contiguous()


# ---------------------------------------------------------------------------------------------
def quantize_weight(
    w: torch.Tensor,
    bits: int = 4,
    group_size: Optional[int] = 128,
    symmetric: bool = False,
    scale_dtype: torch.dtype = torch.float16,
    clip_search: bool = False,
    *,
    act_scale: Optional[torch.Tensor] = None,
    act_scale_kind: str = "mean_abs",
    clip_ratios: Sequence[float] = DEFAULT_CLIP_RATIOS,
    fmt: Optional[str] = None,
) -> QuantizedWeight:
    """Quantize a float weight ``w [out_features, in_features]`` -> :class:`QuantizedWeight`.

    bits: 2, 3, 4 or 8 (int formats). group_size: values per scale along in_features, a
        multiple of 32 dividing in_features; -1 or None = per-channel.
    symmetric: zero point fixed at 2^(b-1) (``zeros`` is None) instead of a stored one.
    scale_dtype: float16 | bfloat16 | float32.
    clip_search: search per group the range shrink factor (``clip_ratios``, 1.0 .. 0.7) that
        minimises the reconstruction error, weighted by ``act_scale`` when given.
    act_scale: per-input-channel activation statistics ``[in_features]``: mean |x|
        (``act_scale_kind="mean_abs"``, squared to weigh the error) or mean x^2
        (``"mean_sq"``). Only used by the clipping search.
    fmt: a format name; ``"int2".."int8"`` override ``bits``; GGUF ``"q4_0" | "q4_1" | "q8_0"``
        (llama.cpp-exact) or ``"q4_k" | "q6_k"`` quantize into blocks (group_size, symmetric,
        scale_dtype are then ignored; clip_search is not supported).
    The result lives on ``w``'s device.
    """
    w = _check_weight(w)
    N, K = w.shape
    if fmt is not None:
        info = qf.format_info(fmt)
        if info.is_gguf:
            if clip_search:
                raise _err("clip_search is not supported for GGUF formats (fmt)")
            qd = quantize_gguf_blocks(w, info.name).to(w.device)
            return QuantizedWeight(qd, None, None, info.name, (N, K), info.block_values)
        bits = info.bits
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in (2, 3, 4, 8):
        raise _err(f"bits must be one of 2, 3, 4, 8; got {bits!r}")
    gs = _resolve_group_size(group_size, K)
    if scale_dtype not in qf.SCALE_DTYPES:
        raise _err(f"scale_dtype must be torch.float16, torch.bfloat16 or torch.float32; got {scale_dtype!r}")
    if not isinstance(symmetric, bool):
        raise _err(f"symmetric must be a bool; got {symmetric!r}")
    imp = _importance(act_scale, act_scale_kind, K, w.device)
    if clip_search:
        ratios = list(clip_ratios)
        if not ratios or any(not (0.0 < float(r) <= 1.0) for r in ratios):
            raise _err(f"clip_ratios must be a non-empty sequence of values in (0, 1]; got {clip_ratios!r}")
        # 1.0 (plain RTN) always comes first: the search can only improve on it
        ratios = [1.0] + [float(r) for r in ratios if float(r) != 1.0]
    else:
        ratios = []
    return _quantize_int(w, bits, gs, symmetric, scale_dtype, clip_search, imp, ratios)
