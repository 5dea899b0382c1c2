"""Adaptive best-of-N over forked paged caches.

The prompt is prefilled once; N samples fork its sequence in the paged KV cache (pages shared
copy-on-write: no prompt copy) and decode as one batch through ``model.layer`` (x ``[B, H]``),
so every weight is read once per step for all samples. Attention over the shared prompt uses
prefix-shared (cascade) attention: the prompt's whole pages are read once for the batch
(``paged_prefix_attention``), each sample's own pages through ``paged_decode_attention``, and the
two merged by their log-sum-exp.

Adaptivity:
  * finished samples (EOS or the token limit) leave the batch and give their pages back;
  * every ``prune_every`` steps the samples the scorer ranks lowest are pruned (``prune_keep``
    of the active ones survive, at least ``min_keep``);
  * with an answer extractor, Best-of-Majority: finished samples vote with their extracted
    answer; decoding stops as soon as the leading answer cannot be overtaken by the samples
    still running; the winner is the best-scored sample among the answers whose frequency is at
    least ``majority_alpha`` times the top frequency.

Sample ``i`` draws from its own ``torch.Generator`` seeded with ``seed + i``, so it reproduces a
single-sequence ``generate(..., seed=seed + i)`` run (tested). The default scorer is the mean
log-probability (temperature 1, natural log) of the sample's tokens under the model.
"""
from __future__ import annotations

import dataclasses
import math
import re
import time
from collections import Counter
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch

from ..attention.prefix_shared import prefix_shared_attention
from ..models.generate import sample_next

__all__ = ["BestOfNResult", "best_of_n", "mean_logprob", "regex_answer", "majority_settled",
           "select_best_of_majority", "prune_ranks", "PrefixSharedAttention",
           "add_best_of_args", "run_best_of"]

Scorer = Callable[[List[int], List[float]], float]


def mean_logprob(tokens: List[int], logprobs: List[float]) -> float:
    """Default scorer: mean natural-log probability of the sample's tokens (higher is better)."""
    return sum(logprobs) / len(logprobs) if logprobs else float("-inf")


def regex_answer(pattern: str) -> Callable[[str], Optional[str]]:
    """An answer extractor: the last match of ``pattern`` in the text (group 1 if the pattern has
    a group), stripped; None when nothing matches."""
    rx = re.compile(pattern)

    def extract(text: str) -> Optional[str]:
        m = list(rx.finditer(text))
        if not m:
            return None
        g = m[-1].group(1) if rx.groups else m[-1].group(0)
        return None if g is None else g.strip()

    return extract


def majority_settled(answers: Sequence[Optional[str]], remaining: int) -> Optional[str]:
    """The leading answer when no outcome of the ``remaining`` unfinished samples can overtake or
    tie it (leader count > runner-up count + remaining), else None. None answers do not vote."""
    counts = Counter(a for a in answers if a is not None).most_common(2)
    if not counts:
        return None
    lead = counts[0][1]
    second = counts[1][1] if len(counts) > 1 else 0
    return counts[0][0] if lead > second + remaining else None


def select_best_of_majority(answers: Sequence[Optional[str]], scores: Sequence[float],
                            alpha: float = 1.0) -> int:
    """Best-of-Majority: keep the samples whose answer occurs at least ``alpha`` x the top
    frequency (all samples when no answer was extracted), return the index of the best score
    among them (the first one on ties)."""
    if len(answers) != len(scores) or not answers:
        raise ValueError("select_best_of_majority: answers and scores must be non-empty and of one length")
    counts = Counter(a for a in answers if a is not None)
    if counts:
        top = max(counts.values())
        ok = {a for a, c in counts.items() if c >= alpha * top}
        cand = [i for i, a in enumerate(answers) if a in ok]
    else:
        cand = list(range(len(answers)))
    return max(cand, key=lambda i: (scores[i], -i))


def prune_ranks(scores: Sequence[float], keep_frac: float, min_keep: int) -> List[int]:
    """Indices (into ``scores``) of the samples to prune: all but the best
    ``max(min_keep, ceil(keep_frac * n))``; ties keep the earlier sample."""
    n = len(scores)
    keep = max(int(min_keep), math.ceil(keep_frac * n))
    if keep >= n:
        return []
    order = sorted(range(n), key=lambda i: (-scores[i], i))
    return sorted(order[keep:])


class PrefixSharedAttention:
    """``attend_hook`` of the runner for a batch of sequences forked from ``root``: the root's
    whole prompt pages are the shared prefix of every row (per layer, per KV head), the rest of
    each row is its suffix. Only valid while no page of the prefix is rewritten (no eviction)."""

    def __init__(self, model, root: int):
        kv = model.kv
        S, Hkv = kv.page_size, kv.num_kv_heads
        self.kv = kv
        self.root = root
        self.npfx = kv.seq_len(root, 0, 0) // S  # whole pages only: the partial one is copied on write
        self.prefix = []  # per layer: (indptr [Hkv+1], indices [Hkv*npfx], lens [Hkv]) int32
        for li in range(kv.num_layers):
            pages = [p for h in range(Hkv) for p in kv.row_pages(root, li, h)[:self.npfx]]
            self.prefix.append((torch.arange(Hkv + 1, dtype=torch.int32) * self.npfx,
                                torch.tensor(pages, dtype=torch.int32),
                                torch.full((Hkv,), self.npfx * S, dtype=torch.int32)))
        self._suffix: Dict[tuple, tuple] = {}

    def _suffix_tables(self, li, seqs):
        indptr, indices, lens = self.kv.plan(li, seqs)
        key = (li, tuple(seqs))
        hit = self._suffix.get(key)
        if hit is None or hit[0] is not indices:  # the plan's page lists changed: re-derive
            ip = indptr.long()
            counts = ip[1:] - ip[:-1]
            row = torch.repeat_interleave(torch.arange(counts.numel()), counts)
            keep = torch.arange(indices.numel()) - ip[:-1][row] >= self.npfx
            s_indptr = torch.zeros_like(indptr)
            s_indptr[1:] = torch.cumsum(counts - self.npfx, 0).to(torch.int32)
            hit = (indices, s_indptr, indices[keep].contiguous())
            self._suffix[key] = hit
        return hit[1], hit[2], lens - self.npfx * self.kv.page_size

    def __call__(self, model, li, q, scale, seqs):
        if self.npfx == 0 or seqs is None or self.root in seqs:
            return None
        B = len(seqs)
        T = q.shape[0] // B
        s_tab = self._suffix_tables(li, seqs)
        o, _ = prefix_shared_attention(q.view(B, T, *q.shape[1:]), self.kv.k_pages[li], self.kv.v_pages[li],
                                       self.prefix[li], s_tab, scale)
        return o.reshape(B * T, *o.shape[2:])


@dataclasses.dataclass
class BestOfNResult:
    text: str  # the selected sample's text
    tokens: List[int]
    best_index: int
    answer: Optional[str]
    votes: Dict[str, int]  # answer -> finished samples voting for it
    samples: List[dict]  # per sample: tokens, text, score, answer, status, seed
    n: int
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    total_s: float
    steps: int  # batched decode steps
    sample_tokens: int  # tokens sampled over all samples
    pruned: int
    stopped_early: bool  # the majority settled before every sample finished
    tokens_per_s: float  # sample_tokens / (prefill_s + decode_s)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _kv_room(model, n: int, prompt: int, max_new: int) -> None:
    """Make the page pool hold the prompt once plus n private suffixes (configure_kv resets)."""
    S = model.page_size
    per_row = -(-model.max_ctx // S) + 1
    need_pages = -(-prompt // S) + n * (-(-max_new // S) + 1)
    need = -(-need_pages // per_row)
    if need > model.max_batch:  # what configure_kv does, keeping the policy object
        model.max_batch, model._kv, model._seq, model.pos = need, None, None, 0


@torch.inference_mode()
def best_of_n(model, tokenizer, prompt: Union[str, Sequence[int]], n: int = 4, max_new_tokens: int = 64,
              temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0, seed: int = 0, chat: bool = False,
              scorer: Optional[Scorer] = None, answer_fn: Optional[Callable[[str], Optional[str]]] = None,
              prune_every: int = 0, prune_keep: float = 0.5, min_keep: int = 2, majority_stop: bool = True,
              majority_alpha: float = 1.0, prefix_shared: bool = True, stop_at_eos: bool = True) -> BestOfNResult:
    """Sample ``n`` continuations of ``prompt`` as one batch over forked caches; pick one.

    scorer(tokens, logprobs) -> float (higher is better; default :func:`mean_logprob`).
    answer_fn(text) -> answer or None turns on Best-of-Majority voting and the early stop
    (``majority_stop``). prune_every > 0 prunes the lowest-scored active samples every that many
    steps. ``prefix_shared=False`` attends through the plain paged path (same result).
    Decoding does not evict KV (a policy only acts on the prefill)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"best_of_n: n must be a positive int, got {n!r}")
    if max_new_tokens < 1:
        raise ValueError(f"best_of_n: max_new_tokens must be >= 1, got {max_new_tokens!r}")
    if not 0.0 < prune_keep <= 1.0:
        raise ValueError(f"best_of_n: prune_keep must be in (0, 1], got {prune_keep!r}")
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("best_of_n: a text prompt needs a tokenizer")
        ids = tokenizer.encode(tokenizer.apply_chat_template(prompt) if chat else prompt)
    else:
        ids = [int(i) for i in prompt]
    if not ids:
        raise ValueError("best_of_n: empty prompt")
    if len(ids) + max_new_tokens > model.max_ctx:
        raise ValueError(f"best_of_n: {len(ids)} prompt + {max_new_tokens} new tokens exceed max_ctx={model.max_ctx}")
    if answer_fn is not None and tokenizer is None:
        raise ValueError("best_of_n: answer_fn needs a tokenizer to decode the samples")
    scorer = scorer or mean_logprob
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else model.config.eos_token_id
    decode = (lambda t: tokenizer.decode(t, skip_special_tokens=True)) if tokenizer is not None else (lambda t: "")
    _kv_room(model, n, len(ids), max_new_tokens)

    t0 = time.perf_counter()
    logits0 = model.prefill(ids)
    t1 = time.perf_counter()
    kv, root, P = model.kv, model._seq, len(ids)
    gens = [torch.Generator().manual_seed(int(seed) + i) for i in range(n)]
    toks: List[List[int]] = [[] for _ in range(n)]
    lps: List[List[float]] = [[] for _ in range(n)]
    status = ["active"] * n
    seqs: List[Optional[int]] = [None] * n
    answers: List[Optional[str]] = [None] * n
    hook_prev = model.attend_hook
    if prefix_shared and model.kv_policy is None:
        model.attend_hook = PrefixSharedAttention(model, root)
    steps, pruned, stopped = 0, 0, False

    def take(i: int, logits: torch.Tensor) -> None:
        tok = sample_next(logits, temperature, top_k, top_p, gens[i])
        toks[i].append(tok)
        lps[i].append(float(torch.log_softmax(logits.float(), -1)[tok]))
        if stop_at_eos and eos is not None and tok == eos:
            status[i] = "eos"
        elif len(toks[i]) >= max_new_tokens:
            status[i] = "length"
        if status[i] != "active":
            if seqs[i] is not None:
                kv.free_sequence(seqs[i])
                seqs[i] = None
            if answer_fn is not None:
                answers[i] = answer_fn(decode(toks[i]))

    try:
        for i in range(n):
            take(i, logits0)
            if status[i] == "active":
                seqs[i] = kv.fork(root)
        while True:
            active = [i for i in range(n) if status[i] == "active"]
            if not active:
                break
            if answer_fn is not None and majority_stop and majority_settled(answers, len(active)) is not None:
                stopped = True
                for i in active:
                    status[i] = "stopped"
                break
            if prune_every > 0 and steps > 0 and steps % prune_every == 0 and len(active) > min_keep:
                for j in prune_ranks([scorer(toks[i], lps[i]) for i in active], prune_keep, min_keep):
                    i = active[j]
                    status[i] = "pruned"
                    kv.free_sequence(seqs[i])
                    seqs[i] = None
                    pruned += 1
                active = [i for i in active if status[i] == "active"]
                if answer_fn is not None and majority_stop and majority_settled(answers, len(active)) is not None:
                    continue  # the next pass stops
            batch = [seqs[i] for i in active]
            x = model._embed(torch.tensor([toks[i][-1] for i in active]))  # [B, H]
            positions = torch.tensor([P + len(toks[i]) - 1 for i in active])  # [B]
            delta = None
            for li in range(model.config.n_layers):
                x, delta = model.layer(li, x, delta, positions, batch)
            logits = model.logits(x, delta, all_logits=True)  # [B, vocab]
            steps += 1
            for b, i in enumerate(active):
                take(i, logits[b])
    finally:
        model.attend_hook = hook_prev
        for i in range(n):
            if seqs[i] is not None:
                kv.free_sequence(seqs[i])
                seqs[i] = None
    t2 = time.perf_counter()

    done = [i for i in range(n) if status[i] in ("eos", "length")]
    if not done:  # everything pruned or stopped (cannot happen with min_keep >= 1): take the rest
        done = [i for i in range(n) if status[i] != "pruned"] or list(range(n))
    scores = [scorer(toks[i], lps[i]) for i in range(n)]
    pick = done[select_best_of_majority([answers[i] for i in done], [scores[i] for i in done], majority_alpha)]
    votes = dict(Counter(answers[i] for i in done if answers[i] is not None))
    total_tok = sum(len(t) for t in toks)
    samples = [dict(index=i, seed=int(seed) + i, tokens=toks[i], text=decode(toks[i]), score=scores[i],
                    answer=answers[i], status=status[i]) for i in range(n)]
    return BestOfNResult(
        text=decode(toks[pick]), tokens=toks[pick], best_index=pick, answer=answers[pick], votes=votes,
        samples=samples, n=n, prompt_tokens=P, prefill_s=t1 - t0, decode_s=t2 - t1, total_s=t2 - t0,
        steps=steps, sample_tokens=total_tok, pruned=pruned, stopped_early=stopped,
        tokens_per_s=total_tok / (t2 - t0) if t2 > t0 else 0.0)


# ---- CLI -------------------------------------------------------------------------------------
def add_best_of_args(parser) -> None:
    """``--best-of N [--answer-regex R --prune-every K --prune-keep F]`` for ``fastadapt generate``."""
    g = parser.add_argument_group("adaptive best-of-N")
    g.add_argument("--best-of", type=int, default=0, metavar="N",
                   help="sample N continuations as one batch over forked caches and keep the best")
    g.add_argument("--answer-regex", default=None, metavar="R",
                   help="extract an answer (last match, group 1 if any) for Best-of-Majority voting "
                        "and the early stop once the majority is settled")
    g.add_argument("--prune-every", type=int, default=0, metavar="K",
                   help="every K steps prune the lowest-scored samples (0: never)")
    g.add_argument("--prune-keep", type=float, default=0.5, help="fraction of samples kept by a prune")


def run_best_of(model, args) -> int:
    """``fastadapt generate --best-of N``: prints the chosen text (or one JSON object)."""
    import json
    import sys

    temp = args.temperature if args.temperature and args.temperature > 0 else 0.8
    r = best_of_n(model, model.tokenizer, args.prompt, n=args.best_of, max_new_tokens=args.max_new_tokens,
                  temperature=temp, top_k=args.top_k, top_p=args.top_p,
                  seed=args.seed if args.seed is not None else 0, chat=args.chat,
                  answer_fn=regex_answer(args.answer_regex) if args.answer_regex else None,
                  prune_every=args.prune_every, prune_keep=args.prune_keep)
    if args.json:
        d = r.to_dict()
        for s in d["samples"]:
            s.pop("tokens")
        print(json.dumps(d))
    else:
        print(r.text)
        print(f"[best of {r.n}: sample {r.best_index} (answer {r.answer!r}, votes {r.votes}); "
              f"{r.sample_tokens} sampled tokens in {r.steps} batched steps, {r.pruned} pruned, "
              f"early stop {r.stopped_early}; {r.tokens_per_s:.1f} tok/s]", file=sys.stderr)
    return 0
