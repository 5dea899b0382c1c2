"""Block-sparse attention layouts and MInference-style dynamic pattern builders.

A :class:`BlockSparseLayout` holds the int32 index tensors of ``fastadapt::block_sparse_attention``
(semantics in ``fastadapt_ops.ops.block_sparse``): 64 x 64 blocks in BSR per (sequence, q head),
plus optional vertical columns and diagonal offsets per (sequence, q head). Build one per
sequence, then :meth:`BlockSparseLayout.concat` them for a ragged batch.

Patterns (per head, all causal):

* ``dense``: every causal block.
* ``a_shape(sink, local)``: the first ``sink`` key blocks and the ``local`` key blocks ending at
  each query block's last position (StreamingLLM's sinks + window, in blocks).
* ``vertical_slash(n_vertical, n_slash)``: from :func:`vertical_slash_scores` (the last 64 queries'
  softmax mass per key column and per diagonal): the top ``n_vertical`` columns (the first 4 keys
  always) and the top ``n_slash`` diagonals beyond the local window, on top of the two local
  blocks of each query block (which hold every diagonal < 65).
* ``block_topk(k)``: from :func:`block_pool_scores` (mean-pooled Q and K blocks), the ``k`` best
  causal key blocks of each query block; the first (sink) and diagonal blocks are always kept and
  count in ``k``.

Estimators run on the ops' kernels; only top-k selection and index assembly happen here (O(blocks)
tensors, never a T x T matrix).
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence

import torch

from ..ops.block_sparse import BLOCK, block_pool_scores, block_sparse_attention, vertical_slash_scores

__all__ = ["BlockSparseLayout", "causal_block_mask", "a_shape_block_mask", "block_topk_mask",
           "vertical_slash_extras", "build_head_layout", "sparse_attention", "PATTERNS"]

PATTERNS = ("dense", "a_shape", "vertical_slash", "block_topk")
SINK_COLUMNS = 4  # vertical-slash always keeps the first keys (attention sinks)


def _nblocks(n: int) -> int:
    return -(-n // BLOCK)


def _last_pos(T: int, Tk: int) -> torch.Tensor:
    """[nqb] position of the last query of each query block."""
    r = torch.arange(_nblocks(T))
    return (Tk - T) + torch.clamp((r + 1) * BLOCK, max=T) - 1


def causal_block_mask(T: int, Tk: int) -> torch.Tensor:
    """[nqb, nkb] bool: key blocks that some query of the block can see."""
    c = torch.arange(_nblocks(Tk))
    return c[None, :] * BLOCK <= _last_pos(T, Tk)[:, None]


def a_shape_block_mask(T: int, Tk: int, sink: int, local: int) -> torch.Tensor:
    """[nqb, nkb] bool: sink blocks + ``local`` blocks ending at each row's diagonal block."""
    c = torch.arange(_nblocks(Tk))[None, :]
    cl = (_last_pos(T, Tk) // BLOCK)[:, None]  # diagonal block of each row
    return ((c < sink) | ((c <= cl) & (c > cl - local))) & causal_block_mask(T, Tk)


def block_topk_mask(scores: torch.Tensor, k: Sequence[int], T: int, Tk: int) -> torch.Tensor:
    """[H, nqb, nkb] bool from block-pooled scores [H, nqb, nkb]: per head the ``k[h]`` best causal
    key blocks of each row, the sink and diagonal blocks always in."""
    H, nqb, nkb = scores.shape
    forced = a_shape_block_mask(T, Tk, 1, 1)
    s = scores.masked_fill(forced[None], float("inf"))
    s = s.masked_fill(~causal_block_mask(T, Tk)[None], float("-inf"))
    out = torch.zeros(H, nqb, nkb, dtype=torch.bool)
    for h in range(H):
        kk = max(1, min(int(k[h]), nkb))
        idx = torch.topk(s[h], kk, dim=-1).indices
        out[h].scatter_(1, idx, True)
    return out & causal_block_mask(T, Tk)[None]


def vertical_slash_extras(vert: torch.Tensor, slash: torch.Tensor, n_vertical: Sequence[int],
                          n_slash: Sequence[int]):
    """Per head (sorted int32 columns, sorted int32 diagonals) from the estimator's scores
    [H, T_k]: the first SINK_COLUMNS keys always, then the best columns; diagonals beyond the
    two local blocks (offsets > 64)."""
    H, Tk = vert.shape
    cols, diags = [], []
    for h in range(H):
        v = vert[h].clone()
        v[:SINK_COLUMNS] = float("inf")
        nv = min(max(int(n_vertical[h]), SINK_COLUMNS), Tk)
        cols.append(torch.sort(torch.topk(v, nv).indices).values.to(torch.int32))
        s = slash[h, BLOCK + 1:]
        ns = min(int(n_slash[h]), s.numel())
        d = torch.topk(s, ns).indices + BLOCK + 1 if ns > 0 else torch.zeros(0, dtype=torch.long)
        diags.append(torch.sort(d).values.to(torch.int32))
    return cols, diags


@dataclasses.dataclass
class BlockSparseLayout:
    """Index tensors of ``fastadapt::block_sparse_attention`` (all int32, on one device)."""

    row_ptr: torch.Tensor  # [rows + 1]
    col_idx: torch.Tensor  # [nnz]
    q_lens: List[int]  # per sequence
    k_lens: List[int]
    n_heads: int
    col_indptr: Optional[torch.Tensor] = None  # [B * H_q + 1]
    cols: Optional[torch.Tensor] = None
    diag_indptr: Optional[torch.Tensor] = None  # [B * H_q + 1]
    diags: Optional[torch.Tensor] = None

    @classmethod
    def from_block_mask(cls, mask: torch.Tensor, T: int, Tk: int,
                        cols: Optional[Sequence[torch.Tensor]] = None,
                        diags: Optional[Sequence[torch.Tensor]] = None) -> "BlockSparseLayout":
        """One sequence: ``mask [H, nqb, nkb]`` bool of listed blocks (rows above the diagonal are
        dropped), optional per-head column and diagonal lists."""
        H, nqb, nkb = mask.shape
        if (nqb, nkb) != (_nblocks(T), _nblocks(Tk)):
            raise ValueError(f"BlockSparseLayout: mask must be [H, {_nblocks(T)}, {_nblocks(Tk)}] for "
                             f"T={T}, T_k={Tk}; got {tuple(mask.shape)}")
        m = mask & causal_block_mask(T, Tk)[None]
        counts = m.reshape(H * nqb, nkb).sum(-1)
        row_ptr = torch.zeros(H * nqb + 1, dtype=torch.int32)
        row_ptr[1:] = torch.cumsum(counts, 0).to(torch.int32)
        col_idx = m.reshape(H * nqb, nkb).nonzero()[:, 1].to(torch.int32)

        def csr(lists):
            if lists is None:
                return None, None
            ptr = torch.zeros(H + 1, dtype=torch.int32)
            ptr[1:] = torch.cumsum(torch.tensor([len(x) for x in lists]), 0).to(torch.int32)
            cat = torch.cat([torch.as_tensor(x, dtype=torch.int32) for x in lists]) if H else torch.zeros(0, dtype=torch.int32)
            return ptr, cat

        cp, cc = csr(cols)
        dp, dd = csr(diags)
        return cls(row_ptr, col_idx, [T], [Tk], H, cp, cc, dp, dd)

    @classmethod
    def dense(cls, T: int, Tk: int, n_heads: int) -> "BlockSparseLayout":
        return cls.from_block_mask(causal_block_mask(T, Tk)[None].expand(n_heads, -1, -1), T, Tk)

    @classmethod
    def a_shape(cls, T: int, Tk: int, n_heads: int, sink: int = 1, local: int = 4) -> "BlockSparseLayout":
        return cls.from_block_mask(a_shape_block_mask(T, Tk, sink, local)[None].expand(n_heads, -1, -1), T, Tk)

    @classmethod
    def block_topk(cls, q: torch.Tensor, k: torch.Tensor, topk) -> "BlockSparseLayout":
        """Dynamic block top-k of one sequence (q [T, H_q, D], k [T_k, H_kv, D]); topk an int or
        one per head."""
        T, H = q.shape[0], q.shape[1]
        ks = [topk] * H if isinstance(topk, int) else list(topk)
        return cls.from_block_mask(block_topk_mask(block_pool_scores(q, k).cpu(), ks, T, k.shape[0]),
                                   T, k.shape[0])

    @classmethod
    def vertical_slash(cls, q: torch.Tensor, k: torch.Tensor, n_vertical, n_slash,
                       last_q: int = 64) -> "BlockSparseLayout":
        """Dynamic vertical-slash of one sequence; budgets (counts) an int or one per head."""
        T, H, Tk = q.shape[0], q.shape[1], k.shape[0]
        nv = [n_vertical] * H if isinstance(n_vertical, int) else list(n_vertical)
        ns = [n_slash] * H if isinstance(n_slash, int) else list(n_slash)
        vert, slash = vertical_slash_scores(q, k, last_q)
        cols, diags = vertical_slash_extras(vert.cpu(), slash.cpu(), nv, ns)
        local = a_shape_block_mask(T, Tk, 0, 2)[None].expand(H, -1, -1)
        return cls.from_block_mask(local, T, Tk, cols, diags)

    @classmethod
    def concat(cls, layouts: Sequence["BlockSparseLayout"]) -> "BlockSparseLayout":
        """A ragged batch from per-sequence layouts (same head count); extras are filled with
        empty lists for layouts that lack them."""
        H = layouts[0].n_heads
        if any(L.n_heads != H for L in layouts):
            raise ValueError("BlockSparseLayout.concat: all layouts must have the same head count")
        rp, ci, base = [torch.zeros(1, dtype=torch.int32)], [], 0
        for L in layouts:
            rp.append(L.row_ptr[1:] + base)
            ci.append(L.col_idx)
            base += int(L.row_ptr[-1])

        def extras(ptr_name, idx_name):
            if all(getattr(L, ptr_name) is None for L in layouts):
                return None, None
            ptrs, idxs, b = [torch.zeros(1, dtype=torch.int32)], [], 0
            for L in layouts:
                p, x = getattr(L, ptr_name), getattr(L, idx_name)
                if p is None:
                    p, x = torch.zeros(L.n_heads * len(L.q_lens) + 1, dtype=torch.int32), torch.zeros(0, dtype=torch.int32)
                ptrs.append(p[1:] + b)
                idxs.append(x)
                b += int(p[-1])
            return torch.cat(ptrs), torch.cat(idxs)

        cp, cc = extras("col_indptr", "cols")
        dp, dd = extras("diag_indptr", "diags")
        return cls(torch.cat(rp), torch.cat(ci), sum((L.q_lens for L in layouts), []),
                   sum((L.k_lens for L in layouts), []), H, cp, cc, dp, dd)

    @property
    def q_indptr(self) -> torch.Tensor:
        return torch.tensor([0] + list(torch.tensor(self.q_lens).cumsum(0).tolist()), dtype=torch.int32)

    @property
    def k_indptr(self) -> torch.Tensor:
        return torch.tensor([0] + list(torch.tensor(self.k_lens).cumsum(0).tolist()), dtype=torch.int32)

    def to(self, device) -> "BlockSparseLayout":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return dataclasses.replace(self, row_ptr=mv(self.row_ptr), col_idx=mv(self.col_idx),
                                   col_indptr=mv(self.col_indptr), cols=mv(self.cols),
                                   diag_indptr=mv(self.diag_indptr), diags=mv(self.diags))

    def density(self) -> float:
        """Fraction of the causal (query, key) pairs the layout computes: listed blocks exactly,
        columns and diagonals counted as if outside every block (an upper bound)."""
        total = sum(H * (Tk * (Tk + 1) // 2 - (Tk - T) * (Tk - T + 1) // 2)
                    for T, Tk, H in zip(self.q_lens, self.k_lens, [self.n_heads] * len(self.q_lens)))
        seen = 0
        rp, ci = self.row_ptr.cpu(), self.col_idx.cpu().long()
        row = 0
        for b, (T, Tk) in enumerate(zip(self.q_lens, self.k_lens)):
            nqb = _nblocks(T)
            pos_last = _last_pos(T, Tk)
            pos_first = (Tk - T) + torch.arange(nqb) * BLOCK
            n = self.n_heads * nqb
            counts = (rp[row + 1:row + n + 1] - rp[row:row + n]).long()
            r_of = torch.repeat_interleave(torch.arange(n) % nqb, counts)
            c = ci[rp[row]:rp[row + n]]
            # visible pairs of block c for queries at positions [pf, pl]: sum_p clamp(p - 64c + 1, 0, len_c)
            pf, pl = pos_first[r_of], pos_last[r_of]
            k0 = c * BLOCK
            klen = torch.clamp(Tk - k0, max=BLOCK)
            p = torch.arange(BLOCK)[None, :] + pf[:, None]
            vis = torch.clamp(p - k0[:, None] + 1, min=0)
            vis = torch.minimum(vis, klen[:, None]) * (p <= pl[:, None])
            seen += int(vis.sum())
            row += n
            for ptr, idx, per_query in ((self.col_indptr, self.cols, True), (self.diag_indptr, self.diags, False)):
                if ptr is None:
                    continue
                for h in range(self.n_heads):
                    s = b * self.n_heads + h
                    x = idx[int(ptr[s]):int(ptr[s + 1])].cpu().long()
                    pos = torch.arange(Tk - T, Tk)
                    if per_query:  # column j is seen by the queries at positions >= j
                        seen += int(torch.clamp(Tk - torch.maximum(x, torch.tensor(Tk - T)), min=0).sum())
                    else:  # diagonal o by the queries at positions >= o
                        seen += int(torch.clamp(pos[-1] - torch.maximum(x, pos[0]) + 1, min=0).sum()) if T else 0
        return min(1.0, seen / max(total, 1))

    def run(self, q, k, v, scale=None):
        """``block_sparse_attention`` of q [N_q, H_q, D], k, v [N_k, H_kv, D] under this layout."""
        dev = q.device
        multi = len(self.q_lens) > 1
        return block_sparse_attention(
            q, k, v, self.row_ptr, self.col_idx,
            self.q_indptr.to(dev) if multi else None, self.k_indptr.to(dev) if multi else None,
            self.col_indptr, self.cols, self.diag_indptr, self.diags, scale)


def build_head_layout(q: torch.Tensor, k: torch.Tensor, heads: Sequence[dict]) -> BlockSparseLayout:
    """One sequence's layout with a pattern per q head: ``heads[h]`` a dict
    ``{"pattern": "dense" | "a_shape" | "vertical_slash" | "block_topk", ...budgets}``
    (``sink``/``local`` blocks, ``n_vertical``/``n_slash`` counts, ``topk`` blocks). Runs only the
    estimators some head needs."""
    T, H, Tk = q.shape[0], q.shape[1], k.shape[0]
    if len(heads) != H:
        raise ValueError(f"build_head_layout: need one pattern per q head ({H}), got {len(heads)}")
    pats = [h.get("pattern") for h in heads]
    for p in pats:
        if p not in PATTERNS:
            raise ValueError(f"build_head_layout: unknown pattern {p!r}; choose from {PATTERNS}")
    nqb, nkb = _nblocks(T), _nblocks(Tk)
    mask = torch.zeros(H, nqb, nkb, dtype=torch.bool)
    cols: List[torch.Tensor] = [torch.zeros(0, dtype=torch.int32)] * H
    diags: List[torch.Tensor] = [torch.zeros(0, dtype=torch.int32)] * H
    if "block_topk" in pats:
        scores = block_pool_scores(q, k).cpu()
        ks = [int(h.get("topk", 8)) for h in heads]
        tk = block_topk_mask(scores, ks, T, Tk)
    if "vertical_slash" in pats:
        vert, slash = vertical_slash_scores(q, k)
        vc, vd = vertical_slash_extras(vert.cpu(), slash.cpu(), [int(h.get("n_vertical", 256)) for h in heads],
                                       [int(h.get("n_slash", 256)) for h in heads])
    for h, cfg in enumerate(heads):
        p = pats[h]
        if p == "dense":
            mask[h] = causal_block_mask(T, Tk)
        elif p == "a_shape":
            mask[h] = a_shape_block_mask(T, Tk, int(cfg.get("sink", 1)), int(cfg.get("local", 4)))
        elif p == "block_topk":
            mask[h] = tk[h]
        else:
            mask[h] = a_shape_block_mask(T, Tk, 0, 2)
            cols[h], diags[h] = vc[h], vd[h]
    has_vs = "vertical_slash" in pats
    return BlockSparseLayout.from_block_mask(mask, T, Tk, cols if has_vs else None, diags if has_vs else None)


def sparse_attention(q, k, v, heads: Sequence[dict], scale=None):
    """Estimate the per-head patterns on (q, k) and run the block-sparse attention (one sequence):
    ``(out [T, H_q, D], lse [T, H_q])``."""
    layout = build_head_layout(q, k, heads).to(q.device)
    return layout.run(q, k, v, scale)
