"""PagedKVCache: per-(sequence, layer, KV head) page tables over per-layer page pools.

Memory layout (fixed by ``fastadapt_ops.ops.kv_reference``)
-----------------------------------------------------------
Layer ``l`` owns ``k_pages[l]``/``v_pages[l]`` ``[num_pages, page_size, D]`` and, with
``track_scores``, ``scores[l]`` ``[num_pages, page_size]`` fp32 (per-key accumulated attention
mass, moved with its token by compaction). A *row* is one (sequence, KV head) pair; every row of
every layer has its own page list, so heads and layers may keep different numbers of tokens and
a row that keeps fewer tokens holds fewer pages.

Allocators: one ``PageAllocator`` per layer. Page ids index that layer's pools only. A single
allocator shared by all layers would hand out the same page id in every layer, so a page could
only go back when *every* layer dropped it: per-layer budgets (PyramidKV) and per-head budgets
(AdaKV) would save nothing. Per-layer allocators return each layer's pages independently.
``num_pages`` is therefore the capacity *per layer*.

Positions: each row keeps the logical position (for RoPE / masks) of each of its tokens.
``position(seq)`` is the next logical position of the sequence (tokens ever appended to layer 0);
after eviction a row's length is smaller than that.

Sharing: ``fork`` copies the page lists and increments the refcounts (no data copy). A shared
page (refcount > 1) is never written: ``append`` into a shared partially filled last page first
copies it into a private page (copy-on-write), and ``keep`` writes compacted tokens only into
pages the row owns alone, or into fresh pages.

Plan/run: ``plan(layer, seq_ids)`` materialises the int32 CSR tables (rows ``b * H_kv + h``) and
caches them until that layer's tables change; ``attend`` runs the paged attention on them.

API: ``add_sequence() -> id``, ``free_sequence(id)``, ``fork(id) -> id``,
``append(layer, ids, k, v, tokens_per_seq=None)``, ``truncate(id, length)``, ``attend(layer, ids, q, scale)``,
``keep(layer, id, idx_per_head, by="index"|"position")``, ``plan(layer, ids)``,
``gather(layer, id, head)``, ``gather_dense(layer, ids)``, ``row_scores``, ``reset_scores``,
``key_norms``, ``seq_len(id, layer, head)``, ``position(id)``, ``positions(id, layer, head)``,
``bytes_held()``, ``peak_bytes``. Exhaustion raises ``OutOfPagesError`` (a ``RuntimeError``)
before any state changes; bad arguments raise ``ValueError`` naming the argument.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import _ops
from .allocator import OutOfPagesError, PageAllocator

__all__ = ["PagedKVCache", "OutOfPagesError"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class _Row:
    """One (sequence, layer, KV head) row: its pages, token count and logical positions.

    Positions are kept lazily: a materialised tensor plus a contiguous tail run ``tail0 ..
    tail0 + tailn - 1`` appended since, so a decode step costs two integer updates, not a
    tensor concatenation (the decode loop appends to every row of every layer each token)."""

    __slots__ = ("pages", "length", "_pos", "_tail0", "_tailn", "cap")

    def __init__(self) -> None:
        self.pages: List[int] = []
        self.length = 0
        self._pos = torch.empty(0, dtype=torch.long)  # materialised head of the positions
        self._tail0 = 0
        self._tailn = 0
        self.cap: Optional[torch.Tensor] = None  # slots of every page (cache; None = stale)

    @property
    def pos(self) -> torch.Tensor:
        """``[length]`` int64 logical positions of the row's tokens."""
        if self._tailn:
            self._pos = torch.cat([self._pos, torch.arange(self._tail0, self._tail0 + self._tailn)])
            self._tailn = 0
        return self._pos

    @pos.setter
    def pos(self, value: torch.Tensor) -> None:
        self._pos = value
        self._tailn = 0

    def extend_pos(self, start: int, n: int) -> None:
        """Append positions ``start .. start + n - 1``."""
        if self._tailn and self._tail0 + self._tailn != start:
            self.pos  # noqa: B018  (materialise the old run first)
        if not self._tailn:
            self._tail0 = start
        self._tailn += n

    def copy(self) -> "_Row":
        r = _Row()
        r.pages = list(self.pages)
        r.length = self.length
        r.pos = self.pos.clone()
        r.cap = self.cap
        return r


class _Seq:
    __slots__ = ("rows", "next_pos")

    def __init__(self, num_layers: int, num_heads: int) -> None:
        self.rows = [[_Row() for _ in range(num_heads)] for _ in range(num_layers)]
        self.next_pos = [0] * num_layers  # tokens ever appended, per layer


class PagedKVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, page_size: int = 16,
                 num_pages: int = 256, dtype: torch.dtype = torch.float32,
                 track_scores: bool = False, device: torch.device | str = "cpu"):
        for name, val in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads),
                          ("head_dim", head_dim), ("page_size", page_size),
                          ("num_pages", num_pages)):
            if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
                raise ValueError(f"PagedKVCache: {name} must be a positive int, got {val!r}")
        if dtype not in _DTYPES:
            raise ValueError(f"PagedKVCache: dtype must be one of {_DTYPES}, got {dtype}")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.page_size, self.num_pages, self.dtype = page_size, num_pages, dtype
        self.track_scores = bool(track_scores)
        self.device = torch.device(device)
        shape = (num_pages, page_size, head_dim)
        self.k_pages = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.v_pages = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.scores: List[Optional[torch.Tensor]] = [
            torch.zeros(num_pages, page_size, dtype=torch.float32, device=self.device)
            if self.track_scores else None for _ in range(num_layers)]
        self.allocators = [PageAllocator(num_pages) for _ in range(num_layers)]
        self._seqs: Dict[int, _Seq] = {}
        self._next_id = 0
        self._version = [0] * num_layers
        self._plans: Dict[Tuple[int, Tuple[int, ...]], Tuple[int, Tuple[torch.Tensor, ...]]] = {}
        self.peak_bytes = 0

    # ------------------------------------------------------------------ sizes
    @property
    def page_bytes(self) -> int:
        """Bytes of one page of one layer: K + V (+ its fp32 scores when tracked)."""
        elt = torch.empty(0, dtype=self.dtype).element_size()
        b = 2 * self.page_size * self.head_dim * elt
        return b + (4 * self.page_size if self.track_scores else 0)

    def bytes_held(self) -> int:
        """Pages in use over all layers x page bytes."""
        return sum(a.num_used for a in self.allocators) * self.page_bytes

    def _note_peak(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self.bytes_held())

    @property
    def seq_ids(self) -> List[int]:
        return list(self._seqs)

    # ------------------------------------------------------------------ checks
    def _seq(self, seq_id, arg: str = "seq_id") -> _Seq:
        s = self._seqs.get(seq_id) if isinstance(seq_id, int) else None
        if s is None:
            raise ValueError(f"PagedKVCache: {arg}: unknown sequence id {seq_id!r}")
        return s

    def _check_layer(self, layer) -> None:
        if not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise ValueError(f"PagedKVCache: layer must be an int in [0, {self.num_layers}), "
                             f"got {layer!r}")

    def _check_head(self, head) -> None:
        if not isinstance(head, int) or not 0 <= head < self.num_kv_heads:
            raise ValueError(f"PagedKVCache: head must be an int in [0, {self.num_kv_heads}), "
                             f"got {head!r}")

    def _check_seq_ids(self, seq_ids: Sequence[int]) -> List[_Seq]:
        if isinstance(seq_ids, int):
            raise ValueError("PagedKVCache: seq_ids must be a list of sequence ids, got an int")
        seq_ids = list(seq_ids)
        if not seq_ids:
            raise ValueError("PagedKVCache: seq_ids is empty")
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"PagedKVCache: seq_ids has duplicates: {seq_ids}")
        return [self._seq(s, "seq_ids") for s in seq_ids]

    def _bump(self, layer: int) -> None:
        self._version[layer] += 1

    # ------------------------------------------------------------------ sequences
    def add_sequence(self) -> int:
        sid = self._next_id
        self._next_id += 1
        self._seqs[sid] = _Seq(self.num_layers, self.num_kv_heads)
        return sid

    def free_sequence(self, seq_id: int) -> None:
        s = self._seq(seq_id)
        for l in range(self.num_layers):
            pages = [p for row in s.rows[l] for p in row.pages]
            self.allocators[l].decref(pages)
            self._bump(l)
        del self._seqs[seq_id]

    def fork(self, seq_id: int) -> int:
        """A new sequence sharing every page of ``seq_id`` (refcounts +1, no copy)."""
        s = self._seq(seq_id)
        sid = self.add_sequence()
        t = self._seqs[sid]
        for l in range(self.num_layers):
            t.rows[l] = [row.copy() for row in s.rows[l]]
            self.allocators[l].incref([p for row in s.rows[l] for p in row.pages])
            t.next_pos[l] = s.next_pos[l]
        return sid

    def truncate(self, seq_id: int, length: int, layers: Optional[Sequence[int]] = None) -> None:
        """Drop every token at logical position >= ``length`` from the sequence's rows (all layers,
        or ``layers``) and free the pages nothing else holds; the layer's next position becomes
        ``min(position, length)``. Speculative decoding rolls rejected draft tokens back with it.
        A shared page that stays partially filled is copied on the next append, as after a fork."""
        s = self._seq(seq_id)
        if not isinstance(length, int) or isinstance(length, bool) or length < 0:
            raise ValueError(f"PagedKVCache.truncate: length must be a non-negative int, got {length!r}")
        layers = range(self.num_layers) if layers is None else list(layers)
        for l in layers:
            self._check_layer(l)
        S = self.page_size
        for l in layers:
            if s.next_pos[l] <= length:
                continue
            release = []
            for row in s.rows[l]:
                if row._tailn and not row._pos.numel():  # contiguous run only: no materialising
                    keep = max(0, min(row.length, length - row._tail0))
                else:
                    keep = int(torch.searchsorted(row.pos, torch.tensor(length)))
                if keep == row.length:
                    continue
                n_pages = -(-keep // S)
                release.extend(row.pages[n_pages:])
                del row.pages[n_pages:]
                row.cap = None
                if row._tailn and not row._pos.numel():
                    row._tailn = keep
                else:
                    row.pos = row.pos[:keep]
                row.length = keep
            if release:
                self.allocators[l].decref(release)
            s.next_pos[l] = length
            self._bump(l)

    def position(self, seq_id: int, layer: int = 0) -> int:
        """Next logical position of the sequence: tokens appended so far to ``layer`` (layer 0 by
        default; all layers agree between forward steps)."""
        self._check_layer(layer)
        return self._seq(seq_id).next_pos[layer]

    def seq_len(self, seq_id: int, layer: int, head: int) -> int:
        """Tokens held by row (seq_id, head) of ``layer`` (after eviction < position)."""
        self._check_layer(layer)
        self._check_head(head)
        return self._seq(seq_id).rows[layer][head].length

    def positions(self, seq_id: int, layer: int, head: int) -> torch.Tensor:
        """Logical positions ``[seq_len]`` (int64, increasing) of the row's tokens."""
        self._check_layer(layer)
        self._check_head(head)
        return self._seq(seq_id).rows[layer][head].pos.clone()

    def set_positions(self, seq_id: int, layer: int, positions: torch.Tensor,
                      next_pos: Optional[int] = None) -> None:
        """Relabel the logical positions of every KV head's row of ``(seq_id, layer)``.

        For callers that append a subset of the tokens, or tokens out of their order (prompt
        pruning computes later layers on the kept tokens only, and revives tokens into the
        middle of rows): ``positions`` ``[seq_len]`` int, strictly increasing, one per held
        token; ``next_pos`` (default unchanged) the position the layer's next append gets."""
        self._check_layer(layer)
        s = self._seq(seq_id)
        pos = torch.as_tensor(positions).reshape(-1)
        if pos.is_floating_point() or (pos.numel() > 1 and not bool((pos[1:] > pos[:-1]).all())):
            raise ValueError("PagedKVCache.set_positions: positions must be strictly increasing ints")
        pos = pos.long().cpu().clone()
        for h, row in enumerate(s.rows[layer]):
            if row.length != pos.numel():
                raise ValueError(f"PagedKVCache.set_positions: row (layer {layer}, head {h}) holds "
                                 f"{row.length} tokens, got {pos.numel()} positions")
        last = int(pos[-1]) if pos.numel() else -1
        if next_pos is not None and (not isinstance(next_pos, int) or next_pos <= last):
            raise ValueError(f"PagedKVCache.set_positions: next_pos must be an int > {last}, got {next_pos!r}")
        for row in s.rows[layer]:
            row.pos = pos
        if next_pos is not None:
            s.next_pos[layer] = next_pos

    def row_pages(self, seq_id: int, layer: int, head: int) -> List[int]:
        self._check_layer(layer)
        self._check_head(head)
        return list(self._seq(seq_id).rows[layer][head].pages)

    # ------------------------------------------------------------------ slots
    def _row_slots(self, row: _Row, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        """int64 slots of tokens ``start .. stop - 1`` of the row (CPU)."""
        stop = row.length if stop is None else stop
        if row.cap is None:  # recomputed only when the page list changed
            S = self.page_size
            pages = torch.tensor(row.pages, dtype=torch.long)
            row.cap = (pages[:, None] * S + torch.arange(S)).reshape(-1)
        return row.cap[start:stop]

    # ------------------------------------------------------------------ append
    def append(self, layer: int, seq_ids: Sequence[int], k: torch.Tensor, v: torch.Tensor,
               tokens_per_seq: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Append tokens to every KV head of the given sequences at ``layer``.

        ``k``, ``v``: ``[N, H_kv, D]``, sequence-major: the first ``tokens_per_seq[0]`` tokens
        belong to ``seq_ids[0]`` and so on. Without ``tokens_per_seq`` the ``N`` tokens are split
        evenly (prefill of one sequence: ``N = T``; decode of ``B`` sequences: ``N = B``).
        Returns the int32 slot mapping ``[N, H_kv]`` that was passed to ``kv_append``.
        """
        self._check_layer(layer)
        seqs = self._check_seq_ids(seq_ids)
        H, D = self.num_kv_heads, self.head_dim
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[1:] != (H, D):
                raise ValueError(f"PagedKVCache.append: {name} must be [N, {H}, {D}], got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t)}")
            if not t.is_floating_point():
                raise ValueError(f"PagedKVCache.append: {name} must be floating point, got {t.dtype}")
        if k.shape != v.shape:
            raise ValueError(f"PagedKVCache.append: v shape {tuple(v.shape)} != k shape {tuple(k.shape)}")
        N = k.shape[0]
        B = len(seqs)
        if tokens_per_seq is None:
            if N % B:
                raise ValueError(f"PagedKVCache.append: {N} tokens do not split evenly over {B} "
                                 "sequences; pass tokens_per_seq")
            counts = [N // B] * B
        else:
            counts = list(tokens_per_seq)
            if len(counts) != B or any((not isinstance(c, int)) or c < 0 for c in counts) \
                    or sum(counts) != N:
                raise ValueError(f"PagedKVCache.append: tokens_per_seq must be {B} non-negative "
                                 f"ints summing to N={N}, got {tokens_per_seq!r}")
        S = self.page_size
        alloc = self.allocators[layer]
        if all(c == 1 for c in counts):
            fast = self._append_one(layer, seq_ids, seqs, k, v)
            if fast is not None:
                return fast
        # page demand first, so that exhaustion raises before anything changes
        need = 0
        for s, n in zip(seqs, counts):
            if n == 0:
                continue
            for row in s.rows[layer]:
                cow = row.length % S != 0 and alloc.refcount(row.pages[-1]) > 1
                need += int(cow) + math.ceil((row.length + n) / S) - len(row.pages)
        if need > alloc.num_free:
            raise OutOfPagesError(f"PagedKVCache.append: layer {layer} needs {need} pages, "
                                  f"{alloc.num_free} free of {self.num_pages}")
        # copy-on-write of shared, partially filled last pages
        cow_src, cow_dst = [], []
        for s, n in zip(seqs, counts):
            if n == 0:
                continue
            for row in s.rows[layer]:
                fill = row.length % S
                if fill and alloc.refcount(row.pages[-1]) > 1:
                    old = row.pages[-1]
                    new = alloc.alloc(1)[0]
                    cow_src.extend(old * S + o for o in range(fill))
                    cow_dst.extend(new * S + o for o in range(fill))
                    alloc.decref(old)
                    row.pages[-1] = new
                    row.cap = None
        if cow_src:
            self._compact(layer, cow_src, cow_dst)
        # grow and build the slot mapping
        slot_mapping = torch.empty(N, H, dtype=torch.int32)
        off = 0
        for s, n in zip(seqs, counts):
            if n == 0:
                continue
            for h, row in enumerate(s.rows[layer]):
                extra = math.ceil((row.length + n) / S) - len(row.pages)
                if extra > 0:
                    row.pages.extend(alloc.alloc(extra))
                    row.cap = None
                slot_mapping[off:off + n, h] = self._row_slots(row, row.length, row.length + n).int()
                row.extend_pos(s.next_pos[layer], n)
                row.length += n
            s.next_pos[layer] += n
            off += n
        sm = slot_mapping.to(self.device)
        # kernels want the pool's dtype and device, contiguous
        _ops.kv_append(k.to(self.device, self.dtype).contiguous(),
                       v.to(self.device, self.dtype).contiguous(), self.k_pages[layer],
                       self.v_pages[layer], sm)
        if self.track_scores:
            flat = sm.reshape(-1).long()
            self.scores[layer].view(-1)[flat[flat >= 0]] = 0.0
        self._bump(layer)
        self._note_peak()
        return slot_mapping

    def append_decode(self, layer: int, seq_ids: Sequence[int], k: torch.Tensor,
                      v: torch.Tensor) -> torch.Tensor:
        """:meth:`append` of one token per sequence (``k``, ``v``: ``[B, H_kv, D]``) for decode
        loops that already guarantee their arguments: ids and shapes are not re-checked (the
        kernel still checks its tensors). Falls back to :meth:`append` when a row needs
        copy-on-write or the pool is short."""
        r = self._append_one(layer, seq_ids, [self._seqs[s] for s in seq_ids], k, v)
        return r if r is not None else self.append(layer, seq_ids, k, v)

    def _append_one(self, layer: int, seq_ids, seqs: List[_Seq], k: torch.Tensor,
                    v: torch.Tensor) -> Optional[torch.Tensor]:
        """Decode fast path: one token per sequence, no shared partially filled page. Slots are
        computed in Python ints, and a cached plan of exactly this batch is advanced in place
        (``kv_lens += 1``) instead of rebuilt when no row needed a new page. Returns None (the
        caller takes the general path) when a row needs copy-on-write or the pool is short."""
        if not self._can_book_one(layer, seqs):
            return None
        slots, need = self._book_one(layer, seqs)
        key = (layer, tuple(seq_ids))
        hit = self._plans.get(key) if need == 0 else None
        if hit is not None and hit[0] == self._version[layer] - 1:
            hit[1][2].add_(1)  # every row of this batch grew by one token; pages unchanged
            self._plans[key] = (self._version[layer], hit[1])
        slot_mapping = torch.tensor(slots, dtype=torch.int32).view(len(seqs), self.num_kv_heads)
        sm = slot_mapping
        if self.device.type != "cpu":
            sm, k, v = sm.to(self.device), k.to(self.device), v.to(self.device)
        _ops.kv_append(k, v, self.k_pages[layer], self.v_pages[layer], sm)  # converts the dtype
        if self.track_scores:
            self.scores[layer].view(-1)[sm.reshape(-1).long()] = 0.0
        if need:
            self._note_peak()
        return slot_mapping

    def _can_book_one(self, layer: int, seqs: List[_Seq]) -> bool:
        """One more token fits every row of ``seqs`` at ``layer`` without copy-on-write."""
        S, alloc, need = self.page_size, self.allocators[layer], 0
        ref = alloc._ref  # page ids in rows are valid by construction: no per-page checks
        for s in seqs:
            for row in s.rows[layer]:
                if row.length % S == 0:
                    need += 1
                elif ref[row.pages[-1]] > 1:
                    return False
        return need <= alloc.num_free

    def _book_one(self, layer: int, seqs: List[_Seq]) -> Tuple[List[int], int]:
        """Book one token per sequence at ``layer`` (checked by :meth:`_can_book_one`): a new
        page where a row's last one is full, the position, the length; bumps the layer's
        version (cached plans go stale: the caller advances or rebuilds them). Returns (slots,
        pages added)."""
        S, alloc = self.page_size, self.allocators[layer]
        slots: List[int] = []
        need = 0
        for s in seqs:
            p = s.next_pos[layer]
            for row in s.rows[layer]:
                n = row.length
                if n % S == 0:
                    row.pages.extend(alloc.alloc(1))
                    row.cap = None
                    need += 1
                slots.append(row.pages[n // S] * S + n % S)
                row.extend_pos(p, 1)
                row.length = n + 1
            s.next_pos[layer] = p + 1
        self._bump(layer)
        return slots, need

    def decode_slots(self, seq_id: int) -> Optional[Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Book one new token of ``seq_id`` in every layer at once, for a decode step whose
        kernels run elsewhere (``torch.classes.fastadapt.DecodeStack``): the bookkeeping of
        :meth:`append_decode` for all layers, without the ``kv_append`` (the caller runs it with
        the returned slots before attending). Returns ``(slots [L, 1, H_kv] int32 on the cache's
        device, plans)`` with ``plans`` the 3 L tables of :meth:`plan` per layer after the
        token, or None (nothing changed) where a row needs copy-on-write, a layer is short of
        pages, or scores are tracked: the caller then takes the per-layer path."""
        s = self._seqs.get(seq_id)
        if s is None or self.track_scores:
            return None
        seqs, L = [s], self.num_layers
        if not all(self._can_book_one(layer, seqs) for layer in range(L)):
            return None  # checked for every layer first: nothing changes on a refusal
        slots: List[int] = []
        grew: List[int] = []
        for layer in range(L):
            sl, need = self._book_one(layer, seqs)
            slots.extend(sl)
            grew.append(need)
        # the new lengths of every layer's rows in one tensor (one op, not one add_ per layer);
        # a layer without a new page keeps its cached page tables with these lengths
        lens = torch.tensor([row.length for layer in range(L) for row in s.rows[layer]], dtype=torch.int32,
                            device=self.device).view(L, self.num_kv_heads).unbind(0)
        plans: List[torch.Tensor] = []
        ids = (seq_id,)
        for layer in range(L):
            key = (layer, ids)
            hit = self._plans.get(key) if not grew[layer] else None
            if hit is not None and hit[0] == self._version[layer] - 1:
                plan = (hit[1][0], hit[1][1], lens[layer])
                self._plans[key] = (self._version[layer], plan)
            else:
                plan = self.plan(layer, ids)
            plans.extend(plan)
        if any(grew):
            self._note_peak()
        sm = torch.tensor(slots, dtype=torch.int32).view(L, 1, self.num_kv_heads)
        return (sm if self.device.type == "cpu" else sm.to(self.device)), plans

    # ------------------------------------------------------------------ compaction
    def _compact(self, layer: int, src: List[int], dst: List[int]) -> None:
        pairs = [(a, b) for a, b in zip(src, dst) if a != b]
        if not pairs:
            return
        src_t = torch.tensor([a for a, _ in pairs], dtype=torch.int32, device=self.device)
        dst_t = torch.tensor([b for _, b in pairs], dtype=torch.int32, device=self.device)
        _ops.kv_compact(self.k_pages[layer], self.v_pages[layer], self.scores[layer], src_t, dst_t)

    def keep(self, layer: int, seq_id: int, keep_idx_per_head, by: str = "index") -> None:
        """Compact each KV head's row of ``(layer, seq_id)`` to exactly the given tokens.

        ``keep_idx_per_head``: ``H_kv`` sorted, distinct integer tensors (or lists) naming the
        tokens to keep: with ``by="index"`` indices into the row's current tokens
        (``0 .. seq_len - 1``, what policies return); with ``by="position"`` logical positions
        (``positions(seq_id, layer, h)`` values; each must be held). Kept tokens keep their order and
        logical positions. Destinations are the row's own pages where the row holds them alone,
        fresh pages where they are shared; a leading run of whole pages that is kept unchanged is
        not touched at all (a forked prompt stays shared). Pages nothing points to any more go
        back to the allocator.
        """
        self._check_layer(layer)
        s = self._seq(seq_id)
        H, S = self.num_kv_heads, self.page_size
        if isinstance(keep_idx_per_head, torch.Tensor) and keep_idx_per_head.dim() == 2:
            keep_idx_per_head = list(keep_idx_per_head)
        if not isinstance(keep_idx_per_head, (list, tuple)) or len(keep_idx_per_head) != H:
            raise ValueError(f"PagedKVCache.keep: keep_idx_per_head must be a list of {H} index "
                             "tensors (one per KV head)")
        if by not in ("index", "position"):
            raise ValueError(f"PagedKVCache.keep: by must be 'index' or 'position', got {by!r}")
        alloc = self.allocators[layer]
        idxs = []
        for h, idx in enumerate(keep_idx_per_head):
            row = s.rows[layer][h]
            idx = torch.as_tensor(idx)
            if idx.dim() != 1 or (idx.numel() and idx.is_floating_point()):
                raise ValueError(f"PagedKVCache.keep: keep_idx_per_head[{h}] must be a 1-D "
                                 "integer tensor")
            idx = idx.long().cpu()
            if by == "position" and idx.numel():
                j = torch.searchsorted(row.pos, idx).clamp(max=max(row.length - 1, 0))
                if row.length == 0 or not torch.equal(row.pos[j], idx):
                    raise ValueError(f"PagedKVCache.keep: keep_idx_per_head[{h}] names positions "
                                     "the row does not hold")
                idx = j
            if idx.numel():
                if int(idx.min()) < 0 or int(idx.max()) >= row.length:
                    raise ValueError(f"PagedKVCache.keep: keep_idx_per_head[{h}] out of range "
                                     f"[0, {row.length})")
                if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
                    raise ValueError(f"PagedKVCache.keep: keep_idx_per_head[{h}] must be sorted "
                                     "and distinct")
            idxs.append(idx)
        # plan every row first (no state change), so exhaustion raises cleanly
        plans = []
        fresh_needed = 0
        for h, idx in enumerate(idxs):
            row = s.rows[layer][h]
            m = idx.numel()
            m_pages = math.ceil(m / S)
            pfx = 0  # leading whole pages kept unchanged
            while pfx < m_pages and (pfx + 1) * S <= m and \
                    bool((idx[pfx * S:(pfx + 1) * S] == torch.arange(pfx * S, (pfx + 1) * S)).all()):
                pfx += 1
            reuse = [i < len(row.pages) and alloc.refcount(row.pages[i]) == 1
                     for i in range(pfx, m_pages)]
            fresh_needed += sum(1 for r in reuse if not r)
            plans.append((m, m_pages, pfx, reuse))
        if fresh_needed > alloc.num_free:
            raise OutOfPagesError(f"PagedKVCache.keep: layer {layer} needs {fresh_needed} fresh "
                                  f"pages (shared rows), {alloc.num_free} free")
        src_all, dst_all, release = [], [], []
        for h, (idx, (m, m_pages, pfx, reuse)) in enumerate(zip(idxs, plans)):
            row = s.rows[layer][h]
            if m == row.length:  # sorted, distinct and in range: keeps everything
                continue
            new_pages = list(row.pages[:pfx])
            for i, r in zip(range(pfx, m_pages), reuse):
                new_pages.append(row.pages[i] if r else alloc.alloc(1)[0])
            kept_old = set(new_pages[pfx:]) & set(row.pages)
            release.extend(p for p in row.pages[pfx:] if p not in kept_old)
            src = self._row_slots(row)[idx]
            j = torch.arange(m)
            dst = torch.tensor(new_pages, dtype=torch.long)[j // S] * S + j % S if m else j
            lo = pfx * S  # tokens below lo sit where they are
            src_all.extend(src[lo:].tolist())
            dst_all.extend(dst[lo:].tolist())
            row.pages = new_pages
            row.cap = None
            row.length = m
            row.pos = row.pos[idx]
        self._compact(layer, src_all, dst_all)
        if release:
            alloc.decref(release)
        self._bump(layer)
        self._note_peak()

    # ------------------------------------------------------------------ plan / run
    def plan(self, layer: int, seq_ids: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """int32 CSR tables ``(page_indptr [B*H_kv+1], page_indices [nnz], kv_lens [B*H_kv])`` of
        ``layer`` for the batch, rows ``b * H_kv + h``; cached until the layer's tables change."""
        try:  # a valid cached plan needs no checks: any change to its rows bumps the version
            key = (layer, tuple(seq_ids))
            hit = self._plans.get(key)
            if hit is not None and hit[0] == self._version[layer]:
                return hit[1]
        except TypeError:
            pass
        self._check_layer(layer)
        seqs = self._check_seq_ids(seq_ids)
        key = (layer, tuple(seq_ids))
        indptr, indices, lens = [0], [], []
        for s in seqs:
            for row in s.rows[layer]:
                indices.extend(row.pages)
                indptr.append(len(indices))
                lens.append(row.length)
        out = (torch.tensor(indptr, dtype=torch.int32, device=self.device),
               torch.tensor(indices, dtype=torch.int32, device=self.device),
               torch.tensor(lens, dtype=torch.int32, device=self.device))
        self._plans = {k_: v_ for k_, v_ in self._plans.items() if v_[0] == self._version[k_[0]]}
        self._plans[key] = (self._version[layer], out)
        return out

    def attend(self, layer: int, seq_ids: Sequence[int], q: torch.Tensor,
               scale: Optional[float] = None, accumulate_scores: Optional[bool] = None
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Paged attention of ``q [B, T_q, H_q, D]`` (the last ``T_q`` tokens of each sequence,
        causal among themselves) over the layer's rows. Returns ``out [B, T_q, H_q, D]`` and
        ``lse [B, T_q, H_q]`` (fp32, natural log). With score tracking (default when the cache
        tracks scores) the attention mass of each key is added to the layer's score pool."""
        self._check_layer(layer)
        seqs = self._check_seq_ids(seq_ids)
        Hkv, D = self.num_kv_heads, self.head_dim
        if not isinstance(q, torch.Tensor) or q.dim() != 4 or q.shape[0] != len(seqs) \
                or q.shape[3] != D or q.shape[2] % Hkv:
            raise ValueError(f"PagedKVCache.attend: q must be [B={len(seqs)}, T_q, H_q, {D}] with "
                             f"H_q a multiple of {Hkv}, got "
                             f"{tuple(q.shape) if isinstance(q, torch.Tensor) else type(q)}")
        if accumulate_scores is None:
            accumulate_scores = self.track_scores
        if accumulate_scores and not self.track_scores:
            raise ValueError("PagedKVCache.attend: accumulate_scores needs track_scores=True")
        if scale is None:
            scale = D ** -0.5
        indptr, indices, lens = self.plan(layer, seq_ids)
        out, lse = _ops.paged_decode_attention(
            q.to(self.device, self.dtype).contiguous(), self.k_pages[layer], self.v_pages[layer],
            indptr, indices, lens, float(scale),
            self.scores[layer] if accumulate_scores else None)
        return out.to(q.dtype), lse

    # ------------------------------------------------------------------ reads
    def gather(self, layer: int, seq_id: int, head: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(K [seq_len, D], V [seq_len, D])`` of one row, in token order (a copy)."""
        self._check_layer(layer)
        self._check_head(head)
        row = self._seq(seq_id).rows[layer][head]
        slots = self._row_slots(row).to(self.device)
        P = self.num_pages * self.page_size
        return (self.k_pages[layer].view(P, -1)[slots], self.v_pages[layer].view(P, -1)[slots])

    def gather_dense(self, layer: int, seq_ids: Sequence[int], pad_left: bool = True
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``K, V [B, H_kv, L, D]`` with ``L`` the longest row, shorter rows zero padded on the
        left (``pad_left``) or right, and ``lens [B, H_kv]`` (int64)."""
        self._check_layer(layer)
        seqs = self._check_seq_ids(seq_ids)
        B, H, D = len(seqs), self.num_kv_heads, self.head_dim
        lens = torch.tensor([[row.length for row in s.rows[layer]] for s in seqs], dtype=torch.long)
        L = int(lens.max()) if lens.numel() else 0
        P = self.num_pages * self.page_size
        # one gather from the flat pool; index P*page_size-... padding reads slot 0 then is zeroed
        idx = torch.zeros(B, H, L, dtype=torch.long)
        valid = torch.zeros(B, H, L, dtype=torch.bool)
        for b, s in enumerate(seqs):
            for h, row in enumerate(s.rows[layer]):
                n = row.length
                if n == 0:
                    continue
                lo = L - n if pad_left else 0
                idx[b, h, lo:lo + n] = self._row_slots(row)
                valid[b, h, lo:lo + n] = True
        idx = idx.to(self.device)
        valid = valid.to(self.device)[..., None]
        K = self.k_pages[layer].view(P, D)[idx].masked_fill(~valid, 0)
        V = self.v_pages[layer].view(P, D)[idx].masked_fill(~valid, 0)
        return K, V, lens

    def row_scores(self, layer: int, seq_id: int, head: int) -> torch.Tensor:
        """Accumulated attention mass ``[seq_len]`` fp32 of the row's keys (score pool)."""
        if not self.track_scores:
            raise ValueError("PagedKVCache.row_scores: the cache was built with track_scores=False")
        self._check_layer(layer)
        self._check_head(head)
        row = self._seq(seq_id).rows[layer][head]
        return self.scores[layer].view(-1)[self._row_slots(row).to(self.device)].cpu()

    def reset_scores(self, layer: int, seq_ids: Optional[Sequence[int]] = None) -> None:
        """Zero the score pool entries of the given sequences (all when None) at ``layer``."""
        if not self.track_scores:
            return
        self._check_layer(layer)
        seqs = self._check_seq_ids(seq_ids) if seq_ids is not None else list(self._seqs.values())
        slots = [self._row_slots(row) for s in seqs for row in s.rows[layer]]
        if slots:
            self.scores[layer].view(-1)[torch.cat(slots).to(self.device)] = 0.0

    def key_norms(self, layer: int, seq_id: int, head: int) -> torch.Tensor:
        """L2 norm ``[seq_len]`` fp32 of the row's keys."""
        k, _ = self.gather(layer, seq_id, head)
        return k.float().norm(dim=-1).cpu()

    def __repr__(self) -> str:
        return (f"PagedKVCache(layers={self.num_layers}, kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, page_size={self.page_size}, "
                f"num_pages={self.num_pages}/layer, dtype={self.dtype}, seqs={len(self._seqs)}, "
                f"bytes_held={self.bytes_held()})")
