"""Weight quantizers: fastadapt_ops.quant.quantize_weight and QuantizedWeight."""

import numpy as np
import pytest
import torch

from fastadapt_ops.ops import qformats as qf
from fastadapt_ops.quant import QuantizedWeight, quantize_weight


def _w(N=48, K=256, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, K, generator=g).to(dtype)


def _group_view(t, gs):
    N, K = t.shape
    return t.reshape(N, K // gs, gs)


# ---- round to nearest ----------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [32, 128, -1, None])
def test_rtn_error_bound(bits, symmetric, group_size):
    w = _w()
    qw = quantize_weight(w, bits=bits, group_size=group_size, symmetric=symmetric)
    gs = w.shape[1] if group_size in (-1, None) else group_size
    assert qw.fmt == f"int{bits}" and qw.group_size == gs and qw.symmetric == symmetric
    assert qw.shape == tuple(w.shape) and qw.bits == bits
    assert (qw.zeros is None) == symmetric
    assert qw.scales.dtype == torch.float16 and tuple(qw.scales.shape) == (w.shape[0], w.shape[1] // gs)
    assert (qw.scales > 0).all()
    d = qw.dequantize(torch.float64)
    err = _group_view((d - w.double()).abs(), gs).amax(-1)  # [N, G]
    bound = 0.5 * qw.scales.double()
    assert (err <= bound * (1 + 1e-5) + 1e-7).all()
    # the scale is no coarser than needed: the group's range spans the code range
    wg = _group_view(w.double(), gs)
    maxq = (1 << bits) - 1
    if symmetric:
        ideal = 2 * wg.abs().amax(-1) / maxq
    else:
        ideal = (wg.amax(-1).clamp(min=0) - wg.amin(-1).clamp(max=0)) / maxq
    assert (qw.scales.double() >= ideal).all()
    assert (qw.scales.double() <= ideal * (1 + 2 ** -9)).all()


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_scale_dtypes(scale_dtype):
    w = _w(16, 128)
    qw = quantize_weight(w, bits=4, group_size=64, scale_dtype=scale_dtype)
    assert qw.scales.dtype == scale_dtype
    err = _group_view((qw.dequantize(torch.float64) - w.double()).abs(), 64).amax(-1)
    assert (err <= 0.5 * qw.scales.double() * (1 + 1e-5) + 1e-7).all()


@pytest.mark.parametrize("wdtype", [torch.float16, torch.bfloat16, torch.float64])
def test_weight_dtypes(wdtype):
    w = _w(8, 64, dtype=wdtype)
    qw = quantize_weight(w, bits=8, group_size=32)
    rel = (qw.dequantize(torch.float64) - w.double()).norm() / w.double().norm()
    assert rel < 0.01


def test_error_decreases_with_bits():
    w = _w()
    errs = [((quantize_weight(w, bits=b).dequantize() - w) ** 2).mean().item() for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True)
    assert errs[3] < errs[2] / 100


def test_codes_in_range_and_zero_points():
    w = _w().abs() + 0.5  # all positive: 0 is still representable, z = 0
    qw = quantize_weight(w, bits=3, group_size=32)
    codes = qf.unpack_int(qw.qdata, 3, w.shape[1])
    assert int(codes.max()) <= 7
    assert int(qw.zeros.max()) <= 7
    assert (qw.zeros == 0).all()
    qw = quantize_weight(-w, bits=3, group_size=32)  # all negative: z = 2^b - 1
    assert (qw.zeros == 7).all()


def test_special_groups():
    w = torch.zeros(4, 64)
    w[1] = 0.125  # constant
    w[2, :32] = torch.linspace(-1, 1, 32)  # one group zero, the other spread
    for sym in (False, True):
        for bits in (2, 4, 8):
            qw = quantize_weight(w, bits=bits, group_size=32, symmetric=sym)
            d = qw.dequantize()
            assert torch.equal(d[0], w[0])  # zero rows are exact
            assert torch.equal(d[2, 32:], w[2, 32:])
            assert torch.isfinite(d).all()
            if not sym:  # asymmetric: the constant is the top of the grid, exact up to the fp16 scale
                assert torch.allclose(d[1], w[1], rtol=1e-3)
            assert ((d[1] - w[1]).abs() <= 0.5 * qw.scales[1].float().repeat_interleave(32) * (1 + 1e-5)).all()


def test_device_and_input_untouched():
    w = _w(8, 64)
    w0 = w.clone()
    qw = quantize_weight(w, bits=4, group_size=32, clip_search=True)
    assert torch.equal(w, w0)
    assert qw.qdata.device == w.device and qw.qdata.is_contiguous()


# ---- clipping search -----------------------------------------------------------------------------
def _weighted_group_err(qw, w, imp, gs):
    e = (qw.dequantize(torch.float64) - w.double()) ** 2 * imp.double()
    return _group_view(e, gs).sum(-1)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("symmetric", [False, True])
def test_clip_search_never_worse(bits, symmetric):
    N, K, gs = 32, 256, 64
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(N, K, generator=g)
    w[torch.rand(N, K, generator=g) < 0.01] *= 6.0  # a few outliers make clipping worthwhile
    act = torch.rand(K, generator=g) * 3 + 0.05  # per-channel mean |x|
    rtn = quantize_weight(w, bits=bits, group_size=gs, symmetric=symmetric)
    clip = quantize_weight(w, bits=bits, group_size=gs, symmetric=symmetric, clip_search=True, act_scale=act)
    imp = act.square()
    e_rtn = _weighted_group_err(rtn, w, imp, gs)
    e_clip = _weighted_group_err(clip, w, imp, gs)
    assert (e_clip <= e_rtn * (1 + 1e-6) + 1e-12).all()  # per group, on the searched objective
    assert e_clip.sum() < e_rtn.sum()  # and strictly better overall here
    # the output MSE on activations with those per-channel magnitudes (independent channels)
    x = torch.randn(4096, K, generator=g) * act * np.sqrt(np.pi / 2)  # E|x_k| = act_k
    y = x.double() @ w.double().t()
    mse = lambda q: ((x.double() @ q.dequantize(torch.float64).t() - y) ** 2).mean().item()  # noqa: E731
    assert mse(clip) <= mse(rtn)


def test_clip_search_without_stats_and_mean_sq():
    w = _w(16, 128)
    rtn = quantize_weight(w, bits=3, group_size=32)
    c1 = quantize_weight(w, bits=3, group_size=32, clip_search=True)
    e = lambda q: ((q.dequantize(torch.float64) - w.double()) ** 2).reshape(16, 4, 32).sum(-1)  # noqa: E731
    assert (e(c1) <= e(rtn) + 1e-12).all()
    sq = torch.rand(128) + 0.1
    c2 = quantize_weight(w, bits=3, group_size=32, clip_search=True, act_scale=sq, act_scale_kind="mean_sq")
    c3 = quantize_weight(w, bits=3, group_size=32, clip_search=True, act_scale=sq.sqrt())
    assert torch.equal(c2.scales, c3.scales) or torch.allclose(c2.dequantize(), c3.dequantize(), atol=0.2)
    # a grid without 1.0 still includes plain RTN
    c4 = quantize_weight(w, bits=3, group_size=32, clip_search=True, clip_ratios=[0.5])
    assert (e(c4) <= e(rtn) + 1e-12).all()


# ---- GGUF formats --------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q8_0"])
def test_gguf_quantize_matches_llama_cpp(fmt):
    gguf = pytest.importorskip("gguf")
    w = _w(12, 512, seed=4)
    w[0, :32] = 0.0
    w[1, :32] = 0.5
    w[2, :32] = torch.arange(32) / 4.0 - 4.0  # exact ties
    qw = quantize_weight(w, fmt=fmt)
    ref = gguf.quants.quantize(w.numpy(), getattr(gguf.GGMLQuantizationType, fmt.upper()))
    assert np.array_equal(qw.qdata.numpy(), ref)
    assert qw.fmt == fmt and qw.scales is None and qw.zeros is None
    assert qw.group_size == 32


@pytest.mark.parametrize("fmt,max_rel", [("q4_0", 0.2), ("q4_1", 0.15), ("q8_0", 0.01), ("q4_k", 0.15), ("q6_k", 0.04)])
def test_gguf_quantize_error(fmt, max_rel):
    gguf = pytest.importorskip("gguf")
    w = _w(16, 512, seed=5)
    qw = quantize_weight(w, fmt=fmt.upper())
    d = qw.dequantize(torch.float32)
    ref = gguf.quants.dequantize(qw.qdata.numpy(), getattr(gguf.GGMLQuantizationType, fmt.upper()))
    assert torch.equal(d, torch.from_numpy(np.ascontiguousarray(ref)))
    rel = ((d - w).norm() / w.norm()).item()
    assert rel < max_rel
    assert tuple(qw.qdata.shape) == (16, qf.row_bytes(fmt, 512))


def test_q4_k_q6_k_zero_and_constant_blocks():
    w = torch.zeros(3, 256)
    w[1] = -0.25
    w[2, :16] = 1.0
    for fmt in ("q4_k", "q6_k"):
        d = quantize_weight(w, fmt=fmt).dequantize()
        assert torch.equal(d[0], w[0])
        assert torch.allclose(d[1], w[1], atol=0.25 / 63)  # q6_k: half a step of 0.25 / 31.5
        assert torch.allclose(d[2], w[2], atol=1.0 / 63)


# ---- QuantizedWeight -----------------------------------------------------------------------------
def test_quantized_weight_object():
    w = _w(8, 128)
    qw = quantize_weight(w, bits=4, group_size=64)
    assert qw.nbytes == 8 * 64 + 8 * 2 * 2 + 8 * 2
    assert qw.out_features == 8 and qw.in_features == 128
    r = repr(qw)
    assert "int4" in r and "group_size=64" in r and "(8, 128)" in r
    q2 = qw.to("cpu")
    assert torch.equal(q2.dequantize(), qw.dequantize())
    assert QuantizedWeight.from_float(w, bits=4, group_size=64).fmt == "int4"
    cfg = qw.config()
    assert cfg["fmt"] == "int4" and cfg["group_size"] == 64 and cfg["scale_dtype"] == "float16"
    with pytest.raises(ValueError, match="scales"):
        QuantizedWeight(qw.qdata, qw.scales[:, :1], qw.zeros, "int4", (8, 128), 64)


def test_from_gguf_flat_and_2d():
    qd, _, _ = qf.random_packed_weight("q4_1", 6, 64)
    a = QuantizedWeight.from_gguf(qd, "Q4_1", (6, 64))
    b = QuantizedWeight.from_gguf(qd.reshape(-1).numpy(), "q4_1", (6, 64))
    assert torch.equal(a.dequantize(), b.dequantize())
    assert a.symmetric is False and a.bits == 4 and a.group_size == 32
    with pytest.raises(ValueError, match="ggml_type"):
        QuantizedWeight.from_gguf(qd, "Q5_K", (6, 64))
    with pytest.raises(ValueError, match="data"):
        QuantizedWeight.from_gguf(qd[:5], "Q4_1", (6, 64))


# ---- bad inputs ----------------------------------------------------------------------------------
BAD = [
    ("bits", dict(bits=5)),
    ("bits", dict(bits=True)),
    ("group_size", dict(group_size=48)),
    ("group_size", dict(group_size=0)),
    ("group_size", dict(group_size=512)),
    ("group_size", dict(group_size=1.5)),
    ("scale_dtype", dict(scale_dtype=torch.float64)),
    ("act_scale", dict(clip_search=True, act_scale=torch.ones(3))),
    ("act_scale", dict(clip_search=True, act_scale=-torch.ones(256))),
    ("act_scale_kind", dict(clip_search=True, act_scale=torch.ones(256), act_scale_kind="max")),
    ("clip_ratios", dict(clip_search=True, clip_ratios=[1.5])),
    ("fmt", dict(fmt="q5_k")),
    ("clip_search", dict(fmt="q4_0", clip_search=True)),
    ("symmetric", dict(symmetric="yes")),
]


@pytest.mark.parametrize("arg,kw", BAD, ids=[f"{a}-{i}" for i, (a, _) in enumerate(BAD)])
def test_bad_arguments(arg, kw):
    with pytest.raises(ValueError, match=rf"\b{arg}\b"):
        quantize_weight(_w(4, 256), **kw)


def test_bad_weights():
    with pytest.raises(ValueError, match=r"\bw\b"):
        quantize_weight(torch.randn(64))
    with pytest.raises(ValueError, match=r"\bw\b"):
        quantize_weight(torch.randint(0, 3, (4, 64)))
    with pytest.raises(ValueError, match="in_features"):
        quantize_weight(torch.randn(4, 40))
    with pytest.raises(ValueError, match="in_features"):
        quantize_weight(torch.randn(4, 96), fmt="q4_k")
    w = torch.randn(4, 64)
    w[0, 3] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        quantize_weight(w)
    with pytest.raises(ValueError, match="scale_dtype"):
        quantize_weight(torch.full((2, 32), 1e6), bits=4, group_size=32)  # scale overflows fp16
    with pytest.raises(ValueError, match="fp16"):
        quantize_weight(torch.full((2, 256), 1e9), fmt="q6_k")
