"""Token generation with timings: greedy (temperature 0) or seeded sampling (top-k / top-p)."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, List, Optional, Sequence, Union

import torch

__all__ = ["GenerationResult", "generate", "sample_next", "perplexity"]


@dataclasses.dataclass
class GenerationResult:
    text: str
    tokens: List[int]  # generated ids
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    finish_reason: str  # "length" | "eos"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: Optional[torch.Generator] = None) -> int:
    """One token id from ``logits [vocab]``: argmax when ``temperature <= 0``."""
    if temperature is None or temperature <= 0:
        return int(torch.argmax(logits))
    x = logits.float() / float(temperature)
    if top_k and 0 < top_k < x.numel():
        kth = torch.topk(x, top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sx, si = torch.sort(x, descending=True)
        cum = torch.softmax(sx, -1).cumsum(-1)
        drop = cum - torch.softmax(sx, -1) >= top_p  # keep the smallest prefix reaching top_p
        drop[0] = False
        x = x.index_fill(0, si[drop], float("-inf"))
    probs = torch.softmax(x, -1)
    return int(torch.multinomial(probs, 1, generator=generator))


def generate(model, tokenizer, prompt: Union[str, Sequence[int]], max_new_tokens: int = 128,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: Optional[int] = None,
             chat: bool = False, stream: Optional[Callable[[str], None]] = None,
             stop_at_eos: bool = True) -> GenerationResult:
    """Generate up to ``max_new_tokens`` after ``prompt`` (text, or token ids).

    ``chat=True`` wraps a text prompt in the tokenizer's chat template. ``stream(piece)`` is called
    with each new piece of decoded text. Sampling with the same ``seed`` repeats exactly.
    """
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("generate: a text prompt needs a tokenizer")
        text = tokenizer.apply_chat_template(prompt) if chat else prompt
        ids = tokenizer.encode(text)
    else:
        ids = [int(i) for i in prompt]
    if not ids:
        raise ValueError("generate: empty prompt")
    gen = None
    if temperature and temperature > 0:
        gen = torch.Generator()
        gen.manual_seed(int(seed) if seed is not None else int(torch.seed() % (2**63)))
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else model.config.eos_token_id
    out: List[int] = []
    shown = ""

    def emit():
        nonlocal shown
        if stream is None or tokenizer is None:
            return
        s = tokenizer.decode(out, skip_special_tokens=True)
        if s.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return
        if len(s) > len(shown) and s.startswith(shown):
            stream(s[len(shown):])
        shown = s

    finish = "length"
    t0 = time.perf_counter()
    logits = model.prefill(ids)
    t1 = time.perf_counter()
    decode_steps = 0
    t_dec = 0.0
    if max_new_tokens > 0:
        while True:
            tok = sample_next(logits, temperature, top_k, top_p, gen)
            out.append(tok)
            emit()
            if stop_at_eos and eos is not None and tok == eos:
                finish = "eos"
                break
            if len(out) >= max_new_tokens:
                break
            ts = time.perf_counter()
            logits = model.decode_one(tok)
            t_dec += time.perf_counter() - ts
            decode_steps += 1
    prefill_s = t1 - t0
    text = tokenizer.decode(out, skip_special_tokens=True) if tokenizer is not None else ""
    return GenerationResult(
        text=text, tokens=out, prompt_tokens=len(ids), prefill_s=prefill_s, decode_s=t_dec,
        prefill_tokens_per_s=len(ids) / prefill_s if prefill_s > 0 else 0.0,
        decode_tokens_per_s=decode_steps / t_dec if t_dec > 0 else 0.0, finish_reason=finish)


def perplexity(model, ids: Sequence[int], ctx: int = 512, chunk: Optional[int] = None) -> dict:
    """Perplexity over ``ids`` in non-overlapping windows of ``ctx`` tokens: ``{ppl, tokens}``.

    Each window is fed in pieces of ``chunk`` tokens (default: the whole window, or 64 when the
    model has a KV eviction policy, so the policy compacts the cache between pieces and later
    tokens are predicted from the budgeted cache)."""
    ids = [int(i) for i in ids]
    ctx = max(2, min(int(ctx), model.max_ctx))
    if chunk is None:
        chunk = 64 if getattr(model, "kv_policy", None) is not None else ctx
    chunk = max(1, int(chunk))
    nll, n = 0.0, 0
    for s in range(0, len(ids) - 1, ctx):
        window = ids[s:s + ctx]
        if len(window) < 2:
            break
        logits = torch.cat([model.prefill(window[c:c + chunk], all_logits=True, reset=c == 0)
                            for c in range(0, len(window), chunk)]).double()
        tgt = torch.tensor(window[1:])
        lp = torch.log_softmax(logits[:-1], -1)
        nll -= float(lp.gather(1, tgt[:, None]).sum())
        n += len(window) - 1
    if n == 0:
        raise ValueError("perplexity: need at least 2 tokens")
    return {"ppl": math.exp(nll / n), "tokens": n}
