"""fastadapt::kv_append and fastadapt::kv_compact on CPU (both paths) and, where a GPU is present,
CUDA: compared exactly against the references, with sentinel (no-touch) checks."""
from __future__ import annotations

import pytest
import torch

import fastadapt_ops
from fastadapt_ops.cpu import available_cpu_isas
from fastadapt_ops.ops import kv_append, kv_compact
from fastadapt_ops.ops.kv_reference import kv_append_reference, kv_compact_reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SENTINEL = 7.25  # exact in every pool dtype


def _path_ok(device, path):
    if path not in available_cpu_isas():
        pytest.skip(f"this CPU cannot run the {path} path")
    if device == "cuda" and path != "generic":
        pytest.skip("the CPU path switch does not apply to CUDA")


def _pools(P, S, D, dtype, device):
    return (torch.full((P, S, D), SENTINEL, dtype=dtype, device=device),
            torch.full((P, S, D), SENTINEL, dtype=dtype, device=device))


def _fused_kv(N, Hq, Hkv, D, dtype, device):
    """k, v as views into a fused QKV projection output [N, (Hq + 2 Hkv) * D]."""
    qkv = torch.randn(N, (Hq + 2 * Hkv) * D, device=device).to(dtype)
    k = qkv[:, Hq * D:(Hq + Hkv) * D].view(N, Hkv, D)
    v = qkv[:, (Hq + Hkv) * D:].view(N, Hkv, D)
    return k, v


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["generic", "avx2"])
@pytest.mark.parametrize("pool_dtype", DTYPES)
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 3])
def test_append_matches_reference_and_touches_nothing_else(device, path, pool_dtype, kv_dtype,
                                                            threads):
    _path_ok(device, path)
    torch.set_num_threads(threads)
    N, Hq, Hkv, D, P, S = 13, 9, 3, 67, 11, 5
    k, v = _fused_kv(N, Hq, Hkv, D, kv_dtype, device)
    assert not k.is_contiguous()
    slots = torch.randperm(P * S)[:N * Hkv].view(N, Hkv).int()
    slots[2, 1] = -1
    slots[5] = -1  # a fully padded token
    slots = slots.to(device)
    kp, vp = _pools(P, S, D, pool_dtype, device)
    kr, vr = kp.clone(), vp.clone()
    with fastadapt_ops.use_cpu_isa(path):
        kv_append(k, v, kp, vp, slots)
    kv_append_reference(k, v, kr, vr, slots)
    assert torch.equal(kp, kr) and torch.equal(vp, vr)  # bit-exact, sentinels included
    written = torch.zeros(P * S, dtype=torch.bool)
    written[slots.flatten().cpu()[slots.flatten().cpu() >= 0].long()] = True
    assert (kp.view(P * S, D)[~written.to(device)] == SENTINEL).all()
    assert (vp.view(P * S, D)[~written.to(device)] == SENTINEL).all()


@pytest.mark.parametrize("device", DEVICES)
def test_append_edge_cases(device):
    P, S, D = 4, 16, 8
    kp, vp = _pools(P, S, D, torch.float32, device)
    empty = torch.empty(0, 2, D, device=device)
    kv_append(empty, empty, kp, vp, torch.empty(0, 2, dtype=torch.int32, device=device))
    k = torch.randn(3, 2, D, device=device)
    kv_append(k, k, kp, vp, torch.full((3, 2), -1, dtype=torch.int32, device=device))  # all padded
    assert (kp == SENTINEL).all() and (vp == SENTINEL).all()
    # page_size 1, single token, last slot of the pool
    kp1, vp1 = _pools(5, 1, 3, torch.bfloat16, device)
    x = torch.randn(1, 1, 3, device=device)
    kv_append(x, -x, kp1, vp1, torch.tensor([[4]], dtype=torch.int32, device=device))
    assert torch.equal(kp1[4, 0], x[0, 0].bfloat16()) and torch.equal(vp1[4, 0], (-x[0, 0]).bfloat16())
    assert (kp1[:4] == SENTINEL).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["generic", "avx2"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_scores", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_compact_matches_reference(device, path, dtype, with_scores, threads):
    _path_ok(device, path)
    torch.set_num_threads(threads)
    P, S, D, M = 9, 4, 33, 17
    kp = torch.randn(P, S, D, device=device).to(dtype)
    vp = torch.randn(P, S, D, device=device).to(dtype)
    sc = torch.rand(P, S, device=device) if with_scores else None
    perm = torch.randperm(P * S)
    src = perm[:M].int()
    # destinations overlap sources: half of them are other moves' sources (read-before-write)
    dst = torch.cat([perm[M // 2:M], perm[M:M + M - M // 2]])[torch.randperm(M)].int()
    src, dst = src.to(device), dst.to(device)
    kr, vr = kp.clone(), vp.clone()
    sr = sc.clone() if with_scores else None
    with fastadapt_ops.use_cpu_isa(path):
        kv_compact(kp, vp, sc, src, dst)
    kv_compact_reference(kr, vr, sr, src, dst)
    assert torch.equal(kp, kr) and torch.equal(vp, vr)
    if with_scores:
        assert torch.equal(sc, sr)


@pytest.mark.parametrize("device", DEVICES)
def test_compact_swap_and_empty(device):
    kp = torch.arange(2 * 2 * 3, dtype=torch.float32, device=device).view(2, 2, 3)
    vp = -kp
    sc = torch.arange(4, dtype=torch.float32, device=device).view(2, 2)
    before = kp.clone()
    kv_compact(kp, vp, sc, torch.tensor([], dtype=torch.int32, device=device),
               torch.tensor([], dtype=torch.int32, device=device))
    assert torch.equal(kp, before)
    # a swap is the sharpest read-before-write case
    kv_compact(kp, vp, sc, torch.tensor([0, 3], dtype=torch.int32, device=device),
               torch.tensor([3, 0], dtype=torch.int32, device=device))
    flat = before.view(4, 3)
    assert torch.equal(kp.view(4, 3), flat[[3, 1, 2, 0]])
    assert torch.equal(vp.view(4, 3), -flat[[3, 1, 2, 0]])
    assert torch.equal(sc.view(4), torch.tensor([3.0, 1, 2, 0], device=device))


def _i32(*v):
    return torch.tensor(v, dtype=torch.int32)


def _append_args(**over):
    a = dict(k=torch.randn(2, 3, 8), v=torch.randn(2, 3, 8), k_pages=torch.zeros(4, 4, 8),
             v_pages=torch.zeros(4, 4, 8), slot_mapping=torch.zeros(2, 3, dtype=torch.int32))
    a.update(over)
    return a


@pytest.mark.parametrize("over, match", [
    (dict(slot_mapping=torch.tensor([[0, 1, 16], [2, 3, 4]], dtype=torch.int32)), "slot_mapping"),
    (dict(slot_mapping=torch.tensor([[0, 1, -2], [2, 3, 4]], dtype=torch.int32)), "slot_mapping"),
    (dict(slot_mapping=torch.zeros(2, 3, dtype=torch.int64)), "slot_mapping must be int32"),
    (dict(slot_mapping=torch.zeros(3, 2, dtype=torch.int32)), "slot_mapping must be"),
    (dict(k=torch.randn(2, 3, 7)), "k must be"),
    (dict(v=torch.randn(2, 2, 8)), "v must have k's shape"),
    (dict(k=torch.randn(2, 3, 8, dtype=torch.float64)), "k must be float32"),
    (dict(k=torch.randn(2, 8, 3).transpose(1, 2)), "last dimension must be contiguous"),
    (dict(k_pages=torch.zeros(4, 4, 8, dtype=torch.int32)), "k_pages must be float32"),
    (dict(k_pages=torch.zeros(4, 8, 4).transpose(1, 2)), "k_pages must be contiguous"),
    (dict(v_pages=torch.zeros(4, 5, 8)), "v_pages must have"),
    (dict(k_pages=torch.zeros(16, 8)), "k_pages must be"),
])
def test_append_bad_inputs(over, match):
    with pytest.raises(RuntimeError, match=match) as e:
        torch.ops.fastadapt.kv_append(**_append_args(**over))
    assert "fastadapt::kv_append" in str(e.value)


@pytest.mark.parametrize("args, match", [
    ((_i32(0, 1), _i32(2)), "equal lengths"),
    ((_i32(0, 16), _i32(2, 3)), "src_slots"),
    ((_i32(0, 1), _i32(-1, 3)), "dst_slots"),
    ((_i32(0, 1), _i32(5, 5)), "dst_slots must be distinct"),
    ((_i32(0, 1).long(), _i32(2, 3)), "src_slots must be int32"),
    ((_i32(0, 1).view(1, 2), _i32(2, 3).view(1, 2)), "src_slots must be 1-D"),
])
def test_compact_bad_slots(args, match):
    kp, vp = torch.zeros(4, 4, 8), torch.zeros(4, 4, 8)
    with pytest.raises(RuntimeError, match=match) as e:
        torch.ops.fastadapt.kv_compact(kp, vp, None, *args)
    assert "fastadapt::kv_compact" in str(e.value)
    assert (kp == 0).all()


def test_compact_bad_scores_and_pools():
    kp, vp = torch.zeros(4, 4, 8), torch.zeros(4, 4, 8)
    for sc, match in ((torch.zeros(4, 5), "scores must be float32"),
                      (torch.zeros(4, 4, dtype=torch.float16), "scores must be float32"),
                      (torch.zeros(4, 4).t().contiguous().t(), "scores must be contiguous")):
        with pytest.raises(RuntimeError, match=match):
            torch.ops.fastadapt.kv_compact(kp, vp, sc, _i32(0), _i32(1))
    with pytest.raises(RuntimeError, match="v_pages must have"):
        torch.ops.fastadapt.kv_compact(kp, torch.zeros(4, 4, 9), None, _i32(0), _i32(1))


def test_opcheck_and_compile():
    P, S, D = 4, 4, 8
    k, v = torch.randn(3, 2, D), torch.randn(3, 2, D)
    slots = torch.tensor([[0, 5], [-1, 9], [3, 15]], dtype=torch.int32)
    torch.library.opcheck(torch.ops.fastadapt.kv_append.default,
                          (k, v, torch.zeros(P, S, D), torch.zeros(P, S, D), slots))
    torch.library.opcheck(torch.ops.fastadapt.kv_compact.default,
                          (torch.randn(P, S, D), torch.randn(P, S, D), torch.rand(P, S),
                           _i32(3, 5, 9), _i32(0, 1, 2)))

    def step(k, v, kp, vp, sc):
        kv_append(k, v, kp, vp, slots)
        kv_compact(kp, vp, sc, _i32(15, 9), _i32(1, 2))
        return kp.sum() + vp.sum()

    args = [torch.zeros(P, S, D), torch.zeros(P, S, D), torch.rand(P, S)]
    ref = [a.clone() for a in args]
    got = torch.compile(step, fullgraph=True)(k, v, *args)
    want = step(k, v, *ref)
    torch.testing.assert_close(got, want)
    for a, b in zip(args, ref):  # the in-place updates survive compilation
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_index_validation_is_opt_in(monkeypatch):
    kp, vp = _pools(4, 4, 8, torch.float16, "cuda")
    k = torch.randn(2, 1, 8, device="cuda")
    monkeypatch.setenv("FASTADAPT_CHECK_INDICES", "1")
    with pytest.raises(RuntimeError, match="slot_mapping"):
        kv_append(k, k, kp, vp, torch.tensor([[0], [16]], dtype=torch.int32, device="cuda"))
    with pytest.raises(RuntimeError, match="dst_slots must be distinct"):
        kv_compact(kp, vp, None, torch.tensor([0, 1], dtype=torch.int32, device="cuda"),
                   torch.tensor([3, 3], dtype=torch.int32, device="cuda"))
    assert (kp == SENTINEL).all()
