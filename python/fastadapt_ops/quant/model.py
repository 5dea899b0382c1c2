"""quantize_model: swap the nn.Linear modules of any torch model (HF included) for QuantLinear."""

from __future__ import annotations

import dataclasses
import fnmatch
import warnings
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from ..ops import qformats as qf
from .linear import QuantLinear

__all__ = ["quantize_model", "QuantizeInfo", "calibrate_act_scales", "matches_any"]


@dataclasses.dataclass
class QuantizeInfo:
    """What :func:`quantize_model` did, by qualified module name."""

    quantized: List[str] = dataclasses.field(default_factory=list)
    skipped: List[str] = dataclasses.field(default_factory=list)  # matched a skip pattern
    unsupported: Dict[str, str] = dataclasses.field(default_factory=dict)  # left as is: reason

    def __repr__(self) -> str:
        return (f"QuantizeInfo(quantized={len(self.quantized)}, skipped={self.skipped}, "
                f"unsupported={self.unsupported})")


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    """True when ``name`` matches a pattern as an fnmatch glob or contains it as a substring."""
    return any(fnmatch.fnmatchcase(name, p) or p in name for p in patterns)


# modules that read their child linears' .weight directly (fast paths), so a swap would break them
_DIRECT_WEIGHT_READERS = (nn.MultiheadAttention, nn.TransformerEncoderLayer)


def _unsupported_reason(name, mod, parent, fmt_name, group_size) -> Optional[str]:
    if isinstance(parent, _DIRECT_WEIGHT_READERS):
        return f"its weight is read directly by {type(parent).__name__}"
    w = mod.weight
    if w.device.type == "meta":
        return "weight is on the meta device"
    if not w.is_floating_point():
        return f"weight dtype {w.dtype} is not floating"
    K = mod.in_features
    info = qf.FORMATS[fmt_name]
    mult = max(qf.CHUNK, info.block_values)
    if K % mult:
        return f"in_features={K} is not a multiple of {mult}"
    if not info.is_gguf and group_size not in (None, -1) and K % group_size:
        return f"in_features={K} is not a multiple of group_size={group_size}"
    return None


def quantize_model(
    model: nn.Module,
    bits: int = 4,
    group_size: Optional[int] = 128,
    symmetric: bool = False,
    skip: Sequence[str] = ("lm_head",),
    fmt: Optional[str] = None,
    *,
    scale_dtype: torch.dtype = torch.float16,
    clip_search: bool = False,
    act_scales: Optional[Mapping[str, torch.Tensor]] = None,
    act_scale_kind: str = "mean_abs",
    act_quant: str = "none",
    return_info: bool = False,
    method: str = "rtn",
    calib: Optional[Iterable] = None,
    gptq_options: Optional[Mapping] = None,
) -> Union[nn.Module, tuple]:
    """Replace every ``nn.Linear`` of ``model`` (in place) with a :class:`QuantLinear`.

    skip: qualified-name patterns left in float (fnmatch glob, e.g. ``"*.mlp.*"``, or a plain
        substring, e.g. ``"lm_head"``).
    bits / group_size / symmetric / scale_dtype / clip_search / fmt: as in ``quantize_weight``.
    act_scales: optional ``{qualified name: per-input-channel statistics}`` for the clipping
        search (see :func:`calibrate_act_scales`).
    act_quant: ``"none"`` or ``"int8"``, stored on each QuantLinear.

    A linear whose ``in_features`` is not a multiple of 32 (256 for q4_k/q6_k) or of the group
    size, or whose weight its parent reads directly (``nn.MultiheadAttention``,
    ``nn.TransformerEncoderLayer``), is left as is with a warning.
    method: ``"rtn"`` (round to nearest, the default) or ``"gptq"``: block-by-block GPTQ on the
        calibration batches ``calib`` (each a tensor -> ``model(batch)``, a tuple -> ``model(*batch)``
        or a dict -> ``model(**batch)``), int formats only; ``gptq_options``: keywords of
        :func:`fastadapt_ops.quant.gptq.gptq_quantize` (``act_order``, ``percdamp``, ``ternary``,
        ``clip_search``, ``block_size``). See ``quant/gptq_model.py``.
    Returns the model (``(model, QuantizeInfo)`` with ``return_info=True``); the info is also
    kept as ``model.fastadapt_quant_info``.
    """
    fmt_name = qf.format_info(fmt).name if fmt is not None else qf.int_format(bits)
    if isinstance(skip, str):
        skip = (skip,)
    skip = tuple(skip or ())
    info = QuantizeInfo()
    act_scales = dict(act_scales or {})
    if method not in ("rtn", "gptq"):
        raise ValueError(f"quantize_model: method must be 'rtn' or 'gptq'; got {method!r}")
    if method == "gptq":
        from .gptq_model import gptq_quantize_model

        if qf.FORMATS[fmt_name].is_gguf or isinstance(model, nn.Linear):
            raise ValueError("quantize_model: method='gptq' needs an int format (bits 2/3/4/8) and a model "
                             "that holds its linears (not a bare nn.Linear)")
        gptq_quantize_model(
            model, calib, bits=qf.FORMATS[fmt_name].bits, group_size=group_size, symmetric=symmetric, skip=skip,
            scale_dtype=scale_dtype, act_quant=act_quant, info=info,
            supported=lambda n, m, p: _unsupported_reason(n, m, p, fmt_name, group_size), **dict(gptq_options or {}))
        model.fastadapt_quant_info = info
        return (model, info) if return_info else model

    if isinstance(model, nn.Linear) and not matches_any("", skip):
        # the model is itself a linear: nothing to swap it into, return the new module
        reason = _unsupported_reason("", model, None, fmt_name, group_size)
        if reason is not None:
            warnings.warn(f"quantize_model: left the model (nn.Linear) unquantized: {reason}")
            info.unsupported[""] = reason
            return (model, info) if return_info else model
        new = QuantLinear.from_linear(
            model, bits=bits, group_size=group_size, symmetric=symmetric, scale_dtype=scale_dtype,
            clip_search=clip_search, fmt=fmt, act_scale=act_scales.get(""),
            act_scale_kind=act_scale_kind, act_quant=act_quant,
        )
        info.quantized.append("")
        new.fastadapt_quant_info = info
        return (new, info) if return_info else new

    modules = dict(model.named_modules())
    targets = [(n, m) for n, m in modules.items() if n and isinstance(m, nn.Linear)]
    for name, mod in targets:
        if matches_any(name, skip):
            info.skipped.append(name)
            continue
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        reason = _unsupported_reason(name, mod, parent, fmt_name, group_size)
        if reason is not None:
            warnings.warn(f"quantize_model: left {name!r} unquantized: {reason}")
            info.unsupported[name] = reason
            continue
        new = QuantLinear.from_linear(
            mod, bits=bits, group_size=group_size, symmetric=symmetric, scale_dtype=scale_dtype,
            clip_search=clip_search, fmt=fmt, act_scale=act_scales.get(name),
            act_scale_kind=act_scale_kind, act_quant=act_quant,
        )
        setattr(parent, child, new)
        info.quantized.append(name)
    try:
        model.fastadapt_quant_info = info
    except Exception:  # a module that forbids attributes: the info is still returned on request
        pass
    return (model, info) if return_info else model


@torch.no_grad()
def calibrate_act_scales(
    model: nn.Module,
    batches: Iterable,
    names: Optional[Sequence[str]] = None,
    kind: str = "mean_abs",
) -> Dict[str, torch.Tensor]:
    """Per-input-channel activation statistics of every ``nn.Linear`` (or those in ``names``).

    Runs ``model`` on each batch (a tensor -> ``model(batch)``, a tuple/list ->
    ``model(*batch)``, a dict -> ``model(**batch)``) and returns ``{name: [in_features]}``
    float32 on CPU: mean |x| (``kind="mean_abs"``) or mean x^2 (``"mean_sq"``) over all tokens.
    Pass the result as ``act_scales`` to :func:`quantize_model` with the same ``kind``.
    """
    if kind not in ("mean_abs", "mean_sq"):
        raise ValueError(f"calibrate_act_scales: kind must be 'mean_abs' or 'mean_sq'; got {kind!r}")
    sums: Dict[str, torch.Tensor] = {}
    counts: Dict[str, int] = {}
    hooks = []

    def make_hook(name):
        def hook(mod, args):
            x = args[0].detach()
            x2 = x.reshape(-1, x.shape[-1]).float()
            v = x2.abs() if kind == "mean_abs" else x2.square()
            s = v.sum(0).cpu()
            sums[name] = sums[name] + s if name in sums else s
            counts[name] = counts.get(name, 0) + x2.shape[0]

        return hook

    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and (names is None or name in names):
            hooks.append(mod.register_forward_pre_hook(make_hook(name)))
    try:
        for batch in batches:
            if isinstance(batch, dict):
                model(**batch)
            elif isinstance(batch, (tuple, list)):
                model(*batch)
            else:
                model(batch)
    finally:
        for h in hooks:
            h.remove()
    return {n: sums[n] / max(counts[n], 1) for n in sums}
