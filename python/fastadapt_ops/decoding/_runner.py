"""Shared pieces of the decoding loops: result record, layer ranges, prefill, token warping."""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence

import torch

__all__ = ["DecodeResult", "run_layers", "prefill_seq", "warp_probs", "ensure_batch"]


@dataclasses.dataclass
class DecodeResult:
    tokens: List[int]  # generated ids (the first comes from the prefill)
    prompt_tokens: int
    prefill_s: float
    decode_s: float  # the loop after the first token
    decode_tokens_per_s: float  # (len(tokens) - 1) / decode_s, as generate() counts
    finish_reason: str  # "length" | "eos"
    stats: dict  # mode-specific: mean layers per token, acceptance rate, mean draft length, ...

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def run_layers(model, lo: int, hi: int, x, delta, positions, seqs):
    for li in range(lo, hi):
        x, delta = model.layer(li, x, delta, positions, seqs)
    return x, delta


def ensure_batch(model, batch: int) -> None:
    """Room in the page pool for ``batch`` decoding sequences besides the model's own."""
    if model.kv_policy is not None:
        raise ValueError("fastadapt_ops.decoding: adaptive decoding needs the full KV cache "
                         "(configure_kv(None)); eviction policies are not supported here")
    if model.max_batch < batch + 1:
        model.configure_kv(None, page_size=model.page_size, max_batch=batch + 1)


def check_prompt(model, ids: Sequence[int], extra: int) -> torch.Tensor:
    """``ids`` as a long tensor, checked against the vocabulary and ``max_ctx`` (with ``extra``
    positions to come)."""
    t = torch.as_tensor([int(i) for i in ids], dtype=torch.long)
    if t.numel() == 0:
        raise ValueError("fastadapt_ops.decoding: empty prompt")
    if int(t.min()) < 0 or int(t.max()) >= model.config.vocab:
        raise ValueError(f"fastadapt_ops.decoding: token ids must be in [0, {model.config.vocab})")
    if t.numel() + extra > model.max_ctx:
        raise ValueError(f"fastadapt_ops.decoding: {t.numel()} prompt tokens + {extra} new positions exceed "
                         f"max_ctx={model.max_ctx} (pass max_ctx= to load)")
    return t


@torch.inference_mode()
def prefill_seq(model, ids: Sequence[int], extra: int = 0):
    """A new cache sequence holding ``ids`` in every layer: ``(seq, last-row logits [V])``."""
    t = check_prompt(model, ids, extra)
    seq = model.kv.add_sequence()
    pos = torch.arange(t.numel())
    x, delta = run_layers(model, 0, model.config.n_layers, model._embed(t), None, pos, [seq])
    return seq, model.logits(x, delta)[0]


def warp_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Rows of ``softmax(logits / temperature)`` after top-k / top-p filtering, fp32 ``[R, V]``
    (the same warping as ``models.generate.sample_next``)."""
    x = logits.float() / float(temperature)
    if top_k and 0 < top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, -1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sx, si = torch.sort(x, -1, descending=True)
        ps = torch.softmax(sx, -1)
        drop = ps.cumsum(-1) - ps >= top_p
        drop[:, 0] = False
        x = x.scatter(-1, si, sx.masked_fill(drop, float("-inf")))
    return torch.softmax(x, -1)


def first_eos(tokens: List[int], eos: Optional[int]) -> int:
    """Index just past the first eos in ``tokens`` (len(tokens) when none)."""
    if eos is None:
        return len(tokens)
    for i, t in enumerate(tokens):
        if t == eos:
            return i + 1
    return len(tokens)
