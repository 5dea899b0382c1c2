"""The paged_attention bench family end to end on tiny sizes (--quick; never a speed assertion)."""
import json

import torch

import fastadapt_ops  # noqa: F401
from fastadapt_ops.bench import FAMILIES, main
from fastadapt_ops.bench import paged_attention as bpa


def test_bench_paged_attention_quick(tmp_path):
    assert "paged_attention" in FAMILIES
    n = torch.get_num_threads()
    try:
        assert main(["paged_attention", "--quick", "--quiet", "--bw-mib", "16", "--out",
                     str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(n)
    (path,) = list(tmp_path.glob("*/paged_attention-quick.json"))
    data = json.loads(path.read_text())
    assert data["columns"] == bpa.COLUMNS
    rows = data["rows"]
    ops = {r["op"] for r in rows}
    assert {"fastadapt.paged_decode_attention", "F.scaled_dot_product_attention",
            "prefix_shared_attention", "paged_decode_attention per sequence"} <= ops
    # quick: smollm2 contexts 64/300 x batches 1/3, llama contexts 64/300 x batch 1, one prefix case
    assert len(rows) == 2 * (4 + 2) + 2
    for r in rows:
        assert r["median_us"] > 0 and r["kv_gbps"] > 0 and r["speedup"] > 0
        assert r["max_abs_err"] is not None and r["max_abs_err"] < 0.05, r  # bf16 outputs
        assert r["command"].startswith("python bench/run.py paged_attention")
    assert (tmp_path / path.parent.name / "paged_attention-quick.md").exists()
