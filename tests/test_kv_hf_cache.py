"""PagedHFCache inside HF ``generate`` on a tiny random Llama: identical greedy output to the
default DynamicCache at a 100% budget (batch 1 and left-padded batch 2), eviction that runs and
holds fewer bytes, the mask semantics after eviction, and bad inputs."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from fastadapt_ops.kv.hf_cache import ATTN_IMPLEMENTATION, PagedHFCache  # noqa: E402
from fastadapt_ops.kv.policies import POLICIES  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread (the shared machine's cores are oversubscribed; conftest restores)."""
    torch.set_num_threads(1)


def _model(seed=0, layers=3):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                      attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).eval()
    return model


def _inputs(batch):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 97, (batch, 13), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1:  # left padding of the second row
        ids[1, :5] = 0
        mask[1, :5] = 0
    return ids, mask


def _generate(model, ids, mask, cache=None, n=12):
    kw = dict(max_new_tokens=n, do_sample=False, attention_mask=mask, pad_token_id=0)
    if cache is not None:
        kw["past_key_values"] = cache
    with torch.no_grad():
        return model.generate(ids, **kw)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("policy,dtype", [("full", torch.float32), ("h2o", torch.float32),
                                          ("streaming", torch.float32), ("snapkv", torch.float32),
                                          ("full", torch.bfloat16), ("h2o", torch.bfloat16)])
def test_full_budget_matches_dynamic_cache(batch, policy, dtype):
    model = _model().to(dtype)
    ids, mask = _inputs(batch)
    ref = _generate(model, ids, mask)
    cache = PagedHFCache(model, policy=policy, budget=1.0, page_size=4)
    try:
        out = _generate(model, ids, mask, cache)
    finally:
        cache.detach()
    assert model.config._attn_implementation == "sdpa", "detach restores the attention"
    assert torch.equal(out, ref)
    assert cache.get_seq_length() == out.shape[1] - 1  # the last token is never fed back


def test_config_only_cache_full_policy():
    model = _model()
    ids, mask = _inputs(2)
    ref = _generate(model, ids, mask)
    out = _generate(model, ids, mask, PagedHFCache(model.config, page_size=8))
    assert torch.equal(out, ref)


@pytest.mark.parametrize("policy", ["streaming", "h2o", "tova", "snapkv", "pyramidkv", "adakv",
                                    "keynorm"])
def test_eviction_runs_and_saves_memory(policy):
    model = _model()
    ids, mask = _inputs(2)
    full = PagedHFCache(model, policy="full", page_size=4)
    _generate(model, ids, mask, full, n=16)
    full.detach()
    cache = PagedHFCache(model, policy=policy, budget=6, page_size=4)
    try:
        out = _generate(model, ids, mask, cache, n=16)
    finally:
        cache.detach()
    assert out.shape == (2, 13 + 16)
    assert cache.bytes_held() < full.bytes_held()
    p = cache.paged
    for l in range(p.num_layers):
        for b, s in enumerate(cache.seq_ids):
            for h in range(p.num_kv_heads):
                n = p.seq_len(s, l, h)
                pos = p.positions(s, l, h)
                assert n <= 6 * 2 + 4 + 4, "at most the budget (x2 for the pyramid top) + a chunk"
                assert torch.all(pos[1:] > pos[:-1])
                if b == 1:
                    assert torch.all(pos >= 5), "padding columns are never kept"


def test_masked_attention_after_eviction_matches_dense_reference():
    """After eviction, one forward step through the cache equals attention of the same model
    computed by hand over the kept tokens only (streaming keeps sinks + recent)."""
    model = _model(layers=1)
    ids, mask = _inputs(2)
    cache = PagedHFCache(model, policy="streaming", budget=6, sinks=2, page_size=2, chunk=0)
    try:
        with torch.no_grad():
            model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
            p = cache.paged
            kept = [p.positions(s, 0, 0).tolist() for s in cache.seq_ids]
            assert kept[0] == [0, 1, 9, 10, 11, 12]
            assert kept[1] == [5, 6, 9, 10, 11, 12]
            nxt = torch.tensor([[7], [8]])
            mask2 = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
            out = model(nxt, attention_mask=mask2, past_key_values=cache, use_cache=True).logits
    finally:
        cache.detach()
    # reference: the full model run with an explicit 2-D mask that hides the evicted columns
    ids2 = torch.cat([ids, nxt], 1)
    ref_mask = torch.zeros_like(mask2)
    for b, cols in enumerate(kept):
        ref_mask[b, cols] = 1
    ref_mask[:, -1] = 1
    with torch.no_grad():
        pos = (mask2.cumsum(-1) - 1).clamp(min=0)
        ref = model(ids2, attention_mask=ref_mask, position_ids=pos).logits[:, -1:]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_bad_inputs():
    model = _model()
    with pytest.raises(ValueError, match="unknown policy"):
        PagedHFCache(model.config, policy="lru")
    with pytest.raises(ValueError, match="budget"):
        PagedHFCache(model.config, policy="h2o", budget=0)
    with pytest.raises(ValueError, match="page_size"):
        PagedHFCache(model.config, page_size=0)
    with pytest.raises(ValueError, match="model_or_config"):
        PagedHFCache(object())
    cache = PagedHFCache(model.config)
    with pytest.raises(ValueError, match="key_states"):
        cache.update(torch.randn(1, 3, 2, 16), torch.randn(1, 3, 2, 16), 0)
    assert set(POLICIES) >= {"full", "streaming", "h2o", "tova", "snapkv", "pyramidkv", "adakv",
                             "keynorm"}
    assert ATTN_IMPLEMENTATION == "fastadapt_paged"


def test_evicting_policy_without_model_raises():
    model = _model()
    ids, mask = _inputs(1)
    with pytest.raises(RuntimeError, match="attach"):
        _generate(model, ids, mask, PagedHFCache(model.config, policy="streaming", budget=4))


@pytest.mark.parametrize("policy", ["adakv", "h2o", "pyramidkv"])
def test_dense_masked_attention_equals_paged_attention_after_eviction(policy):
    """With rows of different lengths per head (adakv) or per layer (pyramidkv), each decode
    step's HF attention output equals PagedKVCache.attend over the same rows (no padding)."""
    import fastadapt_ops.kv.hf_cache as hc
    from transformers import AttentionInterface

    model = _model()
    ids, mask = _inputs(1)
    ids = torch.cat([ids, ids], 0)[:, :13]
    mask = torch.ones_like(ids)
    cache = PagedHFCache(model, policy=policy, budget=5, page_size=2, chunk=1)
    checked = []

    def wrapper(module, query, key, value, attention_mask, **kw):
        info = key._fastadapt_info
        owner = info.owner()
        ref = None
        if not info.aligned and query.shape[2] == 1:
            ref, _ = owner.paged.attend(info.layer, owner.seq_ids, query.transpose(1, 2),
                                        scale=kw["scaling"], accumulate_scores=False)
        out = hc._paged_attention(module, query, key, value, attention_mask, **kw)
        if ref is not None:
            torch.testing.assert_close(out[0], ref, rtol=1e-4, atol=1e-5)
            checked.append(len({owner.paged.seq_len(owner.seq_ids[0], info.layer, h)
                                for h in range(2)}))
        return out

    AttentionInterface.register(ATTN_IMPLEMENTATION, wrapper)
    try:
        _generate(model, ids, mask, cache, n=6)
    finally:
        hc.register_attention()
        cache.detach()
    assert len(checked) >= 3 * 4
    if policy == "adakv":
        assert max(checked) > 1, "head-wise budgets gave the heads of a layer different lengths"


def test_two_generate_calls_on_one_cache_match_dynamic_cache():
    from transformers import DynamicCache

    model = _model()
    ids, mask = _inputs(2)
    more = torch.randint(3, 97, (2, 4), generator=torch.Generator().manual_seed(5))

    def two_turns(cache):
        out = _generate(model, ids, mask, cache, n=5)
        ids2 = torch.cat([out, more], 1)
        mask2 = torch.cat([mask, torch.ones(2, ids2.shape[1] - mask.shape[1], dtype=mask.dtype)], 1)
        return _generate(model, ids2, mask2, cache, n=5)

    ref = two_turns(DynamicCache(config=model.config))
    cache = PagedHFCache(model, policy="h2o", budget=1.0)
    try:
        out = two_turns(cache)
    finally:
        cache.detach()
    assert torch.equal(out, ref)
    assert cache.get_seq_length() == out.shape[1] - 1
    streaming = PagedHFCache(model, policy="streaming", budget=8, page_size=4)
    try:
        out = two_turns(streaming)
    finally:
        streaming.detach()
    assert out.shape == ref.shape and streaming.bytes_held() < cache.bytes_held()
    assert model.config._attn_implementation == "sdpa"


def test_attach_replaces_the_previous_cache_and_restores_sdpa():
    import gc
    import weakref

    model = _model()
    ids, mask = _inputs(1)
    a = PagedHFCache(model, policy="streaming", budget=8)
    b = PagedHFCache(model, policy="streaming", budget=8)  # detaches a
    assert a._model is None and not a._hooks
    _generate(model, ids, mask, b, n=3)
    b.detach()
    assert model.config._attn_implementation == "sdpa"
    c = PagedHFCache(model, policy="h2o", budget=8)
    _generate(model, ids, mask, c, n=3)
    ref = weakref.ref(c)
    del c  # dropped without detach: the model's hook holds it weakly
    gc.collect()
    assert ref() is None
    _generate(model, ids, mask, None, n=3)  # the orphan hook is harmless
