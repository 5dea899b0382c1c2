"""DecodeStack: the runner's one-call decode step (torch.classes.fastadapt.DecodeStack plus
PagedKVCache.decode_slots) against the per-layer Python loop it replaces: bit-identical logits,
KV pages and page tables over many steps (page boundaries included), rebuilt after a weight
swap, skipped where it cannot run, and clear errors for bad use."""
import pytest
import torch

from fastadapt_ops.models import LlamaModel
from fastadapt_ops.models.config import ModelConfig
from fastadapt_ops.quant import quantize_weight

H, NH, NKV, FFN, VOCAB, LAYERS = 64, 4, 2, 96, 101, 3
HD = H // NH


def quantized_model(seed=0, fmts=("q4_1", "q8_0", "q4_0", "int8"), biases=False, max_ctx=256) -> LlamaModel:
    """A random Llama with every block matrix quantized (formats cycle over the matrices)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, sc=0.2: torch.randn(*s, generator=g) * sc  # noqa: E731
    t = {"token_embd.weight": r(VOCAB, H, sc=1.0), "output_norm.weight": 1 + r(H, sc=0.05)}
    k = 0
    for i in range(LAYERS):
        p = f"blk.{i}."
        t[p + "attn_norm.weight"] = 1 + r(H, sc=0.05)
        t[p + "ffn_norm.weight"] = 1 + r(H, sc=0.05)
        shapes = {"attn_q": (NH * HD, H), "attn_k": (NKV * HD, H), "attn_v": (NKV * HD, H),
                  "attn_output": (H, NH * HD), "ffn_gate": (FFN, H), "ffn_up": (FFN, H), "ffn_down": (H, FFN)}
        # q/k/v share a format (fused rows), gate/up too
        for names in (("attn_q", "attn_k", "attn_v"), ("attn_output",), ("ffn_gate", "ffn_up"), ("ffn_down",)):
            fmt = fmts[k % len(fmts)]
            k += 1
            for n in names:
                w = r(*shapes[n])
                t[p + n + ".weight"] = (quantize_weight(w, fmt=fmt) if fmt.startswith("q")
                                        else quantize_weight(w, bits=int(fmt[3:]), group_size=32))
        if biases:
            t[p + "attn_q.bias"], t[p + "attn_k.bias"], t[p + "attn_v.bias"] = r(NH * HD), r(NKV * HD), r(NKV * HD)
            t[p + "attn_output.bias"] = r(H)
    c = ModelConfig(arch="llama", n_layers=LAYERS, hidden=H, n_heads=NH, n_kv_heads=NKV, head_dim=HD, ffn=FFN,
                    vocab=VOCAB, context_length=max_ctx, eos_token_id=None)
    return LlamaModel.from_tensors(c, t, max_ctx=max_ctx, qk_permuted=False)


def _ids(n, seed=0):
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(model, fused, prompt, steps):
    """Greedy decode; per step logits, and the cache's pages and tables at the end."""
    model.fused_decode = fused
    logits = model.prefill(prompt)
    out = []
    for _ in range(steps):
        logits = model.decode_one(int(torch.argmax(logits)))
        out.append(logits.clone())
    kv = model.kv
    tables = [tuple(t.clone() for t in kv.plan(li, [model._seq])) for li in range(model.config.n_layers)]
    pages = [(kp.clone(), vp.clone()) for kp, vp in zip(kv.k_pages, kv.v_pages)]
    return torch.stack(out), tables, pages


@pytest.mark.parametrize("biases", [False, True])
@pytest.mark.parametrize("act_quant", ["none", "int8"])
def test_fused_step_bit_identical_to_python_loop(biases, act_quant):
    loop, fused = quantized_model(biases=biases), quantized_model(biases=biases)  # same pools, same pages
    loop.act_quant = fused.act_quant = act_quant
    assert fused.decode_stack() is not None
    prompt = _ids(13)  # 13 + 40 tokens cross three 16-token page boundaries
    a_logits, a_tables, a_pages = run(loop, False, prompt, 40)
    b_logits, b_tables, b_pages = run(fused, True, prompt, 40)
    assert torch.equal(a_logits, b_logits)
    for (ta, tb) in zip(a_tables, b_tables):
        for x, y in zip(ta, tb):
            assert torch.equal(x, y)
    for (ka, va), (kb, vb) in zip(a_pages, b_pages):
        assert torch.equal(ka, kb) and torch.equal(va, vb)


def test_fused_path_is_taken_and_counts_match():
    model = quantized_model()
    taken = []
    orig = model._fused_decode_step

    def spy(x, p):
        r = orig(x, p)
        taken.append(r is not None)
        return r

    model._fused_decode_step = spy
    model.prefill(_ids(5))
    for t in _ids(7, seed=1):
        model.decode_one(t)
    assert taken == [True] * 7
    assert model.kv.seq_len(model._seq, 0, 0) == 12 and model.kv.position(model._seq) == 12


def test_stack_rebuilt_after_weight_swap():
    model = quantized_model()
    prompt = _ids(9)
    model.prefill(prompt)
    first = model.decode_stack()
    L = model.layers[1]
    L.wgu = quantize_weight(L.wgu.dequantize() * 0.5, fmt="q8_0")  # re-quantized in place
    assert model.decode_stack() is not first
    a, _, _ = run(model, False, prompt, 6)
    b, _, _ = run(model, True, prompt, 6)
    assert torch.equal(a, b)


def test_stack_refuses_what_it_cannot_run():
    model = quantized_model()
    model.layers[0].wo = model.layers[0].wo.dequantize()  # a float weight
    assert model.decode_stack() is None
    model = quantized_model(fmts=("q4_1", "int4"))  # int2/3/4 may take the LUT kernel
    assert model.decode_stack() is None
    # an eviction policy, or an attention hook, keeps the per-layer loop (and still decodes)
    model = quantized_model()
    model.configure_kv("streaming", budget=8)
    model.prefill(_ids(20))
    assert model._fused_decode_step(torch.zeros(1, H), torch.tensor([20])) is None


def test_decode_slots_refuses_shared_page_without_changes():
    model = quantized_model()
    model.prefill(_ids(10))  # the last page is partly filled
    kv, seq = model.kv, model._seq
    child = kv.fork(seq)  # now shared: the next token needs copy-on-write
    before = [(kv.seq_len(seq, li, 0), kv.position(seq)) for li in range(LAYERS)]
    assert kv.decode_slots(seq) is None
    assert [(kv.seq_len(seq, li, 0), kv.position(seq)) for li in range(LAYERS)] == before
    # the loop falls back to the per-layer path and stays right
    model.fused_decode = True
    lg = model.decode_one(3)
    kv.free_sequence(child)
    ref = quantized_model()
    ref.fused_decode = False
    ref.prefill(_ids(10))
    assert torch.equal(lg, ref.decode_one(3))


@torch.inference_mode()  # the plans the model built are inference tensors
def test_bad_use_raises_clear_errors():
    model = quantized_model()
    model.prefill(_ids(4))
    stack = model.decode_stack()
    kv = model.kv
    slots, plans = kv.decode_slots(model._seq)
    x = torch.zeros(1, H)
    with pytest.raises(RuntimeError, match="DecodeStack.step: slots must be"):
        stack.step(x, None, torch.tensor([4]), model._cos_sin, slots[:, :, :1], kv.k_pages, kv.v_pages,
                   plans, 1, "none")
    with pytest.raises(RuntimeError, match="DecodeStack.step: k_pages and v_pages need"):
        stack.step(x, None, torch.tensor([4]), model._cos_sin, slots, kv.k_pages[:1], kv.v_pages, plans, 1,
                   "none")
    with pytest.raises(RuntimeError, match="DecodeStack.step: batch must divide"):
        stack.step(x, None, torch.tensor([4]), model._cos_sin, slots, kv.k_pages, kv.v_pages, plans, 2, "none")
    empty = torch.classes.fastadapt.DecodeStack(2, NH, NKV, HD, 1e-5)
    with pytest.raises(RuntimeError, match="layer 0 has no weights set"):
        empty.step(x, None, torch.tensor([4]), model._cos_sin, torch.zeros(2, 1, NKV, dtype=torch.int32),
                   kv.k_pages[:2], kv.v_pages[:2], plans[:6], 1, "none")
    with pytest.raises(RuntimeError, match="which must be qkv, o, gate_up or down"):
        empty.set_linear(0, "up", torch.zeros(4, 4, dtype=torch.uint8), None, None, None, "q8_0", 32, 32)
    with pytest.raises(RuntimeError, match=r"layer must be in \[0, 2\)"):
        empty.set_norms(2, torch.ones(H), torch.ones(H))
    with pytest.raises(RuntimeError, match="n_heads a multiple of n_kv_heads"):
        torch.classes.fastadapt.DecodeStack(2, 3, 2, HD, 1e-5)


@torch.inference_mode()
def test_batched_step_equals_per_sequence_layers():
    """batch=2 (two sequences, one token each) through the stack equals LlamaModel.layer."""
    model = quantized_model()
    kv_ref = quantized_model()
    for m in (model, kv_ref):
        m.configure_kv(max_batch=2)
        m.prefill(_ids(11))
        m._seq2 = m.kv.add_sequence()
    # give the second sequence its own 6-token prefix through the Python layers
    for m in (model, kv_ref):
        ids = torch.tensor(_ids(6, seed=3))
        x, d = m._embed(ids), None
        for li in range(LAYERS):
            x, d = m.layer(li, x, d, torch.arange(6), seqs=[m._seq2])
    seqs = [model._seq, model._seq2]
    toks = torch.tensor([5, 7])
    pos = torch.tensor([11, 6])
    # reference: the per-layer loop with two sequences
    x, d = kv_ref._embed(toks), None
    for li in range(LAYERS):
        x, d = kv_ref.layer(li, x, d, pos, seqs=[kv_ref._seq, kv_ref._seq2])
    # the stack: book both sequences layer by layer, then one call
    kv = model.kv
    slots, plans = [], []
    sq = [kv._seqs[s] for s in seqs]
    for li in range(LAYERS):
        assert kv._can_book_one(li, sq)
        sl, _ = kv._book_one(li, sq)
        slots.append(sl)
        plans.extend(kv.plan(li, seqs))
    sm = torch.tensor(slots, dtype=torch.int32).view(LAYERS, 2, NKV)
    xs, ds = model.decode_stack().step(model._embed(toks), None, pos, model._cos_sin, sm, kv.k_pages,
                                        kv.v_pages, plans, 2, "none")
    assert torch.equal(xs, x) and torch.equal(ds, d)
