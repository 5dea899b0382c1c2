"""fastadapt::rms_norm on CPU (both paths) and, where a GPU is present, CUDA."""
from __future__ import annotations

import pytest
import torch

import fastadapt_ops
from fastadapt_ops.cpu import available_cpu_isas
from fastadapt_ops.ops import rms_norm
from fastadapt_ops.ops.rms_norm import rms_norm_reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _tol(dtype):
    return {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["generic", "avx2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 576), (2, 3, 577), (64, 4096)])
@pytest.mark.parametrize("fused", [False, True])
def test_matches_float64(device, path, dtype, shape, fused):
    if path not in available_cpu_isas():
        pytest.skip(f"this CPU cannot run the {path} path")
    if device == "cuda" and path != "generic":
        pytest.skip("the CPU path switch does not apply to CUDA")
    x = torch.randn(shape, device=device).to(dtype)
    w = torch.randn(shape[-1], device=device)
    res = torch.randn(shape, device=device).to(dtype) if fused else None
    res_ref = res.clone() if fused else None
    with fastadapt_ops.use_cpu_isa(path):
        y = rms_norm(x, w, 1e-6, res)
    ref = rms_norm_reference(x, w, 1e-6, res_ref)
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y.double(), ref.double(), rtol=_tol(dtype), atol=_tol(dtype))
    if fused:  # the residual stream is updated exactly as the reference does
        torch.testing.assert_close(res.double(), res_ref.double(), rtol=_tol(dtype), atol=_tol(dtype))


def test_zero_rows_and_matches_torch():
    w = torch.randn(16)
    assert rms_norm(torch.randn(0, 16), w, 1e-5).shape == (0, 16)
    x = torch.randn(4, 16)
    torch.testing.assert_close(rms_norm(x, w, 1e-5), torch.nn.functional.rms_norm(x, (16,), w, 1e-5))


@pytest.mark.parametrize("args, match", [
    ((torch.randn(2, 8), torch.randn(7), 1e-6, None), "weight must be"),
    ((torch.randn(2, 8, dtype=torch.float64), torch.randn(8), 1e-6, None), "x must be float32"),
    ((torch.randn(2, 8), torch.randn(8), 1e-6, torch.randn(2, 9)), "residual must match"),
    ((torch.randn(2, 8), torch.randn(8), 1e-6, torch.randn(2, 8).bfloat16()), "residual must match"),
    ((torch.randn(2, 8), torch.randn(8), 1e-6, torch.randn(8, 2).t()), "residual must be contiguous"),
    ((torch.randn(2, 0), torch.randn(0), 1e-6, None), "non-empty last"),
])
def test_bad_inputs(args, match):
    with pytest.raises(RuntimeError, match=match) as e:
        torch.ops.fastadapt.rms_norm(*args)
    assert "fastadapt::rms_norm" in str(e.value)


def test_opcheck_compile_export():
    x, w = torch.randn(3, 32), torch.randn(32)
    torch.library.opcheck(torch.ops.fastadapt.rms_norm.default, (x, w, 1e-6, None))
    torch.library.opcheck(torch.ops.fastadapt.rms_norm.default, (x, w, 1e-6, torch.randn(3, 32)))

    def f(x, r):
        return rms_norm(x, w, 1e-6, r) * 2

    r1, r2 = torch.randn(3, 32), None
    r2 = r1.clone()
    got = torch.compile(f, fullgraph=True)(x, r1)
    want = f(x, r2)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(r1, r2)  # the in-place residual update survives compilation

    class M(torch.nn.Module):
        def forward(self, x):
            return rms_norm(x, w, 1e-6)

    ep = torch.export.export(M(), (x,))
    assert any("fastadapt.rms_norm" in str(n.target) for n in ep.graph.nodes)
