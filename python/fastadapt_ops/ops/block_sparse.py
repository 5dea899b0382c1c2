"""fastadapt::block_sparse_attention and its pattern estimators (vertical_slash_scores,
block_pool_scores): wrappers, fake kernels and float64 references.

Layout (see ``fastadapt_ops.attention.block_sparse.BlockSparseLayout``, which builds them):

* Blocks are 64 x 64 (``BLOCK``): query block r of a sequence holds its queries [64 r, 64 r + 64),
  key block c its keys [64 c, 64 c + 64) (key positions within the sequence).
* Sequences: ``q_indptr``/``k_indptr`` [B + 1] int32 (varlen, ragged), or None for one sequence.
  The q_len queries of a sequence are its *last* q_len keys: query i sits at position
  ``k_len - q_len + i`` and sees keys ``j <= position`` (causal).
* BSR per (sequence, q head): ``row_ptr`` [rows + 1], rows ordered sequence, head, query block;
  ``col_idx`` the key blocks of each row, strictly increasing.
* Vertical-slash extras per (sequence, q head) ``s = b * H_q + h``: key columns
  ``cols[col_indptr[s]:col_indptr[s + 1]]`` (strictly increasing key indices) seen by every query,
  and diagonal offsets ``diags[...]`` (strictly increasing, >= 0): query at position p sees key
  ``p - o``.
* Query i sees key j iff j <= p_i and (j's block is listed in i's row, or j is a column, or p_i - j
  is a diagonal). Union: no key is counted twice.

LSE outputs are natural-log, fp32; a query with no visible key gets output 0 and LSE -inf.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

BLOCK = 64


def block_sparse_attention(
    q: torch.Tensor,  # [N_q, H_q, D] float32 | bfloat16 | float16
    k: torch.Tensor,  # [N_k, H_kv, D]
    v: torch.Tensor,  # [N_k, H_kv, D]
    row_ptr: torch.Tensor,  # [rows + 1] int32
    col_idx: torch.Tensor,  # [nnz] int32
    q_indptr: Optional[torch.Tensor] = None,  # [B + 1] int32
    k_indptr: Optional[torch.Tensor] = None,  # [B + 1] int32
    col_indptr: Optional[torch.Tensor] = None,  # [B * H_q + 1] int32
    cols: Optional[torch.Tensor] = None,
    diag_indptr: Optional[torch.Tensor] = None,  # [B * H_q + 1] int32
    diags: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:  # out [N_q, H_q, D] q's dtype, lse [N_q, H_q] fp32
    """Causal GQA attention under a block-sparse (+ vertical-slash) layout; fused online softmax.
    Returns ``(out, lse)``, lse natural-log fp32."""
    return torch.ops.fastadapt.block_sparse_attention.default(
        q, k, v, row_ptr, col_idx, q_indptr, k_indptr, col_indptr, cols, diag_indptr, diags, scale)


def vertical_slash_scores(q: torch.Tensor, k: torch.Tensor, last_q: int = 64,
                          scale: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Softmax mass of the last ``last_q`` queries per key column and per diagonal offset:
    ``(vert [H_q, T_k], slash [H_q, T_k])`` fp32 (one sequence: q [T, H_q, D], k [T_k, H_kv, D])."""
    return torch.ops.fastadapt.vertical_slash_scores.default(q, k, last_q, scale)


def block_pool_scores(q: torch.Tensor, k: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """``scale * mean(q block) . mean(k block)`` for every (q head, query block, key block),
    -inf above the causal diagonal: ``[H_q, nqb, nkb]`` fp32 (one sequence)."""
    return torch.ops.fastadapt.block_pool_scores.default(q, k, scale)


# ---- references (float64, materialised masks: small sizes only) -----------------------------

def _seqs(q, k, q_indptr, k_indptr):
    if q_indptr is None:
        return [(0, q.shape[0], 0, k.shape[0])]
    qi, ki = q_indptr.tolist(), k_indptr.tolist()
    return [(qi[b], qi[b + 1], ki[b], ki[b + 1]) for b in range(len(qi) - 1)]


def layout_mask(T: int, Tk: int, blocks, cols=None, diags=None) -> torch.Tensor:
    """Boolean [T, Tk] mask of one (sequence, head): ``blocks`` a list over query blocks of key
    block lists; causal."""
    pos = torch.arange(Tk - T, Tk)[:, None]
    j = torch.arange(Tk)[None, :]
    m = torch.zeros(T, Tk, dtype=torch.bool)
    for r, cs in enumerate(blocks):
        for c in cs:
            m[r * BLOCK:(r + 1) * BLOCK, c * BLOCK:(c + 1) * BLOCK] = True
    if cols is not None and len(cols):
        m[:, torch.as_tensor(cols, dtype=torch.long)] = True
    if diags is not None:
        for o in diags:
            m |= (pos - j) == int(o)
    return m & (j <= pos)


def block_sparse_attention_reference(q, k, v, row_ptr, col_idx, q_indptr=None, k_indptr=None,
                                     col_indptr=None, cols=None, diag_indptr=None, diags=None,
                                     scale=None):
    """float64 oracle of :func:`block_sparse_attention`: the layout materialised as a mask."""
    Hq, Hkv, D = q.shape[1], k.shape[1], q.shape[2]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.zeros(q.shape, dtype=torch.float64)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float64)
    rp, ci = row_ptr.tolist(), col_idx.tolist()
    row = 0
    for b, (q0, q1, k0, k1) in enumerate(_seqs(q, k, q_indptr, k_indptr)):
        T, Tk = q1 - q0, k1 - k0
        nqb = -(-T // BLOCK)
        for h in range(Hq):
            blocks = [ci[rp[row + r]:rp[row + r + 1]] for r in range(nqb)]
            row += nqb
            s = b * Hq + h
            cs = cols[col_indptr[s]:col_indptr[s + 1]].tolist() if col_indptr is not None else None
            ds = diags[diag_indptr[s]:diag_indptr[s + 1]].tolist() if diag_indptr is not None else None
            m = layout_mask(T, Tk, blocks, cs, ds)
            qh = q[q0:q1, h].double()
            kh, vh = k[k0:k1, h // G].double(), v[k0:k1, h // G].double()
            logits = (qh @ kh.T) * scale
            logits = logits.masked_fill(~m, float("-inf"))
            l = torch.logsumexp(logits, -1)
            p = torch.exp(logits - l[:, None]).nan_to_num(0.0)
            out[q0:q1, h] = p @ vh
            lse[q0:q1, h] = l
    return out.to(q.dtype), lse.float()


def vertical_slash_scores_reference(q, k, last_q=64, scale=None):
    T, Hq, D = q.shape
    Tk, Hkv = k.shape[0], k.shape[1]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    n = min(last_q, T)
    vert = torch.zeros(Hq, Tk, dtype=torch.float64)
    slash = torch.zeros(Hq, Tk, dtype=torch.float64)
    pos = torch.arange(Tk - n, Tk)
    j = torch.arange(Tk)
    for h in range(Hq):
        logits = (q[T - n:, h].double() @ k[:, h // G].double().T) * scale
        logits = logits.masked_fill(j[None] > pos[:, None], float("-inf"))
        p = torch.softmax(logits, -1)
        vert[h] = p.sum(0)
        off = (pos[:, None] - j[None]).clamp(min=0)
        slash[h].index_add_(0, off.reshape(-1), (p * (j[None] <= pos[:, None])).reshape(-1))
    return vert.float(), slash.float()


def block_pool_scores_reference(q, k, scale=None):
    T, Hq, D = q.shape
    Tk, Hkv = k.shape[0], k.shape[1]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    nqb, nkb = -(-T // BLOCK), -(-Tk // BLOCK)
    out = torch.empty(Hq, nqb, nkb, dtype=torch.float64)
    for h in range(Hq):
        qm = torch.stack([q[r * BLOCK:(r + 1) * BLOCK, h].double().mean(0) for r in range(nqb)])
        km = torch.stack([k[c * BLOCK:(c + 1) * BLOCK, h // G].double().mean(0) for c in range(nkb)])
        s = (qm @ km.T) * scale
        last = torch.tensor([Tk - T + min(T, (r + 1) * BLOCK) - 1 for r in range(nqb)])
        s = s.masked_fill(torch.arange(nkb)[None] * BLOCK > last[:, None], float("-inf"))
        out[h] = s
    return out.float()


# ---- fake kernels ----------------------------------------------------------------------------

@torch.library.register_fake("fastadapt::block_sparse_attention")
def _block_sparse_attention_fake(q, k, v, row_ptr, col_idx, q_indptr=None, k_indptr=None,
                                 col_indptr=None, cols=None, diag_indptr=None, diags=None, scale=None):
    torch._check(k.shape[-1] == q.shape[-1], lambda: "fastadapt::block_sparse_attention: k's D must equal q's")
    return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)


@torch.library.register_fake("fastadapt::vertical_slash_scores")
def _vertical_slash_scores_fake(q, k, last_q=64, scale=None):
    return (q.new_empty((q.shape[1], k.shape[0]), dtype=torch.float32),
            q.new_empty((q.shape[1], k.shape[0]), dtype=torch.float32))


@torch.library.register_fake("fastadapt::block_pool_scores")
def _block_pool_scores_fake(q, k, scale=None):
    nqb = (q.shape[0] + BLOCK - 1) // BLOCK
    nkb = (k.shape[0] + BLOCK - 1) // BLOCK
    return q.new_empty((q.shape[1], nqb, nkb), dtype=torch.float32)
