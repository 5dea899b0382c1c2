"""Adaptive best-of-N over forked paged caches and entropy-adaptive switching, on a tiny random
Llama: forks never corrupt each other (each sample equals a single-sequence run with its seed),
the prefix-shared attention path equals the plain one, pruning / Best-of-Majority / early stop
logic on synthetic scores, KV consistency of both switching variants, and the CLI flags."""
import json

import pytest
import torch

pytest.importorskip("gguf")

from fastadapt_ops.decoding.best_of_n import (  # noqa: E402
    PrefixSharedAttention, best_of_n, majority_settled, mean_logprob, prune_ranks, regex_answer,
    select_best_of_majority)
from fastadapt_ops.decoding.switching import make_cheap_variant, parse_layers, switch_generate  # noqa: E402
from fastadapt_ops.models import generate, load  # noqa: E402

from test_models import TINY, write_tiny_gguf  # noqa: E402


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tinybon") / "tiny.gguf"
    write_tiny_gguf(path, seed=5)
    return str(path)


@pytest.fixture
def model(tiny_path):
    m = load(tiny_path, max_ctx=128)
    m.configure_kv(None, page_size=4)  # prompt of 13 tokens: 3 shared pages + a copied partial one
    return m


def _ids(n, seed=0):
    return torch.randint(0, TINY["vocab"], (n,), generator=torch.Generator().manual_seed(seed)).tolist()


KW = dict(max_new_tokens=12, temperature=1.0, top_k=20, stop_at_eos=False)


class _Tok:
    """A stub tokenizer: text = the ids joined by spaces; a chosen eos id."""

    def __init__(self, eos):
        self.eos_token_id = eos

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


# ---- forks ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix_shared", [True, False])
def test_each_sample_equals_a_single_sequence_run(model, prefix_shared):
    ids = _ids(13)
    r = best_of_n(model, None, ids, n=4, seed=7, prefix_shared=prefix_shared, **KW)
    assert r.steps == KW["max_new_tokens"] - 1 and r.sample_tokens == 4 * KW["max_new_tokens"]
    assert len({tuple(s["tokens"]) for s in r.samples}) > 1  # the samples really differ
    for s in r.samples:
        single = generate(model, None, ids, seed=7 + s["index"], **KW)
        assert s["tokens"] == single.tokens
        # teacher-forced log-probs of the sample's tokens equal the ones recorded in the batch
        logits = model.prefill(ids + s["tokens"][:-1], all_logits=True)[len(ids) - 1:]
        lp = torch.log_softmax(logits.double(), -1).gather(1, torch.tensor(s["tokens"])[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(s["score"], dtype=torch.float64), lp.mean(), rtol=1e-4, atol=1e-4)
    assert model.kv.seq_ids == [model._seq]  # every fork gave its pages back


def test_prefix_shared_attention_equals_plain_path(model):
    ids = _ids(13, seed=1)
    model.prefill(ids)
    kv, root = model.kv, model._seq
    forks = [kv.fork(root) for _ in range(3)]
    hook = PrefixSharedAttention(model, root)
    assert hook.npfx == 3
    c = model.config
    for step in range(6):  # a few decode steps: suffixes grow past a page boundary
        for li in range(c.n_layers):  # random q/k/v: both attention paths on the same q and pages
            q = torch.randn(3, c.n_heads, c.head_dim)
            k = torch.randn(3, c.n_kv_heads, c.head_dim)
            kv.append(li, forks, k, k.clone())
            model.attend_hook = None
            plain = model._attend(li, q, 0.25, forks)
            shared = hook(model, li, q, 0.25, forks)
            torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-5)
    for f in forks:
        kv.free_sequence(f)


def test_prefix_shared_and_plain_runs_agree(model):
    ids = _ids(13, seed=2)
    a = best_of_n(model, None, ids, n=3, seed=3, prefix_shared=True, **KW)
    b = best_of_n(model, None, ids, n=3, seed=3, prefix_shared=False, **KW)
    assert [s["tokens"] for s in a.samples] == [s["tokens"] for s in b.samples]
    for sa, sb in zip(a.samples, b.samples):
        assert sa["score"] == pytest.approx(sb["score"], abs=1e-5)


# ---- pruning, majority, early stop ---------------------------------------------------------------
def test_prune_ranks_and_majority_logic():
    assert prune_ranks([0.1, -3.0, 0.5, -1.0], 0.5, 1) == [1, 3]
    assert prune_ranks([0.1, -3.0, 0.5, -1.0], 0.5, 3) == [1]
    assert prune_ranks([1.0, 1.0, 1.0], 0.3, 1) == [1, 2]  # ties keep the earlier sample
    assert prune_ranks([1.0], 0.5, 1) == []
    assert majority_settled(["a", "a", None], 1) == "a"  # 2 > 0 + 1
    assert majority_settled(["a", "a", "b"], 1) is None  # b could still tie
    assert majority_settled(["a", "a", "a", "b"], 1) == "a"
    assert majority_settled([None, None], 0) is None
    assert majority_settled(["x"], 0) == "x"
    # Best-of-Majority: the frequency filter first, then the best score
    assert select_best_of_majority(["a", "b", "a", "b", "a"], [0.0, 9.0, 1.0, 8.0, 0.5]) == 2
    assert select_best_of_majority(["a", "b", "a", "b", "a"], [0.0, 9.0, 1.0, 8.0, 0.5], alpha=0.5) == 1
    assert select_best_of_majority([None, None], [0.0, 1.0]) == 1
    assert mean_logprob([1, 2], [-1.0, -3.0]) == -2.0
    assert regex_answer(r"answer: (\d+)")("answer: 3 then answer: 42") == "42"
    assert regex_answer(r"\d+")("none") is None


def test_pruning_frees_samples_and_keeps_the_rest_intact(model):
    ids = _ids(13, seed=4)
    r = best_of_n(model, None, ids, n=4, seed=11, prune_every=2, prune_keep=0.5, min_keep=1, **KW)
    status = [s["status"] for s in r.samples]
    assert status.count("pruned") == 3 and r.pruned == 3 and status.count("length") == 1
    kept = next(s for s in r.samples if s["status"] == "length")
    assert r.best_index == kept["index"]
    assert kept["tokens"] == generate(model, None, ids, seed=11 + kept["index"], **KW).tokens
    assert r.sample_tokens < 4 * KW["max_new_tokens"]
    assert model.kv.seq_ids == [model._seq]


def test_majority_early_stop(model):
    """Samples 0 and 1 hit the stub EOS first with the same answer; with one sample left the
    majority is settled and decoding stops."""
    ids = _ids(13, seed=6)
    kw = dict(KW, top_k=3)
    for seed in range(30):
        free = best_of_n(model, None, ids, n=3, seed=seed, **kw)
        t = [s["tokens"] for s in free.samples]
        for eos in set(t[0][:6]) & set(t[1][:6]):
            first = [x.index(eos) if eos in x else 99 for x in t]
            if max(first[0], first[1]) < first[2] - 1:
                r = best_of_n(model, _Tok(eos), ids, n=3, seed=seed, answer_fn=lambda s: "same",
                              **dict(kw, stop_at_eos=True))
                st = [s["status"] for s in r.samples]
                assert st[0] == st[1] == "eos" and st[2] == "stopped" and r.stopped_early
                assert r.votes == {"same": 2} and r.best_index in (0, 1)
                assert r.steps == max(first[0], first[1])
                assert model.kv.seq_ids == [model._seq]
                return
    pytest.fail("no seed gave two samples an early shared token")


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="n must be"):
        best_of_n(model, None, [1, 2], n=0)
    with pytest.raises(ValueError, match="prune_keep"):
        best_of_n(model, None, [1, 2], prune_keep=0.0)
    with pytest.raises(ValueError, match="max_ctx"):
        best_of_n(model, None, [1, 2], max_new_tokens=500)


# ---- entropy switching ---------------------------------------------------------------------------
@pytest.fixture
def pair(tiny_path):
    full = load(tiny_path, max_ctx=128)
    return full, make_cheap_variant(full, bits=3, group_size=32)


def test_never_switching_equals_plain_greedy(pair):
    full, cheap = pair
    ids = _ids(9, seed=8)
    want = generate(full, None, ids, max_new_tokens=16, stop_at_eos=False).tokens
    r = switch_generate(full, cheap, None, ids, max_new_tokens=16, lo=-1.0, hi=-1.0, stop_at_eos=False)
    assert r.tokens == want and r.cheap_fraction == 0.0 and r.switches == 0


@pytest.mark.parametrize("kind", ["int3", "one block"])
def test_switching_keeps_both_caches_consistent(pair, kind):
    """Flapping thresholds: every token must be the greedy choice of the variant that produced it
    given the whole text so far (each variant's cache caught up on the tokens it missed)."""
    full, cheap = pair
    if kind == "one block":
        cheap = make_cheap_variant(full, bits=None, layers=1)
        assert len(cheap.layers) == 1 and cheap.config.n_layers == 1 and full.config.n_layers == 2
    ids = _ids(9, seed=9)
    r = switch_generate(full, cheap, None, ids, max_new_tokens=20, lo=0.6, hi=0.6, window=1,
                        stop_at_eos=False)
    assert 0 < r.cheap_fraction < 1 and r.switches >= 2 and r.catchup_tokens > 0
    text = ids + r.tokens[:-1]
    lf = full.prefill(text, all_logits=True)[len(ids) - 1:]
    lc = cheap.prefill(text, all_logits=True)[len(ids) - 1:]
    for i, (tok, v) in enumerate(zip(r.tokens, r.variant)):
        assert tok == int(torch.argmax((lf if v == "full" else lc)[i])), i


def test_cheap_variant_is_cheaper_and_close(pair):
    full, cheap = pair
    bytes_ = lambda m: sum(w.nbytes for L in m.layers for w in (L.wqkv, L.wo, L.wgu, L.wdown)  # noqa: E731
                           if hasattr(w, "nbytes"))
    assert bytes_(cheap) < bytes_(full)
    ids = _ids(9, seed=10)
    a, b = full.prefill(ids), make_cheap_variant(full, bits=8, group_size=32).prefill(ids)
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99  # int8 re-quantization: near the original
    assert full.prefill(ids).equal(a)  # the variants share no cache
    with pytest.raises(ValueError, match="bits"):
        make_cheap_variant(full, bits=5)
    with pytest.raises(ValueError, match="layers"):
        make_cheap_variant(full, bits=None, layers=[1, 0])
    assert parse_layers("drop-odd:10", 30) == list(range(10)) + list(range(10, 30, 2))
    assert parse_layers("3", 30) == 3 and parse_layers("0,2", 30) == [0, 2] and parse_layers("", 30) is None
    with pytest.raises(ValueError, match="lo <= hi"):
        switch_generate(full, cheap, None, ids, lo=2.0, hi=1.0)


# ---- CLI -------------------------------------------------------------------------------------------
def test_cli_best_of_and_switch_json(tiny_path, capsys):
    from fastadapt_ops.models.cli import main

    assert main(["generate", "--model", tiny_path, "--prompt", "hello there", "--max-new-tokens", "6",
                 "--best-of", "3", "--seed", "1", "--answer-regex", r"(\w+)", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["n"] == 3 and len(d["samples"]) == 3 and "votes" in d and "stopped_early" in d
    assert main(["generate", "--model", tiny_path, "--prompt", "hello there", "--max-new-tokens", "6",
                 "--switch", "entropy", "--switch-bits", "3", "--switch-layers", "1", "--switch-thresholds", "0.5,1.0",
                 "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert 0.0 <= d["cheap_fraction"] <= 1.0 and len(d["variant"]) == len(d["tokens"])
