"""fastadapt::qlinear on CUDA against a float64 reference.

Every packed format, fp16 / bf16 (and fp32) activations, both kernel paths (GEMV for small M,
tensor-core GEMM above; FASTADAPT_QLINEAR_CUDA_PATH forces one), odd sizes (N prime, K not a
multiple of the 64-wide K tile, M around the tile edges), bias on and off, out=, and bad inputs.

Tolerance (FlashAttention's rule): the reference is x (already rounded to its dtype) times the
dequantized weight in float64. The kernel may be at most twice as far from it as torch's own
matmul in the activation dtype (dequantized weight cast to that dtype), plus a small floor
relative to the output's magnitude; a normalised-MSE bound backs it up.
"""
import pytest
import torch

import fastadapt_ops  # noqa: F401  (loads the extension: registers torch.ops.fastadapt)
from fastadapt_ops import ops
from fastadapt_ops.ops import qformats

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

FORMATS = ["int2", "int3", "int4", "int8", "q4_0", "q4_1", "q8_0", "q4_k", "q6_k"]
INT_FORMATS = ["int2", "int3", "int4", "int8"]
GGUF_BLOCK = {"q4_0": 32, "q4_1": 32, "q8_0": 32, "q4_k": 256, "q6_k": 256}
ACT_DTYPES = [torch.float16, torch.bfloat16]
N_PRIME = 67  # > one 64-wide GEMM tile, odd for the two-rows-per-warp GEMV
PATH_ENV = "FASTADAPT_QLINEAR_CUDA_PATH"
DEVICE = "cuda"

# Relative floor on the max error (units of max |ref|) and normalised-MSE bound, per dtype.
FLOOR = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-5}
NMSE = {torch.float16: 1e-5, torch.bfloat16: 1e-4, torch.float32: 1e-10}


def _k_for(fmt):
    # 9 chunks of 32 (4.5 GEMM K tiles) for 32-blocks; 3 super-blocks for the K-quants.
    return 768 if fmt in ("q4_k", "q6_k") else 288


def _group_for(fmt, default=32):
    return GGUF_BLOCK.get(fmt, default)


def _qlinear(*args, **kwargs):
    return ops.qlinear(*args, **kwargs)  # the typed wrapper (out= -> qlinear.out)


def _weight(fmt, N, K, group_size, scale_dtype=torch.float32, symmetric=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    qdata, scales, zeros = qformats.random_packed_weight(
        fmt, N, K, group_size, scale_dtype, symmetric, gen)
    dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return dev(qdata), dev(scales), dev(zeros)


def _dequant(qdata, scales, zeros, fmt, N, K, group_size):
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    w = qformats.dequantize(cpu(qdata), cpu(scales), cpu(zeros), fmt, (N, K), group_size)
    return torch.as_tensor(w, dtype=torch.float64)  # [N, K]


def _check(y, x, w64, bias):
    """y: kernel output [..., N]; x: activations [..., K]; w64: float64 weight [N, K]."""
    dtype = x.dtype
    assert y.dtype == dtype and y.device == x.device
    assert y.shape == (*x.shape[:-1], w64.shape[0])
    ref = x.double().cpu() @ w64.T  # x already rounded to its dtype
    base = torch.matmul(x, w64.to(device=x.device, dtype=dtype).T)
    if bias is not None:
        ref = ref + bias.double().cpu()
        base = base + bias.to(dtype)
    y64 = y.double().cpu()
    assert torch.isfinite(y64).all(), "non-finite output"
    scale = ref.abs().max().item()
    err = (y64 - ref).abs().max().item()
    base_err = (base.double().cpu() - ref).abs().max().item()
    assert err <= 2 * base_err + FLOOR[dtype] * scale, (
        f"max err {err:.3e} vs torch {dtype} matmul {base_err:.3e} (|ref| max {scale:.3e})")
    nmse = ((y64 - ref) ** 2).mean().item() / max((ref**2).mean().item(), 1e-300)
    assert nmse <= NMSE[dtype], f"normalised MSE {nmse:.3e}"


def _x(M, K, dtype, seed=1, lead=None):
    gen = torch.Generator().manual_seed(seed)
    shape = (M, K) if lead is None else (*lead, K)
    return torch.randn(shape, generator=gen).to(dtype).to(DEVICE)


def _bias(N, dtype, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(N, generator=gen).to(dtype).to(DEVICE)


# ---- every format x dtype x M x bias (automatic path) ------------------------------------------

@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("M", [1, 3, 8, 17, 64])
@pytest.mark.parametrize("dtype", ACT_DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_matches_reference(fmt, dtype, M, with_bias):
    N, K, gs = N_PRIME, _k_for(fmt), _group_for(fmt)
    qdata, scales, zeros = _weight(fmt, N, K, gs)
    w64 = _dequant(qdata, scales, zeros, fmt, N, K, gs)
    x = _x(M, K, dtype)
    bias = _bias(N, dtype) if with_bias else None
    y = _qlinear(x, qdata, scales, zeros, bias, fmt, K, gs)
    _check(y, x, w64, bias)


# ---- both kernel paths forced, including GEMM at M = 1 and GEMV over many M slabs -----------

@pytest.mark.parametrize("M", [1, 17, 64, 130])
@pytest.mark.parametrize("path", ["gemv", "gemm"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_forced_path(fmt, path, M, monkeypatch):
    monkeypatch.setenv(PATH_ENV, path)
    N, K, gs = N_PRIME, _k_for(fmt), _group_for(fmt)
    qdata, scales, zeros = _weight(fmt, N, K, gs, seed=3)
    w64 = _dequant(qdata, scales, zeros, fmt, N, K, gs)
    for dtype in ACT_DTYPES:
        x = _x(M, K, dtype, seed=4)
        bias = _bias(N, dtype)
        _check(_qlinear(x, qdata, scales, zeros, bias, fmt, K, gs), x, w64, bias)


@pytest.mark.parametrize("M", [1, 5, 8, 33])
@pytest.mark.parametrize("fmt", ["int4", "q4_1", "q6_k"])
def test_fp32_activations(fmt, M):
    # fp32 x runs the GEMV kernel at every M (no fp32 tensor-core path).
    N, K, gs = N_PRIME, _k_for(fmt), _group_for(fmt)
    qdata, scales, zeros = _weight(fmt, N, K, gs, seed=5)
    w64 = _dequant(qdata, scales, zeros, fmt, N, K, gs)
    x = _x(M, K, torch.float32)
    bias = _bias(N, torch.float32)
    _check(_qlinear(x, qdata, scales, zeros, bias, fmt, K, gs), x, w64, bias)


# ---- int formats: scale dtypes, symmetric, group sizes ------------------------------------------

@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["s32", "s16", "sbf16"])
@pytest.mark.parametrize("fmt", INT_FORMATS)
def test_int_scale_dtypes_and_symmetry(fmt, scale_dtype, symmetric):
    N, K, gs = N_PRIME, 256, 64
    qdata, scales, zeros = _weight(fmt, N, K, gs, scale_dtype=scale_dtype, symmetric=symmetric, seed=6)
    assert (zeros is None) == symmetric
    w64 = _dequant(qdata, scales, zeros, fmt, N, K, gs)
    for M in (1, 17):
        x = _x(M, K, torch.float16)
        _check(_qlinear(x, qdata, scales, zeros, None, fmt, K, gs), x, w64, None)


@pytest.mark.parametrize("group_size", [32, 64, 128, 384])  # 384 = K: per-channel
@pytest.mark.parametrize("fmt", ["int3", "int4"])
def test_int_group_sizes(fmt, group_size):
    N, K = 29, 384
    qdata, scales, zeros = _weight(fmt, N, K, group_size, seed=7)
    w64 = _dequant(qdata, scales, zeros, fmt, N, K, group_size)
    for M in (1, 4, 17):
        x = _x(M, K, torch.bfloat16)
        _check(_qlinear(x, qdata, scales, zeros, None, fmt, K, group_size), x, w64, None)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_int_codes_oracle(bits):
    # Independent of qformats.dequantize: codes packed with qformats.pack_int, weight rebuilt
    # here as scale * (code - zero).
    N, K, gs = 37, 192, 64
    gen = torch.Generator().manual_seed(8)
    codes = torch.randint(0, 2**bits, (N, K), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(N, K // gs, generator=gen) * 0.1 + 0.01).to(torch.float16)
    zeros = torch.randint(0, 2**bits, (N, K // gs), generator=gen, dtype=torch.uint8)
    qdata = qformats.pack_int(codes, bits)
    assert tuple(qdata.shape) == (N, K * bits // 8)
    w64 = scales.double().repeat_interleave(gs, 1) * (
        codes.double() - zeros.double().repeat_interleave(gs, 1))
    fmt = f"int{bits}"
    for M in (1, 8, 40):
        x = _x(M, K, torch.float16, seed=M)
        y = _qlinear(x, qdata.to(DEVICE), scales.to(DEVICE), zeros.to(DEVICE), None, fmt, K, gs)
        _check(y, x, w64, None)
    # symmetric: zero = 2^(bits-1)
    w64 = scales.double().repeat_interleave(gs, 1) * (codes.double() - 2 ** (bits - 1))
    x = _x(3, K, torch.float16)
    _check(_qlinear(x, qdata.to(DEVICE), scales.to(DEVICE), None, None, fmt, K, gs), x, w64, None)


@pytest.mark.parametrize("fmt", list(GGUF_BLOCK))
def test_gguf_blocks_oracle(fmt):
    # Independent of qformats: random llama.cpp blocks dequantized by the gguf package.
    gguf = pytest.importorskip("gguf")
    np = pytest.importorskip("numpy")
    qt = {"q4_0": gguf.GGMLQuantizationType.Q4_0, "q4_1": gguf.GGMLQuantizationType.Q4_1,
          "q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_k": gguf.GGMLQuantizationType.Q4_K,
          "q6_k": gguf.GGMLQuantizationType.Q6_K}[fmt]
    block_bytes = {"q4_0": 18, "q4_1": 20, "q8_0": 34, "q4_k": 144, "q6_k": 210}[fmt]
    half_fields = {"q4_0": [0], "q4_1": [0, 2], "q8_0": [0], "q4_k": [0, 2], "q6_k": [208]}[fmt]
    bv = GGUF_BLOCK[fmt]
    N, K = 31, 3 * bv if bv == 256 else 7 * bv  # odd block counts: both 2-byte alignments
    rng = np.random.default_rng(9)
    nb = N * K // bv
    blocks = rng.integers(0, 256, (nb, block_bytes), dtype=np.uint8)
    for off in half_fields:  # finite fp16 d / dmin / m
        d = (rng.standard_normal(nb) * 0.05).astype(np.float16)
        blocks[:, off:off + 2] = d.view(np.uint8).reshape(nb, 2)
    data = blocks.reshape(N, K // bv * block_bytes)
    w64 = torch.from_numpy(
        np.asarray(gguf.quants.dequantize(data, qt), dtype=np.float64).reshape(N, K))
    qdata = torch.from_numpy(data.copy()).to(DEVICE)
    for dtype in ACT_DTYPES:
        for M in (1, 6, 19):
            x = _x(M, K, dtype, seed=M)
            _check(_qlinear(x, qdata, None, None, None, fmt, K, bv), x, w64, None)


# ---- shapes and layouts -------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["auto", "gemv", "gemm"])
@pytest.mark.parametrize("N,K", [(1, 32), (1, 256), (64, 64), (129, 96), (2, 512)])
def test_edge_sizes(N, K, path, monkeypatch):
    monkeypatch.setenv(PATH_ENV, path)
    for fmt in ("int4", "q8_0") + (("q4_k", "q6_k") if K % 256 == 0 else ()):
        gs = _group_for(fmt)
        qdata, scales, zeros = _weight(fmt, N, K, gs, seed=10)
        w64 = _dequant(qdata, scales, zeros, fmt, N, K, gs)
        for M in (1, 2, 16, 31):
            x = _x(M, K, torch.float16)
            bias = _bias(N, torch.float16)
            _check(_qlinear(x, qdata, scales, zeros, bias, fmt, K, gs), x, w64, bias)


def test_empty_batch():
    N, K, gs = N_PRIME, 128, 32
    qdata, scales, zeros = _weight("int4", N, K, gs)
    x = torch.empty(0, K, dtype=torch.float16, device=DEVICE)
    y = _qlinear(x, qdata, scales, zeros, None, "int4", K, gs)
    assert y.shape == (0, N) and y.dtype == torch.float16


def test_leading_dims_and_strided_x():
    N, K, gs = N_PRIME, 256, 32
    qdata, scales, zeros = _weight("q4_1", N, K, 32)
    w64 = _dequant(qdata, scales, zeros, "q4_1", N, K, 32)
    x = _x(None, K, torch.bfloat16, lead=(2, 5))
    y = _qlinear(x, qdata, None, None, None, "q4_1", K, 32)
    assert y.shape == (2, 5, N)
    _check(y, x, w64, None)
    # non-contiguous rows (a column slice) and a 2-byte offset view (not 16-byte aligned)
    wide = _x(9, K + 8, torch.bfloat16)
    for xs in (wide[:, :K], wide.reshape(-1)[1:1 + 9 * K].view(9, K)):
        _check(_qlinear(xs, qdata, None, None, None, "q4_1", K, 32), xs, w64, None)
    q4, s4, z4 = _weight("int4", N, K, gs)
    w4 = _dequant(q4, s4, z4, "int4", N, K, gs)
    xt = _x(K, 20, torch.float16).t()  # [20, K], column-major
    _check(_qlinear(xt, q4, s4, z4, None, "int4", K, gs), xt, w4, None)


@pytest.mark.parametrize("dtype", ACT_DTYPES, ids=["fp16", "bf16"])
def test_fp32_bias_with_16bit_x(dtype):
    N, K, gs = N_PRIME, 256, 128
    qdata, scales, zeros = _weight("int8", N, K, gs)
    w64 = _dequant(qdata, scales, zeros, "int8", N, K, gs)
    bias = _bias(N, torch.float32)
    for M in (2, 24):
        x = _x(M, K, dtype)
        _check(_qlinear(x, qdata, scales, zeros, bias, "int8", K, gs), x, w64, bias)


def test_float64_bias_is_accepted():
    N, K, gs = N_PRIME, 256, 32
    qdata, scales, zeros = _weight("int4", N, K, gs)
    w64 = _dequant(qdata, scales, zeros, "int4", N, K, gs)
    bias = _bias(N, torch.float64)
    x = _x(5, K, torch.float16)
    _check(_qlinear(x, qdata, scales, zeros, bias, "int4", K, gs), x, w64, bias)


def test_out_variant():
    N, K, gs = N_PRIME, 288, 96
    qdata, scales, zeros = _weight("int3", N, K, gs)
    bias = _bias(N, torch.float16)
    for M in (1, 40):
        x = _x(M, K, torch.float16)
        want = torch.ops.fastadapt.qlinear(x, qdata, scales, zeros, bias, "int3", K, gs)
        out = torch.full((M, N), float("nan"), dtype=torch.float16, device=DEVICE)
        assert torch.ops.fastadapt.qlinear.out(x, qdata, scales, zeros, bias, "int3", K, gs,
                                               out=out) is None  # writes into out, returns ()
        torch.testing.assert_close(out, want, rtol=0, atol=0)
        out2 = torch.empty_like(want)
        res = _qlinear(x, qdata, scales, zeros, bias, "int3", K, gs, out=out2)
        assert res.data_ptr() == out2.data_ptr()
        torch.testing.assert_close(out2, want, rtol=0, atol=0)


def test_act_quant_int8_runs():
    # CUDA has no int8-activation kernel yet: act_quant="int8" runs the exact path, which must
    # still be within the quantized path's error of the exact reference.
    N, K, gs = N_PRIME, 256, 32
    qdata, scales, zeros = _weight("int4", N, K, gs)
    w64 = _dequant(qdata, scales, zeros, "int4", N, K, gs)
    for M in (1, 20):
        x = _x(M, K, torch.float16)
        y = _qlinear(x, qdata, scales, zeros, None, "int4", K, gs, act_quant="int8")
        ref = x.double().cpu() @ w64.T
        nmse = ((y.double().cpu() - ref) ** 2).mean() / (ref**2).mean()
        assert nmse < 1e-3


def test_non_default_stream_and_device_guard():
    N, K = N_PRIME, 256
    qdata, scales, zeros = _weight("q8_0", N, K, 32)
    w64 = _dequant(qdata, scales, zeros, "q8_0", N, K, 32)
    x = _x(17, K, torch.float16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        y = _qlinear(x, qdata, None, None, None, "q8_0", K, 32)
    torch.cuda.current_stream().wait_stream(s)
    _check(y, x, w64, None)


def test_opcheck():
    N, K, gs = 13, 128, 32
    qdata, scales, zeros = _weight("int4", N, K, gs)
    x = _x(3, K, torch.float16)
    torch.library.opcheck(torch.ops.fastadapt.qlinear.default,
                          (x, qdata, scales, zeros, None, "int4", K, gs, "none"))


# ---- bad input: a RuntimeError naming the op -----------------------------------------------------

def _good_args():
    N, K, gs = 17, 256, 32
    qdata, scales, zeros = _weight("int4", N, K, gs)
    x = _x(3, K, torch.float16)
    bias = _bias(N, torch.float16)
    return dict(x=x, qdata=qdata, scales=scales, zeros=zeros, bias=bias, fmt="int4",
                in_features=K, group_size=gs, act_quant="none")


def _call(a):
    return torch.ops.fastadapt.qlinear(a["x"], a["qdata"], a["scales"], a["zeros"], a["bias"],
                                       a["fmt"], a["in_features"], a["group_size"], a["act_quant"])


BAD_CASES = {
    "x_float64": lambda a: a.update(x=a["x"].double()),
    "x_int": lambda a: a.update(x=a["x"].to(torch.int32)),
    "x_wrong_K": lambda a: a.update(x=a["x"][:, :128].contiguous()),
    "in_features_not_mult_32": lambda a: a.update(in_features=250),
    "qdata_wrong_row_bytes": lambda a: a.update(qdata=a["qdata"][:, :-16].contiguous()),
    "qdata_int8": lambda a: a.update(qdata=a["qdata"].view(torch.int8)),
    "qdata_1d": lambda a: a.update(qdata=a["qdata"].reshape(-1)),
    "qdata_non_contiguous": lambda a: a.update(qdata=a["qdata"].t().contiguous().t()),
    "qdata_on_cpu": lambda a: a.update(qdata=a["qdata"].cpu()),
    "scales_missing": lambda a: a.update(scales=None),
    "scales_wrong_shape": lambda a: a.update(scales=a["scales"][:, :-1].contiguous()),
    "scales_int32": lambda a: a.update(scales=a["scales"].to(torch.int32)),
    "zeros_int32": lambda a: a.update(zeros=torch.zeros_like(a["scales"], dtype=torch.int32)),
    "zeros_wrong_shape": lambda a: a.update(zeros=torch.zeros(17, 3, dtype=torch.uint8, device=DEVICE)),
    "bias_wrong_shape": lambda a: a.update(bias=torch.zeros(18, dtype=torch.float16, device=DEVICE)),
    "bias_int32": lambda a: a.update(bias=a["bias"].to(torch.int32)),
    "group_size_not_dividing": lambda a: a.update(group_size=96),
    "group_size_not_mult_32": lambda a: a.update(group_size=16),
    "group_size_zero": lambda a: a.update(group_size=0),
    "unknown_fmt": lambda a: a.update(fmt="int5"),
    "unknown_act_quant": lambda a: a.update(act_quant="fp8"),
    "gguf_with_scales": lambda a: a.update(fmt="q4_0", qdata=torch.zeros(17, 8 * 18, dtype=torch.uint8, device=DEVICE)),
    "kquant_K_not_mult_256": lambda a: a.update(
        fmt="q4_k", in_features=288, x=_x(3, 288, torch.float16), scales=None, zeros=None,
        qdata=torch.zeros(17, 144, dtype=torch.uint8, device=DEVICE)),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input(case):
    a = _good_args()
    BAD_CASES[case](a)
    with pytest.raises(RuntimeError, match="qlinear"):
        _call(a)


def test_bad_out():
    a = _good_args()
    args = (a["x"], a["qdata"], a["scales"], a["zeros"], a["bias"], "int4", 256, 32, "none")
    N = a["qdata"].shape[0]
    for out in (torch.empty(3, N, dtype=torch.float32, device=DEVICE),   # dtype
                torch.empty(3, N + 1, dtype=torch.float16, device=DEVICE),  # shape
                torch.empty(N, 3, dtype=torch.float16, device=DEVICE).t(),  # layout
                torch.empty(3, N, dtype=torch.float16)):                  # device
        with pytest.raises(RuntimeError, match="qlinear"):
            torch.ops.fastadapt.qlinear.out(*args, out=out)
    # out aliasing x (N == K so the shapes agree)
    K = 256
    qdata, scales, zeros = _weight("int8", K, K, 32)
    x = _x(4, K, torch.float16)
    with pytest.raises(RuntimeError, match="qlinear"):
        torch.ops.fastadapt.qlinear.out(x, qdata, scales, zeros, None, "int8", K, 32, "none", out=x)


def test_bad_path_env(monkeypatch):
    monkeypatch.setenv(PATH_ENV, "tensorcore")
    with pytest.raises(RuntimeError, match="qlinear"):
        _call(_good_args())


@pytest.mark.slow
def test_gemv_many_grid_slabs(monkeypatch):
    # M past gridDim.y * 8 rows: the launcher splits the launch.
    monkeypatch.setenv(PATH_ENV, "gemv")
    N, K, gs = 3, 32, 32
    qdata, scales, zeros = _weight("int4", N, K, gs)
    w64 = _dequant(qdata, scales, zeros, "int4", N, K, gs)
    M = 65535 * 8 + 9
    x = _x(M, K, torch.float32)
    y = _qlinear(x, qdata, scales, zeros, None, "int4", K, gs)
    ref = x.double().cpu() @ w64.T
    assert (y.double().cpu() - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
