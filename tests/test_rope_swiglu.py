"""fastadapt::rope and fastadapt::silu_mul on CPU (both paths) and, where a GPU is present, CUDA;
the RoPE tables of models/rope.py against HF transformers' rope init functions."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastadapt_ops
from fastadapt_ops.cpu import available_cpu_isas
from fastadapt_ops.models.rope import rope_cos_sin, rope_cos_sin_for, rope_inv_freq
from fastadapt_ops.ops import rope, silu_mul
from fastadapt_ops.ops.rope import rope_reference
from fastadapt_ops.ops.silu_mul import silu_mul_reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
U32 = 2.0 ** -24  # fp32 unit roundoff
# rounding of the result to the output dtype: twice its unit roundoff (headroom for the fp32 error
# in front of it); fp32 results carry only the kernel's own error
U_OUT = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
TINY = {torch.float32: 2.0 ** -149, torch.bfloat16: 2.0 ** -133, torch.float16: 2.0 ** -24}


def _skip_path(device, path):
    if path not in available_cpu_isas():
        pytest.skip(f"this CPU cannot run the {path} path")
    if device == "cuda" and path != "generic":
        pytest.skip("the CPU path switch does not apply to CUDA")


# ---- rope ---------------------------------------------------------------------------------------
def _fused_qkv(T, hq, hk, D, dtype, device, gen=None):
    """A fused projection output [T, (hq + 2 hk) D + pad] and its q/k/v views (as the runner makes)."""
    nq, nk = hq * D, hk * D
    qkv = torch.randn(T, nq + 2 * nk + 3, generator=gen).to(dtype).to(device)  # +3: sentinel pad
    q = qkv[:, :nq].view(T, hq, D)
    k = qkv[:, nq:nq + nk].view(T, hk, D)
    return qkv, q, k


def _rope_bound(x, cs_rows, interleaved, dtype):
    """Per-element error bound of a rotation of x [T, H, D] by cs_rows [T, D]: the fp32 error of
    a*c - b*s (a few roundings of |a c| + |b s|) plus the rounding of the result to dtype."""
    D = x.shape[-1]
    half = D // 2
    x = x.double()
    c, s = cs_rows.double()[:, None, :half].abs(), cs_rows.double()[:, None, half:].abs()
    if interleaved:
        a, b = x[..., 0::2].abs(), x[..., 1::2].abs()
        mag = torch.stack([a * c + b * s, b * c + a * s], -1).reshape(x.shape)
    else:
        a, b = x[..., :half].abs(), x[..., half:].abs()
        mag = torch.cat([a * c + b * s, b * c + a * s], -1)
    return mag * (4 * U32 + U_OUT[dtype]) + TINY[dtype]


def _assert_within(got, ref, bound, what):
    err = (got.double() - ref).abs()
    bad = err > bound
    assert not bad.any(), (f"{what}: {int(bad.sum())} elements over the bound; worst excess "
                           f"{float((err - bound).max()):.3e}, max err {float(err.max()):.3e}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["generic", "avx2"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("T,hq,hk,D", [(1, 9, 3, 64), (7, 4, 2, 128), (5, 3, 1, 18), (3, 1, 1, 2),
                                       (2, 2, 0, 80), (13, 5, 5, 6), (512, 9, 3, 64)])
def test_rope_matches_float64(device, path, dtype, interleaved, T, hq, hk, D):
    _skip_path(device, path)
    g = torch.Generator().manual_seed(T * 1000 + D)
    qkv, q, k = _fused_qkv(T, hq, hk, D, dtype, device, g)
    max_pos = 600
    cs = rope_cos_sin(D, max_pos, 10000.0).to(device)
    pos = torch.randint(0, max_pos, (T,), generator=g).to(device)
    q0, k0 = q.clone(), k.clone()
    rest0 = qkv[:, (hq + hk) * D:].clone()
    ref_q, ref_k = rope_reference(q0, k0, pos, cs, interleaved)
    with fastadapt_ops.use_cpu_isa(path):
        rope(q, k, pos, cs, interleaved)
    assert torch.equal(qkv[:, (hq + hk) * D:], rest0)  # v and the pad untouched, bit for bit
    rows = cs[pos.long()]
    _assert_within(q, ref_q, _rope_bound(q0, rows, interleaved, dtype), "q")
    _assert_within(k, ref_k, _rope_bound(k0, rows, interleaved, dtype), "k")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64])
def test_rope_layouts_and_position_dtypes(device, pos_dtype):
    """Any strides for T and H (here heads-major storage), int32 positions, a strided cos_sin."""
    T, H, D = 6, 4, 32
    base = torch.randn(H, T, D, device=device)
    q = base.transpose(0, 1)  # [T, H, D], T stride D, H stride T*D
    kbase = torch.randn(T, 2 * H, D, device=device)
    k = kbase[:, ::2]  # every other head
    table = torch.randn(40, 2 * D, device=device)
    cs = table[:, :D]  # row stride 2D
    pos = torch.tensor([0, 39, 5, 5, 17, 2], dtype=pos_dtype, device=device)
    ref_q, ref_k = rope_reference(q, k, pos, cs)
    odd_heads = kbase[:, 1::2].clone()
    rope(q, k, pos, cs)
    torch.testing.assert_close(q.double(), ref_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k.double(), ref_k, rtol=1e-6, atol=1e-6)
    assert torch.equal(kbase[:, 1::2], odd_heads)


def test_rope_matches_old_runner_formula_and_angles():
    """The fp32 table + op against the runner's former torch code and exact float64 angles."""
    T, hq, hk, D, theta = 9, 9, 3, 64, 100000.0
    qkv, q, k = _fused_qkv(T, hq, hk, D, torch.float32, "cpu")
    p0 = 300
    pos = torch.arange(p0, p0 + T)
    inv = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    ang = torch.outer(pos.double(), inv)
    ang = torch.cat([ang, ang], -1)
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]  # [T, 1, D]
    qk = qkv[:, :(hq + hk) * D].view(T, hq + hk, D)
    old = torch.addcmul(qk * cos.float(), torch.cat([qk[..., D // 2:].neg(), qk[..., :D // 2]], -1),
                        sin.float())
    exact = qk.double() * cos + torch.cat([-qk[..., D // 2:], qk[..., :D // 2]], -1).double() * sin
    rope(q, k, pos, rope_cos_sin(D, 512, theta))
    torch.testing.assert_close(qk, old, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(qk.double(), exact, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("path", ["generic", "avx2"])
def test_rope_interleaved_is_rotate_half_on_permuted_pairs(path):
    """Pair (2i, 2i+1) of the interleaved layout is pair (i, i + D/2) of rotate-half."""
    _skip_path("cpu", path)
    T, H, D = 5, 3, 64
    x = torch.randn(T, H, D)
    perm = torch.stack([torch.arange(D // 2), torch.arange(D // 2) + D // 2], -1).reshape(-1)
    y = x[..., perm].contiguous()  # y[2i] = x[i], y[2i+1] = x[i + D/2]
    cs = rope_cos_sin(D, 64, 500.0)
    pos = torch.tensor([0, 3, 63, 7, 1])
    kx = torch.randn(T, 1, D)
    ky = kx[..., perm].contiguous()
    with fastadapt_ops.use_cpu_isa(path):
        rope(x, kx, pos, cs, False)
        rope(y, ky, pos, cs, True)
    assert torch.equal(y, x[..., perm]) and torch.equal(ky, kx[..., perm])


def test_rope_paths_and_threads_agree():
    if "avx2" not in available_cpu_isas():
        pytest.skip("no AVX2 path on this CPU")
    T, hq, hk, D = 512, 9, 3, 64
    cs = rope_cos_sin(D, 1024, 10000.0)
    pos = torch.arange(100, 100 + T)
    outs = {}
    for path in ("generic", "avx2"):
        for threads in (1, 2):
            torch.set_num_threads(threads)
            torch.manual_seed(0)
            _, q, k = _fused_qkv(T, hq, hk, D, torch.bfloat16, "cpu")
            with fastadapt_ops.use_cpu_isa(path):
                rope(q, k, pos, cs)
            outs[path, threads] = (q.clone(), k.clone())
    for path in ("generic", "avx2"):  # the split over threads changes nothing
        assert all(torch.equal(a, b) for a, b in zip(outs[path, 1], outs[path, 2]))
    for a, b in zip(outs["generic", 1], outs["avx2", 1]):  # at most one bf16 rounding step apart
        torch.testing.assert_close(a.float(), b.float(), rtol=2 ** -7, atol=1e-6)


@pytest.mark.parametrize("bad", [-1, 50])
def test_rope_positions_out_of_table(bad):
    q, k = torch.randn(3, 2, 8), torch.randn(3, 1, 8)
    q0, k0 = q.clone(), k.clone()
    cs = rope_cos_sin(8, 50, 10000.0)
    for dt in (torch.int32, torch.int64):
        with pytest.raises(RuntimeError, match=r"fastadapt::rope: positions\[1\] = " + str(bad)):
            rope(q, k, torch.tensor([0, bad, 2], dtype=dt), cs)
    assert torch.equal(q, q0) and torch.equal(k, k0)  # checked before anything is written


def _rope_args(**kw):
    a = dict(q=torch.randn(2, 3, 8), k=torch.randn(2, 1, 8), positions=torch.tensor([0, 1]),
             cos_sin=torch.randn(4, 8))
    a.update(kw)
    return a


@pytest.mark.parametrize("kw, match", [
    (dict(q=torch.randn(2, 24)), "q must be 3-D"),
    (dict(k=torch.randn(2, 8)), "k must be 3-D"),
    (dict(q=torch.randn(2, 3, 8, dtype=torch.float64)), "q must be float32"),
    (dict(k=torch.randn(2, 1, 8).bfloat16()), "k must have q's dtype"),
    (dict(q=torch.randn(2, 3, 7), k=torch.randn(2, 1, 7), cos_sin=torch.randn(4, 7)), "must be even"),
    (dict(k=torch.randn(3, 1, 8)), "k must be"),
    (dict(k=torch.randn(2, 1, 16)), "k must be"),
    (dict(q=torch.randn(2, 8, 3).transpose(1, 2)), "q's last dim must be contiguous"),
    (dict(k=torch.randn(2, 1, 16)[..., ::2]), "k's last dim must be contiguous"),
    (dict(q=torch.randn(1, 3, 8).expand(2, 3, 8)), "must not have overlapping"),
    (dict(positions=torch.tensor([0, 1, 2])), "positions must be 1-D"),
    (dict(positions=torch.tensor([0.0, 1.0])), "positions must be int32 or int64"),
    (dict(cos_sin=torch.randn(4, 4)), "cos_sin must be 2-D"),
    (dict(cos_sin=torch.randn(4, 8).half()), "cos_sin must be float32"),
    (dict(cos_sin=torch.randn(8, 4).t()), "cos_sin's last dim must be contiguous"),
])
def test_rope_bad_inputs(kw, match):
    a = _rope_args(**kw)
    with pytest.raises(RuntimeError, match=match) as e:
        torch.ops.fastadapt.rope(a["q"], a["k"], a["positions"], a["cos_sin"])
    assert "fastadapt::rope" in str(e.value)


def test_rope_q_and_k_must_not_alias():
    # (detected where torch's overlap test can tell: both dense; strided views are the caller's duty)
    buf = torch.randn(64)
    with pytest.raises(RuntimeError, match="must not share memory"):
        rope(buf[:48].view(2, 3, 8), buf[40:56].view(2, 1, 8), torch.tensor([0, 1]), torch.randn(4, 8))


def test_rope_empty():
    cs = torch.randn(4, 8)
    rope(torch.randn(0, 3, 8), torch.randn(0, 1, 8), torch.zeros(0, dtype=torch.long), cs)
    k = torch.randn(2, 0, 8)
    q = torch.randn(2, 3, 8)
    ref_q, _ = rope_reference(q, k, torch.tensor([1, 2]), cs)
    rope(q, k, torch.tensor([1, 2]), cs)  # no KV heads: q alone
    torch.testing.assert_close(q.double(), ref_q)


def test_rope_opcheck_compile_export():
    T, D = 3, 16
    cs = rope_cos_sin(D, 32, 10000.0)
    pos = torch.tensor([4, 5, 6])
    torch.library.opcheck(torch.ops.fastadapt.rope.default,
                          (torch.randn(T, 2, D), torch.randn(T, 1, D), pos, cs, False))
    torch.library.opcheck(torch.ops.fastadapt.rope.default,
                          (torch.randn(T, 2, D), torch.randn(T, 1, D), pos.int(), cs, True))
    w = torch.randn(4 * D, 8)

    def f(x):  # the runner's pattern: rotate views of a fused projection in place
        qkv = x @ w.T
        q = qkv[:, :2 * D].view(T, 2, D)
        k = qkv[:, 2 * D:3 * D].view(T, 1, D)
        rope(q, k, pos, cs)
        return qkv * 1.0

    x = torch.randn(T, 8)
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x))

    class M(torch.nn.Module):
        def forward(self, x):
            return f(x)

    ep = torch.export.export(M(), (x,))
    assert any("fastadapt.rope" in str(n.target) for n in ep.graph.nodes)
    torch.testing.assert_close(ep.module()(x), f(x))


# ---- rope tables ---------------------------------------------------------------------------------
def _hf_inv_freq(kind, head_dim, theta, **params):
    mru = pytest.importorskip("transformers.modeling_rope_utils")
    from transformers import LlamaConfig

    rp = {"rope_type": kind, "rope_theta": theta, **params}
    cfg = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                      max_position_embeddings=131072, rope_parameters=rp)
    if kind == "default":
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        return inv.double()
    inv, attention_factor = mru.ROPE_INIT_FUNCTIONS[kind](cfg, "cpu")
    assert attention_factor == 1.0  # no post-scaling of cos/sin for these kinds
    return inv.double()


@pytest.mark.parametrize("head_dim, theta", [(64, 10000.0), (128, 500000.0), (64, 100000.0)])
def test_rope_tables_match_transformers(head_dim, theta):
    # llama3 (Llama-3.1's values and a second band setting), linear, none
    cases = [
        ("llama3", dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position_embeddings=8192)),
        ("llama3", dict(factor=32.0, low_freq_factor=2.0, high_freq_factor=8.0,
                        original_max_position_embeddings=4096)),
        ("linear", dict(factor=4.0)),
        ("default", {}),
    ]
    for kind, params in cases:
        theirs = _hf_inv_freq(kind, head_dim, theta, **params)
        ours = rope_inv_freq(head_dim, theta, None if kind == "default" else kind,
                             factor=params.get("factor", 1.0),
                             low_freq_factor=params.get("low_freq_factor", 1.0),
                             high_freq_factor=params.get("high_freq_factor", 4.0),
                             original_context=params.get("original_max_position_embeddings", 8192))
        # theirs is computed in fp32: agree to fp32 rounding
        torch.testing.assert_close(ours, theirs, rtol=4e-7, atol=0, msg=f"{kind} {params}")
        if kind == "llama3":  # every band is exercised
            assert (ours == rope_inv_freq(head_dim, theta)).any()
            assert (ours < rope_inv_freq(head_dim, theta) / params["factor"] * 1.0001).any()


@pytest.mark.parametrize("scaling, factor", [(None, 1.0), ("linear", 4.0), ("llama3", 8.0)])
def test_rope_cos_sin_table(scaling, factor):
    D, max_pos = 64, 3000
    cs = rope_cos_sin(D, max_pos, 500000.0, scaling, factor)
    assert cs.shape == (max_pos, D) and cs.dtype == torch.float32 and cs.is_contiguous()
    pos = torch.arange(max_pos, dtype=torch.float64)
    inv = rope_inv_freq(D, 500000.0, scaling, factor)  # linear: factor folded into inv_freq
    ang = torch.outer(pos, inv)
    torch.testing.assert_close(cs.double(), torch.cat([ang.cos(), ang.sin()], -1), rtol=0, atol=1e-7)
    if scaling == "linear":  # positions / factor, i.e. position p reads the angles of p / factor
        torch.testing.assert_close(cs[::4][:max_pos // 4], rope_cos_sin(D, max_pos // 4, 500000.0))


def test_rope_cos_sin_for_config_and_errors():
    from fastadapt_ops.models.config import ModelConfig

    c = ModelConfig(arch="llama", n_layers=1, hidden=128, n_heads=2, n_kv_heads=1, head_dim=64,
                    ffn=256, vocab=10, rope_theta=500000.0, rope_scaling="linear", rope_scale=2.0)
    torch.testing.assert_close(rope_cos_sin_for(c, 100), rope_cos_sin(64, 100, 500000.0, "linear", 2.0))
    c.rope_scaling, c.rope_scale = "llama3", 8.0
    c.rope_low_freq_factor, c.rope_high_freq_factor, c.rope_original_context = 2.0, 8.0, 4096
    torch.testing.assert_close(rope_cos_sin_for(c, 100),
                               rope_cos_sin(64, 100, 500000.0, "llama3", 8.0, 2.0, 8.0, 4096))
    c.rope_scaling = "yarn"
    with pytest.raises(ValueError, match="unsupported rope scaling 'yarn'"):
        rope_cos_sin_for(c, 100)
    with pytest.raises(ValueError, match="head_dim must be even"):
        rope_cos_sin(7, 10, 10000.0)
    with pytest.raises(ValueError, match="factor must be positive"):
        rope_cos_sin(8, 10, 10000.0, "linear", 0.0)
    with pytest.raises(ValueError, match="high_freq_factor > low_freq_factor"):
        rope_cos_sin(8, 10, 10000.0, "llama3", 8.0, 4.0, 4.0)


# ---- silu_mul ----------------------------------------------------------------------------------
def _silu_bound(ref, dtype):
    # fp32: exp (~2 ulp), 1 + e, the division and the product: 8 roundings' worth
    return ref.abs() * (8 * U32 + U_OUT[dtype]) + TINY[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["generic", "avx2"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2), (3, 14), (1, 3072), (2, 3, 3074), (512, 3072), (46,)])
@pytest.mark.parametrize("use_out", [False, True])
def test_silu_mul_matches_float64(device, path, dtype, shape, use_out):
    _skip_path(device, path)
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * 4).to(dtype).to(device)
    ref = silu_mul_reference(x)
    out_shape = (*shape[:-1], shape[-1] // 2)
    with fastadapt_ops.use_cpu_isa(path):
        if use_out:
            buf = torch.full((int(torch.tensor(out_shape).prod()) + 8,), float("nan"), dtype=dtype, device=device)
            out = buf[4:-4].view(out_shape)  # NaN sentinels on both sides
            y = silu_mul(x, out=out)
            assert y is out and buf[:4].isnan().all() and buf[-4:].isnan().all()
        else:
            y = silu_mul(x)
    assert y.dtype == dtype and y.shape == out_shape and y.is_contiguous()
    _assert_within(y, ref, _silu_bound(ref, dtype), "silu_mul")


@pytest.mark.parametrize("device", DEVICES)
def test_silu_mul_strided_input(device):
    base = torch.randn(6, 40, device=device)
    x = base[::2, 4:36]  # rows strided, last dim contiguous: read in place
    torch.testing.assert_close(silu_mul(x).double(), silu_mul_reference(x), rtol=1e-6, atol=1e-7)
    xt = torch.randn(32, 5, device=device).t()  # last dim strided: copied first
    torch.testing.assert_close(silu_mul(xt).double(), silu_mul_reference(xt), rtol=1e-6, atol=1e-7)


def _ulp_error(y, ref):
    """|y - ref| in units of the fp32 ulp at ref (normal range)."""
    ulp = torch.ldexp(torch.ones_like(ref), torch.frexp(ref.abs().float())[1].double().sub(24).int())
    return (y.double() - ref).abs() / ulp.double()


@pytest.mark.parametrize("path", ["generic", "avx2"])
def test_silu_mul_wide_range_accuracy_and_specials(path):
    """fp32 silu over the whole input range, up = 1: a few ulp wherever the result is a normal
    float (also where torch's formula flushes to -0), tiny absolute error where it is subnormal;
    overflowing results, +-inf and NaN exactly as torch's F.silu."""
    _skip_path("cpu", path)
    dense = torch.linspace(-110.0, 110.0, 400003)
    big = torch.logspace(-45, 38.5, 20000).clamp(max=torch.finfo(torch.float32).max)
    g = torch.cat([dense, big, -big, torch.tensor([0.0, -0.0, 88.0, -88.0, -88.7, -88.73, -89.0,
                                                   -103.9, -104.1, 1e-45, -1e-45, 1e-38])])
    g = g.float()
    specials = torch.tensor([float("inf"), float("-inf"), float("nan"),
                             torch.finfo(torch.float32).max, -torch.finfo(torch.float32).max])
    g = torch.cat([g, specials])
    x = torch.cat([g, torch.ones_like(g)])  # gate then up = 1
    with fastadapt_ops.use_cpu_isa(path):
        y = silu_mul(x)
    ref = silu_mul_reference(x)
    normal = ref.abs() >= torch.finfo(torch.float32).tiny
    fin = ref.isfinite() & (ref.abs() <= torch.finfo(torch.float32).max)
    worst = float(_ulp_error(y[normal & fin], ref[normal & fin]).max())
    assert worst <= 4.0, f"max error {worst:.2f} ulp"
    # subnormal (or underflowed) results: e^-|g| is itself subnormal there, |g| < 104 times its
    # half-step error
    tiny = ~normal & fin
    assert float((y[tiny].double() - ref[tiny]).abs().max()) <= 2.0 ** -142
    # non-finite and extreme inputs: exactly what torch gives in fp32; elsewhere torch's values
    # (which are -0 where its e^-g overflows, the band above)
    torch.testing.assert_close(y[-5:], F.silu(specials), equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(y, F.silu(g), equal_nan=True, rtol=1e-6, atol=2.0 ** -120)
    band = (g > -91.5) & (g < -88.8)
    assert band.any() and (F.silu(g[band]) == 0).all() and (y[band] < 0).all()


def test_silu_mul_16bit_specials_match_torch():
    vals = [float("inf"), float("-inf"), float("nan"), 0.0, -0.0, 60000.0, -60000.0, 3.0]
    for dtype in (torch.bfloat16, torch.float16):
        g = torch.tensor(vals).to(dtype)
        u = torch.tensor([2.0, 1.0, 1.0, 5.0, 1.0, 2.0, -1.0, 0.0]).to(dtype)
        y = silu_mul(torch.cat([g, u]))
        want = (F.silu(g.float()) * u.float()).to(dtype)  # fp32 math, one rounding
        torch.testing.assert_close(y, want, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("args, kw, match", [
    ((torch.randn(2, 7),), {}, "even, non-empty last"),
    ((torch.randn(2, 0),), {}, "even, non-empty last"),
    ((torch.randn(4, dtype=torch.float64),), {}, "x must be float32"),
    ((torch.randn(2, 8),), dict(out=torch.empty(2, 5)), "out must have shape"),
    ((torch.randn(2, 8),), dict(out=torch.empty(2, 4).bfloat16()), "out must have x's dtype"),
    ((torch.randn(2, 8),), dict(out=torch.empty(4, 2).t()), "out must be contiguous"),
])
def test_silu_mul_bad_inputs(args, kw, match):
    with pytest.raises(RuntimeError, match=match) as e:
        if kw:
            torch.ops.fastadapt.silu_mul.out(*args, **kw)
        else:
            torch.ops.fastadapt.silu_mul(*args)
    assert "fastadapt::silu_mul" in str(e.value)


def test_silu_mul_out_must_not_alias_x():
    x = torch.randn(1, 16)
    with pytest.raises(RuntimeError, match="out must not share memory with x"):
        silu_mul(x, out=x[0, 4:12].view(1, 8))


def test_silu_mul_empty_rows():
    assert silu_mul(torch.randn(0, 8)).shape == (0, 4)


def test_silu_mul_opcheck_compile_export():
    x = torch.randn(3, 32)
    torch.library.opcheck(torch.ops.fastadapt.silu_mul.default, (x,))
    torch.library.opcheck(torch.ops.fastadapt.silu_mul.out, (x,), {"out": torch.empty(3, 16)})

    def f(x):
        out = torch.empty(x.shape[0], 16)
        return silu_mul(x) + silu_mul(x * 2, out=out)

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x))

    class M(torch.nn.Module):
        def forward(self, x):
            return silu_mul(x)

    ep = torch.export.export(M(), (x,))
    assert any("fastadapt.silu_mul" in str(n.target) for n in ep.graph.nodes)


# ---- bench ---------------------------------------------------------------------------------------
def test_bench_rope_swiglu_smoke(tmp_path):
    import json

    from fastadapt_ops.bench import main

    assert main(["rope_swiglu", "--T", "1,3", "--dtypes", "float32", "--min-time", "0.001",
                 "--out", str(tmp_path), "--quiet"]) == 0
    data = json.loads(next(tmp_path.glob("*/rope_swiglu*.json")).read_text())
    ops = {r["op"] for r in data["rows"]}
    assert {"fastadapt.rope", "torch rotate-half (addcmul/cat)", "fastadapt.silu_mul",
            "F.silu(g) * u"} <= ops
    assert all(r["median_us"] > 0 and r["speedup_vs_torch"] > 0 for r in data["rows"])
    assert all(r["max_abs_diff"] is not None for r in data["rows"])
    assert all(math.isfinite(r["gbps"]) for r in data["rows"])
