"""Null-expert MoE routing (fastadapt::moe_route, moe_grouped_qlinear, moe_combine) and the
NullExpertMoE layer: against float64 references on CPU (every ISA path, several thread counts)
and, where a GPU is present, CUDA against the CPU op."""
from __future__ import annotations

import pytest
import torch

import fastadapt_ops
from fastadapt_ops.cpu import available_cpu_isas
from fastadapt_ops.moe import NullExpertMoE, stack_quantized
from fastadapt_ops.ops import moe_combine, moe_grouped_qlinear, moe_route
from fastadapt_ops.ops.moe import moe_combine_reference, moe_grouped_qlinear_reference, moe_route_reference

PATHS = ["generic", "avx2"]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _path(path):
    if path not in available_cpu_isas():
        pytest.skip(f"this CPU cannot run the {path} path")


def _tol(dtype):
    return {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]


# ---- routing ----------------------------------------------------------------------------------
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("T,E,num_null,k", [(1, 1, 0, 1), (7, 5, 3, 2), (33, 8, 1, 3), (64, 4, 4, 4),
                                            (5, 3, 0, 3)])
@pytest.mark.parametrize("renorm", [True, False])
def test_route_matches_reference(path, threads, T, E, num_null, k, renorm):
    _path(path)
    torch.set_num_threads(threads)
    logits = torch.randn(T, E + num_null, generator=torch.Generator().manual_seed(T * 31 + E))
    with fastadapt_ops.use_cpu_isa(path):
        got = moe_route(logits, k, num_null, renorm)
    want = moe_route_reference(logits, k, num_null, renorm)
    for name, g, w in zip(("token_ids", "offsets", "row_weights", "topk_ids", "topk_rows"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        if g.is_floating_point():
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert torch.equal(g, w), name
    ids, offs, rw, tid, rows = got
    if renorm:  # AdaMoE: the real choices' weights sum to 1 (0 when a token chose only nulls)
        s = torch.zeros(T).index_add_(0, ids[:int(offs[-1])].long(), rw[:int(offs[-1])])
        has_real = (tid < E).any(-1)
        torch.testing.assert_close(s, has_real.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_route_16bit_logits_and_ties(dtype):
    logits = torch.zeros(3, 6, dtype=dtype)  # all tied: lower index first
    ids, offs, rw, tid, rows = moe_route(logits, 2, 2)
    assert tid.tolist() == [[0, 1]] * 3 and offs.tolist() == [0, 3, 6, 6, 6]
    torch.testing.assert_close(rw[:6], torch.full((6,), 0.5))


def test_null_experts_get_no_rows():
    logits = torch.randn(10, 6)
    logits[:, 4:] += 100.0  # every token's top-2 are the two null experts
    ids, offs, rw, tid, rows = moe_route(logits, 2, 2)
    assert int(offs[-1]) == 0 and (rows == -1).all() and (ids == -1).all() and (rw == 0).all()


# ---- grouped quantized matmul ------------------------------------------------------------------
def _experts(E, N, K, fmt, seed=0, gs=32):
    g = torch.Generator().manual_seed(seed)
    return stack_quantized([torch.randn(N, K, generator=g) * 0.1 for _ in range(E)], fmt, gs)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("fmt", ["int4", "int3", "q4_1", "q8_0"])
@pytest.mark.parametrize("T,E,N,K,k,num_null", [(1, 4, 19, 64, 2, 1), (13, 3, 40, 96, 2, 2),
                                                (40, 5, 67, 128, 3, 0)])
def test_grouped_qlinear_matches_float64(path, threads, fmt, T, E, N, K, k, num_null):
    _path(path)
    torch.set_num_threads(threads)
    qd, sc, zp, gs = _experts(E, N, K, fmt, seed=E + N)
    x = torch.randn(T, K)
    ids, offs, rw, tid, rows = moe_route(torch.randn(T, E + num_null), k, num_null)
    with fastadapt_ops.use_cpu_isa(path):
        y = moe_grouped_qlinear(x, qd, sc, zp, fmt, K, gs, offs, ids)
        out = moe_combine(y, rw, rows)
    ref = moe_grouped_qlinear_reference(x, qd, sc, zp, fmt, K, gs, offs, ids)
    assert y.shape == (T * k, N) and y.dtype == x.dtype
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)
    assert (y[int(offs[-1]):] == 0).all()  # padding rows stay 0
    torch.testing.assert_close(out.double(), moe_combine_reference(ref, rw, rows), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_grouped_qlinear_dtypes_and_pregrouped(dtype):
    E, N, K, T = 3, 24, 64, 9
    qd, sc, zp, gs = _experts(E, N, K, "int4")
    x = torch.randn(T, K).to(dtype)
    ids, offs, rw, tid, rows = moe_route(torch.randn(T, E), 2, 0)
    y = moe_grouped_qlinear(x, qd, sc, zp, "int4", K, gs, offs, ids)
    ref = moe_grouped_qlinear_reference(x, qd, sc, zp, "int4", K, gs, offs, ids)
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), ref, rtol=_tol(dtype), atol=_tol(dtype))
    xg = x[ids.clamp_min(0).long()]  # already grouped: no token_ids
    torch.testing.assert_close(moe_grouped_qlinear(xg, qd, sc, zp, "int4", K, gs, offs), y)
    out = moe_combine(y, rw, rows)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), moe_combine_reference(y, rw, rows), rtol=_tol(dtype),
                               atol=_tol(dtype))


# ---- the layer ----------------------------------------------------------------------------------
def _layer(H=64, F=96, E=4, num_null=2, k=2, fmt="int4", seed=0):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(E + num_null, H, generator=g) * 0.3
    wg, wu = torch.randn(E, F, H, generator=g) * 0.1, torch.randn(E, F, H, generator=g) * 0.1
    wd = torch.randn(E, H, F, generator=g) * 0.1
    return NullExpertMoE.from_float(r, wg, wu, wd, num_null=num_null, top_k=k, fmt=fmt, group_size=32)


def _layer_reference(m: NullExpertMoE, x):
    """float64 MoE with the layer's dequantized experts, routing by plain softmax/top-k."""
    from fastadapt_ops.ops import qformats as qf

    x2 = x.reshape(-1, m.hidden).double()
    E, k = m.num_experts, m.top_k
    p = torch.softmax(x.reshape(-1, m.hidden).float() @ m.router.T, -1).double()
    top = torch.sort(x.reshape(-1, m.hidden).float() @ m.router.T, dim=-1, descending=True, stable=True).indices[:, :k]
    out = torch.zeros_like(x2)
    for t in range(x2.shape[0]):
        real = [int(e) for e in top[t] if int(e) < E]
        s = sum(float(p[t, e]) for e in real)
        for e in real:
            gu = qf.dequantize(m.gu_qdata[e], m.gu_scales[e], m.gu_zeros[e], m.fmt, (2 * m.ffn, m.hidden),
                               m.gu_group_size) @ x2[t]
            a = torch.nn.functional.silu(gu[:m.ffn]) * gu[m.ffn:]
            y = qf.dequantize(m.down_qdata[e], m.down_scales[e], m.down_zeros[e], m.fmt, (m.hidden, m.ffn),
                              m.down_group_size) @ a
            out[t] += float(p[t, e]) / s * y
    return out.reshape(x.shape)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("T", [1, 6, 23])
def test_null_expert_moe_matches_float64(path, T):
    _path(path)
    m = _layer()
    x = torch.randn(T, 64)
    with fastadapt_ops.use_cpu_isa(path):
        y = m(x)
    torch.testing.assert_close(y.double(), _layer_reference(m, x), rtol=1e-4, atol=1e-4)
    assert 0.0 <= m.last_null_fraction <= 1.0


def test_all_null_routing_costs_nothing_and_outputs_zero():
    m = _layer()
    with torch.no_grad():  # positive inputs, null rows of ones: the null experts always win
        m.router[:m.num_experts] = 0.0
        m.router[m.num_experts:] = 1.0
    y = m(torch.rand(5, 64) + 0.5)
    assert m.last_null_fraction == 1.0 and (y == 0).all()


def test_bad_layer_shapes():
    with pytest.raises(ValueError, match="router must be"):
        NullExpertMoE.from_float(torch.randn(3, 64), torch.randn(4, 8, 64), torch.randn(4, 8, 64),
                                 torch.randn(4, 64, 8), num_null=1, top_k=1)


# ---- opcheck, compile, bad inputs ---------------------------------------------------------------
def test_opcheck_and_compile():
    E, N, K, T = 3, 32, 64, 5
    qd, sc, zp, gs = _experts(E, N, K, "int4")
    logits, x = torch.randn(T, E + 1), torch.randn(T, K)
    ids, offs, rw, tid, rows = moe_route(logits, 2, 1)
    torch.library.opcheck(torch.ops.fastadapt.moe_route.default, (logits, 2, 1, True))
    torch.library.opcheck(torch.ops.fastadapt.moe_grouped_qlinear.default,
                          (x, qd, sc, zp, "int4", K, gs, offs, ids))
    y = moe_grouped_qlinear(x, qd, sc, zp, "int4", K, gs, offs, ids)
    torch.library.opcheck(torch.ops.fastadapt.moe_combine.default, (y, rw, rows))

    m = _layer()
    xx = torch.randn(7, 64)
    torch.testing.assert_close(torch.compile(m.forward, fullgraph=True)(xx), m(xx))


def _bad_grouped_cases():
    E, N, K = 2, 16, 64
    qd, sc, zp, gs = _experts(E, N, K, "int4")
    x = torch.randn(4, K)
    offs = torch.tensor([0, 2, 4], dtype=torch.int32)
    ids = torch.tensor([0, 1, 2, 3], dtype=torch.int32)
    return [
        ((x, qd[0], sc, zp, "int4", K, gs, offs, ids), "qdata must be uint8 \\[E"),
        ((x, qd, sc, zp, "int4", K, gs, offs[:2], ids), "expert_offsets must be int32"),
        ((x, qd, sc, zp, "int4", K, gs, offs.long(), ids), "expert_offsets must be int32"),
        ((x, qd, sc, zp, "int4", K, gs, torch.tensor([0, 3, 2], dtype=torch.int32), ids), "non-decreasing"),
        ((x, qd, sc, zp, "int4", K, gs, torch.tensor([1, 2, 4], dtype=torch.int32), ids), "offsets\\[0\\]"),
        ((x, qd, sc, zp, "int4", K, gs, torch.tensor([0, 2, 5], dtype=torch.int32), ids), "exceeds"),
        ((x, qd, sc, zp, "int4", K, gs, offs, torch.tensor([0, 1, 2, 9], dtype=torch.int32)), "out of range"),
        ((x, qd, sc, zp, "int4", K, gs, offs, ids.long()), "token_ids must be a 1-D int32"),
        ((x[:, :32], qd, sc, zp, "int4", K, gs, offs, ids), "in_features"),
        ((x.double(), qd, sc, zp, "int4", K, gs, offs, ids), "x must be float32"),
        ((x, qd, sc[:1], zp, "int4", K, gs, offs, ids), "scales and zeros must be"),
        ((x, qd, sc, zp, "int5", K, gs, offs, ids), "unknown fmt"),
    ]


@pytest.mark.parametrize("case", range(12))
def test_bad_grouped_inputs(case):
    args, match = _bad_grouped_cases()[case]
    with pytest.raises(RuntimeError, match=match) as e:
        torch.ops.fastadapt.moe_grouped_qlinear(*args)
    assert "fastadapt::moe_grouped_qlinear" in str(e.value)


@pytest.mark.parametrize("args, match", [
    ((torch.randn(4, 6), 0, 1, True), "top_k must be"),
    ((torch.randn(4, 6), 7, 1, True), "top_k must be"),
    ((torch.randn(4, 6), 2, -1, True), "num_null must be"),
    ((torch.randn(4, 6), 2, 6, True), "at least one real expert"),
    ((torch.randn(6), 2, 1, True), "logits must be \\[T"),
    ((torch.randint(0, 3, (4, 6)), 2, 1, True), "logits must be float32"),
])
def test_bad_route_inputs(args, match):
    with pytest.raises(RuntimeError, match=match) as e:
        torch.ops.fastadapt.moe_route(*args)
    assert "fastadapt::moe_route" in str(e.value)


@pytest.mark.parametrize("args, match", [
    ((torch.randn(4, 8), torch.randn(3), torch.zeros(2, 2, dtype=torch.int32)), "row_weights must be"),
    ((torch.randn(4, 8), torch.randn(4).double(), torch.zeros(2, 2, dtype=torch.int32)), "row_weights must be"),
    ((torch.randn(4, 8), torch.randn(4), torch.zeros(2, 2)), "topk_rows must be int32"),
    ((torch.randn(4, 8), torch.randn(4), torch.full((2, 2), 4, dtype=torch.int32)), "out of range"),
    ((torch.randn(4, 8), torch.randn(4), torch.full((2, 2), -2, dtype=torch.int32)), "out of range"),
    ((torch.randn(8), torch.randn(8), torch.zeros(2, 2, dtype=torch.int32)), "y must be a 2-D"),
])
def test_bad_combine_inputs(args, match):
    with pytest.raises(RuntimeError, match=match) as e:
        torch.ops.fastadapt.moe_combine(*args)
    assert "fastadapt::moe_combine" in str(e.value)


# ---- CUDA against the CPU op -------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", ["int4", "q4_1", "q8_0"])
def test_cuda_matches_cpu(dtype, fmt):
    E, N, K, T, k, nn = 4, 64, 128, 37, 2, 2
    qd, sc, zp, gs = _experts(E, N, K, fmt)
    logits, x = torch.randn(T, E + nn), torch.randn(T, K).to(dtype)
    cpu = moe_route(logits, k, nn)
    gpu = moe_route(logits.cuda(), k, nn)
    for c, g in zip(cpu, gpu):
        if c.is_floating_point():
            torch.testing.assert_close(g.cpu(), c, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(g.cpu(), c)
    ids, offs, rw, tid, rows = cpu
    cu = lambda t: None if t is None else t.cuda()  # noqa: E731
    y_c = moe_grouped_qlinear(x, qd, sc, zp, fmt, K, gs, offs, ids)
    y_g = moe_grouped_qlinear(x.cuda(), qd.cuda(), cu(sc), cu(zp), fmt, K, gs, offs.cuda(), ids.cuda())
    torch.testing.assert_close(y_g.cpu().double(), y_c.double(), rtol=2 * _tol(dtype), atol=2 * _tol(dtype))
    o_c = moe_combine(y_c, rw, rows)
    o_g = moe_combine(y_c.cuda(), rw.cuda(), rows.cuda())
    torch.testing.assert_close(o_g.cpu().double(), o_c.double(), rtol=_tol(dtype), atol=_tol(dtype))
