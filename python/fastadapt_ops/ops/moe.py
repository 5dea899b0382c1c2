"""fastadapt::moe_route, fastadapt::moe_grouped_qlinear, fastadapt::moe_combine: null-expert
mixture-of-experts routing (AdaMoE) and the grouped quantized expert matmul.

``moe_route`` picks the top-k of softmax(logits) over E real + ``num_null`` null experts and
groups the real choices by expert (a CSR of token rows); null experts get no row, so they cost
nothing past the routing. ``moe_grouped_qlinear`` runs each expert's quantized weight on its
segment of rows; ``moe_combine`` sums each token's rows back with their routing weights.
A SwiGLU expert layer is: route -> grouped(x, W_gate_up, token_ids) -> silu_mul ->
grouped(a, W_down) -> combine (see :class:`fastadapt_ops.moe.NullExpertMoE`)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import qformats as qf

__all__ = ["moe_route", "moe_grouped_qlinear", "moe_combine", "moe_route_reference",
           "moe_grouped_qlinear_reference", "moe_combine_reference"]


def moe_route(
    logits: torch.Tensor,  # [T, E + num_null] float32 | bfloat16 | float16, real experts first
    top_k: int,
    num_null: int,
    renormalize: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """AdaMoE routing. Returns ``(token_ids [T*k] int32, expert_offsets [E+1] int32,
    row_weights [T*k] fp32, topk_ids [T, k] int32, topk_rows [T, k] int32)``: rows of expert e are
    ``offsets[e] .. offsets[e+1]-1`` (tokens ascending), entries past ``offsets[E]`` are -1 / 0;
    ``topk_rows`` maps each choice to its row (-1 for a null expert). With ``renormalize`` the
    real choices' weights sum to 1 per token (0 for a token that chose only null experts)."""
    return torch.ops.fastadapt.moe_route.default(logits, top_k, num_null, renormalize)


def moe_grouped_qlinear(
    x: torch.Tensor,  # [T, K] (with token_ids) or [P, K] (grouped already)
    qdata: torch.Tensor,  # [E, N, row_bytes] uint8
    scales: Optional[torch.Tensor],  # [E, N, K / group_size] (int formats) or None (GGUF)
    zeros: Optional[torch.Tensor],  # [E, N, K / group_size] uint8 or None
    fmt: str,
    in_features: int,
    group_size: int,
    expert_offsets: torch.Tensor,  # [E + 1] int32
    token_ids: Optional[torch.Tensor] = None,  # [P] int32
) -> torch.Tensor:  # [P, N] in x's dtype
    """Row p = ``x[token_ids[p]] @ dequant(W[e])^T`` for the expert e whose segment holds p (rows
    past ``offsets[E]`` are 0); fp32 accumulate, the weight never dequantized in memory."""
    return torch.ops.fastadapt.moe_grouped_qlinear.default(x, qdata, scales, zeros, fmt, in_features,
                                                           group_size, expert_offsets, token_ids)


def moe_combine(
    y: torch.Tensor,  # [P, N]
    row_weights: torch.Tensor,  # [P] fp32
    topk_rows: torch.Tensor,  # [T, k] int32, -1 = skip
) -> torch.Tensor:  # [T, N] in y's dtype
    """``out[t] = sum_j row_weights[r] * y[r]`` over ``r = topk_rows[t, j] >= 0`` (fp32 sums)."""
    return torch.ops.fastadapt.moe_combine.default(y, row_weights, topk_rows)


# ---- references (float64 where it matters; the tests' oracle) ----------------------------------
def moe_route_reference(logits, top_k, num_null, renormalize=True):
    """Pure-PyTorch :func:`moe_route` (softmax in float64, stable sort: lower index first)."""
    T, E_all = logits.shape
    E = E_all - num_null
    p = torch.softmax(logits.double(), -1)
    order = torch.sort(logits.float(), dim=-1, descending=True, stable=True).indices[:, :top_k]
    w = p.gather(1, order)
    real = order < E
    if renormalize:
        s = (w * real).sum(-1, keepdim=True)
        w = torch.where(real & (s > 0), w / s.clamp_min(1e-300), torch.zeros_like(w))
    ids = torch.full((T * top_k,), -1, dtype=torch.int32)
    rw = torch.zeros(T * top_k, dtype=torch.float32)
    rows = torch.full((T, top_k), -1, dtype=torch.int32)
    offsets = torch.zeros(E + 1, dtype=torch.int32)
    r = 0
    for e in range(E):
        for t in range(T):
            for j in range(top_k):
                if int(order[t, j]) == e:
                    ids[r], rw[r], rows[t, j] = t, float(w[t, j]), r
                    r += 1
        offsets[e + 1] = r
    return ids, offsets, rw, order.to(torch.int32), rows


def moe_grouped_qlinear_reference(x, qdata, scales, zeros, fmt, in_features, group_size, expert_offsets,
                                  token_ids=None, dtype=torch.float64):
    """Pure-PyTorch :func:`moe_grouped_qlinear` in ``dtype`` (weights dequantized per expert)."""
    E, N = qdata.shape[0], qdata.shape[1]
    gs = group_size or qf.FORMATS[fmt].block_values
    xs = x if token_ids is None else x[token_ids.clamp_min(0).long()]
    P = xs.shape[0]
    out = torch.zeros(P, N, dtype=dtype)
    o = expert_offsets.tolist()
    for e in range(E):
        if o[e + 1] == o[e]:
            continue
        w = qf.dequantize(qdata[e], None if scales is None else scales[e], None if zeros is None else zeros[e],
                          fmt, (N, in_features), gs, dtype)
        out[o[e]:o[e + 1]] = xs[o[e]:o[e + 1]].to(dtype) @ w.T
    return out


def moe_combine_reference(y, row_weights, topk_rows, dtype=torch.float64):
    """Pure-PyTorch :func:`moe_combine` in ``dtype``."""
    T, k = topk_rows.shape
    out = torch.zeros(T, y.shape[1], dtype=dtype)
    for t in range(T):
        for j in range(k):
            r = int(topk_rows[t, j])
            if r >= 0:
                out[t] += float(row_weights[r]) * y[r].to(dtype)
    return out


# ---- fake kernels (the real kernels' shapes; fresh contiguous outputs) --------------------------
@torch.library.register_fake("fastadapt::moe_route")
def _moe_route_fake(logits, top_k, num_null, renormalize=True):
    torch._check(logits.dim() == 2, lambda: "fastadapt::moe_route: logits must be [T, E + num_null]")
    T, E_all = logits.shape
    E = E_all - num_null
    i32 = dict(dtype=torch.int32, device=logits.device)
    f32 = dict(dtype=torch.float32, device=logits.device)
    return (logits.new_empty((T * top_k,), **i32), logits.new_empty((E + 1,), **i32),
            logits.new_empty((T * top_k,), **f32), logits.new_empty((T, top_k), **i32),
            logits.new_empty((T, top_k), **i32))


@torch.library.register_fake("fastadapt::moe_grouped_qlinear")
def _moe_grouped_qlinear_fake(x, qdata, scales, zeros, fmt, in_features, group_size, expert_offsets,
                              token_ids=None):
    torch._check(x.shape[-1] == in_features, lambda: "fastadapt::moe_grouped_qlinear: x must be [rows, in_features]")
    P = x.shape[0] if token_ids is None else token_ids.shape[0]
    return x.new_empty((P, qdata.shape[1]))


@torch.library.register_fake("fastadapt::moe_combine")
def _moe_combine_fake(y, row_weights, topk_rows):
    return y.new_empty((topk_rows.shape[0], y.shape[1]))
