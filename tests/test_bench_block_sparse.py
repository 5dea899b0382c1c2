"""The block_sparse and sparse_prefill bench families end to end on tiny cases (never a speed
assertion): rows, baselines from the same run, files written."""
import json

import pytest
import torch


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_bench_block_sparse_quick(tmp_path, keep_threads):
    from fastadapt_ops.bench import block_sparse

    args = block_sparse.make_parser().parse_args(["--quick", "--threads", "1", "--min-time", "0.001",
                                                  "--out", str(tmp_path)])
    res = block_sparse.run(args)
    ops = [r["op"] for r in res["rows"]]
    assert ops[0].startswith("sdpa causal") and "block_sparse dense layout" in ops
    dense = next(r for r in res["rows"] if r["op"] == "block_sparse dense layout")
    assert dense["density"] == 1.0 and dense["sdpa_ms"] > 0
    sparse = next(r for r in res["rows"] if r["op"].startswith("block_sparse random"))
    assert 0 < sparse["density"] < 0.6 and sparse["ideal"] == pytest.approx(1 / sparse["density"])
    assert all(r["command"].startswith("python bench/run.py block_sparse --tokens 512") for r in res["rows"])
    data = json.loads(next(tmp_path.glob("*/block_sparse*.json")).read_text())
    assert data["columns"] == block_sparse.COLUMNS


def test_random_layout_density():
    from fastadapt_ops.bench.block_sparse import random_layout

    for d in (0.05, 0.2, 0.5):
        L = random_layout(4096, 2, d)
        assert abs(L.density() - d) < 0.05


def test_bench_sparse_prefill_quick(tmp_path, keep_threads, smollm2_gguf_path):
    from fastadapt_ops.bench import sparse_prefill

    args = sparse_prefill.make_parser().parse_args(
        ["--model", smollm2_gguf_path, "--quick", "--threads", "1", "--targets", "0.9", "--uniform", "ashape:1:2",
         "--greedy", "2", "--out", str(tmp_path)])
    res = sparse_prefill.run(args)
    dense, tuned, uni = res["rows"]
    assert dense["setting"] == "dense" and dense["speedup_vs_dense"] == 1.0 and dense["top1_agreement"] == 1.0
    assert dense["ppl_change_pct"] == 0.0 and dense["greedy_match"] == "2/2"
    for r in (tuned, uni):
        assert r["ppl"] > 1 and 0 <= r["top1_agreement"] <= 1 and r["prefill_s"] > 0
    assert uni["mean_head_cost"] < 1.0
    data = json.loads(next(tmp_path.glob("*/sparse_prefill*.json")).read_text())
    assert data["columns"] == sparse_prefill.COLUMNS and len(data["rows"]) == 3
