"""The Llama runner on the paged KV cache: eviction policies through the model, the budget,
real memory returned, logical RoPE positions, and the CLI's --kv-policy / kv_bytes fields."""
import json

import pytest
import torch

pytest.importorskip("gguf")

from fastadapt_ops.kv import POLICIES  # noqa: E402
from fastadapt_ops.models import load  # noqa: E402
from fastadapt_ops.models.generate import perplexity  # noqa: E402

from test_models import TINY, write_tiny_gguf  # noqa: E402

EVICTING = sorted(p for p in POLICIES if p != "full")


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tinykv") / "tiny.gguf"
    write_tiny_gguf(path, seed=3)
    return str(path)


@pytest.fixture
def model(tiny_path):
    return load(tiny_path, max_ctx=256)


def _ids(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY["vocab"], (n,), generator=g).tolist()


def _greedy(model, ids, n):
    logits, out, all_logits = model.prefill(ids), [], []
    for _ in range(n):
        all_logits.append(logits)
        t = int(torch.argmax(logits))
        out.append(t)
        logits = model.decode_one(t)
    return out, torch.stack(all_logits)


@pytest.mark.parametrize("policy", EVICTING)
def test_full_budget_reproduces_full_cache_bit_for_bit(model, policy):
    ids = _ids(40)
    ref_tokens, ref_logits = _greedy(model, ids, 24)
    model.configure_kv(policy, 1.0, page_size=8)
    tokens, logits = _greedy(model, ids, 24)
    assert tokens == ref_tokens
    assert torch.equal(logits, ref_logits)


@pytest.mark.parametrize("policy", EVICTING)
@pytest.mark.parametrize("budget", [0.25, 12])
def test_budget_bounds_rows_and_frees_pages(model, policy, budget):
    c = model.config
    model.configure_kv(policy, budget, page_size=4)
    ids = _ids(64, seed=1)
    full_bytes = None
    logits = model.prefill(ids)
    for _ in range(20):
        logits = model.decode_one(int(torch.argmax(logits)))
        assert torch.isfinite(logits).all()
    kv = model.kv
    seen = model.pos
    assert seen == 84 and kv.position(model._seq) == seen  # logical positions keep counting
    limit = budget if isinstance(budget, int) else budget * seen
    # after an eviction rows may grow by at most one page (plus one step) before the next one;
    # layer budgets (pyramidkv) differ per layer, so the bound is on the total
    held = [sum(kv.seq_len(model._seq, layer, h) for h in range(c.n_kv_heads)) for layer in range(c.n_layers)]
    assert sum(held) <= c.n_layers * c.n_kv_heads * (limit + 2 * kv.page_size + 1), held
    assert all(h < c.n_kv_heads * seen for h in held), held
    model.configure_kv(None, page_size=4)
    model.prefill(ids + [0] * 20)
    full_bytes = model.kv_bytes()["held"]
    assert 0 < kv.bytes_held() < full_bytes


def test_eviction_changes_output_but_stays_sane(model):
    ids = _ids(96, seed=2)
    ref, _ = _greedy(model, ids, 8)
    model.configure_kv("streaming", 16, page_size=4, sinks=2)
    got, logits = _greedy(model, ids, 8)
    assert len(got) == 8 and torch.isfinite(logits).all()
    # streaming keeps the 2 sinks + the most recent tokens, in order, in every row
    kv = model.kv
    pos = kv.positions(model._seq, 0, 0)
    assert pos[:2].tolist() == [0, 1] and pos[-1].item() == model.pos - 1
    assert torch.all(pos[1:] > pos[:-1])


def test_reset_returns_pages(model):
    model.configure_kv("h2o", 0.5, page_size=4)
    model.prefill(_ids(50))
    kv = model.kv
    used = kv.bytes_held()
    assert used > 0
    model.reset()
    assert kv.bytes_held() == 0
    model.prefill(_ids(50))
    assert kv.bytes_held() == used


def test_chunked_prefill_equals_one_prefill(model):
    ids = _ids(70, seed=4)
    whole = model.prefill(ids, all_logits=True)
    parts = torch.cat([model.prefill(ids[i:i + 16], all_logits=True, reset=i == 0) for i in range(0, 70, 16)])
    assert (parts - whole).abs().max() <= 1e-4 * whole.abs().max()


def test_perplexity_under_a_budget(model):
    ids = _ids(120, seed=5)
    full = perplexity(model, ids, ctx=120)
    model.configure_kv("h2o", 1.0)
    same = perplexity(model, ids, ctx=120)  # 100% budget: no policy at all
    assert same["ppl"] == pytest.approx(full["ppl"], rel=1e-5)
    model.configure_kv("streaming", 0.25, page_size=4)
    small = perplexity(model, ids, ctx=120, chunk=16)
    assert small["tokens"] == full["tokens"] and small["ppl"] > 1.0
    assert small["ppl"] != pytest.approx(full["ppl"], rel=1e-6)  # the budget did act


def test_bad_kv_configuration(model):
    with pytest.raises(ValueError, match="policy"):
        model.configure_kv("nope", 0.5)
    with pytest.raises(ValueError, match="budget"):
        model.configure_kv("h2o", 0)
    with pytest.raises(ValueError, match="page_size"):
        model.configure_kv("h2o", 0.5, page_size=0)
    with pytest.raises(ValueError, match="kv_dtype"):
        model.configure_kv(None, kv_dtype=torch.int8)


@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.bfloat16])
def test_half_precision_kv_pages(model, tiny_path, capsys, kv_dtype):
    """configure_kv(kv_dtype=...) stores K/V in half precision (fp32 activations and attention
    math): the pages really are half, the logits stay close to the fp32 cache's."""
    from fastadapt_ops.models.cli import main

    ids = _ids(40, seed=8)
    model.configure_kv(None)
    exact = model.prefill(ids, all_logits=True)
    full_bytes = model.kv_bytes()["held"]
    model.configure_kv(None, kv_dtype=kv_dtype)
    half = model.prefill(ids, all_logits=True)
    assert model.kv.k_pages[0].dtype == kv_dtype and model.kv_bytes()["held"] * 2 == full_bytes
    tol = 0.02 if kv_dtype == torch.float16 else 0.05
    assert (half - exact).abs().max() <= tol * exact.abs().max()
    assert main(["generate", "--model", tiny_path, "--prompt", "the rain", "--max-new-tokens", "3",
                 "--kv-dtype", str(kv_dtype).split(".")[1], "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tokens"]) == 3


def test_cli_kv_policy_json(tiny_path, capsys):
    from fastadapt_ops.models.cli import main

    args = ["generate", "--model", tiny_path, "--prompt", "the rain in spain " * 8, "--max-new-tokens", "6",
            "--json"]
    assert main(args) == 0
    full = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(args + ["--kv-policy", "streaming", "--kv-budget", "0.25", "--page-size", "4"]) == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("kv_bytes_end", "kv_bytes_peak", "text", "tokens"):
        assert key in ev
    assert 0 < ev["kv_bytes_end"] < full["kv_bytes_end"]
    assert ev["kv_bytes_peak"] >= ev["kv_bytes_end"] and ev["kv_policy"] == "streaming"
    with pytest.raises(SystemExit):
        main(args + ["--kv-policy", "h2o", "--kv-budget", "-1"])


def test_int8_decode_activations_close_to_exact(model, tiny_path, capsys):
    """act_quant="int8" (single-token rows quantized per token, integer block dots) stays close
    to the exact path and leaves multi-token matmuls (prefill) exact."""
    from fastadapt_ops.models.cli import main
    from fastadapt_ops.quant import QuantizedWeight

    assert isinstance(model.layers[0].wgu, QuantizedWeight)
    ids = _ids(30, seed=6)
    exact_prefill = model.prefill(ids, all_logits=True)
    model.prefill(ids)
    exact = model.decode_one(7)
    model.act_quant = "int8"
    assert torch.equal(model.prefill(ids, all_logits=True), exact_prefill)  # M = 30 rows: exact
    model.prefill(ids)
    approx = model.decode_one(7)
    assert not torch.equal(approx, exact)  # the int8 path did run
    assert (approx - exact).abs().max() <= 0.05 * exact.abs().max()
    assert main(["generate", "--model", tiny_path, "--prompt", "the rain", "--max-new-tokens", "4",
                 "--act-quant", "int8", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tokens"]) == 4
