"""Early exit (CALM-style): per token, stop at the first exit layer whose confidence passes a
threshold, and keep the skipped layers' KV usable for later tokens.

Measures (``measure``): ``"p1"`` top-1 probability >= threshold, ``"margin"`` top-1 - top-2
probability >= threshold, ``"entropy"`` entropy (nats) <= threshold (all from
``fastadapt::logit_confidence`` over the exit head's logits: full LM head, or a candidate subset,
which is much cheaper), and ``"saturation"`` cosine between the hidden states before and after
the layer >= threshold (``fastadapt::hidden_cosine``; no LM head until the exit). ``decay > 0``
lowers a ``>=`` threshold over the sequence as CALM does: ``0.9 lam + 0.1 exp(-decay t / N)``
capped at ``lam``.

Skipped layers' KV (``kv_fill``):
- ``"copy"``: CALM's state propagation: the exit hidden state is fed to each skipped layer's
  norm + K/V projection (+ RoPE), so every layer holds a K/V for every token (approximate).
- ``"recompute"``: lazy and exact: the exited tokens wait with their hidden state at the exit
  depth; the next token that goes deeper carries them through the layers it runs (several
  queries per sequence in ``model.layer``, causal among themselves), so their K/V are the full
  model's when anyone reads them. Waiting tokens always form a suffix of every layer's rows.

``calibrate(...)`` picks the threshold for a target greedy agreement with the full model on a
text (teacher-forced over the full model's states: an estimate of the free-running agreement).
"""
from __future__ import annotations

import math
import time
from typing import Dict, List, Optional, Sequence

import torch

from ..ops.rms_norm import rms_norm
from ..ops.rope import rope
from ..quant import QuantizedWeight
from ._runner import DecodeResult, ensure_batch, prefill_seq, run_layers
from .confidence import CandidateHead, ExitHead, confidence, saturation

__all__ = ["EarlyExitDecoder", "calibrate", "MEASURES"]

MEASURES = ("p1", "margin", "entropy", "saturation")


def _rows(w, lo: int, hi: int):
    if isinstance(w, QuantizedWeight):
        pick = lambda t: None if t is None else t[lo:hi].contiguous()  # noqa: E731
        return QuantizedWeight(pick(w.qdata), pick(w.scales), pick(w.zeros), w.fmt, (hi - lo, w.in_features),
                               w.group_size)
    if isinstance(w, list):
        raise ValueError("EarlyExitDecoder: kv_fill='copy' needs a fused QKV weight")
    return w[lo:hi].contiguous()


def default_exit_layers(n_layers: int) -> List[int]:
    """Every other layer from a quarter of the depth to the last but one."""
    return list(range(max(1, n_layers // 4), n_layers - 1, 2))


class EarlyExitDecoder:
    def __init__(self, model, exit_layers: Optional[Sequence[int]] = None, measure: str = "p1",
                 threshold: float = 0.9, decay: float = 0.0, kv_fill: str = "copy", adapters=None,
                 candidates: Optional[CandidateHead] = None):
        n = model.config.n_layers
        exit_layers = default_exit_layers(n) if exit_layers is None else sorted(set(int(l) for l in exit_layers))
        if not exit_layers or any(not 0 < l < n for l in exit_layers):
            raise ValueError(f"EarlyExitDecoder: exit_layers must be layer counts in [1, {n}), got {exit_layers}")
        if measure not in MEASURES:
            raise ValueError(f"EarlyExitDecoder: measure must be one of {MEASURES}, got {measure!r}")
        if kv_fill not in ("copy", "recompute"):
            raise ValueError(f"EarlyExitDecoder: kv_fill must be 'copy' or 'recompute', got {kv_fill!r}")
        if not math.isfinite(threshold) or decay < 0:
            raise ValueError("EarlyExitDecoder: threshold must be finite and decay >= 0")
        self.model, self.exit_layers, self.measure = model, exit_layers, measure
        self.threshold, self.decay, self.kv_fill = float(threshold), float(decay), kv_fill
        self.heads = {l: ExitHead(model, l, adapters, candidates) for l in exit_layers}
        self.full_heads = {l: ExitHead(model, l, adapters, None) for l in exit_layers}
        self._wkv = None

    # ------------------------------------------------------------------ rules
    def _thr(self, t: int, N: int) -> float:
        if self.decay <= 0 or self.measure == "entropy":
            return self.threshold
        return min(self.threshold, 0.9 * self.threshold + 0.1 * math.exp(-self.decay * t / max(1, N)))

    def _passes(self, value: float, thr: float) -> bool:
        return value <= thr if self.measure == "entropy" else value >= thr

    # ------------------------------------------------------------------ KV fill (copy)
    def _kv_weights(self):
        if self._wkv is None:
            c = self.model.config
            nq, nk = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
            self._wkv = [(_rows(L.wqkv, nq, nq + 2 * nk), None if L.bqkv is None else L.bqkv[nq:].contiguous())
                         for L in self.model.layers]
        return self._wkv

    def _copy_fill(self, h: torch.Tensor, lo: int, position: int, seq: int) -> None:
        """K/V of layers lo..n-1 for one token from its exit hidden state ``h [1, H]``."""
        m = self.model
        c = m.config
        nk, hd = c.n_kv_heads * c.head_dim, c.head_dim
        pos = torch.tensor([position])
        dummy_q = torch.zeros(1, 1, hd, dtype=h.dtype)
        for li in range(lo, c.n_layers):
            w, b = self._kv_weights()[li]
            kv = m._mm(rms_norm(h, m.layers[li].attn_norm, c.rms_eps), w, b)
            k = kv[:, :nk].view(1, c.n_kv_heads, hd)
            rope(dummy_q, k, pos, m._cos_sin)
            m.kv.append_decode(li, [seq], k, kv[:, nk:].view(1, c.n_kv_heads, hd))

    # ------------------------------------------------------------------ decode
    @torch.inference_mode()
    def generate(self, prompt: Sequence[int], max_new_tokens: int = 64, stop_at_eos: bool = True,
                 eos: Optional[int] = None) -> DecodeResult:
        """Greedy decoding with early exits. ``stats``: mean layers per token, exit histogram,
        layer-row evaluations (recompute runs waiting tokens through later layers too)."""
        m = self.model
        n = m.config.n_layers
        ensure_batch(m, 1)
        eos = (m.config.eos_token_id if eos is None else eos) if stop_at_eos else None
        t0 = time.perf_counter()
        seq, lg = prefill_seq(m, prompt, max_new_tokens + 1)
        prefill_s = time.perf_counter() - t0
        tok = int(confidence(lg[None])["argmax"][0])
        out, depths = [tok], []
        p = len(prompt)
        pend_x: Optional[torch.Tensor] = None  # waiting tokens (recompute): [P, H] at depths pend_depth
        pend_d: Optional[torch.Tensor] = None
        pend_depth: List[int] = []
        rows_eval = 0
        finish = "eos" if eos is not None and tok == eos else "length"
        t1 = time.perf_counter()
        try:
            while finish != "eos" and len(out) < max_new_tokens:
                thr = self._thr(len(out), max_new_tokens)
                x, delta = m._embed(torch.tensor([tok])), None
                first = p  # position of the first row in x
                exit_at, nxt = n, None
                h_prev = None
                for li in range(n):
                    if pend_depth and pend_depth[-1] <= li:  # waiting tokens at this depth join
                        j = len(pend_depth)
                        while j > 0 and pend_depth[j - 1] == li:
                            j -= 1
                        jx, jd = pend_x[j:], pend_d[j:]
                        x = torch.cat([jx, x])  # li >= 1 here, so delta is set
                        delta = torch.cat([jd, delta])
                        first -= len(pend_depth) - j
                        pend_x, pend_d, pend_depth = pend_x[:j], pend_d[:j], pend_depth[:j]
                    positions = torch.arange(first, p + 1)
                    x, delta = m.layer(li, x, delta, positions, [seq])
                    rows_eval += x.shape[0]
                    done = li + 1
                    if done in self.heads:
                        if self.measure == "saturation":
                            h = x[-1:] + delta[-1:]
                            if h_prev is not None and done - 1 == h_prev[0]:
                                ok = self._passes(float(saturation(h_prev[1], h)[0]), thr)
                            else:
                                ok = False
                            if ok:
                                lgx, ids = self.full_heads[done].logits(x[-1:], delta[-1:])
                                nxt = int(lgx[0].argmax())
                        else:
                            lgx, ids = self.heads[done].logits(x[-1:], delta[-1:])
                            c = confidence(lgx)
                            key = {"p1": "p1", "margin": "margin", "entropy": "entropy"}[self.measure]
                            ok = self._passes(float(c[key][0]), thr)
                            if ok:
                                if ids is None:
                                    nxt = int(c["argmax"][0])
                                else:  # the checked subset said yes: read the token from the full head
                                    lgf, _ = self.full_heads[done].logits(x[-1:], delta[-1:])
                                    nxt = int(lgf[0].argmax())
                        if ok:
                            exit_at = done
                            break
                    if self.measure == "saturation" and done + 1 in self.heads:
                        h_prev = (done, x[-1:] + delta[-1:])
                if exit_at < n:
                    if self.kv_fill == "copy":
                        self._copy_fill((x[-1:] + delta[-1:]), exit_at, p, seq)
                        if x.shape[0] > 1:  # joined waiting tokens (never in copy mode)
                            raise AssertionError("copy mode has no waiting tokens")
                    else:
                        keep_x = x.clone()
                        keep_d = delta.clone()
                        pend_x = keep_x if pend_x is None or not pend_depth else torch.cat([pend_x, keep_x])
                        pend_d = keep_d if pend_d is None or not pend_depth else torch.cat([pend_d, keep_d])
                        pend_depth = pend_depth + [exit_at] * x.shape[0]
                else:
                    nxt = int(confidence(m.logits(x, delta))["argmax"][0])
                depths.append(exit_at)
                tok = nxt
                p += 1
                out.append(tok)
                if eos is not None and tok == eos:
                    finish = "eos"
        finally:
            m.kv.free_sequence(seq)
        dec_s = time.perf_counter() - t1
        hist: Dict[int, int] = {}
        for d in depths:
            hist[d] = hist.get(d, 0) + 1
        stats = {"measure": self.measure, "threshold": self.threshold, "decay": self.decay, "kv_fill": self.kv_fill,
                 "mean_layers_per_token": sum(depths) / len(depths) if depths else float(n),
                 "layer_rows_per_token": rows_eval / max(1, len(depths)),
                 "exit_histogram": dict(sorted(hist.items()))}
        k = len(out) - 1
        return DecodeResult(tokens=out, prompt_tokens=len(prompt), prefill_s=prefill_s, decode_s=dec_s,
                            decode_tokens_per_s=k / dec_s if dec_s > 0 else 0.0, finish_reason=finish, stats=stats)


@torch.inference_mode()
def calibrate(model, text_or_ids, exit_layers: Optional[Sequence[int]] = None, measure: str = "p1",
              target_agreement: float = 0.95, thresholds: Optional[Sequence[float]] = None, adapters=None,
              candidates: Optional[CandidateHead] = None, max_tokens: int = 1024, ctx: int = 256) -> dict:
    """Pick the threshold with the fewest layers per token whose exits agree with the full model's
    greedy token on at least ``target_agreement`` of the positions of a text.

    Teacher-forced: one pass of the full model over the text gives every exit layer's state; each
    threshold's exit layer and token follow per position. Returns ``{"threshold", "agreement",
    "mean_layers", "table": [(thr, agreement, mean_layers), ...], "exit_layers", "measure"}``."""
    from .adapters import collect_hidden

    n = model.config.n_layers
    exit_layers = default_exit_layers(n) if exit_layers is None else sorted(set(int(l) for l in exit_layers))
    if measure not in MEASURES:
        raise ValueError(f"calibrate: measure must be one of {MEASURES}, got {measure!r}")
    if not 0 < target_agreement <= 1:
        raise ValueError(f"calibrate: target_agreement must be in (0, 1], got {target_agreement!r}")
    ids = model.tokenizer.encode(text_or_ids) if isinstance(text_or_ids, str) else list(text_or_ids)
    want = set(exit_layers) | {n} | ({l - 1 for l in exit_layers} if measure == "saturation" else set())
    want.discard(0)
    hs = collect_hidden(model, ids, sorted(want), ctx=ctx, max_tokens=max_tokens)
    ref = ExitHead(model, n).logits(hs[n], None)[0].argmax(-1)
    vals, toks = [], []
    for l in exit_layers:
        full = ExitHead(model, l, adapters, None)
        toks.append(full.logits(hs[l], None)[0].argmax(-1))
        if measure == "saturation":
            vals.append(saturation(hs[l - 1], hs[l]) if l - 1 in hs else torch.zeros(ref.shape[0]))
        else:
            lg, _ = ExitHead(model, l, adapters, candidates).logits(hs[l], None)
            vals.append(confidence(lg)[measure])
    V = torch.stack(vals)  # [E, N]
    agree = torch.stack(toks) == ref  # [E, N]
    E = len(exit_layers)
    if thresholds is None:
        thresholds = ([5.0, 3.0, 2.0, 1.5, 1.0, 0.7, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01] if measure == "entropy" else
                      [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999, 0.9999, 1.01])
    layers_t = torch.tensor(exit_layers + [n], dtype=torch.float64)
    table = []
    for thr in thresholds:
        ok = V <= thr if measure == "entropy" else V >= thr
        ok = torch.cat([ok, torch.ones(1, ok.shape[1], dtype=torch.bool)])  # the last layer always "exits"
        first = ok.float().argmax(0)  # first passing exit per position
        hit = torch.cat([agree, torch.ones(1, agree.shape[1], dtype=torch.bool)]).gather(0, first[None])[0]
        table.append((float(thr), float(hit.float().mean()), float(layers_t[first].mean())))
    good = [r for r in table if r[1] >= target_agreement]
    best = min(good, key=lambda r: r[2]) if good else max(table, key=lambda r: r[1])
    return {"threshold": best[0], "agreement": best[1], "mean_layers": best[2], "table": table,
            "exit_layers": exit_layers, "measure": measure, "tokens": int(ref.shape[0]), "met": bool(good)}
