"""fastadapt::block_sparse_attention, vertical_slash_scores and block_pool_scores on CPU (both
ISA paths, several thread counts) and, where a GPU is present, CUDA: against float64 references
with materialised masks, SDPA for dense layouts, the layout builders, and every bad input."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastadapt_ops
from fastadapt_ops.attention.block_sparse import (
    BlockSparseLayout,
    a_shape_block_mask,
    block_topk_mask,
    build_head_layout,
    causal_block_mask,
    sparse_attention,
)
from fastadapt_ops.cpu import available_cpu_isas
from fastadapt_ops.ops.block_sparse import (
    BLOCK,
    block_pool_scores,
    block_pool_scores_reference,
    block_sparse_attention,
    block_sparse_attention_reference,
    layout_mask,
    vertical_slash_scores,
    vertical_slash_scores_reference,
)

PATHS = ["generic", "avx2"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def isa(request):
    path = request.param
    if path not in available_cpu_isas():
        pytest.skip(f"this CPU cannot run the {path} path")
    with fastadapt_ops.use_cpu_isa(path):
        yield path


def _qkv(T, Tk, Hq, Hkv, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, Hq, D, generator=g).to(dtype)
    k = torch.randn(Tk, Hkv, D, generator=g).to(dtype)
    v = torch.randn(Tk, Hkv, D, generator=g).to(dtype)
    return q, k, v


def _random_layout(T, Tk, H, seed, p=0.4, extras=True):
    g = torch.Generator().manual_seed(seed)
    nqb, nkb = -(-T // BLOCK), -(-Tk // BLOCK)
    mask = torch.rand(H, nqb, nkb, generator=g) < p
    cols = diags = None
    if extras:
        cols = [torch.sort(torch.randperm(Tk, generator=g)[: int(torch.randint(0, min(Tk, 40) + 1, (1,), generator=g))]).values
                for _ in range(H)]
        diags = [torch.sort(torch.randperm(Tk, generator=g)[: int(torch.randint(0, min(Tk, 30) + 1, (1,), generator=g))]).values
                 for _ in range(H)]
    return BlockSparseLayout.from_block_mask(mask, T, Tk, cols, diags)


def _tol(dtype):
    return {torch.float32: 3e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype]


def _check(out, lse, ref_out, ref_lse, dtype):
    assert out.dtype == dtype and lse.dtype == torch.float32
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.float(), ref_out.float(), atol=_tol(dtype), rtol=_tol(dtype))
    assert torch.all(out[~finite] == 0)


def _run(layout, q, k, v, scale=None):
    return layout.run(q, k, v, scale)


def _ref(layout, q, k, v, scale=None):
    multi = len(layout.q_lens) > 1
    return block_sparse_attention_reference(
        q, k, v, layout.row_ptr, layout.col_idx, layout.q_indptr if multi else None,
        layout.k_indptr if multi else None, layout.col_indptr, layout.cols, layout.diag_indptr,
        layout.diags, scale)


# ---- attention -------------------------------------------------------------------------------

@pytest.mark.parametrize("isa", PATHS, indirect=True)
@pytest.mark.parametrize("T,Tk,Hq,Hkv,D", [(1, 1, 1, 1, 8), (67, 67, 3, 1, 64), (130, 200, 4, 2, 24),
                                          (64, 64, 2, 2, 17), (191, 191, 9, 3, 64)])
def test_dense_layout_equals_sdpa(isa, T, Tk, Hq, Hkv, D):
    q, k, v = _qkv(T, Tk, Hq, Hkv, D)
    out, lse = _run(BlockSparseLayout.dense(T, Tk, Hq), q, k, v)
    G = Hq // Hkv
    mask = torch.ones(T, Tk, dtype=torch.bool).tril(Tk - T)
    ref = F.scaled_dot_product_attention(q.transpose(0, 1), k.repeat_interleave(G, 1).transpose(0, 1),
                                         v.repeat_interleave(G, 1).transpose(0, 1), attn_mask=mask).transpose(0, 1)
    torch.testing.assert_close(out, ref, atol=3e-5, rtol=3e-5)
    logits = torch.einsum("thd,khd->htk", q.double(), k.repeat_interleave(G, 1).double()) / math.sqrt(D)
    ref_lse = torch.logsumexp(logits.masked_fill(~mask, float("-inf")), -1).T
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("isa", PATHS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_random_layouts_match_masked_reference(isa, dtype, seed):
    T, Tk, Hq, Hkv, D = 157, 229, 6, 2, 40
    q, k, v = _qkv(T, Tk, Hq, Hkv, D, dtype, seed)
    L = _random_layout(T, Tk, Hq, seed)
    out, lse = _run(L, q, k, v, scale=0.3)
    _check(out, lse, *_ref(L, q, k, v, scale=0.3), dtype)


@pytest.mark.parametrize("isa", PATHS, indirect=True)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_ragged_batch_and_threads(isa, threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        Hq, Hkv, D = 4, 2, 32
        lens = [(65, 65), (1, 40), (130, 300), (0, 10), (64, 64)]
        layouts, qs, ks, vs = [], [], [], []
        for i, (T, Tk) in enumerate(lens):
            q, k, v = _qkv(T, Tk, Hq, Hkv, D, seed=10 + i)
            qs.append(q), ks.append(k), vs.append(v)
            layouts.append(_random_layout(T, Tk, Hq, seed=i, extras=i % 2 == 0))
        L = BlockSparseLayout.concat(layouts)
        q, k, v = torch.cat(qs), torch.cat(ks), torch.cat(vs)
        out, lse = _run(L, q, k, v)
        _check(out, lse, *_ref(L, q, k, v), torch.float32)
        # each sequence alone gives the same rows
        q0 = 0
        for i, Li in enumerate(layouts):
            if Li.q_lens[0] == 0:
                continue
            o1, l1 = _run(Li, qs[i], ks[i], vs[i])
            torch.testing.assert_close(out[q0:q0 + len(qs[i])], o1, atol=1e-6, rtol=1e-6)
            q0 += len(qs[i])
    finally:
        torch.set_num_threads(old)


def test_isa_paths_agree():
    if "avx2" not in available_cpu_isas():
        pytest.skip("no AVX2 on this CPU")
    q, k, v = _qkv(300, 300, 3, 1, 64, seed=5)
    L = _random_layout(300, 300, 3, seed=5)
    res = {}
    for path in PATHS:
        with fastadapt_ops.use_cpu_isa(path):
            res[path] = _run(L, q, k, v)
    torch.testing.assert_close(res["generic"][0], res["avx2"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res["generic"][1], res["avx2"][1], atol=1e-5, rtol=1e-5)


def test_empty_rows_give_zero_and_neg_inf():
    q, k, v = _qkv(70, 70, 2, 1, 16)
    mask = torch.zeros(2, 2, 2, dtype=torch.bool)
    mask[0, 1, 0] = True  # head 0, second query block sees key block 0 only
    L = BlockSparseLayout.from_block_mask(mask, 70, 70)
    out, lse = _run(L, q, k, v)
    _check(out, lse, *_ref(L, q, k, v), torch.float32)
    assert torch.all(lse[:, 1] == float("-inf")) and torch.all(out[:, 1] == 0)


def test_overlapping_columns_and_diagonals_count_once():
    # every key of the sequence listed three times: as blocks, as columns and as diagonals
    T = Tk = 100
    q, k, v = _qkv(T, Tk, 2, 2, 16, seed=3)
    full = list(torch.arange(Tk))
    L = BlockSparseLayout.from_block_mask(causal_block_mask(T, Tk)[None].expand(2, -1, -1), T, Tk,
                                          [torch.tensor(full)] * 2, [torch.tensor(full)] * 2)
    out, lse = _run(L, q, k, v)
    out_d, lse_d = _run(BlockSparseLayout.dense(T, Tk, 2), q, k, v)
    torch.testing.assert_close(out, out_d, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse, lse_d, atol=1e-6, rtol=1e-6)


def test_noncontiguous_inputs():
    qkv = torch.randn(130, 4 + 2 + 2, 32)
    q, k, v = qkv[:, :4], qkv[:, 4:6], qkv[:, 6:]
    L = _random_layout(130, 130, 4, seed=7)
    out, lse = _run(L, q, k, v)
    _check(out, lse, *_ref(L, q, k, v), torch.float32)


# ---- builders and estimators -----------------------------------------------------------------

@pytest.mark.parametrize("isa", PATHS, indirect=True)
@pytest.mark.parametrize("T,Tk", [(1, 1), (70, 70), (100, 333), (200, 200)])
def test_vertical_slash_scores_match_reference(isa, T, Tk):
    q, k, _ = _qkv(T, Tk, 6, 3, 32, seed=T)
    vert, slash = vertical_slash_scores(q, k, 64)
    rv, rs = vertical_slash_scores_reference(q, k, 64)
    torch.testing.assert_close(vert, rv, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(slash, rs, atol=2e-5, rtol=1e-4)
    n = min(64, T)
    torch.testing.assert_close(vert.sum(-1), torch.full((6,), float(n)), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("isa", PATHS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
def test_block_pool_scores_match_reference(isa, dtype):
    q, k, _ = _qkv(150, 260, 4, 2, 24, dtype, seed=2)
    s = block_pool_scores(q, k)
    r = block_pool_scores_reference(q, k)
    assert torch.equal(torch.isinf(s), torch.isinf(r))
    f = torch.isfinite(r)
    torch.testing.assert_close(s[f], r[f], atol=1e-4, rtol=1e-4)


def test_block_topk_mask_keeps_sink_and_diagonal_and_count():
    T = Tk = 640
    q, k, _ = _qkv(T, Tk, 3, 1, 16, seed=4)
    s = block_pool_scores(q, k)
    m = block_topk_mask(s, [3, 4, 5], T, Tk)
    forced = a_shape_block_mask(T, Tk, 1, 1)
    assert torch.all(m[:, forced]), "sink and diagonal blocks always kept"
    causal = causal_block_mask(T, Tk)
    for h, kk in enumerate([3, 4, 5]):
        counts = m[h].sum(-1)
        assert torch.equal(counts, torch.clamp(causal.sum(-1), max=kk))
        # the remaining picks are the best non-forced scores of each row
        for r in range(m.shape[1]):
            free = causal[r] & ~forced[r]
            picked = m[h, r] & free
            if picked.any() and (free & ~picked).any():
                assert s[h, r][picked].min() >= s[h, r][free & ~picked].max()


def test_vertical_slash_layout_contents():
    T = Tk = 500
    q, k, v = _qkv(T, Tk, 3, 1, 32, seed=6)
    L = BlockSparseLayout.vertical_slash(q, k, n_vertical=[10, 20, 30], n_slash=[5, 0, 12])
    vert, slash = vertical_slash_scores(q, k)
    for h, nv in enumerate([10, 20, 30]):
        cols = L.cols[L.col_indptr[h]:L.col_indptr[h + 1]]
        assert len(cols) == nv and torch.all(cols[:4] == torch.arange(4))
        assert torch.all(cols[1:] > cols[:-1])
    for h, ns in enumerate([5, 0, 12]):
        d = L.diags[L.diag_indptr[h]:L.diag_indptr[h + 1]].long()
        assert len(d) == ns and torch.all(d > BLOCK)
        if ns:
            rest = torch.ones(Tk, dtype=torch.bool)
            rest[: BLOCK + 1] = False
            rest[d] = False
            assert slash[h, d].min() >= slash[h, rest].max()
    out, lse = _run(L, q, k, v)
    _check(out, lse, *_ref(L, q, k, v), torch.float32)


def test_a_shape_and_mixed_heads():
    T = Tk = 450
    q, k, v = _qkv(T, Tk, 4, 2, 32, seed=8)
    heads = [{"pattern": "dense"}, {"pattern": "a_shape", "sink": 1, "local": 2},
             {"pattern": "vertical_slash", "n_vertical": 16, "n_slash": 8},
             {"pattern": "block_topk", "topk": 3}]
    L = build_head_layout(q, k, heads)
    out, lse = _run(L, q, k, v)
    _check(out, lse, *_ref(L, q, k, v), torch.float32)
    o2, _ = sparse_attention(q, k, v, heads)
    torch.testing.assert_close(o2, out)
    m = layout_mask(T, Tk, [[0] + list(range(max(0, r - 1), r + 1)) for r in range(-(-T // BLOCK))])
    assert m.shape == (T, Tk)
    # a_shape head: exactly the sink block plus two local blocks per row
    La = BlockSparseLayout.a_shape(T, Tk, 1, sink=1, local=2)
    assert La.row_ptr.diff().tolist() == [1, 2, 3, 3, 3, 3, 3, 3]
    assert 0 < La.density() < 1 and BlockSparseLayout.dense(T, Tk, 2).density() == 1.0


# ---- bad inputs ------------------------------------------------------------------------------

def _good():
    q, k, v = _qkv(70, 70, 2, 1, 16)
    L = _random_layout(70, 70, 2, seed=0)
    return dict(q=q, k=k, v=v, row_ptr=L.row_ptr, col_idx=L.col_idx, q_indptr=None, k_indptr=None,
                col_indptr=L.col_indptr, cols=L.cols, diag_indptr=L.diag_indptr, diags=L.diags)


def _bad_cases():
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    g = _good()
    return [
        ({"q": g["q"].double()}, "q must be float32"),
        ({"q": g["q"][0]}, "q must be"),
        ({"k": g["k"].half()}, "k must have q's dtype"),
        ({"k": torch.randn(70, 1, 8)}, "k must be"),
        ({"v": torch.randn(71, 1, 16)}, "v must have k's shape"),
        ({"k": torch.randn(70, 3, 16), "v": torch.randn(70, 3, 16)}, "multiple of k heads"),
        ({"row_ptr": g["row_ptr"].long()}, "row_ptr must be a 1-D int32"),
        ({"row_ptr": g["row_ptr"][:-1]}, "row_ptr must have"),
        ({"col_idx": torch.full_like(g["col_idx"], 2)}, "out of range"),
        ({"col_idx": torch.full_like(g["col_idx"], -1)}, "out of range"),
        ({"row_ptr": i32([0, 2, 2, 2, 2]), "col_idx": i32([1, 0])}, "strictly increasing"),
        ({"row_ptr": i32([0, 2, 1, 2, 2]), "col_idx": i32([0, 1])}, "non-decreasing"),
        ({"row_ptr": i32([0, 1, 1, 1, 5]), "col_idx": i32([0])}, "end at"),
        ({"cols": None}, "must be given together"),
        ({"cols": torch.full_like(g["cols"], 70)}, "out of range"),
        ({"diags": torch.full_like(g["diags"], -3)}, "out of range"),
        ({"col_indptr": g["col_indptr"][:-1]}, "col_indptr must have"),
        ({"q_indptr": i32([0, 70])}, "given together"),
        ({"q_indptr": i32([0, 70]), "k_indptr": i32([0, 69])}, "end at"),
        ({"q_indptr": i32([0, 40, 70]), "k_indptr": i32([0, 30, 70])}, "k_len >= q_len"),
        ({"q_indptr": i32([0, 80]), "k_indptr": i32([0, 70])}, "q_indptr must start at 0"),
    ]


@pytest.mark.parametrize("i", range(len(_bad_cases())))
def test_bad_inputs_raise(i):
    over, msg = _bad_cases()[i]
    args = {**_good(), **over}
    with pytest.raises(RuntimeError, match=msg) as e:
        torch.ops.fastadapt.block_sparse_attention(**args)
    assert "fastadapt::block_sparse_attention" in str(e.value)


def test_estimator_bad_inputs():
    q, k, _ = _qkv(70, 70, 2, 1, 16)
    with pytest.raises(RuntimeError, match="fastadapt::vertical_slash_scores: last_q"):
        vertical_slash_scores(q, k, 65)
    with pytest.raises(RuntimeError, match="fastadapt::vertical_slash_scores: k must hold"):
        vertical_slash_scores(q, k[:10])
    with pytest.raises(RuntimeError, match="fastadapt::block_pool_scores: k must have q's dtype"):
        block_pool_scores(q, k.half())
    with pytest.raises(ValueError, match="unknown pattern"):
        build_head_layout(q, k, [{"pattern": "nope"}] * 2)


# ---- opcheck, compile ------------------------------------------------------------------------

def test_opcheck():
    g = _good()
    torch.library.opcheck(torch.ops.fastadapt.block_sparse_attention.default,
                          (g["q"], g["k"], g["v"], g["row_ptr"], g["col_idx"], None, None, g["col_indptr"],
                           g["cols"], g["diag_indptr"], g["diags"], None))
    torch.library.opcheck(torch.ops.fastadapt.vertical_slash_scores.default, (g["q"], g["k"], 64, None))
    torch.library.opcheck(torch.ops.fastadapt.block_pool_scores.default, (g["q"], g["k"], 0.5))


def test_compile_fullgraph():
    g = _good()

    @torch.compile(fullgraph=True)
    def f(q, k, v):
        o, lse = block_sparse_attention(q, k, v, g["row_ptr"], g["col_idx"], None, None, g["col_indptr"],
                                        g["cols"], g["diag_indptr"], g["diags"])
        return o * 2, lse, block_pool_scores(q, k)

    o, lse, s = f(g["q"], g["k"], g["v"])
    o_ref, lse_ref = block_sparse_attention(g["q"], g["k"], g["v"], g["row_ptr"], g["col_idx"], None, None,
                                            g["col_indptr"], g["cols"], g["diag_indptr"], g["diags"])
    torch.testing.assert_close(o, o_ref * 2)
    torch.testing.assert_close(lse, lse_ref)


# ---- CUDA ------------------------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu(dtype):
    Hq, Hkv, D = 6, 2, 64
    layouts, qs, ks, vs = [], [], [], []
    for i, (T, Tk) in enumerate([(157, 229), (64, 64), (1, 90)]):
        q, k, v = _qkv(T, Tk, Hq, Hkv, D, dtype, seed=i)
        qs.append(q), ks.append(k), vs.append(v)
        layouts.append(_random_layout(T, Tk, Hq, seed=i))
    L = BlockSparseLayout.concat(layouts)
    q, k, v = torch.cat(qs), torch.cat(ks), torch.cat(vs)
    out, lse = _run(L, q, k, v)
    oc, lc = _run(L.to("cuda"), q.cuda(), k.cuda(), v.cuda())
    torch.testing.assert_close(lc.cpu(), lse, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(oc.cpu().float(), out.float(), atol=2 * _tol(dtype), rtol=2 * _tol(dtype))
    vc, sc = vertical_slash_scores(qs[0].cuda(), ks[0].cuda())
    v0, s0 = vertical_slash_scores(qs[0], ks[0])
    torch.testing.assert_close(vc.cpu(), v0, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(sc.cpu(), s0, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(block_pool_scores(qs[0].cuda(), ks[0].cuda()).cpu(), block_pool_scores(qs[0], ks[0]),
                               atol=1e-3, rtol=1e-3)
