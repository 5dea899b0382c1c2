"""The lut_linear bench end to end on one tiny shape (never a speed assertion), and its table."""
import importlib.util
import json

import pytest
import torch

try:
    from fastadapt_ops.ops import lut_linear as _lut  # noqa: F401

    torch.ops.fastadapt.lut_linear  # noqa: B018
except (ImportError, AttributeError, RuntimeError):
    pytest.skip("fastadapt_ops._C not built", allow_module_level=True)

from fastadapt_ops.bench import lut_linear as bl  # noqa: E402
from fastadapt_ops.bench import main  # noqa: E402


def test_bench_lut_linear_smoke(tmp_path):
    n = torch.get_num_threads()
    table = tmp_path / "table.py"
    try:
        assert main(["lut_linear", "--shapes", "64x128", "--m", "1,2", "--min-time", "0.001",
                     "--rotation-mib", "1", "--bw-mib", "64", "--quiet", "--out", str(tmp_path),
                     "--write-table", str(table)]) == 0
    finally:
        torch.set_num_threads(n)
    (js,) = tmp_path.glob("*/lut_linear.json")
    data = json.loads(js.read_text())
    assert data["columns"] == bl.COLUMNS
    rows = data["rows"]
    assert {r["op"] for r in rows} == set(bl.LUT_KINDS + bl.Q_KINDS)
    for r in rows:
        assert r["median_us"] > 0 and r["command"].startswith("python bench/run.py lut_linear --shapes 64x128")
        assert r["vs_q4"] > 0
    assert any("lut2" in line for line in data["meta"]["notes"])
    spec = importlib.util.spec_from_file_location("t", table)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert set(mod.TABLE) == {(b, 64, 128, m) for b in (2, 3, 4) for m in (1, 2)}
    assert mod.COMMAND.startswith("python bench/run.py lut_linear") and "--write-table" in mod.COMMAND
