"""fastadapt::paged_decode_attention, paged_prefix_attention and merge_attention_states on CPU
(both paths, several thread counts) and, where a GPU is present, CUDA, against the float64
references of fastadapt_ops.ops.kv_reference."""
from __future__ import annotations

import math

import pytest
import torch

import fastadapt_ops
from fastadapt_ops.attention import prefix_shared_attention
from fastadapt_ops.cpu import available_cpu_isas
from fastadapt_ops.ops import merge_attention_states, paged_decode_attention, paged_prefix_attention
from fastadapt_ops.ops.kv_reference import (
    merge_attention_states_reference,
    paged_decode_attention_reference,
    paged_prefix_attention_reference,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _path_ok(device, path):
    if path not in available_cpu_isas():
        pytest.skip(f"this CPU cannot run the {path} path")
    if device == "cuda" and path != "generic":
        pytest.skip("the CPU path switch does not apply to CUDA")


def _tol(dtype):
    return {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]


def make_paged(lens, S, D, dtype, device="cpu", spare_pages=3, seed=0):
    """Pools and a CSR page table for rows of the given lengths: pages shuffled over the pool,
    some rows holding one more page than they need, a few pages owned by nobody."""
    g = torch.Generator().manual_seed(seed)
    need = [math.ceil(n / S) + int(torch.randint(0, 2, (1,), generator=g)) for n in lens]
    P = sum(need) + spare_pages
    perm = torch.randperm(P, generator=g)
    indptr = torch.zeros(len(lens) + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(torch.tensor(need), 0)
    indices = perm[:sum(need)].int()
    kp = torch.randn(P, S, D, generator=g).to(dtype)
    vp = torch.randn(P, S, D, generator=g).to(dtype)
    return (kp.to(device), vp.to(device), indptr.to(device), indices.to(device),
            torch.tensor(lens, dtype=torch.int32, device=device))


def _check(out, lse, ref_out, ref_lse, dtype):
    assert out.dtype == ref_out.dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.cpu().double(), ref_out.double(), rtol=_tol(dtype), atol=_tol(dtype))
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite)
    assert (lse.cpu()[~finite] == -math.inf).all()
    torch.testing.assert_close(lse.cpu()[finite], ref_lse[finite], rtol=1e-5, atol=1e-4)


# (B, H_kv, G, T_q, D, page_size, lens or None for random)
DECODE_CASES = {
    "smollm2_decode": (2, 3, 3, 1, 64, 16, [37, 1, 200, 16, 0, 5]),
    "mha_page1": (2, 2, 1, 1, 32, 1, [7, 3, 1, 9]),
    "gqa4_d128_verify": (1, 2, 4, 5, 128, 16, [40, 77]),
    "spec_short_rows": (3, 1, 3, 4, 64, 8, [2, 4, 9]),  # rows shorter than T_q: no-key queries
    "odd_dim": (1, 3, 3, 2, 67, 5, [11, 31, 3]),
    "d256": (1, 1, 2, 3, 256, 16, [70]),
    "tiny": (1, 1, 1, 1, 1, 3, [4]),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["generic", "avx2"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(DECODE_CASES))
def test_decode_matches_reference(device, path, dtype, case):
    _path_ok(device, path)
    B, Hkv, G, Tq, D, S, lens = DECODE_CASES[case]
    kp, vp, ip, ix, kl = make_paged(lens, S, D, dtype, device, seed=hash(case) % 1000)
    q = torch.randn(B, Tq, Hkv * G, D, device=device).to(dtype)
    scale = D ** -0.5
    acc = torch.rand(kp.shape[:2], device=device)
    acc_ref = acc.cpu().clone()
    with fastadapt_ops.use_cpu_isa(path):
        out, lse = paged_decode_attention(q, kp, vp, ip, ix, kl, scale, acc)
    ref_out, ref_lse = paged_decode_attention_reference(q.cpu(), kp.cpu(), vp.cpu(), ip.cpu(),
                                                        ix.cpu(), kl.cpu(), scale, acc_ref)
    _check(out, lse, ref_out, ref_lse, dtype)
    torch.testing.assert_close(acc.cpu(), acc_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path", ["generic", "avx2"])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_long_rows_split_k(path, threads, dtype):
    """B = 1, H_kv = 3 with long rows: the rows are split over threads and merged."""
    _path_ok("cpu", path)
    torch.set_num_threads(threads)
    lens = [3000, 1234, 2049]
    kp, vp, ip, ix, kl = make_paged(lens, 16, 64, dtype, seed=threads)
    q = torch.randn(1, 2, 9, 64).to(dtype)
    acc = torch.zeros(kp.shape[:2])
    acc_ref = acc.clone()
    with fastadapt_ops.use_cpu_isa(path):
        out, lse = paged_decode_attention(q, kp, vp, ip, ix, kl, 0.125, acc)
    ref_out, ref_lse = paged_decode_attention_reference(q, kp, vp, ip, ix, kl, 0.125, acc_ref)
    _check(out, lse, ref_out, ref_lse, dtype)
    torch.testing.assert_close(acc, acc_ref, rtol=1e-4, atol=1e-5)
    # each row's mass sums to its number of query heads times query tokens
    assert math.isclose(float(acc.sum()), 3 * 3 * 2, rel_tol=1e-4)


@pytest.mark.parametrize("path", ["generic", "avx2"])
def test_decode_paths_and_threads_agree(path):
    _path_ok("cpu", path)
    lens = [513, 2, 999, 64]
    kp, vp, ip, ix, kl = make_paged(lens, 16, 128, torch.bfloat16)
    q = torch.randn(2, 3, 8, 128).bfloat16()
    outs = []
    for threads in (1, 2, 4):
        torch.set_num_threads(threads)
        with fastadapt_ops.use_cpu_isa(path):
            outs.append(paged_decode_attention(q, kp, vp, ip, ix, kl, 0.1))
    for o, l in outs[1:]:
        torch.testing.assert_close(o.float(), outs[0][0].float(), rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(l, outs[0][1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_empty_rows_and_batch(device):
    kp, vp, ip, ix, kl = make_paged([0, 0, 0], 4, 16, torch.float32, device)
    q = torch.randn(1, 2, 6, 16, device=device)
    acc = torch.zeros(kp.shape[:2], device=device)
    out, lse = paged_decode_attention(q, kp, vp, ip, ix, kl, 0.25, acc)
    assert (out == 0).all() and (lse == -math.inf).all() and (acc == 0).all()
    q0 = torch.randn(0, 1, 6, 16, device=device)
    empty = torch.zeros(1, dtype=torch.int32, device=device)
    o0, l0 = paged_decode_attention(q0, kp, vp, empty, empty[:0], empty[:0], 0.25)
    assert o0.shape == (0, 1, 6, 16) and l0.shape == (0, 1, 6)


def test_decode_noncontiguous_q_and_mixed_dtype():
    kp, vp, ip, ix, kl = make_paged([20, 5], 4, 32, torch.float16)
    q = torch.randn(1, 6, 3, 32).transpose(1, 2)  # [1, 3, 6, 32] non-contiguous, fp32 q on fp16 pools
    out, lse = paged_decode_attention(q, kp, vp, ip, ix, kl, 0.2)
    ref_out, ref_lse = paged_decode_attention_reference(q, kp, vp, ip, ix, kl, 0.2)
    _check(out, lse, ref_out, ref_lse, torch.float32)


def test_decode_shared_pages_score_acc():
    """Two rows reading the same pages (a prefix shared by page table): masses add up."""
    kp, vp, ip, ix, kl = make_paged([40], 8, 16, torch.float32)
    ip2 = torch.tensor([0, int(ip[1]), 2 * int(ip[1])], dtype=torch.int32)
    ix2 = torch.cat([ix, ix])
    kl2 = torch.tensor([40, 33], dtype=torch.int32)
    q = torch.randn(2, 1, 2, 16)
    acc, acc_ref = torch.zeros(kp.shape[:2]), torch.zeros(kp.shape[:2])
    out, lse = paged_decode_attention(q, kp, vp, ip2, ix2, kl2, 0.3, acc)
    ref = paged_decode_attention_reference(q, kp, vp, ip2, ix2, kl2, 0.3, acc_ref)
    _check(out, lse, *ref, torch.float32)
    torch.testing.assert_close(acc, acc_ref, rtol=1e-5, atol=1e-6)


# (B, T_q, H_kv, G, D, page_size, prefix lens per KV head)
PREFIX_CASES = {
    "smollm2_batch16": (16, 1, 3, 3, 64, 16, [300, 300, 300]),
    "ragged_heads": (3, 2, 2, 4, 128, 8, [65, 0]),
    "odd": (5, 3, 1, 3, 37, 3, [29]),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["generic", "avx2"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(PREFIX_CASES))
@pytest.mark.parametrize("threads", [1, 2])
def test_prefix_matches_reference(device, path, dtype, case, threads):
    _path_ok(device, path)
    torch.set_num_threads(threads)
    B, Tq, Hkv, G, D, S, lens = PREFIX_CASES[case]
    kp, vp, ip, ix, pl = make_paged(lens, S, D, dtype, device)
    q = torch.randn(B, Tq, Hkv * G, D, device=device).to(dtype)
    with fastadapt_ops.use_cpu_isa(path):
        out, lse = paged_prefix_attention(q, kp, vp, ip, ix, pl, D ** -0.5)
    ref = paged_prefix_attention_reference(q.cpu(), kp.cpu(), vp.cpu(), ip.cpu(), ix.cpu(),
                                           pl.cpu(), D ** -0.5)
    _check(out, lse, *ref, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["generic", "avx2"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_matches_reference(device, path, dtype):
    _path_ok(device, path)
    oa = torch.randn(3, 2, 5, 24, device=device).to(dtype)
    ob = torch.randn(3, 2, 5, 24, device=device).to(dtype)
    la = torch.randn(3, 2, 5, device=device) * 3
    lb = torch.randn(3, 2, 5, device=device) * 3
    la[0, 0, :2] = -math.inf  # one side empty
    lb[1, 1, 1:3] = -math.inf
    la[2, 1, 4] = lb[2, 1, 4] = -math.inf  # both empty
    with fastadapt_ops.use_cpu_isa(path):
        out, lse = merge_attention_states(oa, la, ob, lb)
    ref = merge_attention_states_reference(oa.cpu(), la.cpu(), ob.cpu(), lb.cpu())
    _check(out, lse, *ref, dtype)
    assert (out[2, 1, 4] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_split_then_merge_equals_whole(device):
    """Attention over prefix + suffix == merge(prefix attention, suffix attention)."""
    B, Hkv, G, D, S = 4, 3, 3, 64, 16
    P_len, suf = 100, [1, 7, 20, 3]
    kp, vp, ip, ix, pl = make_paged([P_len] * Hkv + [s for s in suf for _ in range(Hkv)], S, D,
                                    torch.float32, device, seed=5)
    n_pre = Hkv
    pre_ip = ip[:n_pre + 1].clone()
    pre_ix, pre_l = ix[:int(ip[n_pre])], pl[:n_pre]
    suf_ip = (ip[n_pre:] - ip[n_pre]).contiguous()
    suf_ix, suf_l = ix[int(ip[n_pre]):], pl[n_pre:]
    q = torch.randn(B, 1, Hkv * G, D, device=device)
    out, lse = prefix_shared_attention(q, kp, vp, (pre_ip, pre_ix, pre_l),
                                       (suf_ip, suf_ix, suf_l), D ** -0.5)
    # the composition against the references
    ref_pre = paged_prefix_attention_reference(q.cpu(), kp.cpu(), vp.cpu(), pre_ip.cpu(),
                                               pre_ix.cpu(), pre_l.cpu(), D ** -0.5)
    ref_suf = paged_decode_attention_reference(q.cpu(), kp.cpu(), vp.cpu(), suf_ip.cpu(),
                                               suf_ix.cpu(), suf_l.cpu(), D ** -0.5)
    ref = merge_attention_states_reference(*ref_pre, *ref_suf)
    _check(out, lse, *ref, torch.float32)
    # and against plain softmax attention over the concatenated keys
    kf, vf = kp.cpu().view(-1, D).double(), vp.cpu().view(-1, D).double()
    for b in range(B):
        for h in range(Hkv):
            r = b * Hkv + h
            pre_slots = (pre_ix[int(pre_ip[h]):].cpu().long()[torch.arange(P_len) // S] * S
                         + torch.arange(P_len) % S)
            ns = int(suf_l[r])
            suf_slots = (suf_ix[int(suf_ip[r]):].cpu().long()[torch.arange(ns) // S] * S
                         + torch.arange(ns) % S)
            slots = torch.cat([pre_slots, suf_slots])
            qs = q[b, 0, h * G:(h + 1) * G].cpu().double()
            p = torch.softmax(qs @ kf[slots].T * D ** -0.5, -1)
            torch.testing.assert_close(out[b, 0, h * G:(h + 1) * G].cpu().double(), p @ vf[slots],
                                       rtol=1e-4, atol=1e-5)


# ---- bad inputs ---------------------------------------------------------------------------

def _decode_args(**over):
    kp, vp, ip, ix, kl = make_paged([5, 9], 4, 8, torch.float32)
    a = dict(q=torch.randn(1, 1, 4, 8), k_pages=kp, v_pages=vp, page_indptr=ip, page_indices=ix,
             kv_lens=kl, scale=0.5, score_acc=None)
    a.update(over)
    return a


def _bad_decode_cases():
    kp, vp, ip, ix, kl = make_paged([5, 9], 4, 8, torch.float32)
    P = kp.shape[0]
    return [
        (dict(q=torch.randn(1, 4, 8)), "q must be"),
        (dict(q=torch.randn(1, 1, 4, 8, dtype=torch.float64)), "q must be float32"),
        (dict(q=torch.randn(1, 1, 4, 16)), "head dim"),
        (dict(q=torch.randn(1, 1, 3, 8)), "multiple of H_kv"),
        (dict(q=torch.randn(3, 1, 4, 8)), "kv_lens must hold B"),
        (dict(v_pages=vp.half()), "v_pages must match"),
        (dict(k_pages=kp[:, :, :4].contiguous(), v_pages=vp[:, :, :4].contiguous()), "head dim"),
        (dict(page_indptr=ip.long()), "page_indptr must be int32"),
        (dict(page_indptr=ip[:2]), "page_indptr must be"),
        (dict(page_indptr=torch.tensor([0, 3, 2], dtype=torch.int32)), "non-decreasing"),
        (dict(page_indptr=torch.tensor([0, 1, 99], dtype=torch.int32)), "page_indptr"),
        (dict(page_indices=torch.full_like(ix, P)), "page_indices"),
        (dict(page_indices=torch.full_like(ix, -1)), "page_indices"),
        (dict(kv_lens=torch.tensor([5, 99], dtype=torch.int32)), "kv_lens"),
        (dict(kv_lens=torch.tensor([-1, 9], dtype=torch.int32)), "kv_lens"),
        (dict(score_acc=torch.zeros(P, 4, dtype=torch.float16)), "score_acc must be float32"),
        (dict(score_acc=torch.zeros(P + 1, 4)), "score_acc must be float32"),
        (dict(score_acc=torch.zeros(4, P).t()), "score_acc must be contiguous"),
        (dict(q=torch.randn(1, 1, 4, 300), k_pages=torch.zeros(4, 4, 300),
              v_pages=torch.zeros(4, 4, 300)), "supported maximum"),
    ]


@pytest.mark.parametrize("i", range(len(_bad_decode_cases())))
def test_decode_bad_inputs(i):
    over, match = _bad_decode_cases()[i]
    with pytest.raises(RuntimeError, match=match) as e:
        torch.ops.fastadapt.paged_decode_attention(**_decode_args(**over))
    assert "fastadapt::paged_decode_attention" in str(e.value)


def test_prefix_and_merge_bad_inputs():
    kp, vp, ip, ix, pl = make_paged([5, 9], 4, 8, torch.float32)
    q = torch.randn(2, 1, 4, 8)
    with pytest.raises(RuntimeError, match="prefix_lens"):
        paged_prefix_attention(q, kp, vp, ip, ix, torch.tensor([5, 999], dtype=torch.int32), 1.0)
    with pytest.raises(RuntimeError, match="prefix_indices"):
        paged_prefix_attention(q, kp, vp, ip, ix + 1000, pl, 1.0)
    with pytest.raises(RuntimeError, match="multiple of H_kv"):
        paged_prefix_attention(torch.randn(2, 1, 3, 8), kp, vp, ip, ix, pl, 1.0)
    o, l = torch.randn(2, 3, 8), torch.randn(2, 3)
    for args, match in (((o, l, o[:1], l), "out_b must have"),
                        ((o, l.double(), o, l), "lse_a must be float32"),
                        ((o, l, o, l[:, :2]), "lse_b must be float32"),
                        ((o.long(), l, o, l), "out_a must be float32")):
        with pytest.raises(RuntimeError, match=match) as e:
            merge_attention_states(*args)
        assert "fastadapt::merge_attention_states" in str(e.value)


# ---- opcheck and compile ------------------------------------------------------------------

def test_opcheck():
    kp, vp, ip, ix, kl = make_paged([5, 9, 0, 17], 4, 16, torch.float32)
    q = torch.randn(2, 2, 4, 16)
    torch.library.opcheck(torch.ops.fastadapt.paged_decode_attention.default,
                          (q, kp, vp, ip, ix, kl, 0.25, torch.zeros(kp.shape[:2])))
    torch.library.opcheck(torch.ops.fastadapt.paged_prefix_attention.default,
                          (q, kp, vp, ip[:3], ix, kl[:2], 0.25))
    o, l = torch.randn(2, 3, 8), torch.randn(2, 3)
    torch.library.opcheck(torch.ops.fastadapt.merge_attention_states.default,
                          (o, l, torch.randn(2, 3, 8), torch.randn(2, 3)))


def test_compile_fullgraph():
    kp, vp, ip, ix, kl = make_paged([5, 9], 4, 16, torch.float32)
    pre_ip, pre_ix, pre_l = ip, ix, kl  # two KV heads' prefixes

    def f(q, acc):
        o1, l1 = paged_decode_attention(q, kp, vp, ip, ix, kl, 0.25, acc)
        o2, l2 = paged_prefix_attention(q, kp, vp, pre_ip, pre_ix, pre_l, 0.25)
        o, l = merge_attention_states(o1, l1, o2, l2)
        return o * 2, l

    q = torch.randn(1, 1, 4, 16)
    acc1, acc2 = torch.zeros(kp.shape[:2]), torch.zeros(kp.shape[:2])
    got = torch.compile(f, fullgraph=True)(q, acc1)
    want = f(q, acc2)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(acc1, acc2)


def test_export_keeps_the_ops():
    kp, vp, ip, ix, kl = make_paged([5, 9], 4, 16, torch.float32)

    class M(torch.nn.Module):
        def forward(self, q):
            o1, l1 = paged_decode_attention(q, kp, vp, ip, ix, kl, 0.25)
            o2, l2 = paged_prefix_attention(q, kp, vp, ip, ix, kl, 0.25)
            return merge_attention_states(o1, l1, o2, l2)

    ep = torch.export.export(M(), (torch.randn(1, 1, 4, 16),))
    targets = {str(n.target) for n in ep.graph.nodes}
    for op in ("paged_decode_attention", "paged_prefix_attention", "merge_attention_states"):
        assert any(op in t for t in targets), targets


# ---- CUDA-only: split-K over long rows, shared pages, opt-in index validation ----------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_long_rows_split_k_and_scores(dtype):
    lens = [3000, 17, 2049, 0, 1234, 5]
    kp, vp, ip, ix, kl = make_paged(lens, 16, 128, dtype, "cuda", seed=3)
    q = torch.randn(2, 3, 12, 128, device="cuda").to(dtype)
    acc = torch.zeros(kp.shape[:2], device="cuda")
    acc_ref = acc.cpu().clone()
    out, lse = paged_decode_attention(q, kp, vp, ip, ix, kl, 0.09, acc)
    ref = paged_decode_attention_reference(q.cpu(), kp.cpu(), vp.cpu(), ip.cpu(), ix.cpu(),
                                           kl.cpu(), 0.09, acc_ref)
    _check(out, lse, *ref, dtype)
    torch.testing.assert_close(acc.cpu(), acc_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_shared_pages_and_index_validation(monkeypatch):
    kp, vp, ip, ix, kl = make_paged([40], 8, 64, torch.float16, "cuda")
    ip2 = torch.tensor([0, int(ip[1]), 2 * int(ip[1])], dtype=torch.int32, device="cuda")
    ix2 = torch.cat([ix, ix])
    kl2 = torch.tensor([40, 33], dtype=torch.int32, device="cuda")
    q = torch.randn(2, 1, 2, 64, device="cuda").half()
    acc = torch.zeros(kp.shape[:2], device="cuda")
    acc_ref = acc.cpu().clone()
    out, lse = paged_decode_attention(q, kp, vp, ip2, ix2, kl2, 0.3, acc)
    ref = paged_decode_attention_reference(q.cpu(), kp.cpu(), vp.cpu(), ip2.cpu(), ix2.cpu(),
                                           kl2.cpu(), 0.3, acc_ref)
    _check(out, lse, *ref, torch.float16)
    torch.testing.assert_close(acc.cpu(), acc_ref, rtol=1e-4, atol=1e-5)
    monkeypatch.setenv("FASTADAPT_CHECK_INDICES", "1")
    with pytest.raises(RuntimeError, match="kv_lens"):
        paged_decode_attention(q, kp, vp, ip2, ix2, kl2 + 1000, 0.3)
