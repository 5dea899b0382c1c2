"""Self-speculative decoding (LayerSkip-like) with an adaptive draft length, batch >= 1.

Draft: the first ``L`` layers (+ optional exit adapter) + the LM head (full, or a candidate
subset of the vocabulary: the head is a third of SmolLM2's bytes per token, so the draft reads
only its most frequent rows) propose tokens one at a time; their layer-0..L-1 K/V go into the
cache as they are made. Verify: the k drafted tokens plus the last committed one run through
layers L..n-1 in one pass with T = k + 1 queries per sequence (``model.layer`` appends their K/V
and attends causally among them), starting from the draft's own layer-L hidden states, so the
draft layers are never run twice. Rejected tokens are rolled back from every layer with
``PagedKVCache.truncate``.

Acceptance: greedy keeps the longest prefix of drafts equal to the full model's argmax plus the
full model's next token (output identical to plain greedy decoding); sampling uses the standard
rejection rule (accept d with prob min(1, p(d)/q(d)), else resample from max(0, p - q)), so
tokens follow the full model's (warped) distribution.

Draft length (``draft_len``): an int K (fixed); ``"adaptive"``: SpecDec++'s stop rule with the
draft's own confidence as the acceptance estimate (stop when the predicted probability that some
draft is rejected, 1 - prod p1_i, exceeds ``stop_threshold``); ``"heuristic"``: HF assisted
generation's rule (start at ``init_draft``, +2 after a cycle that accepted everything, -1 otherwise).

Batch > 1: sequences draft in lockstep (T = 1 each) and verify together (T = k + 1 each);
acceptance is ragged: each sequence keeps its own prefix and rolls back its own tail.
"""
from __future__ import annotations

import time
from typing import List, Optional, Sequence, Union

import torch

from ._runner import DecodeResult, check_prompt, ensure_batch, first_eos, prefill_seq, run_layers, warp_probs
from .confidence import CandidateHead, ExitHead, confidence

__all__ = ["SelfSpeculativeDecoder"]


class SelfSpeculativeDecoder:
    def __init__(self, model, draft_layers: int, draft_len: Union[str, int] = "adaptive", max_draft: int = 6,
                 stop_threshold: float = 0.7, init_draft: int = 4, adapters=None,
                 candidates: Optional[CandidateHead] = None):
        n = model.config.n_layers
        if not isinstance(draft_layers, int) or not 0 < draft_layers < n:
            raise ValueError(f"SelfSpeculativeDecoder: draft_layers must be an int in [1, {n}), got {draft_layers!r}")
        if isinstance(draft_len, str):
            if draft_len not in ("adaptive", "heuristic"):
                raise ValueError("SelfSpeculativeDecoder: draft_len must be 'adaptive', 'heuristic' or a "
                                 f"positive int, got {draft_len!r}")
        elif not isinstance(draft_len, int) or draft_len <= 0:
            raise ValueError(f"SelfSpeculativeDecoder: draft_len must be a positive int, got {draft_len!r}")
        if not isinstance(max_draft, int) or max_draft <= 0:
            raise ValueError(f"SelfSpeculativeDecoder: max_draft must be a positive int, got {max_draft!r}")
        if not 0.0 < stop_threshold < 1.0:
            raise ValueError(f"SelfSpeculativeDecoder: stop_threshold must be in (0, 1), got {stop_threshold!r}")
        self.model, self.L, self.draft_len = model, draft_layers, draft_len
        self.max_draft = draft_len if isinstance(draft_len, int) else max_draft
        self.stop_threshold = float(stop_threshold)
        self.head = ExitHead(model, draft_layers, adapters, candidates)
        self._k_heur = max(1, min(int(init_draft), self.max_draft))

    # ------------------------------------------------------------------ public
    def generate(self, prompt: Sequence[int], max_new_tokens: int = 64, **kw) -> DecodeResult:
        return self.generate_batch([prompt], max_new_tokens, **kw)[0]

    @torch.inference_mode()
    def generate_batch(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64, temperature: float = 0.0,
                       top_k: int = 0, top_p: float = 1.0, seed: Optional[int] = None,
                       stop_at_eos: bool = True, eos: Optional[int] = None) -> List[DecodeResult]:
        m = self.model
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("SelfSpeculativeDecoder: prompts must be non-empty token lists")
        for p in prompts:  # all checked before any sequence is made
            check_prompt(m, p, max_new_tokens + self.max_draft + 2)
        ensure_batch(m, len(prompts))
        eos = m.config.eos_token_id if eos is None else eos
        eos = eos if stop_at_eos else None
        sample = temperature is not None and temperature > 0
        gen = torch.Generator().manual_seed(int(seed) if seed is not None else int(torch.seed() % (2**63)))
        B = len(prompts)
        seqs, last, pos, outs, fin, pf_s = [], [], [], [], [], []
        for p in prompts:
            t0 = time.perf_counter()
            seq, lg = prefill_seq(m, p, max_new_tokens + self.max_draft + 2)
            tok = self._pick(lg[None], sample, temperature, top_k, top_p, gen)[0]
            pf_s.append(time.perf_counter() - t0)
            seqs.append(seq)
            last.append(tok)
            pos.append(len(p))
            outs.append([tok])
            fin.append("eos" if eos is not None and tok == eos else ("length" if max_new_tokens <= 1 else None))
        st = {"cycles": 0, "drafted": 0, "accepted": 0, "draft_steps": 0}
        t0 = time.perf_counter()
        try:
            while True:
                act = [b for b in range(B) if fin[b] is None]
                if not act:
                    break
                room = min(max_new_tokens - len(outs[b]) for b in act)
                self._cycle(act, seqs, last, pos, outs, max(1, room), sample, temperature, top_k, top_p, gen, st)
                for b in act:
                    cut = first_eos(outs[b], eos)
                    if cut < len(outs[b]) or (eos is not None and outs[b][cut - 1] == eos):
                        outs[b] = outs[b][:cut]
                        fin[b] = "eos"
                    elif len(outs[b]) >= max_new_tokens:
                        outs[b] = outs[b][:max_new_tokens]
                        fin[b] = "length"
        finally:
            for s in seqs:
                m.kv.free_sequence(s)
        dec_s = time.perf_counter() - t0
        n_new = sum(len(o) - 1 for o in outs)
        n = m.config.n_layers
        stats = {
            "draft_layers": self.L, "draft_len": self.draft_len, "cycles": st["cycles"],
            "mean_draft_len": st["drafted"] / max(1, st["cycles"] * B) if st["cycles"] else 0.0,
            "acceptance_rate": st["accepted"] / st["drafted"] if st["drafted"] else 0.0,
            "tokens_per_cycle": n_new / max(1, st["cycles"] * B),
            # layer evaluations per generated token: draft steps run L layers, verify n - L per row
            "mean_layers_per_token": (st["draft_steps"] * self.L + st.get("verify_rows", 0) * (n - self.L))
            / max(1, n_new),
        }
        res = []
        for b in range(B):
            k = len(outs[b]) - 1
            res.append(DecodeResult(tokens=outs[b], prompt_tokens=len(prompts[b]), prefill_s=pf_s[b], decode_s=dec_s,
                                    decode_tokens_per_s=(n_new / dec_s if dec_s > 0 else 0.0) if B == 1 else
                                    (k / dec_s if dec_s > 0 else 0.0),
                                    finish_reason=fin[b] or "length", stats=dict(stats)))
        return res

    # ------------------------------------------------------------------ internals
    def _pick(self, logits, sample, temperature, top_k, top_p, gen) -> List[int]:
        if not sample:
            return confidence(logits)["argmax"].tolist()
        return torch.multinomial(warp_probs(logits, temperature, top_k, top_p), 1, generator=gen)[:, 0].tolist()

    def _want(self) -> int:
        return self.draft_len if isinstance(self.draft_len, int) else (
            self._k_heur if self.draft_len == "heuristic" else self.max_draft)

    def _cycle(self, act, seqs, last, pos, outs, room, sample, temperature, top_k, top_p, gen, st):
        m = self.model
        n, L = m.config.n_layers, self.L
        S = [seqs[b] for b in act]
        Bn = len(act)
        kmax = max(1, min(self._want(), room))  # no point drafting past the budget
        cur = torch.tensor([last[b] for b in act], dtype=torch.long)
        p0 = torch.tensor([pos[b] for b in act], dtype=torch.long)
        xs, ds, drafts, qs = [], [], [], []
        survive = torch.ones(Bn, dtype=torch.float64)  # prod of the draft's confidences
        k = 0
        while True:
            x, delta = run_layers(m, 0, L, m._embed(cur), None, p0 + k, S)
            st["draft_steps"] += Bn
            xs.append(x)
            ds.append(delta)
            if k == kmax:
                break  # the last draft's layer-L state, for the bonus row of the verify pass
            if sample:
                q = warp_probs(self.head.full_logits(x, delta), temperature, top_k, top_p)
                nxt = torch.multinomial(q, 1, generator=gen)[:, 0]
                qs.append(q)
                p1 = q.gather(1, nxt[:, None])[:, 0].double()
            else:
                lg, ids = self.head.logits(x, delta)
                c = confidence(lg)
                nxt = c["argmax"] if ids is None else ids[c["argmax"]]
                p1 = c["p1"].double()
            drafts.append(nxt)
            cur = nxt
            k += 1
            survive *= p1
            if self.draft_len == "adaptive" and bool((1.0 - survive > self.stop_threshold).all()):
                kmax = k  # SpecDec++: every sequence predicts a rejection; verify now
        T = k + 1
        # verify rows, sequence-major: [b0: last, d1..dk, b1: ...]
        X = torch.stack(xs, 1).reshape(Bn * T, -1)
        D = torch.stack(ds, 1).reshape(Bn * T, -1)
        positions = (p0[:, None] + torch.arange(T)).reshape(-1)
        X, D = run_layers(m, L, n, X, D, positions, S)
        logits = m.logits(X, D, all_logits=True).view(Bn, T, -1)
        st["verify_rows"] = st.get("verify_rows", 0) + Bn * T
        dr = torch.stack(drafts, 1) if drafts else torch.empty(Bn, 0, dtype=torch.long)  # [Bn, k]
        if sample:
            P = warp_probs(logits.reshape(Bn * T, -1), temperature, top_k, top_p).view(Bn, T, -1)
            Q = torch.stack(qs, 1) if qs else None
        else:
            tgt = logits.argmax(-1)  # [Bn, T]
        all_ok = True
        for i, b in enumerate(act):
            if sample:
                new = self._accept_sample(P[i], None if Q is None else Q[i], dr[i], k, gen)
            else:
                t = tgt[i].tolist()
                d = dr[i].tolist()
                j = 0
                while j < k and d[j] == t[j]:
                    j += 1
                new = d[:j] + [t[j]]
            acc = len(new) - 1
            all_ok &= acc == k
            st["accepted"] += acc
            # keep positions < pos + len(new): last and the accepted drafts are now in every layer
            m.kv.truncate(seqs[b], pos[b] + len(new))
            pos[b] += len(new)
            last[b] = new[-1]
            outs[b].extend(new)
        st["drafted"] += k * Bn
        st["cycles"] += 1
        if self.draft_len == "heuristic":
            self._k_heur = min(self.max_draft, self._k_heur + 2) if all_ok else max(1, self._k_heur - 1)

    @staticmethod
    def _accept_sample(P, Q, d, k, gen) -> List[int]:
        """Rejection rule over drafts ``d [k]`` with target rows ``P [k + 1, V]`` and draft rows
        ``Q [k, V]``: the accepted prefix plus one token from the residual or the bonus row."""
        u = torch.rand(k, generator=gen, dtype=torch.float64)
        out = []
        for j in range(k):
            t = int(d[j])
            p, q = float(P[j, t]), float(Q[j, t])
            if q > 0 and u[j] < min(1.0, p / q):
                out.append(t)
                continue
            r = (P[j] - Q[j]).clamp_min(0)
            s = float(r.sum())
            r = r / s if s > 0 else P[j]
            out.append(int(torch.multinomial(r, 1, generator=gen)))
            return out
        out.append(int(torch.multinomial(P[k], 1, generator=gen)))
        return out
