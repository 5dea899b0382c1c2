"""``quantize_model(model, method="gptq", calib=...)`` for any nn.Module (HF models included).

Sequential, block by block, as GPTQ does: the inputs of the first repeated block (the largest
``nn.ModuleList`` whose entries hold linears: a decoder's layers) are captured on the
calibration batches; then for each block, forward pre-hooks on its linears accumulate the
Hessians ``2/n X^T X`` of their inputs while the block runs on the cached inputs, each linear is
GPTQ-quantized into a :class:`QuantLinear`, and the block runs again, quantized, to produce the
next block's inputs. Linears outside the blocks (not skipped) are calibrated afterwards with one
pass of the whole (already quantized) model. A model without such a list is calibrated in one
pass over the float model.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .gptq import HessianAccumulator, gptq_quantize
from .linear import QuantLinear

__all__ = ["gptq_quantize_model", "find_blocks"]


class _Stop(Exception):
    pass


def find_blocks(model: nn.Module) -> Optional[Tuple[str, nn.ModuleList]]:
    """``(name, list)`` of the ModuleList with the most parameters whose every entry holds an
    ``nn.Linear``; None when there is none."""
    best, best_n = None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and all(
                any(isinstance(m, nn.Linear) for m in blk.modules()) for blk in mod):
            n = sum(p.numel() for p in mod.parameters())
            if n > best_n:
                best, best_n = (name, mod), n
    return best


def _call(model, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _hidden(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def gptq_quantize_model(model: nn.Module, calib: Iterable, *, bits: int, group_size, symmetric: bool,
                        skip: Sequence[str], scale_dtype: torch.dtype, act_quant: str, info,
                        supported, ternary: bool = False, act_order: bool = False, percdamp: float = 0.01,
                        block_size: int = 128, clip_search: bool = False) -> nn.Module:
    """The GPTQ path of :func:`fastadapt_ops.quant.quantize_model` (see there). ``supported(name,
    mod, parent) -> reason or None`` and ``info`` (QuantizeInfo) come from the caller."""
    from .model import matches_any

    if calib is None:
        raise ValueError("quantize_model: method='gptq' needs calib= (batches to run the model on)")
    batches = list(calib)
    if not batches:
        raise ValueError("quantize_model: calib= holds no batches")
    modules = dict(model.named_modules())

    def targets(prefix: str, root: nn.Module) -> List[Tuple[str, nn.Module, nn.Module, str]]:
        out = []
        for sub, mod in root.named_modules():
            if not sub or not isinstance(mod, nn.Linear):
                continue
            name = f"{prefix}.{sub}" if prefix else sub
            if name in done:
                continue
            if matches_any(name, skip):
                info.skipped.append(name)
                done.add(name)
                continue
            pname, _, child = name.rpartition(".")
            parent = modules[pname] if pname else model
            reason = supported(name, mod, parent)
            if reason is not None:
                import warnings

                warnings.warn(f"quantize_model: left {name!r} unquantized: {reason}")
                info.unsupported[name] = reason
                done.add(name)
                continue
            out.append((name, mod, parent, child))
        return out

    done: set = set()

    def quantize_group(group, run):
        """Record the Hessians of ``group``'s linears while ``run()`` executes, then swap them."""
        acc: Dict[str, HessianAccumulator] = {n: HessianAccumulator(m.in_features) for n, m, _, _ in group}
        hooks = [m.register_forward_pre_hook(lambda mod, args, _a=acc[n]: _a.add(args[0]))
                 for n, m, _, _ in group]
        try:
            run()
        finally:
            for h in hooks:
                h.remove()
        for n, m, parent, child in group:
            qw = gptq_quantize(m.weight.detach().float(), acc[n].hessian(), bits, group_size, symmetric=symmetric,
                               ternary=ternary, act_order=act_order, percdamp=percdamp, block_size=block_size,
                               clip_search=clip_search, scale_dtype=scale_dtype)
            bias = None if m.bias is None else m.bias.detach()
            setattr(parent, child, QuantLinear.from_quantized(qw.to(m.weight.device), bias, act_quant=act_quant))
            info.quantized.append(n)
            done.add(n)

    found = find_blocks(model)
    with torch.no_grad():
        if found is not None:
            bname, blocks = found
            cached: List[Tuple[tuple, dict]] = []

            def catch(mod, args, kwargs):
                kwargs = dict(kwargs)
                for key in ("past_key_value", "past_key_values"):  # a cache would grow on every rerun
                    if key in kwargs:
                        kwargs[key] = None
                if "use_cache" in kwargs:
                    kwargs["use_cache"] = False
                cached.append((args, kwargs))
                raise _Stop

            h = blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
            try:
                for b in batches:
                    try:
                        _call(model, b)
                    except _Stop:
                        pass
            finally:
                h.remove()
            for i, blk in enumerate(blocks):
                group = targets(f"{bname}.{i}" if bname else str(i), blk)
                if group:
                    quantize_group(group, lambda: [blk(*a, **k) for a, k in cached])
                nxt = []
                for a, k in cached:  # the quantized block's outputs feed the next block
                    y = _hidden(blk(*a, **k))
                    if a:
                        nxt.append(((y,) + tuple(a[1:]), k))
                    else:
                        nxt.append((a, {**k, "hidden_states": y}))
                cached = nxt
        rest = targets("", model)
        if rest:
            quantize_group(rest, lambda: [_call(model, b) for b in batches])
    return model
