"""PagedKVCache and PageAllocator: a seeded random driver against a plain-tensor shadow model
(contents, positions, refcounts, no leaks after every step), attention against SDPA, copy-on-write
after fork, real memory release on eviction, and bad inputs."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from fastadapt_ops.kv import OutOfPagesError, PageAllocator, PagedKVCache
from fastadapt_ops.kv import _ops


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread (the shared machine's cores are oversubscribed; conftest restores)."""
    torch.set_num_threads(1)


# ---------------------------------------------------------------------------- allocator
def test_allocator_basics():
    a = PageAllocator(4)
    p = a.alloc(3)
    assert len(set(p)) == 3 and a.num_free == 1
    a.incref(p[0])
    assert a.refcount(p[0]) == 2
    assert a.decref(p[0]) == [] and a.refcount(p[0]) == 1
    assert sorted(a.decref(p)) == sorted(p) and a.num_free == 4
    with pytest.raises(ValueError, match="double free"):
        a.decref(p[0])
    with pytest.raises(OutOfPagesError, match="out of pages"):
        a.alloc(5)
    assert a.num_free == 4  # a failed alloc changes nothing
    q = a.alloc(1)
    with pytest.raises(ValueError, match="double free"):
        a.decref([q[0], q[0]])  # two releases of a page with refcount 1: nothing changes
    assert a.refcount(q[0]) == 1
    with pytest.raises(ValueError, match="out of range"):
        a.incref(99)
    with pytest.raises(ValueError, match="is free"):
        a.incref(q[0] + 1 if q[0] + 1 < 4 else 0)
    with pytest.raises(ValueError, match="num_pages"):
        PageAllocator(0)


# ---------------------------------------------------------------------------- shadow model
class Shadow:
    """Plain tensors: per seq, per layer, per head (K [n, D], V [n, D], pos [n])."""

    def __init__(self, L, H, D):
        self.L, self.H, self.D = L, H, D
        self.rows = {}
        self.next_pos = {}

    def add(self, sid):
        e = torch.empty(0, self.D, dtype=torch.float64)
        self.rows[sid] = [[(e, e, torch.empty(0, dtype=torch.long)) for _ in range(self.H)]
                          for _ in range(self.L)]
        self.next_pos[sid] = [0] * self.L

    def append(self, l, sid, k, v):  # k: [n, H, D]
        n = k.shape[0]
        p0 = self.next_pos[sid][l]
        for h in range(self.H):
            K, V, P = self.rows[sid][l][h]
            self.rows[sid][l][h] = (torch.cat([K, k[:, h].double()]), torch.cat([V, v[:, h].double()]),
                                    torch.cat([P, torch.arange(p0, p0 + n)]))
        self.next_pos[sid][l] += n

    def keep(self, l, sid, idxs):
        for h, idx in enumerate(idxs):
            K, V, P = self.rows[sid][l][h]
            self.rows[sid][l][h] = (K[idx], V[idx], P[idx])

    def fork(self, sid, new):
        self.rows[new] = [[tuple(t.clone() for t in r) for r in layer] for layer in self.rows[sid]]
        self.next_pos[new] = list(self.next_pos[sid])


def check_consistent(cache: PagedKVCache, shadow: Shadow, exact_dtype=True):
    L, H = cache.num_layers, cache.num_kv_heads
    assert sorted(cache.seq_ids) == sorted(shadow.rows)
    for l in range(L):
        alloc = cache.allocators[l]
        counts = [0] * cache.num_pages
        for sid in cache.seq_ids:
            for h in range(H):
                pages = cache.row_pages(sid, l, h)
                n = cache.seq_len(sid, l, h)
                assert len(pages) == -(-n // cache.page_size), "a row holds exactly the pages it fills"
                for p in pages:
                    counts[p] += 1
                K, V = cache.gather(l, sid, h)
                Ks, Vs, Ps = shadow.rows[sid][l][h]
                assert K.shape == Ks.shape
                torch.testing.assert_close(K.double(), Ks.to(cache.dtype).double(), rtol=0, atol=0)
                torch.testing.assert_close(V.double(), Vs.to(cache.dtype).double(), rtol=0, atol=0)
                assert torch.equal(cache.positions(sid, l, h), Ps)
        assert counts == alloc.refcounts(), "refcounts match the page tables"
        used = sum(1 for c in counts if c)
        assert used + alloc.num_free == cache.num_pages, "no page leaks"
    for sid in cache.seq_ids:
        assert cache.position(sid) == shadow.next_pos[sid][0]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("page_size", [1, 3, 4])
def test_random_driver_matches_shadow(seed, page_size):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    L, H, D = 2, 2, 5
    cache = PagedKVCache(L, H, D, page_size=page_size, num_pages=2000)
    shadow = Shadow(L, H, D)
    for step in range(60):
        live = cache.seq_ids
        op = rng.choice(["add", "append", "append", "batch", "fork", "keep", "keep", "free",
                         "attend"])
        if op in ("add", "fork") and len(live) >= 6:
            op = "free"
        if op == "add" or not live:
            sid = cache.add_sequence()
            shadow.add(sid)
            T = rng.randint(0, 9)
            if T:
                for l in range(L):
                    k, v = torch.randn(T, H, D), torch.randn(T, H, D)
                    cache.append(l, [sid], k, v)
                    shadow.append(l, sid, k, v)
        elif op == "append":
            sid = rng.choice(live)
            n = rng.randint(1, 5)
            for l in range(L):
                k, v = torch.randn(n, H, D), torch.randn(n, H, D)
                cache.append(l, [sid], k, v)
                shadow.append(l, sid, k, v)
        elif op == "batch":  # ragged batched append, sequences in random order
            sids = rng.sample(live, rng.randint(1, len(live)))
            counts = [rng.randint(0, 3) for _ in sids]
            N = sum(counts)
            for l in range(L):
                k, v = torch.randn(N, H, D), torch.randn(N, H, D)
                cache.append(l, sids, k, v, tokens_per_seq=counts)
                off = 0
                for sid, c in zip(sids, counts):
                    shadow.append(l, sid, k[off:off + c], v[off:off + c])
                    off += c
        elif op == "fork":
            sid = rng.choice(live)
            new = cache.fork(sid)
            shadow.fork(sid, new)
        elif op == "keep":
            sid = rng.choice(live)
            l = rng.randrange(L)
            idxs = []
            for h in range(H):
                n = cache.seq_len(sid, l, h)
                m = rng.randint(0, n)
                idxs.append(torch.tensor(sorted(rng.sample(range(n), m)), dtype=torch.long))
            before = cache.bytes_held()
            shared = any(cache.allocators[l].refcount(p) > 1
                         for h in range(H) for p in cache.row_pages(sid, l, h))
            cache.keep(l, sid, idxs)
            shadow.keep(l, sid, idxs)
            if not shared:  # an unshared row compacts in place: memory never grows
                assert cache.bytes_held() <= before
        elif op == "attend":  # decode attention of the non-empty sequences against SDPA
            sids = [s for s in live if all(cache.seq_len(s, l, h) for l in range(L) for h in range(H))]
            if sids:
                l = rng.randrange(L)
                q = torch.randn(len(sids), 1, 2 * H, D)
                out, lse = cache.attend(l, sids, q, scale=0.5)
                for b, s in enumerate(sids):
                    for h in range(H):
                        K, V, _ = shadow.rows[s][l][h]
                        ref = _sdpa_ref(q[b, :, 2 * h:2 * h + 2], K, V, 0.5)
                        torch.testing.assert_close(out[b, :, 2 * h:2 * h + 2].double(), ref,
                                                   rtol=1e-5, atol=1e-5)
        elif op == "free":
            sid = rng.choice(live)
            cache.free_sequence(sid)
            del shadow.rows[sid]
        check_consistent(cache, shadow)
    for sid in cache.seq_ids:
        cache.free_sequence(sid)
    assert cache.bytes_held() == 0
    assert all(a.num_free == cache.num_pages for a in cache.allocators)


def test_fork_copy_on_write_and_shared_prefix():
    L, H, D, S = 1, 2, 4, 4
    cache = PagedKVCache(L, H, D, page_size=S, num_pages=64)
    shadow = Shadow(L, H, D)
    a = cache.add_sequence()
    shadow.add(a)
    k, v = torch.randn(10, H, D), torch.randn(10, H, D)
    cache.append(0, [a], k, v)
    shadow.append(0, a, k, v)
    used = cache.allocators[0].num_used
    b = cache.fork(a)
    shadow.fork(a, b)
    assert cache.allocators[0].num_used == used, "fork copies nothing"
    assert cache.row_pages(a, 0, 0) == cache.row_pages(b, 0, 0)
    k2, v2 = torch.randn(1, H, D), torch.randn(1, H, D)
    cache.append(0, [b], k2, v2)  # last page (2 of 4 filled) is shared: copy on write
    shadow.append(0, b, k2, v2)
    check_consistent(cache, shadow)
    pa, pb = cache.row_pages(a, 0, 0), cache.row_pages(b, 0, 0)
    assert pa[:2] == pb[:2] and pa[2] != pb[2], "full pages stay shared, the last one is private"
    # the parent appends too: its last page is now private (refcount 1), so no copy
    used = cache.allocators[0].num_used
    cache.append(0, [a], k2, v2)
    shadow.append(0, a, k2, v2)
    assert cache.allocators[0].num_used == used
    check_consistent(cache, shadow)
    # keep on the child: the unchanged leading page stays shared, the rest goes to fresh pages
    idx = torch.tensor([0, 1, 2, 3, 5, 9, 10])
    cache.keep(0, b, [idx, idx])
    shadow.keep(0, b, [idx, idx])
    check_consistent(cache, shadow)
    assert cache.row_pages(b, 0, 0)[0] == cache.row_pages(a, 0, 0)[0]
    cache.free_sequence(a)
    del shadow.rows[a]
    check_consistent(cache, shadow)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_keep_releases_memory(dtype):
    L, H, D, S = 2, 3, 8, 4
    cache = PagedKVCache(L, H, D, page_size=S, num_pages=64, dtype=dtype, track_scores=True)
    shadow = Shadow(L, H, D)
    s = cache.add_sequence()
    shadow.add(s)
    for l in range(L):
        k, v = torch.randn(23, H, D), torch.randn(23, H, D)
        cache.append(l, [s], k, v)
        shadow.append(l, s, k, v)
    full = cache.bytes_held()
    assert full == L * H * 6 * cache.page_bytes and cache.peak_bytes == full
    # head-wise budgets: heads keep 3, 9 and 23 tokens
    idxs = [torch.tensor([0, 7, 22]), torch.arange(0, 23, 2)[:9], torch.arange(23)]
    cache.keep(1, s, idxs)
    shadow.keep(1, s, idxs)
    check_consistent(cache, shadow)
    assert cache.bytes_held() == (L * H * 6 - (6 - 1) - (6 - 3)) * cache.page_bytes
    assert cache.peak_bytes == full
    assert [cache.seq_len(s, 1, h) for h in range(H)] == [3, 9, 23]
    assert cache.position(s) == 23


def test_append_zeroes_recycled_scores():
    cache = PagedKVCache(1, 1, 4, page_size=4, num_pages=4, track_scores=True)
    s = cache.add_sequence()
    cache.append(0, [s], torch.randn(8, 1, 4), torch.randn(8, 1, 4))
    cache.attend(0, [s], torch.randn(1, 1, 2, 4))
    before = cache.row_scores(0, s, 0)
    assert float(before.sum()) == pytest.approx(2.0, rel=1e-5)
    cache.keep(0, s, [torch.tensor([6, 7])])
    assert torch.equal(cache.row_scores(0, s, 0), before[6:]), "scores move with their tokens"
    cache.append(0, [s], torch.randn(5, 1, 4), torch.randn(5, 1, 4))
    assert torch.all(cache.row_scores(0, s, 0)[2:] == 0), "new tokens start with zero mass"


# ---------------------------------------------------------------------------- attention
def _sdpa_ref(q, K, V, scale):  # q: [T_q, Hq, D]; K, V: [n, D] for one KV head
    T = q.shape[0]
    n = K.shape[0]
    qh = q.double().permute(1, 0, 2)  # [Hq, T, D]
    mask = torch.arange(n)[None, :] <= (n - T + torch.arange(T))[:, None]
    return F.scaled_dot_product_attention(qh, K.double()[None], V.double()[None], attn_mask=mask,
                                          scale=scale).permute(1, 0, 2)


@pytest.mark.parametrize("T_q", [1, 3])
def test_attend_matches_sdpa_after_eviction(T_q):
    torch.manual_seed(0)
    L, H, G, D, S = 1, 2, 3, 8, 4
    cache = PagedKVCache(L, H, D, page_size=S, num_pages=64, track_scores=True)
    shadow = Shadow(L, H, D)
    sids = [cache.add_sequence() for _ in range(3)]
    for i, s in enumerate(sids):
        shadow.add(s)
        k, v = torch.randn(5 + 4 * i, H, D), torch.randn(5 + 4 * i, H, D)
        cache.append(0, [s], k, v)
        shadow.append(0, s, k, v)
    idxs = [torch.tensor([0, 2, 3, 8]), torch.tensor([1, 5, 6, 7, 8])]
    cache.keep(0, sids[1], idxs)
    shadow.keep(0, sids[1], idxs)
    k, v = torch.randn(3 * T_q, H, D), torch.randn(3 * T_q, H, D)
    cache.append(0, sids, k, v)
    for j, s in enumerate(sids):
        shadow.append(0, s, k[j * T_q:(j + 1) * T_q], v[j * T_q:(j + 1) * T_q])
    q = torch.randn(3, T_q, H * G, D)
    out, lse = cache.attend(0, sids, q, scale=0.3)
    assert out.shape == q.shape and lse.shape == (3, T_q, H * G) and lse.dtype == torch.float32
    for b, s in enumerate(sids):
        for h in range(H):
            K, V, _ = shadow.rows[s][0][h]
            ref = _sdpa_ref(q[b, :, h * G:(h + 1) * G], K, V, 0.3)
            torch.testing.assert_close(out[b, :, h * G:(h + 1) * G].double(), ref, rtol=1e-5, atol=1e-5)
    # scores: every query head and query token distributes mass 1
    total = sum(float(cache.row_scores(0, s, h).sum()) for s in sids for h in range(H))
    assert total == pytest.approx(3 * T_q * H * G, rel=1e-5)


def test_plan_is_cached_until_tables_change():
    cache = PagedKVCache(2, 2, 4, page_size=2, num_pages=16)
    a, b = cache.add_sequence(), cache.add_sequence()
    cache.append(0, [a, b], torch.randn(6, 2, 4), torch.randn(6, 2, 4))
    p1 = cache.plan(0, [a, b])
    assert cache.plan(0, [a, b]) is p1
    indptr, indices, lens = p1
    assert indptr.dtype == indices.dtype == lens.dtype == torch.int32
    assert lens.tolist() == [3, 3, 3, 3] and indptr.tolist() == [0, 2, 4, 6, 8]
    cache.append(1, [a], torch.randn(1, 2, 4), torch.randn(1, 2, 4))
    assert cache.plan(0, [a, b]) is p1, "another layer's change keeps the plan"
    cache.append(0, [a], torch.randn(1, 2, 4), torch.randn(1, 2, 4))
    assert cache.plan(0, [a, b]) is not p1


def test_gather_dense_left_pads():
    cache = PagedKVCache(1, 2, 3, page_size=2, num_pages=16)
    a, b = cache.add_sequence(), cache.add_sequence()
    ka, kb = torch.randn(5, 2, 3), torch.randn(2, 2, 3)
    cache.append(0, [a, b], torch.cat([ka, kb]), torch.cat([ka, kb]), tokens_per_seq=[5, 2])
    cache.keep(0, a, [torch.arange(5), torch.tensor([1, 3])])
    K, V, lens = cache.gather_dense(0, [a, b])
    assert K.shape == (2, 2, 5, 3) and lens.tolist() == [[5, 2], [2, 2]]
    assert torch.equal(K[0, 1, 3:], ka[[1, 3], 1]) and torch.all(K[0, 1, :3] == 0)
    assert torch.equal(K[1, 0, 3:], kb[:, 0])


def test_ops_dispatch_reports_implementation():
    for name in ("kv_append", "kv_compact", "paged_decode_attention"):
        assert _ops.implementation(name) in ("kernel", "reference")
    _ops.force_reference(True)
    try:
        assert _ops.implementation("kv_append") == "reference"
    finally:
        _ops.force_reference(False)


# ---------------------------------------------------------------------------- bad inputs
def test_bad_inputs():
    with pytest.raises(ValueError, match="head_dim"):
        PagedKVCache(1, 1, 0)
    with pytest.raises(ValueError, match="dtype"):
        PagedKVCache(1, 1, 4, dtype=torch.int32)
    cache = PagedKVCache(2, 2, 4, page_size=2, num_pages=4)
    s = cache.add_sequence()
    with pytest.raises(ValueError, match="unknown sequence id"):
        cache.append(0, [s + 7], torch.randn(1, 2, 4), torch.randn(1, 2, 4))
    with pytest.raises(ValueError, match="seq_id"):
        cache.free_sequence(99)
    with pytest.raises(ValueError, match="k must be"):
        cache.append(0, [s], torch.randn(1, 3, 4), torch.randn(1, 3, 4))
    with pytest.raises(ValueError, match="v shape"):
        cache.append(0, [s], torch.randn(2, 2, 4), torch.randn(1, 2, 4))
    with pytest.raises(ValueError, match="layer"):
        cache.append(2, [s], torch.randn(1, 2, 4), torch.randn(1, 2, 4))
    with pytest.raises(ValueError, match="tokens_per_seq"):
        cache.append(0, [s], torch.randn(2, 2, 4), torch.randn(2, 2, 4), tokens_per_seq=[3])
    with pytest.raises(ValueError, match="duplicates"):
        cache.append(0, [s, s], torch.randn(2, 2, 4), torch.randn(2, 2, 4))
    with pytest.raises(OutOfPagesError):
        cache.append(0, [s], torch.randn(9, 2, 4), torch.randn(9, 2, 4))
    assert cache.seq_len(s, 0, 0) == 0 and cache.allocators[0].num_free == 4, "nothing changed"
    cache.append(0, [s], torch.randn(3, 2, 4), torch.randn(3, 2, 4))
    with pytest.raises(ValueError, match="sorted"):
        cache.keep(0, s, [torch.tensor([1, 0]), torch.tensor([0])])
    with pytest.raises(ValueError, match="out of range"):
        cache.keep(0, s, [torch.tensor([3]), torch.tensor([0])])
    with pytest.raises(ValueError, match="keep_idx_per_head"):
        cache.keep(0, s, [torch.tensor([0])])
    with pytest.raises(ValueError, match="q must be"):
        cache.attend(0, [s], torch.randn(1, 1, 3, 4))
    with pytest.raises(ValueError, match="track_scores"):
        cache.attend(0, [s], torch.randn(1, 1, 2, 4), accumulate_scores=True)
    with pytest.raises(ValueError, match="track_scores"):
        cache.row_scores(0, s, 0)


# ---------------------------------------------------------------------------- bench smoke
def test_bench_kv_cache_smoke(tmp_path):
    import json

    from fastadapt_ops.bench import FAMILIES, main

    assert "kv_cache" in FAMILIES
    main(["kv_cache", "--batch", "2", "--context", "20", "--heads", "4:2", "--dim", "8",
          "--page-size", "4", "--min-time", "0.001", "--threads", "1", "--out", str(tmp_path)])
    (js,) = list(tmp_path.glob("*/kv_cache.json"))
    data = json.loads(js.read_text())
    cases = {(r["case"], r["impl"]) for r in data["rows"]}
    assert ("decode attention", "torch") in cases and ("decode append", "torch") in cases
    held = {r["case"]: r["bytes"] for r in data["rows"] if r["case"].startswith("held")}
    assert held["held streaming"] < held["held full"]


def test_reference_fallback_on_used_pages_equals_reference():
    from fastadapt_ops.ops.kv_reference import paged_decode_attention_reference

    torch.manual_seed(0)
    cache = PagedKVCache(1, 2, 8, page_size=4, num_pages=200, track_scores=True)
    a = cache.add_sequence()
    cache.append(0, [a], torch.randn(9, 2, 8), torch.randn(9, 2, 8))
    b = cache.fork(a)  # shared pages appear in two rows
    cache.append(0, [a, b], torch.randn(2, 2, 8), torch.randn(2, 2, 8))
    indptr, indices, lens = cache.plan(0, [a, b])
    q = torch.randn(2, 1, 4, 8)
    acc1 = torch.rand(200, 4)
    acc2 = acc1.clone()
    out1, lse1 = _ops._decode_reference_on_used_pages(q, cache.k_pages[0], cache.v_pages[0],
                                                      indptr, indices, lens, 0.4, acc1)
    out2, lse2 = paged_decode_attention_reference(q, cache.k_pages[0], cache.v_pages[0],
                                                  indptr, indices, lens, 0.4, acc2)
    assert torch.equal(out1, out2) and torch.equal(lse1, lse2)
    torch.testing.assert_close(acc1, acc2, rtol=1e-6, atol=1e-6)


def test_keep_by_position():
    cache = PagedKVCache(1, 2, 4, page_size=2, num_pages=32)
    s = cache.add_sequence()
    k = torch.randn(10, 2, 4)
    cache.append(0, [s], k, k)
    cache.keep(0, s, [torch.tensor([1, 4, 6, 9]), torch.arange(10)])
    cache.keep(0, s, [torch.tensor([4, 9]), torch.tensor([0, 9])], by="position")
    assert cache.positions(s, 0, 0).tolist() == [4, 9]
    assert torch.equal(cache.gather(0, s, 0)[0], k[[4, 9], 0])
    assert torch.equal(cache.gather(0, s, 1)[0], k[[0, 9], 1])
    with pytest.raises(ValueError, match="does not hold"):
        cache.keep(0, s, [torch.tensor([5]), torch.tensor([0])], by="position")
    with pytest.raises(ValueError, match="by must be"):
        cache.keep(0, s, [torch.tensor([0]), torch.tensor([0])], by="slot")
