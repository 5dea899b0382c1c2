"""Eviction policies: which tokens each (layer, KV head) row keeps.

One API: ``policy.select(ctx) -> {(layer, head): LongTensor}`` of sorted indices into the row's
current tokens. ``ctx`` (:class:`EvictionContext`) exposes per row the accumulated attention mass
read from the cache's score pool (never a materialised attention matrix), the key L2 norms, the
logical positions, which tokens are real (not padding), the row length, and the budget.

Budgets
-------
``budget`` is a ratio ``0 < r <= 1`` of the tokens the sequence has seen (``ctx.total_len``),
or an int token count ``>= 1``; it resolves to the average tokens per row ``k``. Then
- per layer (``layer_budgets``): ``"uniform"`` (every layer ``k``), ``"pyramid"`` (PyramidKV:
  linear from ``2k - k/beta`` at layer 0 down to ``k/beta`` at the last layer, same total), or a
  list of per-layer weights (normalised to mean 1);
- per head (``head_budgets``): ``"uniform"`` or ``"adaptive"`` (AdaKV: the layer's total
  ``H * k_l`` goes to the top ``H * k_l`` scores over all heads, with a floor of ``alpha * k_l``
  per head, so heads whose mass is concentrated give budget to heads whose mass is spread).
Totals never exceed the resolved budget (rows shorter than their share keep everything).

Policies (``POLICIES``, ``get_policy(name, **kw)``)
----------------------------------------------------
- ``full``: keeps everything.
- ``streaming``: ``sinks`` first tokens + the most recent ones (StreamingLLM).
- ``h2o``: heavy hitters by accumulated mass + a recent window (``recent``: fraction of the row
  budget, or an int).
- ``tova``: the tokens the last query attended to most (scores are reset before every step).
- ``snapkv``: mass of the last ``window`` queries at prefill, smoothed by a 1-D max/avg pool of
  ``kernel`` taps, plus the window itself.
- ``pyramidkv``: ``snapkv`` with pyramid layer budgets.
- ``adakv``: ``snapkv`` with head-adaptive budgets.
- ``keynorm``: keeps the keys with the lowest L2 norm (no attention needed) + a recent window
  (``recent``, default half the budget; 0 = KnormPress).

``score_mode`` tells the driver how to feed the score pool: ``None`` (no scores needed),
``"accumulate"`` (every query adds), ``"last"`` (reset before each step), ``"window"`` (the last
``window`` queries of the prefill, then every decode query).

When to evict (:func:`maybe_evict`): at the end of a prefill every row goes to its budget; during
decode a layer is compacted only once its rows hold more than their budget plus ``chunk`` tokens
each (a page by default; the layer total, since head-adaptive shares differ), which amortises
compaction. The caller feeds the score pool as ``score_mode`` says (``PagedHFCache`` does).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = [
    "Budget", "EvictionContext", "Policy", "FullPolicy", "StreamingPolicy", "H2OPolicy",
    "TOVAPolicy", "SnapKVPolicy", "PyramidKVPolicy", "AdaKVPolicy", "KeyNormPolicy",
    "POLICIES", "get_policy", "pyramid_layer_budgets", "evict", "maybe_evict",
]

Key = Tuple[int, int]


# ---------------------------------------------------------------------------------------- budget
class Budget:
    """A ratio ``0 < r <= 1`` of the tokens seen, or an int count ``>= 1``."""

    def __init__(self, value: Union[int, float, "Budget"]):
        if isinstance(value, Budget):
            value = value.value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"budget must be a ratio in (0, 1] or a positive int, got {value!r}")
        if isinstance(value, int):
            if value <= 0:
                raise ValueError(f"budget must be a positive token count, got {value}")
        else:
            if not (0.0 < value <= 1.0):
                raise ValueError(f"budget ratio must be in (0, 1], got {value}")
        self.value = value

    @property
    def is_ratio(self) -> bool:
        return isinstance(self.value, float)

    @property
    def is_full(self) -> bool:
        return self.is_ratio and self.value >= 1.0

    def tokens(self, total_len: int) -> int:
        """Average tokens per row for a sequence that has seen ``total_len`` tokens."""
        if self.is_ratio:
            return max(1, math.ceil(self.value * total_len)) if total_len > 0 else 0
        return min(self.value, total_len)

    def __repr__(self) -> str:
        return f"Budget({self.value!r})"


def pyramid_layer_budgets(avg: int, num_layers: int, beta: float = 20.0) -> List[int]:
    """PyramidKV allocation: linear from ``2*avg - avg/beta`` (layer 0) to ``avg/beta`` (last
    layer); integer budgets whose sum is at most ``num_layers * avg``."""
    if num_layers == 1 or avg <= 0:
        return [avg] * num_layers
    lo = avg / beta
    hi = 2 * avg - lo
    raw = [hi - (hi - lo) * l / (num_layers - 1) for l in range(num_layers)]
    out = [max(1, int(math.floor(x))) for x in raw]
    rem = num_layers * avg - sum(out)
    order = sorted(range(num_layers), key=lambda l: out[l] - raw[l])  # most rounded down first
    i = 0
    while rem > 0:
        out[order[i % num_layers]] += 1
        rem -= 1
        i += 1
    while rem < 0:  # the max(1, .) floors overshot
        l = max(range(num_layers), key=lambda j: out[j])
        out[l] -= 1
        rem += 1
    return out


# ---------------------------------------------------------------------------------------- context
class EvictionContext:
    """What a policy may read for one sequence: per (layer, head) row its ``length``, ``scores``
    (fp32 accumulated attention mass), ``key_norms``, ``positions``, ``valid`` (real tokens),
    plus ``budget``, ``total_len`` (tokens seen) and the model shape.

    Build it from a cache with :meth:`from_cache`, or from plain tensors (tests, other caches)
    by passing dicts keyed ``(layer, head)``; missing scores/norms raise when a policy asks.
    """

    def __init__(self, num_layers: int, num_heads: int, layers: Sequence[int],
                 budget, total_len: int,
                 lengths: Dict[Key, int],
                 scores: Optional[Callable[[int, int], torch.Tensor] | Dict[Key, torch.Tensor]] = None,
                 key_norms: Optional[Callable[[int, int], torch.Tensor] | Dict[Key, torch.Tensor]] = None,
                 positions: Optional[Callable[[int, int], torch.Tensor] | Dict[Key, torch.Tensor]] = None,
                 valid: Optional[Callable[[int, int], torch.Tensor] | Dict[Key, torch.Tensor]] = None):
        self.num_layers, self.num_heads = num_layers, num_heads
        self.layers = list(layers)
        self.budget = Budget(budget)
        self.total_len = int(total_len)
        self._lengths = lengths
        self._scores, self._norms, self._pos, self._valid = scores, key_norms, positions, valid

    @classmethod
    def from_cache(cls, cache, seq_id: int, layers: Optional[Sequence[int]] = None, budget=1.0,
                   total_len: Optional[int] = None,
                   valid: Optional[Callable[[int, int], torch.Tensor]] = None) -> "EvictionContext":
        layers = list(range(cache.num_layers)) if layers is None else list(layers)
        lengths = {(l, h): cache.seq_len(seq_id, l, h)
                   for l in layers for h in range(cache.num_kv_heads)}
        scores = (lambda l, h: cache.row_scores(l, seq_id, h)) if cache.track_scores else None
        return cls(cache.num_layers, cache.num_kv_heads, layers, budget,
                   cache.position(seq_id) if total_len is None else total_len, lengths,
                   scores=scores,
                   key_norms=lambda l, h: cache.key_norms(l, seq_id, h),
                   positions=lambda l, h: cache.positions(seq_id, l, h),
                   valid=valid)

    @staticmethod
    def _get(src, what: str, l: int, h: int) -> Optional[torch.Tensor]:
        if src is None:
            return None
        return src(l, h) if callable(src) else src[(l, h)]

    def length(self, l: int, h: int) -> int:
        return int(self._lengths[(l, h)])

    def scores(self, l: int, h: int) -> torch.Tensor:
        s = self._get(self._scores, "scores", l, h)
        if s is None:
            raise ValueError("policy needs attention scores: build the cache with track_scores=True "
                             "and run attend() (or pass scores= to the context)")
        return s.float().cpu()

    def key_norms(self, l: int, h: int) -> torch.Tensor:
        s = self._get(self._norms, "key_norms", l, h)
        if s is None:
            raise ValueError("policy needs key norms (pass key_norms= to the context)")
        return s.float().cpu()

    def positions(self, l: int, h: int) -> torch.Tensor:
        s = self._get(self._pos, "positions", l, h)
        return torch.arange(self.length(l, h)) if s is None else s.long().cpu()

    def valid(self, l: int, h: int) -> torch.Tensor:
        s = self._get(self._valid, "valid", l, h)
        return torch.ones(self.length(l, h), dtype=torch.bool) if s is None else s.bool().cpu()


# ---------------------------------------------------------------------------------------- policies
def _top_with_protect(score: torch.Tensor, k: int, protect: torch.Tensor,
                      valid: torch.Tensor) -> torch.Tensor:
    """Sorted indices: protected valid tokens (most recent first if more than ``k``) then the
    highest-scoring other valid tokens, ``min(k, #valid)`` in all."""
    n = score.numel()
    k = min(k, int(valid.sum()))
    if k <= 0:
        return torch.empty(0, dtype=torch.long)
    prot = torch.nonzero(protect & valid).flatten()
    if prot.numel() >= k:
        return prot[-k:]  # the protected tokens are sinks/windows: keep the latest ones
    s = score.float().clone()
    s[~valid] = float("-inf")
    s[prot] = float("-inf")
    rest = k - prot.numel()
    # stable: among equal scores prefer later tokens (recency)
    order = torch.argsort(s.flip(0), descending=True, stable=True)
    picked = (n - 1 - order[:rest])
    return torch.sort(torch.cat([prot, picked])).values


def _recent_mask(valid: torch.Tensor, w: int) -> torch.Tensor:
    m = torch.zeros_like(valid)
    if w > 0:
        idx = torch.nonzero(valid).flatten()[-w:]
        m[idx] = True
    return m


def _sink_mask(valid: torch.Tensor, s: int) -> torch.Tensor:
    m = torch.zeros_like(valid)
    if s > 0:
        idx = torch.nonzero(valid).flatten()[:s]
        m[idx] = True
    return m


class Policy:
    """Base class: budget resolution (per layer, per head) and top-k row selection.

    Subclasses set ``name``/``score_mode`` and implement ``row_score`` (higher = keep) and
    ``protect`` (tokens kept regardless of score)."""

    name = "base"
    score_mode: Optional[str] = None  # None | "accumulate" | "last" | "window"

    def __init__(self, budget: Union[int, float] = 1.0, layer_budgets="uniform",
                 head_budgets: str = "uniform", beta: float = 20.0, alpha: float = 0.2):
        self.budget = Budget(budget)
        if not (layer_budgets in ("uniform", "pyramid") or isinstance(layer_budgets, (list, tuple))):
            raise ValueError(f"layer_budgets must be 'uniform', 'pyramid' or a list of weights, "
                             f"got {layer_budgets!r}")
        if isinstance(layer_budgets, (list, tuple)) and (
                not layer_budgets or any(float(w) < 0 for w in layer_budgets) or sum(layer_budgets) <= 0):
            raise ValueError("layer_budgets weights must be non-negative with a positive sum")
        if head_budgets not in ("uniform", "adaptive"):
            raise ValueError(f"head_budgets must be 'uniform' or 'adaptive', got {head_budgets!r}")
        if beta < 1:
            raise ValueError(f"beta must be >= 1, got {beta}")
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.layer_budgets, self.head_budgets = layer_budgets, head_budgets
        self.beta, self.alpha = beta, alpha

    @property
    def needs_scores(self) -> bool:
        return self.score_mode is not None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(budget={self.budget.value!r})"

    # -- budgets
    def row_budget(self, ctx: EvictionContext) -> int:
        return ctx.budget.tokens(ctx.total_len)

    def layer_allocation(self, ctx: EvictionContext) -> List[int]:
        """Average tokens per row for each of the model's layers."""
        k, L = self.row_budget(ctx), ctx.num_layers
        if self.layer_budgets == "uniform":
            return [k] * L
        if self.layer_budgets == "pyramid":
            return pyramid_layer_budgets(k, L, self.beta)
        w = [float(x) for x in self.layer_budgets]
        if len(w) != L:
            raise ValueError(f"layer_budgets has {len(w)} weights for {L} layers")
        tot = sum(w)
        return [int(math.floor(k * L * x / tot)) for x in w]

    def head_allocation(self, ctx: EvictionContext, l: int, k_layer: int) -> List[int]:
        """Tokens per head of layer ``l``; sums to at most ``H * k_layer``."""
        H = ctx.num_heads
        nv = [int(ctx.valid(l, h).sum()) for h in range(H)]
        if self.head_budgets == "uniform":
            return [min(k_layer, n) for n in nv]
        total = min(H * k_layer, sum(nv))
        floor = [min(int(self.alpha * k_layer), n) for n in nv]
        rest = total - sum(floor)
        alloc = list(floor)
        if rest > 0:
            cand, owner = [], []
            for h in range(H):
                s = self.row_score(ctx, l, h).clone()
                s[~ctx.valid(l, h)] = float("-inf")
                # the floor tokens of a head are its best ones: the rest compete across heads
                s_sorted = torch.sort(s, descending=True).values[floor[h]:nv[h]]
                cand.append(s_sorted)
                owner.append(torch.full((s_sorted.numel(),), h, dtype=torch.long))
            cand_t, owner_t = torch.cat(cand), torch.cat(owner)
            top = torch.topk(cand_t, min(rest, cand_t.numel())).indices
            alloc = [a + int((owner_t[top] == h).sum()) for h, a in enumerate(alloc)]
        return alloc

    # -- selection
    def row_score(self, ctx: EvictionContext, l: int, h: int) -> torch.Tensor:
        raise NotImplementedError

    def protect(self, ctx: EvictionContext, l: int, h: int, k: int) -> torch.Tensor:
        return torch.zeros(ctx.length(l, h), dtype=torch.bool)

    def select_row(self, ctx: EvictionContext, l: int, h: int, k: int) -> torch.Tensor:
        valid = ctx.valid(l, h)
        return _top_with_protect(self.row_score(ctx, l, h), k, self.protect(ctx, l, h, k), valid)

    def select(self, ctx: EvictionContext) -> Dict[Key, torch.Tensor]:
        if ctx.budget.is_full:  # a 100% budget keeps every real token, whatever the allocation
            return {(l, h): torch.nonzero(ctx.valid(l, h)).flatten()
                    for l in ctx.layers for h in range(ctx.num_heads)}
        per_layer = self.layer_allocation(ctx)
        out = {}
        for l in ctx.layers:
            per_head = self.head_allocation(ctx, l, per_layer[l])
            for h in range(ctx.num_heads):
                out[(l, h)] = self.select_row(ctx, l, h, per_head[h])
        return out


class FullPolicy(Policy):
    name = "full"

    def __init__(self, budget=1.0, **kw):
        super().__init__(budget, **kw)

    def select(self, ctx):
        return {(l, h): torch.nonzero(ctx.valid(l, h)).flatten()
                for l in ctx.layers for h in range(ctx.num_heads)}


class StreamingPolicy(Policy):
    name = "streaming"

    def __init__(self, budget=1.0, sinks: int = 4, **kw):
        super().__init__(budget, **kw)
        if not isinstance(sinks, int) or sinks < 0:
            raise ValueError(f"sinks must be a non-negative int, got {sinks!r}")
        self.sinks = sinks

    def row_score(self, ctx, l, h):
        return ctx.positions(l, h).float()  # recency

    def protect(self, ctx, l, h, k):
        return _sink_mask(ctx.valid(l, h), min(self.sinks, k))


class _RecentMixin:
    @staticmethod
    def _check_window(name, w):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0 or \
                (isinstance(w, float) and w > 1):
            raise ValueError(f"{name} must be an int >= 0 or a fraction in [0, 1], got {w!r}")

    @staticmethod
    def _size(w, k):
        return int(w * k) if isinstance(w, float) else int(w)


class H2OPolicy(Policy, _RecentMixin):
    name = "h2o"
    score_mode = "accumulate"

    def __init__(self, budget=1.0, recent: Union[int, float] = 0.5, **kw):
        super().__init__(budget, **kw)
        self._check_window("recent", recent)
        self.recent = recent

    def row_score(self, ctx, l, h):
        return ctx.scores(l, h)

    def protect(self, ctx, l, h, k):
        return _recent_mask(ctx.valid(l, h), min(self._size(self.recent, k), k))


class TOVAPolicy(Policy):
    name = "tova"
    score_mode = "last"

    def row_score(self, ctx, l, h):
        return ctx.scores(l, h)


class SnapKVPolicy(Policy):
    name = "snapkv"
    score_mode = "window"

    def __init__(self, budget=1.0, window: int = 8, kernel: int = 5, pool: str = "max", **kw):
        super().__init__(budget, **kw)
        if not isinstance(window, int) or window < 0:
            raise ValueError(f"window must be a non-negative int, got {window!r}")
        if not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"kernel must be an odd positive int, got {kernel!r}")
        if pool not in ("max", "avg"):
            raise ValueError(f"pool must be 'max' or 'avg', got {pool!r}")
        self.window, self.kernel, self.pool = window, kernel, pool

    def row_score(self, ctx, l, h):
        s = ctx.scores(l, h)
        if self.kernel == 1 or s.numel() == 0:
            return s
        x = s[None, None, :]
        p = self.kernel // 2
        if self.pool == "max":
            y = F.max_pool1d(x, self.kernel, stride=1, padding=p)
        else:
            y = F.avg_pool1d(x, self.kernel, stride=1, padding=p, count_include_pad=False)
        return y[0, 0]

    def protect(self, ctx, l, h, k):
        return _recent_mask(ctx.valid(l, h), min(self.window, k))


class PyramidKVPolicy(SnapKVPolicy):
    name = "pyramidkv"

    def __init__(self, budget=1.0, beta: float = 20.0, **kw):
        kw.setdefault("layer_budgets", "pyramid")
        super().__init__(budget, beta=beta, **kw)


class AdaKVPolicy(SnapKVPolicy):
    name = "adakv"

    def __init__(self, budget=1.0, alpha: float = 0.2, **kw):
        kw.setdefault("head_budgets", "adaptive")
        super().__init__(budget, alpha=alpha, **kw)


class KeyNormPolicy(Policy, _RecentMixin):
    name = "keynorm"

    # A recent window of half the budget by default, as for H2O: on SmolLM2 at a 25% budget it
    # took the continuation's perplexity from 2.06x to 1.34x the full cache's (recent=0 is
    # kvpress's KnormPress, 1.55x in the same protocol; bench kv_quality).
    def __init__(self, budget=1.0, recent: Union[int, float] = 0.5, **kw):
        super().__init__(budget, **kw)
        self._check_window("recent", recent)
        self.recent = recent

    def row_score(self, ctx, l, h):
        return -ctx.key_norms(l, h)  # low norm = keep

    def protect(self, ctx, l, h, k):
        return _recent_mask(ctx.valid(l, h), min(self._size(self.recent, k), k))


POLICIES = {cls.name: cls for cls in (FullPolicy, StreamingPolicy, H2OPolicy, TOVAPolicy,
                                       SnapKVPolicy, PyramidKVPolicy, AdaKVPolicy, KeyNormPolicy)}


def get_policy(name: str, **kw) -> Policy:
    """``get_policy("h2o", budget=0.25, recent=0.5)``."""
    if isinstance(name, Policy):
        return name
    cls = POLICIES.get(name)
    if cls is None:
        raise ValueError(f"unknown policy {name!r}; known: {sorted(POLICIES)}")
    return cls(**kw)


# ---------------------------------------------------------------------------------------- driver
def evict(cache, policy: Policy, seq_id: int, layers: Optional[Sequence[int]] = None,
          total_len: Optional[int] = None, valid=None) -> Dict[Key, torch.Tensor]:
    """Run ``policy`` on the sequence's rows of ``layers`` and compact the cache to the
    selection. Returns the selection."""
    ctx = EvictionContext.from_cache(cache, seq_id, layers, policy.budget, total_len, valid)
    sel = policy.select(ctx)
    for l in ctx.layers:
        cache.keep(l, seq_id, [sel[(l, h)] for h in range(cache.num_kv_heads)])
    return sel


def maybe_evict(cache, policy: Policy, seq_id: int, layer: int, prefill: bool = False,
                chunk: Optional[int] = None, total_len: Optional[int] = None, valid=None) -> bool:
    """Evict ``layer`` of ``seq_id`` when due: after a prefill when over budget, during decode when
    the layer holds more than ``H_kv * (budget + chunk)`` tokens (``chunk`` default: one page).
    Returns whether it evicted."""
    if isinstance(policy, FullPolicy) or policy.budget.is_full:
        return False
    chunk = cache.page_size if chunk is None else chunk
    ctx = EvictionContext.from_cache(cache, seq_id, [layer], policy.budget, total_len, valid)
    k_layer = policy.layer_allocation(ctx)[layer]
    H = cache.num_kv_heads
    held = sum(ctx.length(layer, h) for h in range(H))
    # the layer's total, not the longest row: head-adaptive budgets give heads unequal shares
    if not prefill and held <= H * (k_layer + chunk):
        return False
    if prefill and held <= H * k_layer and policy.head_budgets == "uniform":
        return False
    sel = policy.select(ctx)
    cache.keep(layer, seq_id, [sel[(layer, h)] for h in range(cache.num_kv_heads)])
    return True
