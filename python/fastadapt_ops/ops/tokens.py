"""Token merging and pruning ops: ToMe's bipartite soft matching, size-weighted merge and its
inverse scatter, order-preserving top-k pruning, and attention with ToMe's proportional
``log(size)`` bias, each with its fake kernel and a float64 reference.

A *merge plan* is an int32 ``dest`` map [B, N]: token ``n`` of item ``b`` goes to row
``dest[b, n]`` of the reduced sequence, ``-1`` drops it. Plans are order-preserving (kept tokens
keep their relative order; a merged token points at its destination's row), so position 0 (CLS)
stays at row 0.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import torch

_DEBUG = bool(os.environ.get("FASTADAPT_DEBUG"))


# ---------------------------------------------------------------------------------------------
# wrappers
# ---------------------------------------------------------------------------------------------
def bipartite_soft_matching(
    metric: torch.Tensor,  # [B, N, C] float32 | bfloat16 | float16
    r: int,
    protected: Optional[torch.Tensor] = None,  # [B, N] bool: never merged, never a destination
) -> torch.Tensor:  # dest [B, N] int32 into N - r rows
    """ToMe matching: A = even positions, B = odd; each A token's most cosine-similar
    unprotected B token; the ``r`` most similar A->B edges merge (ties: the earlier A token).

    ``r`` must not exceed the unprotected even positions that have an unprotected odd partner
    (the CPU kernel raises; on CUDA such an item merges what it can). See :func:`protected_mask`.
    """
    return torch.ops.fastadapt.bipartite_soft_matching.default(metric, r, protected)


def merge_tokens(
    x: torch.Tensor,  # [B, N, C]
    dest: torch.Tensor,  # [B, N] int32 in [-1, num_out)
    num_out: int,
    sizes: Optional[torch.Tensor] = None,  # [B, N] token sizes (None: ones)
) -> tuple[torch.Tensor, torch.Tensor]:  # ([B, num_out, C] x's dtype, [B, num_out] fp32)
    """Size-weighted mean of the tokens sent to each row, and the summed sizes.

    Rows whose summed size is 0 (only zero-size tokens, e.g. padding, or no token) are 0."""
    if _DEBUG and x.is_cuda:
        _check_dest(dest, num_out, "merge_tokens")
    return torch.ops.fastadapt.merge_tokens.default(x, dest, num_out, sizes)


def unmerge_tokens(
    x: torch.Tensor,  # [B, M, C]
    dest: torch.Tensor,  # [B, N] int32 in [-1, M)
    fill: Optional[torch.Tensor] = None,  # [B, N, C] x's dtype: rows for dest == -1 (else 0)
) -> torch.Tensor:  # [B, N, C]
    """Inverse scatter of a plan: every token takes its row's features (dense outputs)."""
    if _DEBUG and x.is_cuda:
        _check_dest(dest, x.shape[1], "unmerge_tokens")
    return torch.ops.fastadapt.unmerge_tokens.default(x, dest, fill)


def prune_tokens(
    x: torch.Tensor,  # [B, N, C]
    scores: torch.Tensor,  # [B, N]
    keep: int,
    protected: Optional[torch.Tensor] = None,  # [B, N] bool: always kept
) -> tuple[torch.Tensor, torch.Tensor]:  # (x_kept [B, keep, C], kept_idx [B, keep] int32)
    """Keep the ``keep`` highest-scoring tokens in their original order (ties: earlier token;
    NaN scores rank last). ``kept_idx`` (ascending) revives them: :func:`kept_to_dest`."""
    return torch.ops.fastadapt.prune_tokens.default(x, scores, keep, protected)


def proportional_attention(
    q: torch.Tensor,  # [B, H, Nq, D]
    k: torch.Tensor,  # [B, H, Nk, D]
    v: torch.Tensor,  # [B, H, Nk, D]
    sizes: Optional[torch.Tensor] = None,  # [B, Nk] >= 0; 0 masks a key; None: ones
    scale: Optional[float] = None,  # None: 1/sqrt(D)
) -> torch.Tensor:  # [B, H, Nq, D] in q's dtype
    """``softmax(q k^T * scale + log(sizes)) v`` without an Nq x Nk matrix (online softmax)."""
    return torch.ops.fastadapt.proportional_attention.default(q, k, v, sizes, scale)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def protected_mask(
    B: int, N: int, *, first: bool = True, last: bool = False, indices: Sequence[int] = (),
    device=None,
) -> torch.Tensor:  # [B, N] bool
    """Protected tokens: the first (CLS / attention sink), the last, and any other positions."""
    m = torch.zeros(B, N, dtype=torch.bool, device=device)
    if N:
        if first:
            m[:, 0] = True
        if last:
            m[:, -1] = True
        for i in indices:
            m[:, i] = True
    return m


def max_merge(N: int, protected: Optional[torch.Tensor] = None) -> int:
    """The largest valid ``r`` for :func:`bipartite_soft_matching` (min over the batch)."""
    if N < 2:
        return 0
    if protected is None:
        return N // 2
    p = protected.bool()
    a_free = (~p[:, 0::2]).sum(1)
    b_free = (~p[:, 1::2]).sum(1)
    return int(torch.where(b_free > 0, a_free, torch.zeros_like(a_free)).min().item())


def kept_to_dest(kept_idx: torch.Tensor, N: int) -> torch.Tensor:  # [B, keep] -> [B, N] int32
    """The plan of a pruning: kept token ``kept_idx[b, i]`` -> row ``i``, others -1, so
    ``unmerge_tokens(x_kept, dest, fill=x_before)`` revives the pruned tokens."""
    B, keep = kept_idx.shape
    dest = torch.full((B, N), -1, dtype=torch.int32, device=kept_idx.device)
    rows = torch.arange(keep, dtype=torch.int32, device=kept_idx.device).expand(B, keep)
    return dest.scatter_(1, kept_idx.long(), rows)


def compose_dest(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Plan of two successive plans: [B, N] into M rows, then [B, M] into K rows -> [B, N]."""
    idx = first.long().clamp_min(0)
    out = second.gather(1, idx)
    return torch.where(first < 0, torch.full_like(out, -1), out)


def token_scores(
    mode: str,
    x: Optional[torch.Tensor] = None,  # [B, N, C] for "norm"
    attn: Optional[torch.Tensor] = None,  # [B, H, Nq, N] attention probabilities
    query: int = -1,
) -> torch.Tensor:  # [B, N] fp32
    """Scores for :func:`prune_tokens`: ``"norm"`` (L2 norm of each token's features) or
    ``"attention"`` (attention received from query row ``query``, mean over heads: -1 = the last
    token, as FastV; 0 = CLS)."""
    if mode == "norm":
        if x is None:
            raise ValueError("token_scores: mode 'norm' needs x [B, N, C]")
        return x.float().norm(dim=-1)
    if mode == "attention":
        if attn is None or attn.dim() != 4:
            raise ValueError("token_scores: mode 'attention' needs attn [B, H, Nq, N]")
        return attn[:, :, query, :].float().mean(1)
    raise ValueError(f"token_scores: mode must be 'norm' or 'attention', got {mode!r}")


def _check_dest(dest: torch.Tensor, num_out: int, op: str) -> None:
    if dest.numel() and (int(dest.min()) < -1 or int(dest.max()) >= num_out):
        raise RuntimeError(f"fastadapt::{op}: dest values must be in [-1, {num_out})")


# ---------------------------------------------------------------------------------------------
# float64 references (semantics, oracle of the tests)
# ---------------------------------------------------------------------------------------------
def bipartite_soft_matching_reference(metric, r, protected=None):
    B, N, _ = metric.shape
    m = metric.double()
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    a, b = m[:, 0::2], m[:, 1::2]
    dest = torch.empty(B, N, dtype=torch.int32)
    for bi in range(B):
        target = torch.full((N,), -1, dtype=torch.long)
        if r > 0:
            scores = a[bi] @ b[bi].T  # [Na, Nb]
            if protected is not None:
                p = protected[bi].cpu()
                scores[:, p[1::2]] = -math.inf
            best, idx = scores.max(-1)  # ties: first index
            ok = best > -math.inf
            if protected is not None:
                ok &= ~protected[bi].cpu()[0::2]
            cand = torch.nonzero(ok).flatten()
            if len(cand) < r:
                raise RuntimeError("fastadapt::bipartite_soft_matching: r exceeds the mergeable tokens")
            order = torch.sort(best[cand], descending=True, stable=True).indices
            for i in cand[order[:r]].tolist():
                target[2 * i] = 2 * int(idx[i]) + 1
        rows = torch.full((N,), -1, dtype=torch.long)
        kept = target < 0
        rows[kept] = torch.arange(int(kept.sum()))
        rows[~kept] = rows[target[~kept]]
        dest[bi] = rows.to(torch.int32)
    return dest.to(metric.device)


def merge_tokens_reference(x, dest, num_out, sizes=None):
    B, N, C = x.shape
    s = torch.ones(B, N, dtype=torch.float64) if sizes is None else sizes.double().cpu()
    xd, d = x.double().cpu(), dest.long().cpu()
    out = torch.zeros(B, num_out + 1, C, dtype=torch.float64)
    tot = torch.zeros(B, num_out + 1, dtype=torch.float64)
    di = torch.where(d < 0, torch.full_like(d, num_out), d)  # dropped tokens -> a spare row
    out.scatter_add_(1, di[..., None].expand(B, N, C), xd * s[..., None])
    tot.scatter_add_(1, di, s)
    out, tot = out[:, :num_out], tot[:, :num_out]
    out = torch.where(tot[..., None] != 0, out / torch.where(tot == 0, 1.0, tot)[..., None], 0.0)
    return out.to(x.dtype).to(x.device), tot.float().to(x.device)


def unmerge_tokens_reference(x, dest, fill=None):
    idx = dest.long().clamp_min(0)
    out = x.gather(1, idx[..., None].expand(*dest.shape, x.shape[-1]))
    other = torch.zeros_like(out) if fill is None else fill
    return torch.where((dest >= 0)[..., None], out, other)


def prune_tokens_reference(x, scores, keep, protected=None):
    B, N, C = x.shape
    kept = torch.empty(B, keep, dtype=torch.int32)
    for bi in range(B):
        s = scores[bi].double().cpu()
        p = protected[bi].cpu() if protected is not None else torch.zeros(N, dtype=torch.bool)
        # sort key: protected first, non-NaN before NaN, score descending, position
        key = sorted(range(N), key=lambda i: (not bool(p[i]), bool(torch.isnan(s[i])),
                                             -float(s[i]) if not torch.isnan(s[i]) else 0.0, i))
        kept[bi] = torch.tensor(sorted(key[:keep]), dtype=torch.int32)
    kept = kept.to(x.device)
    out = x.gather(1, kept.long()[..., None].expand(B, keep, C))
    return out, kept


def proportional_attention_reference(q, k, v, sizes=None, scale=None):
    D = q.shape[-1]
    sc = 1.0 / math.sqrt(D) if scale is None else scale
    s = (q.double() @ k.double().transpose(-1, -2)) * sc
    if sizes is not None:
        s = s + sizes.double().log()[:, None, None, :]
    mx = s.amax(-1, keepdim=True)
    p = torch.exp(s - torch.where(mx == -math.inf, 0.0, mx))
    den = p.sum(-1, keepdim=True)
    out = (p @ v.double()) / torch.where(den == 0, 1.0, den)
    return out.to(q.dtype)


# ---------------------------------------------------------------------------------------------
# fake kernels (the real kernels return fresh contiguous tensors)
# ---------------------------------------------------------------------------------------------
@torch.library.register_fake("fastadapt::bipartite_soft_matching")
def _bsm_fake(metric, r, protected=None):
    torch._check(metric.dim() == 3, lambda: "fastadapt::bipartite_soft_matching: metric must be [B, N, C]")
    return metric.new_empty(metric.shape[:2], dtype=torch.int32)


@torch.library.register_fake("fastadapt::merge_tokens")
def _merge_fake(x, dest, num_out, sizes=None):
    torch._check(x.dim() == 3, lambda: "fastadapt::merge_tokens: x must be [B, N, C]")
    B, _, C = x.shape
    return x.new_empty((B, num_out, C)), x.new_empty((B, num_out), dtype=torch.float32)


@torch.library.register_fake("fastadapt::unmerge_tokens")
def _unmerge_fake(x, dest, fill=None):
    torch._check(x.dim() == 3, lambda: "fastadapt::unmerge_tokens: x must be [B, M, C]")
    return x.new_empty((x.shape[0], dest.shape[1], x.shape[2]))


@torch.library.register_fake("fastadapt::prune_tokens")
def _prune_fake(x, scores, keep, protected=None):
    torch._check(x.dim() == 3, lambda: "fastadapt::prune_tokens: x must be [B, N, C]")
    B, _, C = x.shape
    return x.new_empty((B, keep, C)), x.new_empty((B, keep), dtype=torch.int32)


@torch.library.register_fake("fastadapt::proportional_attention")
def _prop_attn_fake(q, k, v, sizes=None, scale=None):
    torch._check(q.dim() == 4, lambda: "fastadapt::proportional_attention: q must be [B, H, Nq, D]")
    return q.new_empty(q.shape)
