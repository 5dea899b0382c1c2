"""fastadapt::logit_confidence and fastadapt::hidden_cosine against float64 references: dtypes,
odd sizes, ties and -inf, every ISA path and thread count, opcheck, torch.compile, bad inputs,
and the CUDA kernels against the CPU op."""
import pytest
import torch

import fastadapt_ops
from fastadapt_ops.ops.confidence import (hidden_cosine, hidden_cosine_reference, logit_confidence,
                                          logit_confidence_reference)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}  # inputs are exact in each dtype


def _check(logits, temperature=1.0):
    stats, arg = logit_confidence(logits, temperature)
    ref, ref_arg = logit_confidence_reference(logits, temperature)
    assert stats.dtype == torch.float32 and stats.shape == (logits.shape[0], 3)
    assert arg.dtype == torch.long and torch.equal(arg, ref_arg)
    torch.testing.assert_close(stats, ref, rtol=TOL[logits.dtype], atol=TOL[logits.dtype] * 10)


@pytest.mark.parametrize("isa", ["generic", "avx2"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,V", [(1, 1), (1, 7), (3, 513), (2, 4099), (1, 49157), (5, 20011)])
def test_logit_confidence_matches_reference(isa, dtype, B, V):
    g = torch.Generator().manual_seed(B * 1000 + V)
    x = (torch.randn(B, V, generator=g) * 3).to(dtype)
    with fastadapt_ops.use_cpu_isa(isa):
        _check(x)
        _check(x, temperature=0.7)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_logit_confidence_threads_split_rows_exactly(threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.randn(1, 60001) * 4
        x[0, 59999] = 30.0  # the maximum in the last slice: the merge must rescale the sums
        _check(x)
        x = torch.randn(2, 33333)
        _check(x)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_logit_confidence_ties_and_inf(isa):
    with fastadapt_ops.use_cpu_isa(isa):
        x = torch.full((2, 1000), -5.0)
        x[0, 10] = x[0, 900] = 2.0  # tie: first index, margin 0
        x[1, :500] = float("-inf")
        x[1, 777] = 1.0
        stats, arg = logit_confidence(x)
        assert arg.tolist() == [10, 777]
        assert float(stats[0, 1]) == 0.0
        _check(x)
        one_hot = torch.full((1, 64), float("-inf"))
        one_hot[0, 3] = 0.0
        stats, arg = logit_confidence(one_hot)
        assert stats[0].tolist() == [1.0, 1.0, 0.0] and int(arg[0]) == 3


@pytest.mark.parametrize("isa", ["generic", "avx2"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 576), (2, 5, 1031)])
def test_hidden_cosine_matches_reference(isa, dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    a = torch.randn(*shape, generator=g).to(dtype)
    b = (a.float() + 0.3 * torch.randn(*shape, generator=g)).to(dtype)
    with fastadapt_ops.use_cpu_isa(isa):
        out = hidden_cosine(a, b)
    assert out.shape == shape[:-1] and out.dtype == torch.float32
    torch.testing.assert_close(out, hidden_cosine_reference(a, b), rtol=1e-5, atol=1e-5)
    z = torch.zeros(2, 8, dtype=dtype)
    assert hidden_cosine(z, z).tolist() == [0.0, 0.0]  # eps floors the norms: no NaN


def test_opcheck():
    torch.library.opcheck(torch.ops.fastadapt.logit_confidence.default, (torch.randn(3, 101), 1.0))
    torch.library.opcheck(torch.ops.fastadapt.hidden_cosine.default, (torch.randn(3, 64), torch.randn(3, 64), 1e-8))


def test_torch_compile_fullgraph():
    def f(logits, a, b):
        stats, arg = logit_confidence(logits)
        return stats[:, 0] * hidden_cosine(a, b), arg

    x, a, b = torch.randn(2, 333), torch.randn(2, 48), torch.randn(2, 48)
    got = torch.compile(f, fullgraph=True)(x, a, b)
    want = f(x, a, b)
    torch.testing.assert_close(got[0], want[0])
    assert torch.equal(got[1], want[1])


@pytest.mark.parametrize("args,match", [
    ((torch.randn(10),), "logits must be 2-D"),
    ((torch.randn(2, 0),), "logits must have V > 0"),
    ((torch.randn(2, 5).double(),), "logits must be float32"),
    ((torch.randint(0, 5, (2, 5)),), "logits must be float32"),
    ((torch.randn(2, 5), 0.0), "temperature"),
    ((torch.randn(2, 5), float("nan")), "temperature"),
])
def test_logit_confidence_bad_input(args, match):
    with pytest.raises(RuntimeError, match="fastadapt::logit_confidence: " + match):
        torch.ops.fastadapt.logit_confidence.default(*args)


@pytest.mark.parametrize("a,b,eps,match", [
    (torch.randn(2, 4), torch.randn(2, 5), 1e-8, "b must match a"),
    (torch.randn(2, 4), torch.randn(2, 4).half(), 1e-8, "b must match a"),
    (torch.randn(2, 4).double(), torch.randn(2, 4).double(), 1e-8, "a must be float32"),
    (torch.randn(2, 0), torch.randn(2, 0), 1e-8, "a must have a non-empty last"),
    (torch.randn(2, 4), torch.randn(2, 4), 0.0, "eps"),
])
def test_hidden_cosine_bad_input(a, b, eps, match):
    with pytest.raises(RuntimeError, match="fastadapt::hidden_cosine: " + match):
        torch.ops.fastadapt.hidden_cosine.default(a, b, eps)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,V", [(1, 1), (3, 513), (2, 49157)])
def test_cuda_logit_confidence_matches_cpu(dtype, B, V):
    x = (torch.randn(B, V) * 3).to(dtype)
    s_cpu, a_cpu = logit_confidence(x)
    s_gpu, a_gpu = logit_confidence(x.cuda(), 1.0)
    assert torch.equal(a_gpu.cpu(), a_cpu)
    torch.testing.assert_close(s_gpu.cpu(), s_cpu, rtol=1e-4, atol=1e-5)


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_hidden_cosine_matches_cpu(dtype):
    a, b = torch.randn(5, 577).to(dtype), torch.randn(5, 577).to(dtype)
    torch.testing.assert_close(hidden_cosine(a.cuda(), b.cuda()).cpu(), hidden_cosine(a, b), rtol=1e-5, atol=1e-5)
