"""Lookup-table low-bit linears: ``LutWeight`` (bit planes), ``to_lut``, ``lut_linear`` and the
automatic choice between ``fastadapt::lut_linear`` and ``fastadapt::qlinear``.

Weights arrive in our int formats (:class:`QuantizedWeight` ``int2 | int3 | int4``; ternary is
``int2`` with every zero point 1 and codes in {0, 1, 2}) and are re-packed once into the bit-plane
layout of :mod:`fastadapt_ops.ops.lut_formats`. 1-bit weights come from codes
(:meth:`LutWeight.from_codes`) or :func:`quantize_1bit`.

Automatic choice (``fastadapt_ops.quant.linear`` / ``QuantLinear`` with backend ``"auto"``): the
LUT op quantizes activations to int8 per group, so by default it is only a candidate where the
caller already asked for int8 activations (``act_quant="int8"``); :func:`set_lut_policy`
(``"int8"`` default, ``"always"``, ``"never"``) or ``FASTADAPT_LUT_POLICY`` changes that. Among
candidates the measured table :mod:`fastadapt_ops.quant.lut_table` (written by
``fastadapt bench lut_linear``) decides per (bits, N, K, M). ``backend="lut"`` / ``"qlinear"``
or ``FASTADAPT_LINEAR_BACKEND=lut|qlinear|auto`` force one.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable, Optional, Tuple

import torch

from ..ops import lut_formats as lf
from ..ops import qformats as qf
from .weight import QuantizedWeight

__all__ = [
    "LutWeight",
    "to_lut",
    "quantize_1bit",
    "lut_linear",
    "choose_backend",
    "set_lut_policy",
    "lut_policy",
    "LUT_FORMATS",
]

LUT_FORMATS = ("int2", "int3", "int4")  # the int formats to_lut converts (plus 1-bit codes)
_POLICIES = ("int8", "always", "never")
_policy: Optional[str] = None  # None: FASTADAPT_LUT_POLICY, else "int8"


def _err(msg: str) -> ValueError:
    return ValueError("fastadapt::lut_linear: " + msg)


@dataclasses.dataclass
class LutWeight:
    """A weight ``W [N, K]`` in the bit-plane layout of ``fastadapt::lut_linear``.

    planes uint8 ``[ceil(N/32), K/8, bits, 32]``, scales float32 ``[ceil(N/32), K/gs, 32]``,
    zoffs int8 (same shape) or None with one ``zoff`` for all: ``w = s/2 (sum_i 2^i sigma_i + zo)``.
    """

    planes: torch.Tensor
    scales: torch.Tensor
    zoffs: Optional[torch.Tensor]
    zoff: int
    bits: int
    shape: Tuple[int, int]
    group_size: int
    ternary: bool = False

    def __post_init__(self):
        self.shape = tuple(int(s) for s in self.shape)
        self.validate()

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def device(self) -> torch.device:
        return self.planes.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.planes, self.scales, self.zoffs) if t is not None)

    def validate(self) -> "LutWeight":
        N, K = self.shape
        lf._check_bits(self.bits)
        if K <= 0 or K % 32:
            raise _err(f"in_features must be a positive multiple of 32; got {K}")
        gs = self.group_size
        if not isinstance(gs, int) or gs <= 0 or gs % 32 or K % gs:
            raise _err(f"group_size must be a positive multiple of 32 dividing in_features ({K}); got {gs}")
        NB, G = lf.row_blocks(N), K // gs
        if self.planes.dtype != torch.uint8 or tuple(self.planes.shape) != (NB, K // 8, self.bits, 32):
            raise _err(f"planes must be uint8 [{NB}, {K // 8}, {self.bits}, 32]; got "
                       f"{self.planes.dtype} {list(self.planes.shape)}")
        if self.scales.dtype != torch.float32 or tuple(self.scales.shape) != (NB, G, 32):
            raise _err(f"scales must be float32 [{NB}, {G}, 32]; got {self.scales.dtype} {list(self.scales.shape)}")
        if self.zoffs is not None and (self.zoffs.dtype != torch.int8 or tuple(self.zoffs.shape) != (NB, G, 32)):
            raise _err(f"zoffs must be int8 [{NB}, {G}, 32] or None; got {self.zoffs.dtype} {list(self.zoffs.shape)}")
        if not -128 <= int(self.zoff) <= 127:
            raise _err(f"zoff must be in [-128, 127]; got {self.zoff}")
        return self

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense ``[N, K]`` weight."""
        return lf.dequantize(self.planes, self.scales, self.zoffs, self.zoff, self.bits,
                             self.shape[0], self.group_size, dtype)

    def to(self, device) -> "LutWeight":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return dataclasses.replace(self, planes=mv(self.planes), scales=mv(self.scales), zoffs=mv(self.zoffs))

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros, bits: int,
                   group_size: int, ternary: bool = False) -> "LutWeight":
        """From codes ``uint8 [N, K]`` (< 2^bits), scales ``[N, K/gs]`` and zero points.

        ``zeros``: ``[N, K/gs]`` tensor (integers or half integers, ``w = s (q - z)``), a number
        (the same zero everywhere), or None (symmetric: ``z = 2^(bits-1)``).
        """
        bits = lf._check_bits(bits)
        N, K = codes.shape
        if not isinstance(group_size, int) or group_size <= 0 or group_size % 32 or K % group_size:
            raise _err(f"group_size must be a positive multiple of 32 dividing in_features ({K}); got {group_size!r}")
        G = K // group_size
        if tuple(scales.shape) != (N, G):
            raise _err(f"scales must have shape [{N}, {G}]; got {list(scales.shape)}")
        top = (1 << bits) - 1
        if zeros is None:
            zeros = float(1 << (bits - 1))
        if isinstance(zeros, torch.Tensor):
            if tuple(zeros.shape) != (N, G):
                raise _err(f"zeros must have shape [{N}, {G}]; got {list(zeros.shape)}")
            zo = top - 2 * zeros.double()
        else:
            zo = torch.full((N, G), top - 2 * float(zeros), dtype=torch.float64, device=codes.device)
        if zo.numel() and (bool((zo != zo.round()).any()) or float(zo.abs().max()) > 127):
            raise _err("zeros must be integers or half integers with |2^bits - 1 - 2 z| <= 127")
        planes = lf.pack_planes(codes, bits)
        packed_s = lf.pack_group_tensor(scales.float(), torch.float32)
        if zo.numel() == 0 or bool((zo == zo.flatten()[0]).all()):
            zoffs, zoff = None, int(zo.flatten()[0]) if zo.numel() else -1
        else:
            zoffs, zoff = lf.pack_group_tensor(zo, torch.int8), -1
        return cls(planes, packed_s, zoffs, zoff, bits, (N, K), group_size, ternary)


def _is_ternary(qw: QuantizedWeight, codes: torch.Tensor) -> bool:
    return (qw.fmt == "int2" and qw.zeros is not None and bool((qw.zeros == 1).all())
            and (codes.numel() == 0 or int(codes.max()) <= 2))


def to_lut(qw: QuantizedWeight, ternary: Optional[bool] = None) -> LutWeight:
    """Re-pack a :class:`QuantizedWeight` (``int2 | int3 | int4``) into bit planes (exact).

    ``ternary=None`` detects BitNet ternary weights (int2, zero points all 1, codes in {0,1,2});
    ``True`` requires them (ValueError otherwise). The values are the same either way.
    """
    if not isinstance(qw, QuantizedWeight):
        raise _err(f"qw must be a QuantizedWeight; got {type(qw).__name__}")
    if qw.fmt not in LUT_FORMATS:
        raise _err(f"qw.fmt must be one of {', '.join(LUT_FORMATS)}; got {qw.fmt}")
    bits = qw.bits
    N, K = qw.shape
    codes = qf.unpack_int(qw.qdata, bits, K)
    tern = _is_ternary(qw, codes)
    if ternary and not tern:
        raise _err("ternary=True needs an int2 weight with all zeros == 1 and codes in {0, 1, 2}")
    zeros = None if qw.zeros is None else qw.zeros.to(torch.float64)
    return LutWeight.from_codes(codes, qw.scales, zeros, bits, int(qw.group_size),
                                ternary=tern if ternary is None else bool(ternary))


def quantize_1bit(w: torch.Tensor, group_size: Optional[int] = 128) -> LutWeight:
    """1-bit round-to-nearest sign quantizer (tests, experiments): ``w ~ alpha_g * sign(w)`` with
    ``alpha_g = mean |w|`` over the group (the L2-optimal scale for fixed signs)."""
    N, K = w.shape
    gs = K if group_size in (None, -1) else int(group_size)
    if gs <= 0 or gs % 32 or K % gs:
        raise _err(f"group_size must be a positive multiple of 32 dividing in_features ({K}); got {group_size!r}")
    wf = w.detach().float().reshape(N, K // gs, gs)
    alpha = wf.abs().mean(-1)  # [N, G]
    codes = (wf >= 0).to(torch.uint8).reshape(N, K)
    # w = s (q - 1/2) with s = 2 alpha: zo = 1 - 2 * 1/2 = 0
    return LutWeight.from_codes(codes, 2 * alpha, 0.5, 1, gs)


def lut_linear(x: torch.Tensor, lw: LutWeight, bias: Optional[torch.Tensor] = None,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``y = x . W^T (+ bias)`` through ``fastadapt::lut_linear`` (float64 x: the reference)."""
    if not isinstance(lw, LutWeight):
        raise _err(f"lw must be a LutWeight; got {type(lw).__name__}")
    args = (x, lw.planes, lw.scales, lw.zoffs, bias, lw.bits, lw.out_features, lw.group_size, lw.zoff)
    if isinstance(x, torch.Tensor) and x.dtype == torch.float64:
        y = lf.lut_linear_reference(*args)
    else:
        from ..ops.lut_linear import lut_linear as op

        if bias is not None and isinstance(x, torch.Tensor) and bias.dtype != x.dtype:
            args = args[:4] + (bias.to(x.dtype),) + args[5:]
        y = op(*args)
    if out is not None:
        out.copy_(y)
        return out
    return y


# ---------------------------------------------------------------------------------------------
# automatic choice
# ---------------------------------------------------------------------------------------------
def set_lut_policy(policy: Optional[str]) -> None:
    """When ``backend="auto"`` may pick the LUT op: ``"int8"`` (default: only for
    ``act_quant="int8"`` calls, whose activations are int8 anyway), ``"always"`` (also exact
    calls: their activations then get quantized per group to int8), ``"never"``; None: the
    ``FASTADAPT_LUT_POLICY`` environment variable (else ``"int8"``)."""
    global _policy
    if policy is not None and policy not in _POLICIES:
        raise ValueError(f"set_lut_policy: policy must be one of {', '.join(_POLICIES)}; got {policy!r}")
    _policy = policy


def lut_policy() -> str:
    if _policy is not None:
        return _policy
    env = os.environ.get("FASTADAPT_LUT_POLICY", "int8").strip().lower()
    return env if env in _POLICIES else "int8"


def _table():
    from . import lut_table

    return lut_table.TABLE


_choice_cache: dict = {}


def _choose_cached(bits: int, N: int, K: int, M: int, act_quant: str) -> str:
    key = (bits, N, K, M, act_quant, id(_table()))
    c = _choice_cache.get(key)
    if c is None:
        if len(_choice_cache) > 4096:
            _choice_cache.clear()
        c = _choice_cache[key] = choose_backend(bits, N, K, M, act_quant)
    return c


def choose_backend(bits: int, N: int, K: int, M: int, act_quant: str = "int8") -> str:
    """``"lut"`` or ``"qlinear"`` for one call, from the measured table (nearest measured shape
    of the same bits; the smallest measured M >= M; qlinear beyond the largest measured M).
    The qlinear time compared is the one of the same ``act_quant``."""
    table = _table()
    rows = [(k, v) for k, v in table.items() if k[0] == bits]
    if not rows:
        return "qlinear"
    ms = sorted({k[3] for k, _ in rows})
    mm = next((m for m in ms if m >= M), None)
    if mm is None:
        return "qlinear"

    def dist(k):
        return abs(math.log(k[1] * k[2]) - math.log(max(1, N * K))) + abs(math.log(k[2]) - math.log(K))

    cands = [(k, v) for k, v in rows if k[3] == mm]
    k, v = min(cands, key=lambda kv: dist(kv[0]))
    q = v.get("qlinear_int8_us" if act_quant == "int8" else "qlinear_us")
    if q is None:
        q = v["qlinear_us"]
    return "lut" if v["lut_us"] < q else "qlinear"


_CACHE_ATTR = "_fastadapt_lut_cache"


def _cached_lut(owner, make_qw: Callable[[], QuantizedWeight]) -> LutWeight:
    """The LUT copy of ``owner``'s weight, converted once (re-done if the tensors changed)."""
    # owner is a QuantizedWeight or a QuantLinear: both hold qdata / scales / zeros
    key = tuple((t.data_ptr(), t._version, t.device) if t is not None else None
                for t in (owner.qdata, owner.scales, owner.zeros))
    hit = owner.__dict__.get(_CACHE_ATTR)
    if hit is not None and hit[0] == key:
        return hit[1]
    lw = to_lut(make_qw())
    owner.__dict__[_CACHE_ATTR] = (key, lw)
    return lw


def dispatch(owner, make_qw: Callable[[], QuantizedWeight], fmt: str, N: int, K: int,
             x, bias, act_quant: str, backend: Optional[str], out=None):
    """Hook of ``quant.linear``/``QuantLinear``: y from the LUT op when chosen, else None
    (the caller runs qlinear). ``backend``: None/"auto" (table + policy), "lut" (forced; a
    ValueError where it cannot run), anything else: None."""
    if backend is None and fmt not in LUT_FORMATS:
        return None  # fast path: GGUF / int8 weights never run here
    if backend is None:
        env = os.environ.get("FASTADAPT_LINEAR_BACKEND", "").strip().lower()
        backend = env if env in ("lut", "qlinear", "auto") else "auto"
    if backend not in ("auto", "lut"):
        return None
    ok = (fmt in LUT_FORMATS and isinstance(x, torch.Tensor) and x.dtype != torch.float64
          and x.device.type == "cpu")
    if backend == "lut":
        if not ok:
            raise _err(f"backend='lut' needs an {'/'.join(LUT_FORMATS)} weight and a CPU fp32/bf16/fp16 x; "
                       f"got fmt={fmt}, x {getattr(x, 'dtype', type(x))} on {getattr(x, 'device', '?')}")
    else:
        pol = lut_policy()
        if not ok or pol == "never" or (pol == "int8" and act_quant != "int8"):
            return None
        if x.dim() < 1 or x.shape[-1] != K:
            return None  # qlinear raises the proper error
        M = x.numel() // K if K else 0
        if _choose_cached(qf.FORMATS[fmt].bits, N, K, M, act_quant) != "lut":
            return None
    return lut_linear(x, _cached_lut(owner, make_qw), bias, out=out)
