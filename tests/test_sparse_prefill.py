"""Block-sparse prefill in the Llama runner (the ``prefill_attention`` hook), the per-head pattern
search, the config file, and the CLI (``fastadapt tune-sparse``, ``generate --sparse-prefill``),
on a tiny random GGUF model."""
import json

import pytest
import torch

pytest.importorskip("gguf")

from fastadapt_ops.attention.sparse_prefill import (  # noqa: E402
    CANDIDATES,
    disable_sparse_prefill,
    enable_sparse_prefill,
    load_config,
    save_config,
    tune_sparse,
    uniform_config,
)
from fastadapt_ops.models import load  # noqa: E402

from test_models import TINY, write_tiny_gguf  # noqa: E402


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tinysparse") / "tiny.gguf"
    write_tiny_gguf(path, seed=5)
    return str(path)


@pytest.fixture
def model(tiny_path):
    return load(tiny_path, max_ctx=400)


def _ids(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY["vocab"], (n,), generator=g).tolist()


def _run(model, ids, n_decode=4):
    logits = [model.prefill(ids, all_logits=True)]
    t = int(torch.argmax(logits[0][-1]))
    for _ in range(n_decode):
        logits.append(model.decode_one(t)[None])
        t = int(torch.argmax(logits[-1][0]))
    return torch.cat(logits)


def test_dense_config_matches_the_paged_prefill(model):
    ids = _ids(200)
    ref = _run(model, ids)
    hook = enable_sparse_prefill(model, uniform_config(TINY["n_layers"], TINY["n_heads"], {"pattern": "dense"},
                                                       min_len=100))
    out = _run(model, ids)
    assert hook.calls == TINY["n_layers"]  # every layer of the prefill ran block-sparse
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)


def test_sparse_config_changes_prefill_and_decodes_from_the_cache(model):
    ids = _ids(300, seed=1)
    ref = _run(model, ids)
    cfg = uniform_config(TINY["n_layers"], TINY["n_heads"], {"pattern": "a_shape", "sink": 1, "local": 1}, 100)
    hook = enable_sparse_prefill(model, cfg)
    out = _run(model, ids)
    assert hook.calls == TINY["n_layers"]
    assert torch.isfinite(out).all()
    assert not torch.allclose(out[:200], ref[:200], atol=1e-4)  # late queries lost keys
    # the first two query blocks see all their keys either way (sink + diagonal)
    torch.testing.assert_close(out[:64], ref[:64], atol=2e-4, rtol=2e-4)
    disable_sparse_prefill(model)
    torch.testing.assert_close(_run(model, ids), ref)


def test_short_prompts_batches_and_continuations_stay_dense(model):
    hook = enable_sparse_prefill(model, uniform_config(TINY["n_layers"], TINY["n_heads"], {"pattern": "dense"}, 150))
    model.prefill(_ids(100))
    assert hook.calls == 0
    model.prefill(_ids(160))
    assert hook.calls == TINY["n_layers"]
    model.forward(_ids(160, seed=2))  # a second chunk starts at position 160: dense
    assert hook.calls == TINY["n_layers"]


def test_mixed_head_config_and_file_roundtrip(model, tmp_path):
    heads = [{"pattern": "dense"}, {"pattern": "vertical_slash", "n_vertical": 32, "n_slash": 8},
             {"pattern": "block_topk", "topk": 2}, {"pattern": "a_shape", "sink": 1, "local": 2}]
    cfg = {"version": 1, "block": 64, "min_len": 64, "layers": [heads] * TINY["n_layers"]}
    save_config(cfg, tmp_path / "c.json")
    enable_sparse_prefill(model, str(tmp_path / "c.json"))
    assert torch.isfinite(_run(model, _ids(260, seed=3))).all()
    with pytest.raises(ValueError, match="layers"):
        enable_sparse_prefill(model, {"version": 1, "block": 64, "layers": [heads]})


def test_tune_picks_cheapest_pattern_meeting_recall(model):
    ids = _ids(320, seed=4)
    cfg = tune_sparse(model, ids, target_recall=1.01, sample_blocks=3)
    assert len(cfg["layers"]) == TINY["n_layers"] and all(len(l) == TINY["n_heads"] for l in cfg["layers"])
    assert all(h["pattern"] == "dense" for l in cfg["layers"] for h in l)
    cfg = tune_sparse(model, ids, target_recall=0.0, sample_blocks=3)
    assert all(h["pattern"] != "dense" and h["recall"] >= 0 for l in cfg["layers"] for h in l)
    assert cfg["mean_cost"] < 1.0
    mid = tune_sparse(model, ids, target_recall=0.9, sample_blocks=3)
    for l in mid["layers"]:
        for h in l:
            assert h["recall"] >= 0.9
    # the dense prefill the search ran left the model usable and unhooked
    assert model.prefill_attention is None


def test_recall_of_full_patterns_is_one(model):
    from fastadapt_ops.attention.sparse_prefill import _Recall

    c = model.config
    q = torch.randn(200, c.n_heads, c.head_dim)
    k = torch.randn(200, c.n_kv_heads, c.head_dim)
    cands = [{"pattern": "a_shape", "sink": 1, "local": 8}, {"pattern": "block_topk", "topk": 8},
             {"pattern": "vertical_slash", "n_vertical": 200, "n_slash": 0},
             {"pattern": "a_shape", "sink": 1, "local": 1}]
    rec = _Recall(cands, 4).layer_recall(q, k)
    torch.testing.assert_close(rec[:, :3], torch.ones(c.n_heads, 3, dtype=torch.float64), atol=1e-5, rtol=0)
    assert torch.all(rec[:, 3] < 1)


def test_cli_tune_then_generate(tiny_path, tmp_path, capsys):
    from fastadapt_ops.cli import main

    text = tmp_path / "t.txt"
    text.write_text("".join(chr(33 + i % 90) for i in range(3000)))
    out = tmp_path / "cfg.json"
    assert main(["tune-sparse", "--model", tiny_path, "--file", str(text), "--out", str(out), "--tokens", "300",
                 "--target-recall", "0.9", "--min-len", "64", "--sample-blocks", "3"]) == 0
    cfg = load_config(str(out))
    assert cfg["target_recall"] == 0.9 and len(cfg["layers"]) == TINY["n_layers"]
    capsys.readouterr()
    assert main(["generate", "--model", tiny_path, "--prompt", text.read_text()[:110], "--max-new-tokens", "4",
                 "--sparse-prefill", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(res["tokens"]) >= 1


def test_candidates_are_valid_patterns():
    from fastadapt_ops.attention.block_sparse import PATTERNS

    assert {c["pattern"] for c in CANDIDATES} <= set(PATTERNS)
