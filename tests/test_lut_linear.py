"""fastadapt::lut_linear (bit-plane lookup-table linear): layout, numerics, every ISA path and
thread count, the int8 activation error bound, ternary exactness, opcheck/compile, bad inputs,
and the automatic choice against qlinear."""
from __future__ import annotations

import pytest
import torch

import fastadapt_ops
from fastadapt_ops.cpu import available_cpu_isas
from fastadapt_ops.ops import lut_formats as lf
from fastadapt_ops.ops import qformats as qf
from fastadapt_ops.ops.lut_linear import lut_linear as lut_op
from fastadapt_ops.quant import QuantizedWeight, QuantLinear, linear
from fastadapt_ops.quant import lut as L

KINDS = [1, 2, 3, 4, "ternary"]


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _weight(kind, N, K, gs, gen, asym=True):
    """(LutWeight, dense float64 W) of a random weight of this kind."""
    G = K // gs
    scales = torch.rand(N, G, generator=gen) * 0.02 + 0.005
    if kind == "ternary":
        codes = torch.randint(0, 3, (N, K), generator=gen, dtype=torch.uint8)
        qw = QuantizedWeight(qf.pack_int(codes, 2), scales.half(), torch.ones(N, G, dtype=torch.uint8),
                             "int2", (N, K), gs)
        lw = L.to_lut(qw)
        assert lw.ternary
        return lw, qw.dequantize(torch.float64)
    b = kind
    codes = torch.randint(0, 1 << b, (N, K), generator=gen, dtype=torch.uint8)
    zeros = torch.randint(0, 1 << b, (N, G), generator=gen, dtype=torch.uint8) if asym else None
    lw = L.LutWeight.from_codes(codes, scales, zeros, b, gs)
    z = zeros.double() if asym else float(1 << (b - 1))
    zz = z.repeat_interleave(gs, 1) if asym else z
    w = scales.double().repeat_interleave(gs, 1) * (codes.double() - zz)
    return lw, w


def _args(lw, bias=None):
    return (lw.planes, lw.scales, lw.zoffs, bias, lw.bits, lw.out_features, lw.group_size, lw.zoff)


# ---- layout ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_pack_unpack_roundtrip(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (37, 96), generator=g, dtype=torch.uint8)
    planes = lf.pack_planes(codes, bits)
    assert planes.shape == (2, 12, bits, 32)
    torch.testing.assert_close(lf.unpack_planes(planes, bits, 37), codes, rtol=0, atol=0)
    # byte j of a unit is row ROW_OF_BYTE[j]: the low nibble of plane i over values 0..3
    j, cp, i = 5, 3, bits - 1
    r = lf.ROW_OF_BYTE[j]
    expect = sum(((int(codes[r, 8 * cp + e]) >> i) & 1) << e for e in range(4))
    assert int(planes[0, cp, i, j]) & 15 == expect
    assert sorted(lf.ROW_OF_BYTE) == list(range(32))


@pytest.mark.parametrize("fmt", ["int2", "int3", "int4"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_to_lut_is_exact(fmt, symmetric):
    from fastadapt_ops.quant import quantize_weight

    w = torch.randn(45, 128, generator=torch.Generator().manual_seed(1))
    qw = quantize_weight(w, bits=qf.FORMATS[fmt].bits, group_size=64, symmetric=symmetric)
    lw = L.to_lut(qw)
    assert lw.bits == qw.bits and (lw.zoffs is None) == symmetric
    torch.testing.assert_close(lw.dequantize(torch.float64), qw.dequantize(torch.float64), rtol=0, atol=0)


def test_ternary_detection_and_1bit():
    N, K = 8, 64
    codes = torch.randint(0, 3, (N, K), dtype=torch.uint8)
    s = torch.ones(N, 2)
    tern = QuantizedWeight(qf.pack_int(codes, 2), s, torch.ones(N, 2, dtype=torch.uint8), "int2", (N, K), 32)
    assert L.to_lut(tern).ternary and L.to_lut(tern).zoffs is None and L.to_lut(tern).zoff == 1
    codes[0, 0] = 3
    not_tern = QuantizedWeight(qf.pack_int(codes, 2), s, torch.ones(N, 2, dtype=torch.uint8), "int2", (N, K), 32)
    assert not L.to_lut(not_tern).ternary
    with pytest.raises(ValueError, match="fastadapt::lut_linear: ternary=True"):
        L.to_lut(not_tern, ternary=True)
    w = torch.randn(33, 96)
    lw = L.quantize_1bit(w, 32)
    alpha = w.abs().view(33, 3, 32).mean(-1).repeat_interleave(32, 1)
    torch.testing.assert_close(lw.dequantize(), torch.where(w >= 0, alpha, -alpha))


# ---- numerics --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("gs", [32, 64, 128, "channel"])
def test_matches_reference(kind, gs, keep_threads):
    """Every ISA path and 1 and 2 threads against the float64 reference, odd N, M in {1, 3, 17}."""
    K = 384
    gs = K if gs == "channel" else gs
    gen = torch.Generator().manual_seed(hash((str(kind), gs)) % 1000)
    for N in (37, 67):
        lw, w = _weight(kind, N, K, gs, gen, asym=(N == 37))
        bias = torch.randn(N, generator=gen)
        for M in (1, 3, 17):
            x = torch.randn(M, K, generator=gen)
            ref = lf.lut_linear_reference(x.double(), *_args(lw, bias))
            scale = ref.abs().max().item()
            for isa in available_cpu_isas():
                for threads in (1, 2):
                    torch.set_num_threads(threads)
                    with fastadapt_ops.use_cpu_isa(isa):
                        y = lut_op(x, *_args(lw, bias))
                    assert y.shape == (M, N) and y.dtype == torch.float32
                    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=2e-6 * scale,
                                               msg=lambda m: f"{isa} threads={threads} M={M} N={N}: {m}")
    assert "avx2" in available_cpu_isas() or "generic" in available_cpu_isas()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_and_leading_dims(dtype):
    gen = torch.Generator().manual_seed(3)
    lw, _ = _weight(3, 50, 256, 64, gen)
    x = torch.randn(2, 3, 256, generator=gen).to(dtype)
    y = lut_op(x, *_args(lw))
    assert y.shape == (2, 3, 50) and y.dtype == dtype
    ref = lf.lut_linear_reference(x.double(), *_args(lw))  # quantizes the same (exactly widened) x
    torch.testing.assert_close(y.double(), ref.double(), rtol=1e-2, atol=1e-2 * ref.abs().max().item())


@pytest.mark.parametrize("kind", KINDS)
def test_activation_error_bound(kind):
    """|lut_linear(x, W) - x . W^T| <= sum_g max|x_g|/254 * sum_g |W| (lut_formats docstring)."""
    gen = torch.Generator().manual_seed(5)
    K, gs = 512, 128
    lw, w = _weight(kind, 70, K, gs, gen)
    x = torch.randn(9, K, generator=gen) * torch.rand(9, K, generator=gen) * 4  # uneven magnitudes
    for isa in available_cpu_isas():
        with fastadapt_ops.use_cpu_isa(isa):
            y = lut_op(x, *_args(lw)).double()
        exact = x.double() @ w.t()
        bound = lf.activation_error_bound(x, w, gs)
        slack = 1e-5 * (x.double().abs() @ w.abs().t())  # fp32 rounding of the kernel
        assert bool(((y - exact).abs() <= bound + slack).all()), float(((y - exact).abs() - bound).max())
        assert float((y - exact).abs().max()) > 0  # the bound is not vacuous: x is not exact in int8


@pytest.mark.parametrize("kind", KINDS)
def test_exact_on_int8_activations(kind):
    """Activations already on the int8 grid (max 127 per group, so a_g = 1) and power-of-two
    scales: every step is exact, the output equals x . W^T bit for bit. Ternary included."""
    gen = torch.Generator().manual_seed(7)
    N, K, gs = 41, 256, 64
    lw, w = _weight(kind, N, K, gs, gen)
    lw.scales.copy_(torch.where(lw.scales > 0, torch.full_like(lw.scales, 0.5), lw.scales))
    w = lw.dequantize(torch.float64)
    x = torch.randint(-127, 128, (5, K), generator=gen).float()
    x.view(5, K // gs, gs)[..., 0] = 127.0
    for isa in available_cpu_isas():
        with fastadapt_ops.use_cpu_isa(isa):
            y = lut_op(x, *_args(lw))
        torch.testing.assert_close(y.double(), x.double() @ w.t(), rtol=0, atol=0)


def test_int16_accumulator_worst_case():
    """Every lookup at its maximum (|T| = 508) over long groups: the int16 spans must widen."""
    K = 2048
    for bits in (1, 4):
        codes = torch.full((32, K), (1 << bits) - 1, dtype=torch.uint8)
        lw = L.LutWeight.from_codes(codes, torch.ones(32, 1), 0, bits, K)
        x = torch.full((1, K), 3.0)
        for isa in available_cpu_isas():
            with fastadapt_ops.use_cpu_isa(isa):
                y = lut_op(x, *_args(lw))
            torch.testing.assert_close(y, x @ lw.dequantize().t(), rtol=1e-6, atol=0)


def test_zero_sizes_and_zero_groups():
    gen = torch.Generator().manual_seed(9)
    lw, w = _weight(2, 40, 128, 32, gen)
    assert lut_op(torch.randn(0, 128), *_args(lw)).shape == (0, 40)
    x = torch.randn(2, 128, generator=gen)
    x[:, 32:64] = 0  # an all-zero group: a_g = 0
    torch.testing.assert_close(lut_op(x, *_args(lw)).double(), lf.lut_linear_reference(x.double(), *_args(lw)),
                               rtol=1e-5, atol=1e-6)
    empty = L.LutWeight.from_codes(torch.zeros(0, 64, dtype=torch.uint8), torch.ones(0, 2), None, 2, 32)
    assert lut_op(torch.randn(3, 64), *_args(empty)).shape == (3, 0)


# ---- torch integration -----------------------------------------------------------------------
def test_opcheck_and_compile():
    gen = torch.Generator().manual_seed(11)
    lw, _ = _weight(2, 40, 128, 64, gen)
    x = torch.randn(3, 128, generator=gen)
    torch.library.opcheck(torch.ops.fastadapt.lut_linear.default, (x, *_args(lw, torch.randn(40))))

    def f(x):
        return L.lut_linear(x, lw) * 2

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x))


def _bad(**kw):
    lw, _ = _weight(2, 40, 128, 64, torch.Generator().manual_seed(0))
    a = dict(x=torch.randn(2, 128), planes=lw.planes, scales=lw.scales, zoffs=lw.zoffs, bias=None, bits=2,
             out_features=40, group_size=64, zoff=-1)
    a.update(kw)
    return a


@pytest.mark.parametrize("kw, match", [
    (dict(x=torch.randn(2, 128, dtype=torch.float64)), "x must be float32"),
    (dict(x=torch.randn(2, 100)), "in_features"),
    (dict(bits=5), "bits must be"),
    (dict(group_size=48), "group_size must be"),
    (dict(group_size=256), "group_size must be"),
    (dict(out_features=70), "planes must be"),
    (dict(planes=torch.zeros(2, 16, 2, 32, dtype=torch.int8)), "planes must be"),
    (dict(scales=torch.zeros(2, 2, 32, dtype=torch.float16)), "scales must be"),
    (dict(scales=torch.zeros(2, 3, 32)), "scales must be"),
    (dict(zoffs=torch.zeros(2, 2, 32, dtype=torch.uint8)), "zoffs must be"),
    (dict(bias=torch.zeros(39)), "bias must be"),
    (dict(zoff=200), "zoff must be"),
    (dict(out_features=-1), "out_features"),
])
def test_bad_inputs(kw, match):
    a = _bad(**kw)
    with pytest.raises(RuntimeError, match=match) as e:
        torch.ops.fastadapt.lut_linear(*a.values())
    assert "fastadapt::lut_linear" in str(e.value)


def test_bad_python_inputs():
    w = torch.randn(16, 64)
    from fastadapt_ops.quant import quantize_weight

    with pytest.raises(ValueError, match="fastadapt::lut_linear: qw.fmt"):
        L.to_lut(quantize_weight(w, bits=8, group_size=32))
    with pytest.raises(ValueError, match="fastadapt::lut_linear: lw must be"):
        L.lut_linear(torch.randn(2, 64), w)
    with pytest.raises(ValueError, match="fastadapt::lut_linear: group_size"):
        L.quantize_1bit(w, 48)
    with pytest.raises(ValueError, match="backend='lut'"):
        linear(torch.randn(2, 64), quantize_weight(w, bits=8, group_size=32), backend="lut")


# ---- automatic choice ------------------------------------------------------------------------
def test_dispatch_backends(monkeypatch):
    from fastadapt_ops.ops.qlinear import qlinear
    from fastadapt_ops.quant import quantize_weight

    gen = torch.Generator().manual_seed(13)
    w = torch.randn(96, 256, generator=gen)
    qw = quantize_weight(w, bits=2, group_size=64)
    x = torch.randn(1, 256, generator=gen)
    via_lut = L.lut_linear(x, L.to_lut(qw))
    via_q = qlinear(x, qw.qdata, qw.scales, qw.zeros, None, "int2", 256, 64, "int8")
    torch.testing.assert_close(linear(x, qw, act_quant="int8", backend="lut"), via_lut, rtol=0, atol=0)
    torch.testing.assert_close(linear(x, qw, act_quant="int8", backend="qlinear"), via_q, rtol=0, atol=0)
    # the LUT copy is made once per weight and redone when the weight changes in place
    lw1 = L._cached_lut(qw, lambda: qw)
    assert L._cached_lut(qw, lambda: qw) is lw1
    qw.scales.mul_(2)
    assert L._cached_lut(qw, lambda: qw) is not lw1
    # auto: the table decides where the policy allows; "never" and exact calls go to qlinear
    table = {(2, 96, 256, 1): {"lut_us": 1.0, "qlinear_us": 2.0, "qlinear_int8_us": 2.0}}
    monkeypatch.setattr(L, "_table", lambda: table)
    assert L.choose_backend(2, 100, 250, 1) == "lut" and L.choose_backend(2, 96, 256, 2) == "qlinear"
    assert L.choose_backend(3, 96, 256, 1) == "qlinear"
    torch.testing.assert_close(linear(x, qw, act_quant="int8"), L.lut_linear(x, L.to_lut(qw)), rtol=0, atol=0)
    y_exact = linear(x, qw)  # policy "int8": exact calls stay exact
    torch.testing.assert_close(y_exact, qlinear(x, qw.qdata, qw.scales, qw.zeros, None, "int2", 256, 64))
    monkeypatch.setenv("FASTADAPT_LINEAR_BACKEND", "qlinear")
    torch.testing.assert_close(linear(x, qw, act_quant="int8"), qlinear(x, qw.qdata, qw.scales, qw.zeros, None,
                                                                         "int2", 256, 64, "int8"))
    monkeypatch.delenv("FASTADAPT_LINEAR_BACKEND")
    L.set_lut_policy("always")
    try:
        torch.testing.assert_close(linear(x, qw), L.lut_linear(x, L.to_lut(qw)), rtol=0, atol=0)
        L.set_lut_policy("never")
        torch.testing.assert_close(linear(x, qw, act_quant="int8"),
                                   qlinear(x, qw.qdata, qw.scales, qw.zeros, None, "int2", 256, 64, "int8"))
    finally:
        L.set_lut_policy(None)


def test_quantlinear_lut_backend():
    lin = torch.nn.Linear(128, 50)
    m = QuantLinear.from_linear(lin, bits=3, group_size=32, act_quant="int8")
    x = torch.randn(4, 128)
    m.backend = "lut"
    y = m(x)
    torch.testing.assert_close(y, L.lut_linear(x, L.to_lut(m.qweight), m.bias), rtol=0, atol=0)
    assert "_fastadapt_lut_cache" not in m.state_dict()
    m.backend = "qlinear"
    torch.testing.assert_close(y, m(x), rtol=0.05, atol=0.05 * y.abs().max().item())


def test_measured_table_is_well_formed():
    from fastadapt_ops.quant import lut_table

    for (bits, N, K, M), v in lut_table.TABLE.items():
        assert bits in (1, 2, 3, 4) and N > 0 and K > 0 and M > 0
        assert v["lut_us"] > 0 and v["qlinear_us"] > 0
    if lut_table.TABLE:
        assert lut_table.COMMAND.startswith("python bench/run.py lut_linear")


# ---- CUDA (compared with the CPU op) ---------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_cpu(kind, dtype):
    gen = torch.Generator().manual_seed(17)
    for gs, K in ((32, 256), (128, 512), (4096, 4096)):
        lw, _ = _weight(kind, 67, K, gs, gen)
        bias = torch.randn(67, generator=gen)
        for M in (1, 3, 17):
            x = torch.randn(M, K, generator=gen).to(dtype)
            want = lut_op(x, *_args(lw, bias.to(dtype)))
            lc = lw.to("cuda")
            got = lut_op(x.cuda(), *_args(lc, bias.to(dtype).cuda()))
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            torch.testing.assert_close(got.cpu().double(), want.double(), rtol=tol,
                                       atol=tol * want.abs().max().item())


def test_model_runner_decodes_through_lut(tmp_path, monkeypatch):
    """The runner's quantized matmuls go through the LUT hook: forced to lut_linear here (prefill
    included), the decode logits stay close to the qlinear int8 path."""
    pytest.importorskip("transformers")
    pytest.importorskip("safetensors.torch")
    from test_hf_loader import _ids, make_hf_model, save_hf

    from fastadapt_ops.models import load

    path = save_hf(make_hf_model("llama", seed=4), tmp_path / "m")
    logits = {}
    for backend in ("qlinear", "lut"):
        monkeypatch.setenv("FASTADAPT_LINEAR_BACKEND", backend)
        model = load(path, quantize="int4", group_size=32)
        model.act_quant = "int8"
        model.prefill(_ids(8))
        logits[backend] = model.decode_one(5)
        used = [w for w in (model.layers[0].wqkv, model.layers[0].wdown) if L._CACHE_ATTR in w.__dict__]
        assert bool(used) == (backend == "lut")
    a, b = logits["lut"].double(), logits["qlinear"].double()
    assert float((a - b).abs().max()) <= 0.05 * float(b.abs().max())
