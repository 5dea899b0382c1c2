"""fastadapt::qlinear on CPU: every format, every ISA path, odd shapes, against float64."""
from __future__ import annotations

import pytest
import torch

import fastadapt_ops
from fastadapt_ops.cpu import available_cpu_isas
from fastadapt_ops.ops import qformats as qf
from fastadapt_ops.ops import qlinear
from fastadapt_ops.ops.reference import qlinear_reference

CPU_PATHS = ["generic", "avx2"]
INT_FORMATS = ["int2", "int3", "int4", "int8"]
GGUF_FORMATS = ["q4_0", "q4_1", "q8_0", "q4_k", "q6_k"]


def _use_path(path: str):
    if path not in available_cpu_isas():
        pytest.skip(f"this CPU cannot run the {path} path")  # never the case on CI's machine
    return fastadapt_ops.use_cpu_isa(path)


def _weight(fmt, N, K, gs=None, scale_dtype=torch.float16, symmetric=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if fmt in GGUF_FORMATS:
        qd, s, z = qf.random_packed_weight(fmt, N, K, generator=g)
        return qd, s, z, qf.FORMATS[fmt].block_values
    qd, s, z = qf.random_packed_weight(fmt, N, K, group_size=gs, scale_dtype=scale_dtype,
                                       symmetric=symmetric, generator=g)
    return qd, s, z, gs


def _check(y, x, qd, s, z, bias, fmt, K, gs, act_quant="none"):
    """Kernel error against float64 must stay within 4x (+ a hair) the error of the same product
    computed by torch in fp32 from the exact dequantized weight (FlashAttention's rule)."""
    ref = qlinear_reference(x, qd, s, z, bias, fmt, K, gs, act_quant, return_float64=True)
    if act_quant == "int8":
        from fastadapt_ops.ops.reference import quantize_activations_int8
        xq, sx = quantize_activations_int8(x.reshape(-1, K))
        xeff = (xq.double() * sx.double()[:, None]).float()
    else:
        xeff = x.reshape(-1, K).float()
    w32 = qf.dequantize(qd, s, z, fmt, (qd.shape[0], K), gs).float()
    same_precision = xeff @ w32.t() + (bias.float() if bias is not None else 0)
    ref2 = ref.reshape(-1, qd.shape[0])
    torch_err = (same_precision.double() - ref2).abs().max().item()
    scale = ref2.abs().max().item() + 1e-30
    out_round = 0.0 if y.dtype == torch.float32 else 2.0 ** -8 * scale  # bf16/fp16 output
    err = (y.double().reshape(ref2.shape) - ref2).abs().max().item()
    # fp32 summation error grows with sum |x_k w_k| (not |y|): a few ulps of it on top. A wrong
    # decode, scale or offset gives errors of the order of |y| itself.
    abs_sum = (xeff.abs().double() @ w32.abs().double().t()).max().item()
    tol = 4 * torch_err + out_round + 2.0 ** -20 * abs_sum
    assert err <= tol, f"max error {err:.3g} > tol {tol:.3g} (torch fp32 error {torch_err:.3g})"


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("fmt", INT_FORMATS)
@pytest.mark.parametrize("M", [1, 3, 8, 9, 17])
def test_int_formats(path, fmt, M):
    N, K = 37, 256
    for gs, sym, sdt in [(32, False, torch.float16), (64, True, torch.bfloat16),
                         (128, False, torch.float32), (K, False, torch.float16)]:
        qd, s, z, gs = _weight(fmt, N, K, gs, sdt, sym, seed=M + gs)
        x = torch.randn(M, K)
        bias = torch.randn(N) if gs == 64 else None
        with _use_path(path):
            y = qlinear(x, qd, s, z, bias, fmt, K, gs)
        _check(y, x, qd, s, z, bias, fmt, K, gs)


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("fmt", GGUF_FORMATS)
@pytest.mark.parametrize("M", [1, 2, 5, 12])
def test_gguf_formats(path, fmt, M):
    bv = qf.FORMATS[fmt].block_values
    for N, K in [(1, bv), (13, 2 * bv), (41, 5 * 32 if bv == 32 else 3 * bv)]:
        qd, s, z, gs = _weight(fmt, N, K, seed=N + M)
        x = torch.randn(M, K)
        with _use_path(path):
            y = qlinear(x, qd, None, None, None, fmt, K, 0)
        _check(y, x, qd, s, z, None, fmt, K, gs)


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("fmt", ["int2", "int3", "int4", "int8", "q4_0", "q4_1", "q8_0", "q4_k", "q6_k"])
@pytest.mark.parametrize("M", [1, 4, 11])
def test_int8_activations(path, fmt, M):
    K = 512
    N = 29
    qd, s, z, gs = _weight(fmt, N, K, 128, seed=M)
    x = torch.randn(M, K)
    bias = torch.randn(N)
    with _use_path(path):
        y = qlinear(x, qd, s, z, bias, fmt, K, gs, "int8")
    _check(y, x, qd, s, z, bias, fmt, K, gs, "int8")


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_activations(path, dtype):
    fmt, N, K, gs = "int4", 67, 384, 128
    qd, s, z, gs = _weight(fmt, N, K, gs)
    for M in (1, 6, 20):
        x = torch.randn(2, M, K).to(dtype)  # leading dims are kept
        with _use_path(path):
            y = qlinear(x, qd, s, z, None, fmt, K, gs)
        assert y.dtype == dtype and y.shape == (2, M, N)
        _check(y, x, qd, s, z, None, fmt, K, gs)


def test_paths_agree_and_threads_do_not_change_results():
    """gemm (M > 8), gemv and the portable path compute the same function; the split of rows
    over threads never changes a result bit."""
    fmt, N, K, gs = "q4_1", 150, 2048 + 512, 32
    qd, s, z, gs = _weight(fmt, N, K)
    x = torch.randn(40, K)
    outs = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        with _use_path("avx2"):
            outs[threads] = qlinear(x, qd, None, None, None, fmt, K, gs)
    assert torch.equal(outs[1], outs[2])
    _check(outs[1], x, qd, s, z, None, fmt, K, gs)  # K > 2048 exercises the K-blocked panel


def test_out_variant_and_empty():
    qd, s, z, gs = _weight("int4", 10, 64, 32)
    x = torch.randn(3, 64)
    out = torch.full((3, 10), float("nan"))
    r = qlinear(x, qd, s, z, None, "int4", 64, gs, out=out)
    assert r.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, qlinear(x, qd, s, z, None, "int4", 64, gs))
    assert qlinear(torch.randn(0, 64), qd, s, z, None, "int4", 64, gs).shape == (0, 10)
    outb = torch.empty(3, 10, dtype=torch.bfloat16)
    qlinear(x.bfloat16(), qd, s, z, None, "int4", 64, gs, out=outb)
    torch.testing.assert_close(outb, qlinear(x.bfloat16(), qd, s, z, None, "int4", 64, gs))


def test_real_smollm2_q4_1_and_q8_0_through_the_op(smollm2_reader):
    import gguf
    tensors = {t.name: t for t in smollm2_reader.tensors}
    for name, rows in [("blk.0.ffn_down.weight", 576), ("token_embd.weight", 64)]:
        t = tensors[name]
        data = torch.from_numpy(t.data[:rows].copy())
        fmt = t.tensor_type.name.lower()
        K = int(t.shape[0])
        w = torch.from_numpy(gguf.quants.dequantize(t.data[:rows], t.tensor_type)).double()
        x = torch.randn(3, K)
        y = qlinear(x, data, None, None, None, fmt, K, 0)
        ref = x.double() @ w.t()
        assert (y.double() - ref).abs().max() <= 1e-4 * ref.abs().max()


# ---- bad input: a clear RuntimeError naming the op and the argument --------------------------
def _good():
    qd, s, z, gs = _weight("int4", 8, 64, 32)
    return dict(x=torch.randn(2, 64), qdata=qd, scales=s, zeros=z, bias=None, fmt="int4",
                in_features=64, group_size=32)


@pytest.mark.parametrize("change, match", [
    (dict(fmt="int5"), "unknown fmt"),
    (dict(x=torch.randn(2, 63)), "in_features=64"),
    (dict(x=torch.randn(2, 64, dtype=torch.float64)), "x must be float32"),
    (dict(x=torch.randint(0, 3, (2, 64))), "x must be float32"),
    (dict(in_features=48, x=torch.randn(2, 48)), "multiple of 32"),
    (dict(group_size=48), "group_size"),
    (dict(group_size=0), "group_size"),
    (dict(qdata=torch.zeros(8, 33, dtype=torch.uint8)), "bytes per row"),
    (dict(qdata=torch.zeros(8, 32, dtype=torch.int8)), "qdata must be a 2-D uint8"),
    (dict(scales=None), "needs scales"),
    (dict(scales=torch.ones(8, 3)), "scales must have shape"),
    (dict(scales=torch.ones(8, 2, dtype=torch.int32)), "scales must be float32"),
    (dict(zeros=torch.zeros(8, 2, dtype=torch.int32)), "zeros must be uint8"),
    (dict(zeros=torch.zeros(7, 2, dtype=torch.uint8)), "zeros must be uint8"),
    (dict(bias=torch.ones(9)), "bias must be"),
    (dict(fmt="q4_0", scales=None, zeros=None, group_size=0,
          qdata=torch.zeros(8, 36, dtype=torch.uint8)), None),  # valid GGUF call
    (dict(fmt="q4_0", group_size=0, qdata=torch.zeros(8, 36, dtype=torch.uint8)), "scales=None"),
    (dict(fmt="q4_k", scales=None, zeros=None, group_size=0,
          qdata=torch.zeros(8, 36, dtype=torch.uint8)), "multiple of 256"),
])
def test_bad_inputs(change, match):
    args = {**_good(), **change}
    call = lambda: torch.ops.fastadapt.qlinear(*args.values())  # noqa: E731
    if match is None:
        call()
        return
    with pytest.raises(RuntimeError, match=match) as e:
        call()
    assert "fastadapt::qlinear" in str(e.value)


def test_bad_act_quant_and_out():
    a = _good()
    with pytest.raises(RuntimeError, match="act_quant"):
        torch.ops.fastadapt.qlinear(*a.values(), "int4")
    with pytest.raises(RuntimeError, match="out must have shape"):
        qlinear(*a.values(), out=torch.empty(2, 9))
    with pytest.raises(RuntimeError, match="out must have x's dtype"):
        qlinear(*a.values(), out=torch.empty(2, 8, dtype=torch.bfloat16))


def test_force_unknown_path():
    with pytest.raises(ValueError, match="avx9"):
        fastadapt_ops.force_cpu_isa("avx9")


# ---- torch.library contracts -----------------------------------------------------------------
def test_opcheck():
    a = _good()
    args = tuple(a.values())
    torch.library.opcheck(torch.ops.fastadapt.qlinear.default, args + ("none",))
    torch.library.opcheck(torch.ops.fastadapt.qlinear.default, args + ("int8",))
    torch.library.opcheck(torch.ops.fastadapt.qlinear.out, args + ("none",),
                          {"out": torch.empty(2, 8)})


def test_torch_compile_fullgraph_and_export():
    a = _good()

    def f(x):
        return torch.relu(qlinear(x, a["qdata"], a["scales"], a["zeros"], None, "int4", 64, 32))

    x = torch.randn(5, 64)
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x))

    class M(torch.nn.Module):
        def forward(self, x):
            return f(x)

    ep = torch.export.export(M(), (x,))
    assert any("fastadapt.qlinear" in str(n.target) for n in ep.graph.nodes)
    torch.testing.assert_close(ep.module()(x), f(x))


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("fmt, K, gs", [("int4", 96, 96), ("int4", 96, 32), ("int4", 160, 32),
                                        ("int4", 192, 64), ("q4_0", 96, 0), ("q4_1", 160, 0),
                                        ("q8_0", 96, 0), ("int3", 96, 96), ("int2", 160, 32)])
def test_int8_activations_odd_chunk_counts(path, fmt, K, gs):
    """Kernels that step two 32-value chunks at a time must handle a lone last chunk and groups
    of an odd number of chunks."""
    N = 23
    qd, s, z, gs = _weight(fmt, N, K, gs or None, seed=K)
    for M in (1, 5):
        x = torch.randn(M, K)
        with _use_path(path):
            y = qlinear(x, qd, s, z, None, fmt, K, gs, "int8")
        _check(y, x, qd, s, z, None, fmt, K, gs, "int8")


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("act_quant", ["none", "int8"])
@pytest.mark.parametrize("fmt, M", [("int4", 1), ("int3", 5), ("q4_1", 12), ("q6_k", 3), ("int8", 20)])
def test_out_writes_nothing_outside(path, act_quant, fmt, M):
    """out is a window of a NaN-filled buffer: the kernel must leave the sentinels around it."""
    K = 256
    N = 19
    qd, s, z, gs = _weight(fmt, N, K, 64)
    x = torch.randn(M, K)
    big = torch.full((M * N + 64,), float("nan"))
    out = big[32:32 + M * N].view(M, N)
    with _use_path(path):
        qlinear(x, qd, s, z, None, fmt, K, gs, act_quant, out=out)
        fresh = qlinear(x, qd, s, z, None, fmt, K, gs, act_quant)  # same path: same bits
    assert torch.isnan(big[:32]).all() and torch.isnan(big[-32:]).all()
    assert not torch.isnan(out).any()
    assert torch.equal(out, fresh)
