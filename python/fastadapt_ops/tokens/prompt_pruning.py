"""Decoder prefill pruning for :class:`fastadapt_ops.models.LlamaModel`: FastV, PyramidDrop and
LazyLLM, driving ``model.layer`` / ``model.logits`` directly.

SPEC strings (``fastadapt generate --prune-prompt SPEC``; layer indices are 0-based, a stage at
layer ``l`` drops tokens *after* layer ``l`` has run, so layers ``> l`` compute only kept tokens)::

    none                                  no pruning (the runner's own prefill)
    fastv:layer=3,keep=0.5                FastV: one drop after layer 3, keep 50% of the tokens
    pyramid:layers=4/10/18,keep=0.7       PyramidDrop: at each stage keep 70% of the tokens still
                                          kept (keep=0.8/0.6/0.5 gives one ratio per stage)
    lazy:layers=4/10/18,keep=0.7          LazyLLM: the same progressive drops during prefill, the
                                          dropped tokens' hidden states kept aside, and revival
                                          during decoding (see below)
    options: sinks=N   first N prompt tokens never dropped (attention sinks; default 4)
             revive=X  lazy: revive a dropped token when the new token pays it at least X of its
                       attention (mean over query heads) at the drop layer (default 0.02)
             max_revive=N  lazy: at most N revivals per stage per decode step (default 16)

Importance
    At a stage layer ``l`` the importance of each token still kept is the attention the *last
    prompt token* pays it at layer ``l`` (summed over query heads): the last token's query is
    formed from its layer-``l`` input (one row through the norm, the q projection and RoPE) and
    run through ``paged_decode_attention`` over layer ``l``'s rows with ``score_acc``, a private
    per-slot score buffer, exactly as the runner's "last" score mode does for KV eviction. The
    ``prune_tokens`` op then keeps the ``ceil(keep * n)`` highest in their original order; the
    first ``sinks`` tokens and the last token are protected. Ranking costs one row of projection
    and one single-query attention per stage.

Pruned prefill
    Kept tokens carry their residual stream ``(x, delta)`` and their *original* positions into the
    next layers (RoPE rows are the prompt positions). Layer ``l``'s KV rows hold every token that
    reached layer ``l``; rows of later layers hold only the kept tokens (the cache allows rows of
    different lengths per layer), relabelled with their true logical positions. ``model.pos``
    ends at the full prompt length, so decoding continues normally (new tokens attend to whatever
    each layer holds). Logits are only available for the last prompt position.

LazyLLM revival (``lazy:``)
    A token dropped at stage layer ``l`` keeps its KV in layers ``<= l``; its hidden state after
    layer ``l`` goes into an aux cache. At every decode step, when the new token has run layer
    ``l`` its attention mass over layer ``l``'s keys is read the same way; dropped tokens of that
    stage with mass ``>= revive`` are revived *before the new token runs layer l + 1*: from the
    saved hidden state they run layers ``l + 1 .. L - 1`` (all of them: a revived token stays), so
    the new token and every later one attend to them from layer ``l + 1`` on. A token is computed
    at most once per layer, as in LazyLLM.

    Correctness of revival: the revived token at position ``p`` must see what it would have seen
    in a causal prefill of the same pruned prompt: the keys at positions ``<= p`` that the layer
    holds, never a later prompt token nor a decoded token. Each layer's rows are kept sorted by
    position (the revived K/V are inserted in place: the row tail behind the insertion point is
    rewritten, the leading pages stay), so "positions <= p" is a prefix of every row; each revived
    token is then one query row of ``paged_decode_attention`` whose ``kv_len`` stops at itself.
    Several tokens revived together see each other causally (the earlier one is in the later
    one's prefix). Revivals are counted and timed (``stats()``: ``revived``, ``revive_s``).

A wrapper (:class:`PromptPruner`) exposes ``prefill`` / ``decode_one`` like the model, so
``fastadapt_ops.models.generate`` runs it unchanged.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

from ..ops.paged_attention import paged_decode_attention
from ..ops.rms_norm import rms_norm
from ..ops.rope import rope
from ..ops.silu_mul import silu_mul
from ..ops.tokens import prune_tokens

__all__ = ["PruneSpec", "parse_prune_spec", "PromptPruner", "add_prune_args", "apply_prune_args",
           "prune_fields"]

METHODS = ("none", "fastv", "pyramid", "lazy")
_ERR = "fastadapt prune-prompt"


@dataclasses.dataclass(frozen=True)
class PruneSpec:
    """A parsed ``--prune-prompt`` SPEC: stage layers (0-based, increasing) and a keep ratio per
    stage (of the tokens still kept when the stage runs)."""

    method: str = "none"
    layers: Tuple[int, ...] = ()
    keep: Tuple[float, ...] = ()
    sinks: int = 4
    revive: float = 0.02
    max_revive: int = 16
    text: str = "none"


def _int(key: str, val: str, lo: int = 0) -> int:
    try:
        v = int(val)
    except ValueError:
        raise ValueError(f"{_ERR}: {key} must be an integer, got {val!r}") from None
    if v < lo:
        raise ValueError(f"{_ERR}: {key} must be >= {lo}, got {v}")
    return v


def _ratio(key: str, val: str) -> float:
    try:
        v = float(val)
    except ValueError:
        raise ValueError(f"{_ERR}: {key} must be a ratio in (0, 1], got {val!r}") from None
    if not 0.0 < v <= 1.0:
        raise ValueError(f"{_ERR}: {key} must be a ratio in (0, 1], got {val!r}")
    return v


def parse_prune_spec(text: Union[str, PruneSpec, None]) -> PruneSpec:
    """Parse a SPEC string (module docstring); bad strings raise ``ValueError`` naming the key."""
    if isinstance(text, PruneSpec):
        return text
    if text is None or not str(text).strip() or str(text).strip().lower() == "none":
        return PruneSpec()
    text = str(text).strip()
    method, sep, rest = text.partition(":")
    method = method.strip().lower()
    if method not in METHODS[1:]:
        raise ValueError(f"{_ERR}: unknown method {method!r} in {text!r} (use one of "
                         f"{', '.join(METHODS)}, e.g. fastv:layer=3,keep=0.5)")
    if not sep or not rest.strip():
        raise ValueError(f"{_ERR}: {method} needs options, e.g. "
                         + ("fastv:layer=3,keep=0.5" if method == "fastv" else f"{method}:layers=4/10/18,keep=0.7"))
    kv: Dict[str, str] = {}
    for part in rest.split(","):
        key, eq, val = part.partition("=")
        key = key.strip().lower()
        if not eq or not key or not val.strip() or "=" in val:
            raise ValueError(f"{_ERR}: expected key=value (options separated by ','), got {part!r} in {text!r}")
        if key in kv:
            raise ValueError(f"{_ERR}: {key} given twice in {text!r}")
        kv[key] = val.strip()
    allowed = {"fastv": {"layer", "layers", "keep", "sinks"},
               "pyramid": {"layers", "keep", "sinks"},
               "lazy": {"layers", "keep", "sinks", "revive", "max_revive"}}[method]
    for key in kv:
        if key not in allowed:
            raise ValueError(f"{_ERR}: unknown option {key!r} for {method} (allowed: {', '.join(sorted(allowed))})")
    if method == "fastv" and "layer" in kv and "layers" in kv:
        raise ValueError(f"{_ERR}: give layer= or layers=, not both")
    lkey = "layer" if "layer" in kv else "layers"
    if lkey not in kv:
        raise ValueError(f"{_ERR}: {method} needs {'layer=' if method == 'fastv' else 'layers='}")
    if "keep" not in kv:
        raise ValueError(f"{_ERR}: {method} needs keep= (a ratio in (0, 1])")
    layers = tuple(_int(lkey, v) for v in kv[lkey].split("/"))
    if method == "fastv" and len(layers) != 1:
        raise ValueError(f"{_ERR}: fastv drops once: layer= takes one layer, got {kv[lkey]!r}")
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise ValueError(f"{_ERR}: layers must be strictly increasing, got {kv[lkey]!r}")
    keeps = tuple(_ratio("keep", v) for v in kv["keep"].split("/"))
    if len(keeps) == 1:
        keeps = keeps * len(layers)
    if len(keeps) != len(layers):
        raise ValueError(f"{_ERR}: keep= gives {len(keeps)} ratios for {len(layers)} layers")
    revive = 0.02
    if "revive" in kv:
        try:
            revive = float(kv["revive"])
        except ValueError:
            raise ValueError(f"{_ERR}: revive must be a number >= 0, got {kv['revive']!r}") from None
        if not revive >= 0 or math.isinf(revive):
            raise ValueError(f"{_ERR}: revive must be a number >= 0, got {kv['revive']!r}")
    return PruneSpec(method=method, layers=layers, keep=keeps,
                     sinks=_int("sinks", kv["sinks"]) if "sinks" in kv else 4, revive=revive,
                     max_revive=_int("max_revive", kv["max_revive"], 1) if "max_revive" in kv else 16,
                     text=text)


@dataclasses.dataclass
class _Aux:
    """LazyLLM aux cache of one stage: dropped tokens' positions and hidden states."""

    positions: torch.Tensor  # [r] int64, increasing
    hidden: torch.Tensor  # [r, H]: x + delta after the stage layer (input of the next layer)


ScoreFn = Callable[[int, torch.Tensor], torch.Tensor]


class PromptPruner:
    """A :class:`LlamaModel` whose prefill drops prompt tokens per a SPEC (module docstring).

    ``prefill(tokens)`` -> logits ``[vocab]`` of the last prompt token; ``decode_one(token)``
    -> ``[vocab]``; other attributes (``config``, ``tokenizer``, ``pos``, ``kv`` ...) are the
    model's, so ``fastadapt_ops.models.generate(pruner, ...)`` works. ``stats()`` reports kept
    tokens per stage and revivals.

    score_fn: optional ``(layer, positions [n]) -> scores [n]`` replacing the last token's
    attention as the importance (a given score; tests use it to choose what is dropped).
    """

    def __init__(self, model, spec: Union[str, PruneSpec, None], score_fn: Optional[ScoreFn] = None):
        self.model = model
        self.spec = spec = parse_prune_spec(spec)
        n_layers = model.config.n_layers
        for li in spec.layers:
            if li >= n_layers - 1:
                raise ValueError(f"{_ERR}: layer {li} is out of range: a stage must leave layers after it "
                                 f"(the model has {n_layers} layers: 0 .. {n_layers - 2})")
        if spec.method == "lazy" and model.kv_policy is not None:
            raise ValueError(f"{_ERR}: lazy revival needs the full KV cache (rows of one layer aligned "
                             f"over KV heads); drop the KV eviction policy or use fastv/pyramid")
        self.score_fn = score_fn
        self._stage = {li: i for i, li in enumerate(spec.layers)}
        self._aux: Dict[int, _Aux] = {}
        self._buf: Optional[torch.Tensor] = None
        self._reset_stats(0)

    def __getattr__(self, name):  # config, tokenizer, pos, kv, max_ctx ... are the model's
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)

    def _reset_stats(self, n: int) -> None:
        self.prompt_tokens = n
        self.kept: List[int] = []  # tokens after each stage
        self.revived = 0
        self.revive_s = 0.0
        self.revive_events = 0

    def stats(self) -> dict:
        """Kept tokens per stage and LazyLLM revivals of the last prompt."""
        return {"prune_prompt": self.spec.text, "prune_prompt_tokens": self.prompt_tokens,
                "prune_kept": [{"layer": li, "kept": k} for li, k in zip(self.spec.layers, self.kept)],
                "prune_revived": self.revived, "prune_revive_s": self.revive_s,
                "prune_aux_tokens": sum(a.positions.numel() for a in self._aux.values())}

    # ---- prefill ---------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, tokens, all_logits: bool = False, reset: bool = True) -> torch.Tensor:
        """Run a prompt from position 0, dropping tokens at the stage layers; ``[vocab]`` logits
        of the last prompt token. With ``none`` this is the model's own prefill."""
        m, spec = self.model, self.spec
        self._aux = {}
        if spec.method == "none":
            out = m.prefill(tokens, all_logits=all_logits, reset=reset)
            self._reset_stats(m.pos)
            return out
        if not reset:
            raise ValueError(f"{_ERR}: a pruned prefill runs a whole prompt from position 0 (reset=True)")
        if all_logits:
            raise ValueError(f"{_ERR}: dropped tokens have no logits; a pruned prefill returns the last "
                             "position's only (all_logits=False)")
        m.reset()
        ids = m._check_tokens(tokens)
        N = ids.numel()
        self._reset_stats(N)
        H = m.config.hidden
        kv, seq = m.kv, m._seq
        positions = torch.arange(N)  # [n] original prompt positions of the kept tokens
        x, delta = m._embed(ids), None  # residual stream of the kept tokens
        for li in range(m.config.n_layers):
            stage = self._stage.get(li)
            last = None
            if stage is not None and self.score_fn is None:  # the last token's layer input
                last = x[-1:].clone() if delta is None else x[-1:] + delta[-1:]
            x, delta = m.layer(li, x, delta, positions)
            if positions.numel() < N:  # appended a subset: record the true positions
                kv.set_positions(seq, li, positions, next_pos=N)
            if stage is None:
                continue
            n = positions.numel()
            protected = (positions < spec.sinks)
            protected[-1] = True
            k = min(n, max(int(protected.sum()), math.ceil(spec.keep[stage] * n - 1e-9)))
            if k < n:
                if self.score_fn is not None:
                    scores = self.score_fn(li, positions.clone()).to(torch.float32).reshape(n)
                else:
                    scores = self._importance(li, last, positions[-1:]).sum(0)  # [n]
                packed = torch.cat([x, delta], -1)[None]  # [1, n, 2H]: one gather for both
                kept_x, kept_idx = prune_tokens(packed, scores[None], k, protected[None])
                kept_idx = kept_idx[0].long()
                if spec.method == "lazy":
                    drop = torch.ones(n, dtype=torch.bool)
                    drop[kept_idx] = False
                    self._aux[li] = _Aux(positions[drop], (x[drop] + delta[drop]).contiguous())
                x, delta = kept_x[0, :, :H].contiguous(), kept_x[0, :, H:].contiguous()
                positions = positions[kept_idx]
            self.kept.append(positions.numel())
        m.pos = N
        if m.kv_policy is not None:
            m._maybe_evict(N)
        return m.logits(x, delta)[0]

    # ---- importance ------------------------------------------------------------------------
    def _score_buf(self) -> torch.Tensor:
        kv = self.model.kv
        if self._buf is None or self._buf.shape != (kv.num_pages, kv.page_size) or self._buf.device != kv.device:
            self._buf = torch.zeros(kv.num_pages, kv.page_size, dtype=torch.float32, device=kv.device)
        return self._buf

    def _row_slots(self, li: int, h: int, n: Optional[int] = None) -> torch.Tensor:
        kv, seq = self.model.kv, self.model._seq
        S = kv.page_size
        pages = torch.tensor(kv.row_pages(seq, li, h), dtype=torch.long)
        n = kv.seq_len(seq, li, h) if n is None else n
        return (pages[:, None] * S + torch.arange(S)).reshape(-1)[:n]

    def _importance(self, li: int, h_in: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Attention mass ``[H_kv, n]`` (summed over each KV head's query heads) that one query,
        the token with layer-``li`` input ``h_in [1, H]`` at RoPE row ``pos [1]``, pays to every
        key of layer ``li``'s rows, from the attention kernel's score accumulator."""
        m = self.model
        c = m.config
        L = m.layers[li]
        nh, nkv, hd = c.n_heads, c.n_kv_heads, c.head_dim
        kv, seq = m.kv, m._seq
        h = rms_norm(h_in, L.attn_norm, c.rms_eps)
        qkv = m._mm(h, L.wqkv, L.bqkv)  # [1, nq + 2 nk]
        q = qkv[:, :nh * hd].view(1, nh, hd)
        k = qkv[:, nh * hd:(nh + nkv) * hd].view(1, nkv, hd)
        rope(q, k, pos, m._cos_sin)
        buf = self._score_buf()
        buf.zero_()
        indptr, indices, lens = kv.plan(li, [seq])
        paged_decode_attention(q.reshape(1, 1, nh, hd), kv.k_pages[li], kv.v_pages[li], indptr, indices,
                               lens, hd ** -0.5, buf)
        flat = buf.view(-1)
        return torch.stack([flat[self._row_slots(li, hh).to(flat.device)] for hh in range(nkv)]).cpu()

    # ---- decoding with revival -------------------------------------------------------------
    @torch.inference_mode()
    def decode_one(self, token: int) -> torch.Tensor:
        """Append one token; its logits ``[vocab]``. With ``lazy:`` and tokens in the aux cache,
        runs the layers itself and revives the dropped tokens the new token attends to."""
        m = self.model
        if not any(a.positions.numel() for a in self._aux.values()):
            return m.decode_one(token)
        ids = m._check_tokens([int(token)])
        p = m.pos
        positions = torch.tensor([p])
        x, delta = m._embed(ids), None
        for li in range(m.config.n_layers):
            aux = self._aux.get(li)
            check = aux is not None and aux.positions.numel() > 0
            last = (x.clone() if delta is None else x + delta) if check else None
            x, delta = m.layer(li, x, delta, positions)
            if check:
                self._maybe_revive(li, last, positions)
        m.pos = p + 1
        return m.logits(x, delta)[0]

    def _maybe_revive(self, li: int, last: torch.Tensor, pos: torch.Tensor) -> None:
        m, spec, aux = self.model, self.spec, self._aux[li]
        kv, seq = m.kv, m._seq
        mass = self._importance(li, last, pos).sum(0) / m.config.n_heads  # [n] mean over q heads
        row_pos = kv.positions(seq, li, 0)
        got = mass[torch.searchsorted(row_pos, aux.positions)]  # the dropped tokens' share
        want = torch.nonzero(got >= spec.revive).reshape(-1)
        if want.numel() == 0:
            return
        if want.numel() > spec.max_revive:
            want = want[torch.topk(got[want], spec.max_revive).indices]
        want = want.sort().values  # by position
        t0 = time.perf_counter()
        self.revive(li, want)
        self.revive_s += time.perf_counter() - t0

    def revive(self, li: int, which: Optional[torch.Tensor] = None) -> int:
        """Revive dropped tokens of stage layer ``li`` (indices into its aux cache, default all):
        run them from their saved hidden state through layers ``li + 1 ..`` (module docstring) and
        insert their K/V into those layers' rows. Returns how many were revived."""
        aux = self._aux.get(li)
        if aux is None or aux.positions.numel() == 0:
            return 0
        r_all = aux.positions.numel()
        which = torch.arange(r_all) if which is None else torch.as_tensor(which, dtype=torch.long).sort().values
        if which.numel() == 0:
            return 0
        if int(which.min()) < 0 or int(which.max()) >= r_all:
            raise ValueError(f"{_ERR}: revive indices out of range [0, {r_all})")
        pos = aux.positions[which]
        x, delta = aux.hidden[which].clone(), None
        stay = torch.ones(r_all, dtype=torch.bool)
        stay[which] = False
        self._aux[li] = _Aux(aux.positions[stay], aux.hidden[stay])
        with torch.inference_mode():
            for lj in range(li + 1, self.model.config.n_layers):
                x, delta = self._layer_at(lj, x, delta, pos)
        self.revived += int(which.numel())
        self.revive_events += 1
        return int(which.numel())

    def _layer_at(self, lj: int, x: torch.Tensor, delta: Optional[torch.Tensor],
                  pos: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``model.layer`` for revived tokens ``x [r, H]`` at positions ``pos [r]`` (increasing)
        that lie *inside* the rows: K/V inserted in position order, each token attending to the
        keys at positions <= its own."""
        m = self.model
        c = m.config
        r = x.shape[0]
        nh, nkv, hd, eps = c.n_heads, c.n_kv_heads, c.head_dim, c.rms_eps
        nq, nk = nh * hd, nkv * hd
        L = m.layers[lj]
        h = rms_norm(x, L.attn_norm, eps) if delta is None else rms_norm(delta, L.attn_norm, eps, x)
        qkv = m._mm(h, L.wqkv, L.bqkv)  # [r, nq + 2 nk]
        q = qkv[:, :nq].view(r, nh, hd)
        k = qkv[:, nq:nq + nk].view(r, nkv, hd)
        rope(q, k, pos, m._cos_sin)
        v = qkv[:, nq + nk:].view(r, nkv, hd)
        self._insert(lj, k, v, pos)
        o = self._attend_prefix(lj, q, pos).reshape(r, nq)
        h = rms_norm(m._mm(o, L.wo, L.bo), L.ffn_norm, eps, x)
        return x, m._mm(silu_mul(m._mm(h, L.wgu)), L.wdown)

    def _insert(self, lj: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        """Insert K/V ``[r, H_kv, D]`` at positions ``pos`` into layer ``lj``'s rows, keeping them
        sorted: the leading tokens (positions below the first insert) stay where they are, the
        tail is rewritten after them."""
        m = self.model
        kv, seq = m.kv, m._seq
        row_pos = kv.positions(seq, lj, 0)
        cut = int(torch.searchsorted(row_pos, pos[:1]))
        n, H = row_pos.numel(), m.config.n_kv_heads
        tk, tv = [], []
        for hh in range(H):
            kk, vv = kv.gather(lj, seq, hh)
            tk.append(kk[cut:])
            tv.append(vv[cut:])
        allpos = torch.cat([row_pos[cut:], pos])
        order = torch.argsort(allpos)
        new_k = torch.cat([torch.stack(tk, 1).to(k.dtype), k]).index_select(0, order)
        new_v = torch.cat([torch.stack(tv, 1).to(v.dtype), v]).index_select(0, order)
        if cut < n:
            kv.keep(lj, seq, [torch.arange(cut)] * H)
        kv.append(lj, [seq], new_k.contiguous(), new_v.contiguous())
        kv.set_positions(seq, lj, torch.cat([row_pos[:cut], allpos[order]]), next_pos=m.pos)

    def _attend_prefix(self, lj: int, q: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Attention of ``q [r, H_q, D]`` (tokens at positions ``pos``, held by the rows) where
        token i sees the row prefix up to its own position: one paged query row per token."""
        m = self.model
        kv, seq = m.kv, m._seq
        c = m.config
        S, H = kv.page_size, c.n_kv_heads
        r = q.shape[0]
        row_pos = kv.positions(seq, lj, 0)
        lens = torch.searchsorted(row_pos, pos, right=True)  # keys at positions <= p_i, itself included
        pages = [kv.row_pages(seq, lj, hh) for hh in range(H)]
        indptr, indices, kv_lens = [0], [], []
        for i in range(r):
            n_i = int(lens[i])
            for hh in range(H):
                indices.extend(pages[hh][:-(-n_i // S)])
                indptr.append(len(indices))
                kv_lens.append(n_i)
        dev = kv.device
        out, _ = paged_decode_attention(
            q.reshape(r, 1, c.n_heads, c.head_dim), kv.k_pages[lj], kv.v_pages[lj],
            torch.tensor(indptr, dtype=torch.int32, device=dev), torch.tensor(indices, dtype=torch.int32, device=dev),
            torch.tensor(kv_lens, dtype=torch.int32, device=dev), c.head_dim ** -0.5)
        return out.reshape(r, c.n_heads, c.head_dim)

    def __repr__(self) -> str:
        return f"PromptPruner({self.spec.text!r}, {self.model!r})"


# ---- CLI ------------------------------------------------------------------------------------
def add_prune_args(parser) -> None:
    """``--prune-prompt SPEC`` for ``fastadapt generate``."""
    parser.add_argument("--prune-prompt", default=None, metavar="SPEC",
                        help="drop prompt tokens during prefill: fastv:layer=3,keep=0.5 | "
                             "pyramid:layers=4/10/18,keep=0.7 | lazy:layers=4/10/18,keep=0.7[,revive=0.02] "
                             "(0-based layers; options sinks=N)")


def apply_prune_args(model, args):
    """The model, or a :class:`PromptPruner` around it when ``--prune-prompt`` was given. A bad
    SPEC exits with the parse error."""
    text = getattr(args, "prune_prompt", None)
    if not text:
        return model
    try:
        return PromptPruner(model, text)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def prune_fields(runner) -> dict:
    """JSON fields of a run: kept tokens per stage, revivals (empty without pruning)."""
    return runner.stats() if isinstance(runner, PromptPruner) else {}
