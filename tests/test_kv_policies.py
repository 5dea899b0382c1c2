"""Eviction policies on hand-made scores/norms, budget resolution (ratio, count, per layer,
per head), the eviction driver on a real PagedKVCache, and bad inputs."""
from __future__ import annotations

import pytest
import torch

from fastadapt_ops.kv import PagedKVCache
from fastadapt_ops.kv.policies import (POLICIES, Budget, EvictionContext, evict, get_policy,
                                       maybe_evict, pyramid_layer_budgets)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread (the shared machine's cores are oversubscribed; conftest restores)."""
    torch.set_num_threads(1)


def _ctx(scores=None, norms=None, budget=1.0, L=1, H=1, n=None, total_len=None, valid=None):
    """A context from plain per-row tensors (every row gets the same tensor unless a dict)."""
    def per_row(x):
        if x is None or isinstance(x, dict):
            return x
        return {(l, h): x for l in range(L) for h in range(H)}
    scores, norms, valid = per_row(scores), per_row(norms), per_row(valid)
    ref = scores or norms
    lengths = {key: (n if n is not None else ref[key].numel()) for key in
               [(l, h) for l in range(L) for h in range(H)]}
    tl = total_len if total_len is not None else max(lengths.values())
    return EvictionContext(L, H, range(L), budget, tl, lengths, scores=scores, key_norms=norms,
                           valid=valid)


def test_budget_resolution():
    assert Budget(0.5).tokens(10) == 5 and Budget(0.25).tokens(10) == 3  # ceil
    assert Budget(1.0).is_full and Budget(1.0).tokens(7) == 7
    assert Budget(4).tokens(10) == 4 and Budget(40).tokens(10) == 10
    assert Budget(0.01).tokens(10) == 1
    for bad in (0, -3, 0.0, 1.5, -0.1, True, "half", None):
        with pytest.raises(ValueError, match="budget"):
            Budget(bad)


def test_streaming_keeps_sinks_and_recent():
    ctx = _ctx(n=20, budget=7)
    sel = get_policy("streaming", budget=7, sinks=2).select(ctx)[(0, 0)]
    assert sel.tolist() == [0, 1, 15, 16, 17, 18, 19]


def test_h2o_heavy_hitters_plus_recent():
    s = torch.zeros(12)
    s[[1, 4, 6]] = torch.tensor([5.0, 9.0, 7.0])
    sel = get_policy("h2o", budget=5, recent=2).select(_ctx(s, budget=5))[(0, 0)]
    assert sel.tolist() == [1, 4, 6, 10, 11]
    sel = get_policy("h2o", budget=0.25, recent=0.5).select(_ctx(s, budget=0.25))[(0, 0)]
    assert sel.tolist() == [4, 6, 11]  # ceil(0.25 * 12) = 3 tokens: int(0.5 * 3) = 1 recent + top 2


def test_tova_uses_last_scores_only():
    s = torch.tensor([0.1, 0.5, 0.05, 0.3, 0.05])
    sel = get_policy("tova", budget=2).select(_ctx(s, budget=2))[(0, 0)]
    assert sel.tolist() == [1, 3]


def test_snapkv_pooling_and_window():
    s = torch.zeros(16)
    s[5] = 1.0  # a peak: max pooling (kernel 3) spreads it to 4, 5, 6
    pol = get_policy("snapkv", budget=6, window=3, kernel=3, pool="max")
    sel = pol.select(_ctx(s, budget=6))[(0, 0)]
    assert sel.tolist() == [4, 5, 6, 13, 14, 15]
    pol = get_policy("snapkv", budget=4, window=2, kernel=3, pool="avg")
    s2 = torch.zeros(16)
    s2[[3, 4]] = torch.tensor([1.0, 1.0])
    s2[9] = 1.5  # alone: avg pool 0.5; the pair 3, 4 pools to 2/3 at both
    sel = pol.select(_ctx(s2, budget=4))[(0, 0)]
    assert sel.tolist() == [3, 4, 14, 15]


def test_keynorm_keeps_lowest_norms():
    norms = torch.tensor([3.0, 0.5, 2.0, 0.1, 4.0, 1.0])
    sel = get_policy("keynorm", budget=3, recent=0).select(_ctx(norms=norms, budget=3))[(0, 0)]
    assert sel.tolist() == [1, 3, 5]
    norms[5] = 9.0  # the default recent window (half the budget: 1 token) keeps the newest anyway
    assert get_policy("keynorm", budget=3).select(_ctx(norms=norms, budget=3))[(0, 0)].tolist() == [1, 3, 5]
    assert get_policy("keynorm", budget=3, recent=0).select(_ctx(norms=norms, budget=3))[(0, 0)].tolist() == [1, 2, 3]


def test_padding_is_never_kept_and_not_counted():
    valid = torch.tensor([False, False, True, True, True, True, True, True])
    ctx = _ctx(n=8, budget=0.5, valid=valid, total_len=6)
    sel = get_policy("streaming", budget=0.5, sinks=1).select(ctx)[(0, 0)]
    assert sel.tolist() == [2, 6, 7]
    full = get_policy("full").select(ctx)[(0, 0)]
    assert full.tolist() == list(range(2, 8))


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_full_budget_keeps_everything(name):
    L, H, n = 3, 2, 11
    g = torch.Generator().manual_seed(0)
    scores = {(l, h): torch.rand(n, generator=g) for l in range(L) for h in range(H)}
    norms = {(l, h): torch.rand(n, generator=g) for l in range(L) for h in range(H)}
    pol = get_policy(name, budget=1.0)
    sel = pol.select(_ctx(scores, norms, budget=1.0, L=L, H=H))
    assert all(sel[(l, h)].tolist() == list(range(n)) for l in range(L) for h in range(H))


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("budget", [0.3, 5])
def test_every_policy_respects_budget(name, budget):
    L, H, n = 4, 3, 23
    g = torch.Generator().manual_seed(1)
    scores = {(l, h): torch.rand(n, generator=g) for l in range(L) for h in range(H)}
    norms = {(l, h): torch.rand(n, generator=g) for l in range(L) for h in range(H)}
    pol = get_policy(name, budget=budget)
    ctx = _ctx(scores, norms, budget=budget, L=L, H=H)
    sel = pol.select(ctx)
    k = Budget(budget).tokens(n)
    for idx in sel.values():
        assert idx.dtype == torch.long and torch.all(idx[1:] > idx[:-1])
        assert idx.numel() == 0 or (int(idx.min()) >= 0 and int(idx.max()) < n)
    total = sum(v.numel() for v in sel.values())
    if name == "full":
        assert total == L * H * n
    else:
        assert total <= L * H * k
        assert total >= L * H * k - L * H  # rounding loses at most one token per row


def test_pyramid_layer_budgets_sum_and_shape():
    for avg, L in ((10, 4), (7, 30), (1, 5), (64, 24)):
        b = pyramid_layer_budgets(avg, L, beta=20)
        assert sum(b) == avg * L and all(x >= 1 for x in b)
        assert all(b[i] >= b[i + 1] for i in range(L - 1)), "decreasing with depth"
    L, H, n = 5, 2, 40
    g = torch.Generator().manual_seed(2)
    scores = {(l, h): torch.rand(n, generator=g) for l in range(L) for h in range(H)}
    sel = get_policy("pyramidkv", budget=10, window=2).select(_ctx(scores, budget=10, L=L, H=H))
    per_layer = [sum(sel[(l, h)].numel() for h in range(H)) for l in range(L)]
    assert sum(per_layer) == L * H * 10
    assert per_layer[0] > per_layer[-1]
    # an explicit per-layer weight list
    pol = get_policy("snapkv", budget=10, window=0, layer_budgets=[3, 1, 1, 1, 4])
    sel = pol.select(_ctx(scores, budget=10, L=L, H=H))
    per_layer = [sel[(l, 0)].numel() for l in range(L)]
    assert per_layer == [15, 5, 5, 5, 20]


def test_adakv_moves_budget_to_spread_heads():
    n = 20
    peaked = torch.full((n,), 0.001)
    peaked[[2, 7]] = 1.0  # head 0: two keys hold the mass
    spread = torch.linspace(0.2, 0.6, n)  # head 1: mass everywhere
    scores = {(0, 0): peaked, (0, 1): spread}
    pol = get_policy("adakv", budget=6, window=0, kernel=1, alpha=0.2)
    sel = pol.select(_ctx(scores, budget=6, L=1, H=2))
    c0, c1 = sel[(0, 0)].numel(), sel[(0, 1)].numel()
    assert c0 + c1 == 12, "the layer total is respected"
    assert c1 > c0 and c0 >= int(0.2 * 6)
    assert {2, 7} <= set(sel[(0, 0)].tolist())


def test_evict_on_cache_frees_pages_and_keeps_selection():
    torch.manual_seed(0)
    L, H, D, S = 2, 2, 4, 4
    cache = PagedKVCache(L, H, D, page_size=S, num_pages=64, track_scores=True)
    s = cache.add_sequence()
    k = torch.randn(L, 30, H, D)
    for l in range(L):
        cache.append(l, [s], k[l], k[l])
        cache.attend(l, [s], torch.randn(1, 4, H * 2, D))
    before = cache.bytes_held()
    pol = get_policy("h2o", budget=10, recent=4)
    expect = {(l, h): pol.select_row(EvictionContext.from_cache(cache, s, budget=10), l, h, 10)
              for l in range(L) for h in range(H)}
    sel = evict(cache, pol, s)
    for l in range(L):
        for h in range(H):
            assert sel[(l, h)].tolist() == expect[(l, h)].tolist()
            K, _ = cache.gather(l, s, h)
            assert torch.equal(K, k[l, sel[(l, h)], h])
            assert cache.positions(s, l, h).tolist() == sel[(l, h)].tolist()
    assert cache.bytes_held() == L * H * 3 * cache.page_bytes < before
    # decode: no eviction until a row is over budget by a page
    for step in range(S):
        for l in range(L):
            cache.append(l, [s], torch.randn(1, H, D), torch.randn(1, H, D))
            assert not maybe_evict(cache, pol, s, l) or step == S - 1
    assert cache.seq_len(s, 0, 0) == 10 + S
    for l in range(L):
        cache.append(l, [s], torch.randn(1, H, D), torch.randn(1, H, D))
        assert maybe_evict(cache, pol, s, l)
        assert cache.seq_len(s, l, 0) == 10


def test_bad_policy_inputs():
    with pytest.raises(ValueError, match="unknown policy"):
        get_policy("lru")
    with pytest.raises(ValueError, match="budget"):
        get_policy("h2o", budget=0)
    with pytest.raises(ValueError, match="budget"):
        get_policy("streaming", budget=-2)
    with pytest.raises(ValueError, match="sinks"):
        get_policy("streaming", sinks=-1)
    with pytest.raises(ValueError, match="layer_budgets"):
        get_policy("snapkv", layer_budgets="triangle")
    with pytest.raises(ValueError, match="head_budgets"):
        get_policy("snapkv", head_budgets="random")
    with pytest.raises(ValueError, match="kernel"):
        get_policy("snapkv", kernel=4)
    with pytest.raises(ValueError, match="pool"):
        get_policy("snapkv", pool="median")
    with pytest.raises(ValueError, match="recent"):
        get_policy("h2o", recent=-1)
    with pytest.raises(ValueError, match="scores"):
        get_policy("h2o", budget=2).select(_ctx(norms=torch.rand(5), budget=2))


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_full_budget_eviction_changes_nothing_in_the_cache(name):
    torch.manual_seed(0)
    L, H, D = 2, 2, 8
    cache = PagedKVCache(L, H, D, page_size=4, num_pages=64, track_scores=True)
    s = cache.add_sequence()
    for l in range(L):
        cache.append(l, [s], torch.randn(13, H, D), torch.randn(13, H, D))
        cache.attend(l, [s], torch.randn(1, 3, 2 * H, D))
    q = torch.randn(1, 1, 2 * H, D)
    before = [cache.attend(l, [s], q, accumulate_scores=False) for l in range(L)]
    held = cache.bytes_held()
    evict(cache, get_policy(name, budget=1.0), s)
    assert cache.bytes_held() == held
    for l in range(L):
        out, lse = cache.attend(l, [s], q, accumulate_scores=False)
        assert torch.equal(out, before[l][0]) and torch.equal(lse, before[l][1])
