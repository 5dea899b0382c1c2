"""Token merging and pruning ops (bipartite_soft_matching, merge_tokens, unmerge_tokens,
prune_tokens, proportional_attention) against float64 references, on every CPU path and several
thread counts, and on CUDA where a GPU is present."""
from __future__ import annotations

import pytest
import torch

import fastadapt_ops
from fastadapt_ops.cpu import available_cpu_isas
from fastadapt_ops.ops import tokens as T

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
PATHS = ["generic", "avx2"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _path_ok(device, path):
    if path not in available_cpu_isas():
        pytest.skip(f"this CPU cannot run the {path} path")
    if device == "cuda" and path != "generic":
        pytest.skip("the CPU path switch does not apply to CUDA")


def _tol(dtype):
    return {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ---- bipartite_soft_matching --------------------------------------------------------------------
def _check_plan(dest, N, r, protected=None):
    """Structural facts of every plan: N - r rows, each used, order kept, protected untouched."""
    B = dest.shape[0]
    for b in range(B):
        d = dest[b].tolist()
        assert sorted(set(d)) == list(range(N - r)), d
        counts = torch.bincount(dest[b].long(), minlength=N - r)
        # order-preserving: the kept tokens (alone, or the odd B token of a merged row) number
        # the rows in token order
        kept = [n for n in range(N) if counts[d[n]] == 1 or n % 2 == 1]
        assert [d[n] for n in kept] == list(range(N - r))
        assert int(counts.sum()) == N  # sizes sum to N
        if protected is not None:
            for n in torch.nonzero(protected[b]).flatten().tolist():
                assert counts[d[n]] == 1, (b, n)  # alone in its row: neither merged nor a target
        for n in range(0, N, 2):  # A tokens merge into B tokens only
            if counts[d[n]] > 1:
                partners = [j for j in range(N) if d[j] == d[n]]
                assert sum(j % 2 for j in partners) == 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("B, N, C", [(1, 1, 4), (2, 2, 3), (3, 17, 5), (2, 64, 33), (1, 129, 64)])
def test_bsm_matches_float64(device, path, threads, B, N, C):
    _path_ok(device, path)
    torch.set_num_threads(threads)
    g = _gen(N * 7 + C)
    metric = torch.randn(B, N, C, generator=g)
    prot = T.protected_mask(B, N, first=True, last=N > 2)
    for r in sorted({0, 1, N // 4, T.max_merge(N, prot)}):
        if r > T.max_merge(N, prot):
            continue
        with fastadapt_ops.use_cpu_isa(path):
            dest = T.bipartite_soft_matching(metric.to(device), r, prot.to(device)).cpu()
        ref = T.bipartite_soft_matching_reference(metric, r, prot)
        assert dest.dtype == torch.int32 and dest.shape == (B, N)
        assert torch.equal(dest, ref), (r, dest, ref)
        _check_plan(dest, N, r, prot)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bsm_dtypes_and_no_protection(device, dtype):
    g = _gen(3)
    B, N, C = 2, 40, 24
    metric = torch.randn(B, N, C, generator=g).to(dtype)
    for r in (0, 7, N // 2):
        dest = T.bipartite_soft_matching(metric.to(device), r).cpu()
        assert torch.equal(dest, T.bipartite_soft_matching_reference(metric, r))
        _check_plan(dest, N, r)


def test_bsm_identical_tokens_merge_first():
    """Duplicated tokens are the most similar pairs: they are merged first."""
    g = _gen(5)
    x = torch.randn(1, 10, 16, generator=g)
    x[0, 4] = x[0, 7] * 3.0  # same direction: cosine 1
    dest = T.bipartite_soft_matching(x, 1)
    assert dest[0, 4] == dest[0, 7]


def test_bsm_r_too_large_for_protection():
    prot = torch.ones(1, 6, dtype=torch.bool)
    prot[0, 0] = False  # one mergeable A token ... but every B token is protected
    with pytest.raises(RuntimeError, match="fastadapt::bipartite_soft_matching: r = 1 exceeds"):
        T.bipartite_soft_matching(torch.randn(1, 6, 4), 1, prot)


# ---- merge / unmerge ----------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("B, N, C", [(1, 1, 1), (2, 9, 7), (3, 50, 64), (1, 101, 384)])
def test_merge_unmerge_match_float64(device, path, dtype, threads, B, N, C):
    _path_ok(device, path)
    torch.set_num_threads(threads)
    g = _gen(N + C)
    x = torch.randn(B, N, C, generator=g).to(dtype)
    sizes = torch.randint(0, 4, (B, N), generator=g).float()
    metric = torch.randn(B, N, 8, generator=g)
    r = N // 3
    dest = T.bipartite_soft_matching_reference(metric, r)
    dest[:, -1] = torch.where(torch.rand(B, generator=g) < 0.5, -1, dest[:, -1])  # dropped tokens
    with fastadapt_ops.use_cpu_isa(path):
        out, s_out = T.merge_tokens(x.to(device), dest.to(device), N - r, sizes.to(device))
        back = T.unmerge_tokens(out, dest.to(device))
        back_fill = T.unmerge_tokens(out, dest.to(device), fill=x.to(device))
    ref, s_ref = T.merge_tokens_reference(x, dest, N - r, sizes)
    assert out.dtype == dtype and out.shape == (B, N - r, C) and s_out.dtype == torch.float32
    torch.testing.assert_close(out.cpu().double(), ref.double(), rtol=_tol(dtype), atol=_tol(dtype))
    torch.testing.assert_close(s_out.cpu(), s_ref)
    # sizes are conserved by merging (dropped tokens aside)
    torch.testing.assert_close(s_out.sum(1).cpu(), (sizes * (dest >= 0)).sum(1))
    assert torch.equal(back.cpu(), T.unmerge_tokens_reference(out.cpu(), dest))
    assert torch.equal(back_fill.cpu(), T.unmerge_tokens_reference(out.cpu(), dest, fill=x))


@pytest.mark.parametrize("device", DEVICES)
def test_merge_without_sizes_and_identity(device):
    """Merging identical tokens and unmerging gives them back exactly; sizes count tokens."""
    g = _gen(11)
    B, N, C = 2, 12, 16
    base = torch.randn(B, N // 2, C, generator=g)
    x = base.repeat_interleave(2, dim=1)  # tokens 2i and 2i+1 identical
    dest = T.bipartite_soft_matching(x.to(device), N // 2)
    out, sizes = T.merge_tokens(x.to(device), dest, N // 2)
    assert torch.equal(sizes.cpu(), torch.full((B, N // 2), 2.0))
    torch.testing.assert_close(T.unmerge_tokens(out, dest).cpu(), x, rtol=1e-6, atol=1e-6)
    # r = 0: the identity plan, merge and unmerge are exact copies
    dest0 = T.bipartite_soft_matching(x.to(device), 0)
    assert torch.equal(dest0.cpu(), torch.arange(N, dtype=torch.int32).expand(B, N))
    out0, s0 = T.merge_tokens(x.to(device), dest0, N)
    assert torch.equal(out0.cpu(), x) and torch.equal(s0.cpu(), torch.ones(B, N))
    assert torch.equal(T.unmerge_tokens(out0, dest0).cpu(), x)


def test_merge_zero_size_rows_are_zero():
    x = torch.randn(1, 3, 4)
    out, s = T.merge_tokens(x, torch.tensor([[0, 0, -1]], dtype=torch.int32), 2, torch.tensor([[0.0, 0.0, 1.0]]))
    assert torch.equal(out, torch.zeros(1, 2, 4)) and torch.equal(s, torch.zeros(1, 2))


def test_unmerge_no_touch_with_sentinel_fill():
    """Rows with dest -1 take fill exactly; nothing else is written from fill."""
    x = torch.randn(2, 3, 5)
    fill = torch.full((2, 4, 5), 123.0)
    dest = torch.tensor([[0, -1, 2, 1], [-1, -1, -1, -1]], dtype=torch.int32)
    out = T.unmerge_tokens(x, dest, fill)
    assert torch.equal(out[0, 1], fill[0, 1]) and torch.equal(out[1], fill[1])
    assert torch.equal(out[0, [0, 2, 3]], x[0, [0, 2, 1]])


# ---- prune ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("B, N, C", [(1, 1, 3), (2, 13, 8), (3, 64, 40)])
def test_prune_matches_reference(device, dtype, threads, B, N, C):
    torch.set_num_threads(threads)
    g = _gen(N)
    x = torch.randn(B, N, C, generator=g).to(dtype)
    scores = torch.randn(B, N, generator=g)
    scores[:, N // 2] = float("nan")
    scores[0, 0] = scores[0, -1]  # a tie
    prot = T.protected_mask(B, N, first=True, last=True)
    for keep in sorted({int(prot[0].sum()), N // 2, N}):
        if keep < int(prot[0].sum()):
            continue
        out, kept = T.prune_tokens(x.to(device), scores.to(device), keep, prot.to(device))
        ref, kref = T.prune_tokens_reference(x, scores, keep, prot)
        assert torch.equal(kept.cpu(), kref) and torch.equal(out.cpu(), ref)
        if keep == N:  # keep = all: the identity
            assert torch.equal(out.cpu(), x)
        # revival: the pruned tokens come back from fill
        dest = T.kept_to_dest(kept, N)
        assert torch.equal(T.unmerge_tokens(out, dest, fill=x.to(device)).cpu(), x)


def test_prune_scores_helpers():
    x = torch.randn(2, 6, 4)
    norms = T.token_scores("norm", x=x)
    out, kept = T.prune_tokens(x, norms, 3)
    assert torch.equal(kept, torch.sort(norms.topk(3).indices, dim=1).values.int())
    attn = torch.softmax(torch.randn(2, 3, 6, 6), -1)
    s = T.token_scores("attention", attn=attn)
    torch.testing.assert_close(s, attn[:, :, -1].mean(1))
    with pytest.raises(ValueError, match="mode must be"):
        T.token_scores("entropy", x=x)


# ---- proportional attention --------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("B, H, Nq, Nk, D", [(1, 1, 1, 1, 1), (2, 3, 7, 7, 32), (1, 2, 19, 133, 64),
                                              (2, 1, 5, 65, 80), (1, 1, 3, 9, 256)])
def test_prop_attn_matches_float64(device, path, dtype, threads, B, H, Nq, Nk, D):
    _path_ok(device, path)
    torch.set_num_threads(threads)
    g = _gen(Nq * Nk + D)
    q = (torch.randn(B, H, Nq, D, generator=g) * 2).to(dtype)
    k = torch.randn(B, H, Nk, D, generator=g).to(dtype)
    v = torch.randn(B, H, Nk, D, generator=g).to(dtype)
    sizes = torch.randint(0, 5, (B, Nk), generator=g).float()
    sizes[:, 0] = 1.0  # at least one visible key
    for s in (sizes, None):
        with fastadapt_ops.use_cpu_isa(path):
            out = T.proportional_attention(q.to(device), k.to(device), v.to(device),
                                           None if s is None else s.to(device))
        ref = T.proportional_attention_reference(q, k, v, s)
        # twice the error of the same-precision torch computation, with a floor
        same = T.proportional_attention_reference(q.float(), k.float(), v.float(), s).to(dtype)
        err_ref = (same.double() - ref.double()).abs().max().item()
        err = (out.cpu().double() - ref.double()).abs().max().item()
        assert out.dtype == dtype and out.shape == (B, H, Nq, D)
        assert err <= max(2 * err_ref, _tol(dtype)), (err, err_ref)


@pytest.mark.parametrize("device", DEVICES)
def test_prop_attn_special_cases(device):
    g = _gen(1)
    q, k, v = (torch.randn(1, 2, 5, 16, generator=g) for _ in range(3))
    # unit sizes = plain softmax attention (= SDPA)
    out = T.proportional_attention(q.to(device), k.to(device), v.to(device), torch.ones(1, 5, device=device))
    torch.testing.assert_close(out.cpu(), torch.nn.functional.scaled_dot_product_attention(q, k, v),
                               rtol=1e-5, atol=1e-5)
    # a key of size 2 counts as two copies of itself
    k2, v2 = torch.cat([k, k[:, :, :1]], 2), torch.cat([v, v[:, :, :1]], 2)
    sizes = torch.tensor([[2.0, 1, 1, 1, 1]], device=device)
    out2 = T.proportional_attention(q.to(device), k.to(device), v.to(device), sizes, scale=0.3)
    want = torch.nn.functional.scaled_dot_product_attention(q, k2, v2, scale=0.3)
    torch.testing.assert_close(out2.cpu(), want, rtol=1e-5, atol=1e-5)
    # all keys masked: zeros, not NaN
    z = T.proportional_attention(q.to(device), k.to(device), v.to(device), torch.zeros(1, 5, device=device))
    assert torch.equal(z.cpu(), torch.zeros_like(q))


# ---- bad inputs ---------------------------------------------------------------------------------
I32 = torch.int32
BAD = [
    ("bipartite_soft_matching", (torch.randn(4, 3), 1, None), "metric must be \\[B, N, C\\]"),
    ("bipartite_soft_matching", (torch.randn(1, 4, 3).double(), 1, None), "metric must be float32"),
    ("bipartite_soft_matching", (torch.randn(1, 4, 3), 3, None), "r must be in"),
    ("bipartite_soft_matching", (torch.randn(1, 4, 3), -1, None), "r must be in"),
    ("bipartite_soft_matching", (torch.randn(1, 4, 3), 1, torch.zeros(1, 4)), "protected must be a bool"),
    ("bipartite_soft_matching", (torch.randn(1, 4, 3), 1, torch.zeros(2, 4, dtype=torch.bool)),
     "protected must be a bool"),
    ("merge_tokens", (torch.randn(1, 4, 3), torch.zeros(1, 4), 2, None), "dest must be an int32"),
    ("merge_tokens", (torch.randn(1, 4, 3), torch.zeros(1, 5, dtype=I32), 2, None), "dest must be \\[B, N\\]"),
    ("merge_tokens", (torch.randn(1, 4, 3), torch.full((1, 4), 2, dtype=I32), 2, None), "dest values must be in"),
    ("merge_tokens", (torch.randn(1, 4, 3), torch.full((1, 4), -2, dtype=I32), 2, None), "dest values must be in"),
    ("merge_tokens", (torch.randn(1, 4, 3), torch.zeros(1, 4, dtype=I32), 5, None), "num_out must be in"),
    ("merge_tokens", (torch.randn(1, 4, 3), torch.zeros(1, 4, dtype=I32), 2, torch.ones(4)), "sizes must be"),
    ("unmerge_tokens", (torch.randn(1, 2, 3), torch.full((1, 4), 2, dtype=I32), None), "dest values must be in"),
    ("unmerge_tokens", (torch.randn(1, 2, 3), torch.zeros(2, 4, dtype=I32), None), "dest must be an int32"),
    ("unmerge_tokens", (torch.randn(1, 2, 3), torch.zeros(1, 4, dtype=I32), torch.randn(1, 4, 2)), "fill must be"),
    ("unmerge_tokens", (torch.randn(1, 2, 3), torch.zeros(1, 4, dtype=I32), torch.randn(1, 4, 3).half()),
     "fill must be"),
    ("prune_tokens", (torch.randn(1, 4, 3), torch.randn(1, 5), 2, None), "scores must be"),
    ("prune_tokens", (torch.randn(1, 4, 3), torch.randn(1, 4), 5, None), "keep must be in"),
    ("prune_tokens", (torch.randn(1, 4, 3), torch.randn(1, 4), 1, torch.ones(1, 4, dtype=torch.bool)),
     "keep = 1 is smaller than the 4 protected"),
    ("prune_tokens", (torch.randn(1, 4, 3).to(torch.int32), torch.randn(1, 4), 1, None), "x must be float32"),
    ("proportional_attention", (torch.randn(1, 2, 3), torch.randn(1, 2, 3), torch.randn(1, 2, 3), None, None),
     "q must be \\[B, H, Nq, D\\]"),
    ("proportional_attention", (torch.randn(1, 1, 2, 4), torch.randn(1, 1, 3, 5), torch.randn(1, 1, 3, 5), None, None),
     "k must be"),
    ("proportional_attention", (torch.randn(1, 1, 2, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 2, 4), None, None),
     "v must have k's shape"),
    ("proportional_attention", (torch.randn(1, 1, 2, 4), torch.randn(1, 1, 3, 4).half(), torch.randn(1, 1, 3, 4),
                                None, None), "k and v must have q's dtype"),
    ("proportional_attention", (torch.randn(1, 1, 2, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4),
                                torch.ones(1, 2), None), "sizes must be"),
    ("proportional_attention", (torch.randn(1, 1, 2, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4),
                                -torch.ones(1, 3), None), "sizes must be >= 0"),
    ("proportional_attention", (torch.randn(1, 1, 2, 300), torch.randn(1, 1, 3, 300), torch.randn(1, 1, 3, 300),
                                None, None), "head dim D must be in"),
]


@pytest.mark.parametrize("op, args, match", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_inputs(op, args, match):
    with pytest.raises(RuntimeError, match=match) as e:
        getattr(torch.ops.fastadapt, op)(*args)
    assert f"fastadapt::{op}" in str(e.value)


# ---- opcheck, compile --------------------------------------------------------------------------
def test_opcheck():
    g = _gen(2)
    x = torch.randn(2, 9, 6, generator=g)
    prot = T.protected_mask(2, 9)
    dest = T.bipartite_soft_matching(x, 3, prot)
    sizes = torch.rand(2, 9, generator=g) + 0.5
    ops = torch.ops.fastadapt
    torch.library.opcheck(ops.bipartite_soft_matching.default, (x, 3, prot))
    torch.library.opcheck(ops.merge_tokens.default, (x, dest, 6, sizes))
    merged, _ = T.merge_tokens(x, dest, 6, sizes)
    torch.library.opcheck(ops.unmerge_tokens.default, (merged, dest, x))
    torch.library.opcheck(ops.prune_tokens.default, (x, torch.randn(2, 9, generator=g), 4, prot))
    q, k, v = (torch.randn(2, 3, 9, 8, generator=g) for _ in range(3))
    torch.library.opcheck(ops.proportional_attention.default, (q, k, v, sizes, None))


def test_compile_fullgraph():
    """One ToMe step (match, merge, proportional attention, unmerge) compiles without breaks."""
    g = _gen(4)
    x = torch.randn(2, 11, 16, generator=g)
    prot = T.protected_mask(2, 11)

    def step(x, prot):
        dest = T.bipartite_soft_matching(x, 4, prot)
        m, s = T.merge_tokens(x, dest, 7)
        q = m.view(2, 7, 2, 8).transpose(1, 2)
        a = T.proportional_attention(q, q, q, s)
        y = a.transpose(1, 2).reshape(2, 7, 16)
        kept, idx = T.prune_tokens(y, y.norm(dim=-1), 5)
        return T.unmerge_tokens(y, dest) * 2, kept, idx

    got = torch.compile(step, fullgraph=True)(x, prot)
    want = step(x, prot)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
