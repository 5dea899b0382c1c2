"""NullExpertMoE: a SwiGLU mixture-of-experts layer with AdaMoE null experts on the
``fastadapt::moe_*`` ops and our quantized weight formats.

Per token the router scores E real and ``num_null`` null experts; the top-k are chosen over all
of them, and a choice of a null expert does nothing (no rows, no weight reads, no FLOPs), so a
token may use anywhere from 0 to k real experts: easy tokens get fewer. Expert e computes
``down_e(silu(gate_e(x)) * up_e(x))``; the outputs are summed with the renormalised routing
weights (AdaMoE)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops.moe import moe_combine, moe_grouped_qlinear, moe_route
from ..ops.silu_mul import silu_mul
from ..quant import quantize_weight

__all__ = ["NullExpertMoE", "stack_quantized"]


def stack_quantized(ws, fmt: str, group_size: int):
    """Quantize each ``[N, K]`` float weight of ``ws`` and stack them: ``(qdata [E, N, row_bytes],
    scales [E, N, G] or None, zeros or None, group_size)``."""
    qs = [quantize_weight(w.float(), group_size=group_size, fmt=fmt) for w in ws]
    st = lambda ts: None if ts[0] is None else torch.stack(ts).contiguous()  # noqa: E731
    return (st([q.qdata for q in qs]), st([q.scales for q in qs]), st([q.zeros for q in qs]), qs[0].group_size)


class NullExpertMoE(nn.Module):
    """``forward(x [..., H]) -> [..., H]``. Build from float weights with :meth:`from_float`:
    router ``[E + num_null, H]`` (null experts' rows last), gate/up ``[E, F, H]``, down
    ``[E, H, F]``; the experts are quantized once (``fmt``: a qlinear format, e.g. int4, q4_0,
    q8_0). ``last_null_fraction`` holds the share of the last call's choices that went to null
    experts."""

    def __init__(self, router: torch.Tensor, gu, down, num_experts: int, num_null: int, top_k: int,
                 hidden: int, ffn: int, fmt: str, renormalize: bool = True):
        super().__init__()
        self.router = nn.Parameter(router, requires_grad=False)  # [E + num_null, H] float
        self.num_experts, self.num_null, self.top_k = num_experts, num_null, top_k
        self.hidden, self.ffn, self.fmt, self.renormalize = hidden, ffn, fmt, renormalize
        for name, (qd, sc, zp, gs) in (("gu", gu), ("down", down)):
            self.register_buffer(f"{name}_qdata", qd)
            self.register_buffer(f"{name}_scales", sc)
            self.register_buffer(f"{name}_zeros", zp)
            setattr(self, f"{name}_group_size", gs)
        self.last_null_fraction = 0.0

    @classmethod
    def from_float(cls, router: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                   num_null: int, top_k: int, fmt: str = "int4", group_size: int = 64,
                   renormalize: bool = True) -> "NullExpertMoE":
        E, F, H = w_gate.shape
        if w_up.shape != (E, F, H) or w_down.shape != (E, H, F):
            raise ValueError(f"NullExpertMoE: w_up must be [E, F, H] = {(E, F, H)} and w_down [E, H, F] = "
                             f"{(E, H, F)}; got {tuple(w_up.shape)} and {tuple(w_down.shape)}")
        if router.shape != (E + num_null, H):
            raise ValueError(f"NullExpertMoE: router must be [E + num_null, H] = {(E + num_null, H)}, "
                             f"got {tuple(router.shape)}")
        gu = stack_quantized([torch.cat([w_gate[e], w_up[e]], 0) for e in range(E)], fmt, group_size)
        down = stack_quantized([w_down[e] for e in range(E)], fmt, group_size)
        return cls(router.float().contiguous(), gu, down, E, num_null, top_k, H, F, fmt, renormalize)

    def route(self, x2: torch.Tensor):
        logits = x2.float() @ self.router.T  # [T, E + num_null]
        return moe_route(logits, self.top_k, self.num_null, self.renormalize)

    def forward(self, x: torch.Tensor, routing: Optional[tuple] = None) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.hidden).contiguous()
        token_ids, offsets, row_w, topk_ids, topk_rows = routing if routing is not None else self.route(x2)
        if not torch.compiler.is_compiling():
            self.last_null_fraction = float((topk_rows < 0).float().mean()) if topk_rows.numel() else 0.0
        gu = moe_grouped_qlinear(x2, self.gu_qdata, self.gu_scales, self.gu_zeros, self.fmt, self.hidden,
                                 self.gu_group_size, offsets, token_ids)  # [P, 2F]
        a = silu_mul(gu)  # [P, F]
        y = moe_grouped_qlinear(a, self.down_qdata, self.down_scales, self.down_zeros, self.fmt, self.ffn,
                                self.down_group_size, offsets)  # [P, H]
        return moe_combine(y, row_w, topk_rows).reshape(shape)
