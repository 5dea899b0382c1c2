"""A transformers ``Cache`` backed by :class:`PagedKVCache` and an eviction policy.

Usage::

    cache = PagedHFCache(model, policy="streaming", budget=64)    # attaches itself to the model
    out = model.generate(input_ids, attention_mask=mask, past_key_values=cache, max_new_tokens=32)
    cache.bytes_held(), cache.peak_bytes

How it plugs into HF (transformers 5.x):
- ``update(key_states [B, H_kv, T, D], value_states, layer_idx)`` appends the new tokens to every
  (sequence, KV head) row of the layer (one ``kv_append``) and returns the layer's K/V gathered
  from the pages as dense ``[B, H_kv, L, D]`` tensors (the integration path: HF's attention needs
  dense K/V; correctness over speed). ``L`` is the longest row; shorter rows (after eviction,
  head-wise budgets, ...) are zero padded on the left.
- Positions are *columns* of the padded batch (what HF's 2-D ``attention_mask`` indexes).
  ``get_seq_length`` returns the columns seen, not the tokens held, so RoPE positions and HF's
  (logical) mask sizes stay those of an uncompressed cache.
- Until a layer has evicted anything its rows are exactly DynamicCache's tensors, and attention
  runs through transformers' own SDPA with HF's own mask: with a 100% budget (or
  ``policy="full"``) generation is identical to the default ``DynamicCache``.
- Once rows hold different token sets the HF mask no longer lines up, so ``attach`` (done by the
  constructor when given a model) switches the model to the attention implementation
  ``"fastadapt_paged"``: the same SDPA, but with a mask built from each row's kept positions:
  key ``j`` of row ``(b, h)`` is visible to query column ``c`` iff it is a real kept token
  (not zero padding of the dense layout), its column is ``<= c``, and its column is not a
  padding column of sequence ``b`` in the model's 2-D ``attention_mask`` (captured by a forward
  pre-hook). A query with no visible key (a left-padding query) is let see all keys, as HF does,
  to avoid NaNs; its output is never used.
- Padding: padding columns are stored like DynamicCache stores them (so the 100% path is exact),
  count as invalid for policies (never kept, never counted in ratio budgets) and so disappear at
  the first eviction. Only padding in the 2-D mask is understood; packed sequences are not.
- Scores for attention-based policies (h2o, tova, snapkv, pyramidkv, adakv) come from
  ``PagedKVCache.attend`` (``paged_decode_attention`` with the layer's score pool), called on the
  layer's query states after HF's attention. Padding keys may receive mass during the first
  prefill (the paged rows do not know padding); they are dropped at the first eviction anyway.
- Eviction runs right after a layer's attention: at the end of the prefill every row goes to its
  budget, during decode a layer is compacted once its rows hold more than their budget plus
  ``chunk`` tokens each (one page by default), which amortises compaction.
- Memory: ``bytes_held``/``peak_bytes`` count pages. The dense K/V handed to HF is a transient
  copy of one layer (freed after that layer's attention).
- The attached model runs SDPA (through ``"fastadapt_paged"``) whatever it ran before; the 100%
  budget equality is with the SDPA ``DynamicCache`` path. ``detach()`` restores the original.
- Not supported (raise): beam search reordering, ``crop`` (assisted decoding), batch selection.
"""
from __future__ import annotations

import math
import weakref
from typing import List, Optional

import torch
import torch.nn.functional as F

from .cache import PagedKVCache
from .policies import FullPolicy, Policy, get_policy, maybe_evict

try:  # transformers is an optional dependency of the package
    from transformers.cache_utils import Cache, CacheLayerMixin
except ImportError as e:  # pragma: no cover
    raise ImportError("fastadapt_ops.kv.hf_cache needs transformers (pip install transformers)") from e

__all__ = ["PagedHFCache", "ATTN_IMPLEMENTATION", "register_attention"]

ATTN_IMPLEMENTATION = "fastadapt_paged"


class _DenseInfo:
    """Attached to the dense key tensor that ``update`` returns, read by the attention function."""

    __slots__ = ("owner", "layer", "kvpos", "qpos", "aligned")

    def __init__(self, owner, layer, kvpos, qpos, aligned):
        self.owner = weakref.ref(owner)
        self.layer, self.kvpos, self.qpos, self.aligned = layer, kvpos, qpos, aligned


def _paged_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                     scaling: Optional[float] = None, **kwargs):
    """SDPA over the dense K/V of a :class:`PagedHFCache` with the per-row mask (see module doc).
    Falls back to transformers' SDPA for rows that are still DynamicCache-aligned."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    info = getattr(key, "_fastadapt_info", None)
    owner = info.owner() if info is not None else None
    if owner is None or info.aligned:
        out = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                     scaling=scaling, **kwargs)
    else:
        mask = owner._dense_mask(info)  # [B, H_kv, q, L] bool
        G = query.shape[1] // key.shape[1]
        k = key.repeat_interleave(G, dim=1)
        v = value.repeat_interleave(G, dim=1)
        m = mask.repeat_interleave(G, dim=1)
        m = m | ~m.any(-1, keepdim=True)
        o = F.scaled_dot_product_attention(query, k, v, attn_mask=m, dropout_p=dropout, scale=scaling)
        out = (o.transpose(1, 2).contiguous(), None)
    if owner is not None:
        owner._after_attention(info.layer, query, scaling)
    return out


def register_attention() -> None:
    """Register ``"fastadapt_paged"`` with transformers (attention function + SDPA's mask)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, _paged_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


class _PagedLayer(CacheLayerMixin):
    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, owner: "PagedHFCache", layer_idx: int):
        super().__init__()
        self._owner = weakref.ref(owner)
        self.layer_idx = layer_idx

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self._owner()._update(self.layer_idx, key_states, value_states)

    def get_mask_sizes(self, query_length: int):
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self._owner()._columns(self.layer_idx)

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self._owner().reset()

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("PagedHFCache does not support beam search")

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove == 0:
            return
        raise NotImplementedError("PagedHFCache does not support crop (assisted decoding)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("PagedHFCache does not support batch_repeat_interleave")

    def batch_select_indices(self, indices) -> None:
        raise NotImplementedError("PagedHFCache does not support batch_select_indices")


class PagedHFCache(Cache):
    """transformers ``Cache`` on a :class:`PagedKVCache` with eviction by ``policy``.

    Args:
        model_or_config: the model (then the cache attaches itself: attention implementation
            ``"fastadapt_paged"`` and a pre-hook that reads the 2-D ``attention_mask``) or just
            its config (enough for ``policy="full"`` / a 100% budget).
        policy: a name of ``POLICIES`` or a :class:`Policy`; ``budget`` and ``**policy_kw`` go to
            ``get_policy`` when a name is given.
        page_size, max_tokens: pages hold ``page_size`` tokens; each layer's pool is sized for
            ``max_tokens`` tokens per (sequence, KV head) row (``num_pages`` overrides).
        chunk: decode eviction runs when a row exceeds its budget by ``chunk`` tokens (default
            one page).
    """

    def __init__(self, model_or_config, policy="full", budget=1.0, page_size: int = 16,
                 max_tokens: int = 2048, num_pages: Optional[int] = None,
                 chunk: Optional[int] = None, **policy_kw):
        config = getattr(model_or_config, "config", model_or_config)
        cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        try:
            self.num_layers = int(cfg.num_hidden_layers)
            self.num_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
            self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        except AttributeError as e:
            raise ValueError(f"PagedHFCache: model_or_config is not a decoder config ({e})") from e
        self.policy: Policy = get_policy(policy, budget=budget, **policy_kw) \
            if isinstance(policy, str) else policy
        if not isinstance(self.policy, Policy):
            raise ValueError(f"PagedHFCache: policy must be a policy name or a Policy, got {policy!r}")
        for name, val in (("page_size", page_size), ("max_tokens", max_tokens)):
            if not isinstance(val, int) or val <= 0:
                raise ValueError(f"PagedHFCache: {name} must be a positive int, got {val!r}")
        if chunk is not None and (not isinstance(chunk, int) or chunk < 0):
            raise ValueError(f"PagedHFCache: chunk must be a non-negative int, got {chunk!r}")
        self.page_size, self.max_tokens, self.num_pages, self.chunk = page_size, max_tokens, num_pages, chunk
        self.paged: Optional[PagedKVCache] = None
        self.seq_ids: List[int] = []
        self._valid_cols: Optional[torch.Tensor] = None  # [B, columns] bool, from the 2-D mask
        self._pending_mask: Optional[torch.Tensor] = None
        self._hooks = []
        self._model = None
        self._prev_attn = None
        self._attn_seen = True
        super().__init__(layers=[_PagedLayer(self, l) for l in range(self.num_layers)])
        if hasattr(model_or_config, "config") and isinstance(model_or_config, torch.nn.Module):
            self.attach(model_or_config)

    # ------------------------------------------------------------------ model hookup
    def attach(self, model: torch.nn.Module) -> "PagedHFCache":
        """Switch ``model`` to the ``"fastadapt_paged"`` attention and capture its 2-D mask.

        One cache is attached to a model at a time: attaching detaches the previous one (its
        original attention implementation is what a final ``detach`` restores). The model's hook
        holds the cache weakly, so a cache that is dropped without ``detach`` is still freed.
        """
        register_attention()
        self.detach()
        prev_ref = getattr(model, "_fastadapt_paged_cache", None)
        prev = prev_ref() if prev_ref is not None else None
        if prev is not None and prev is not self and prev._model is model:
            orig = prev._prev_attn
            prev.detach()
        else:
            orig = model.config._attn_implementation
        self._model = model
        self._prev_attn = orig
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        model._fastadapt_paged_cache = weakref.ref(self)
        me = weakref.ref(self)

        def pre_hook(_mod, args, kwargs):
            cache = me()
            if cache is not None:
                am = kwargs.get("attention_mask")
                cache._pending_mask = am if (isinstance(am, torch.Tensor) and am.dim() == 2) else None
            return None

        self._hooks.append(model.register_forward_pre_hook(pre_hook, with_kwargs=True))
        return self

    def detach(self) -> None:
        """Undo :meth:`attach` (hook and attention implementation)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self._model is not None and self._prev_attn is not None:
            self._model.set_attn_implementation(self._prev_attn)
            if getattr(self._model, "_fastadapt_paged_cache", lambda: None)() is self:
                self._model._fastadapt_paged_cache = None
        self._model = None

    # ------------------------------------------------------------------ bookkeeping
    def bytes_held(self) -> int:
        return 0 if self.paged is None else self.paged.bytes_held()

    @property
    def peak_bytes(self) -> int:
        return 0 if self.paged is None else self.paged.peak_bytes

    def _columns(self, layer: int) -> int:
        if self.paged is None or not self.seq_ids:
            return 0
        return self.paged.position(self.seq_ids[0], layer)

    def reset(self) -> None:
        if self.paged is not None:
            for s in self.seq_ids:
                self.paged.free_sequence(s)
        self.seq_ids = []
        self._valid_cols = None

    def _init_paged(self, k: torch.Tensor) -> None:
        B = k.shape[0]
        if k.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"PagedHFCache: key dtype {k.dtype} is not supported")
        pages = self.num_pages or B * self.num_kv_heads * (math.ceil(self.max_tokens / self.page_size) + 1)
        self.paged = PagedKVCache(self.num_layers, self.num_kv_heads, self.head_dim,
                                  page_size=self.page_size, num_pages=pages, dtype=k.dtype,
                                  track_scores=self.policy.needs_scores, device=k.device)

    # ------------------------------------------------------------------ update
    def _update(self, layer: int, key_states: torch.Tensor, value_states: torch.Tensor):
        # key_states, value_states: [B, H_kv, T, D]
        B, H, T, D = key_states.shape
        if H != self.num_kv_heads or D != self.head_dim:
            raise ValueError(f"PagedHFCache.update: key_states must be [B, {self.num_kv_heads}, T, "
                             f"{self.head_dim}], got {tuple(key_states.shape)}")
        if self.paged is None:
            if self._model is None and not (isinstance(self.policy, FullPolicy) or self.policy.budget.is_full):
                raise RuntimeError(
                    f"PagedHFCache: policy {self.policy.name!r} evicts, which needs the "
                    f"'{ATTN_IMPLEMENTATION}' attention: pass the model (not its config) to "
                    "PagedHFCache, or call cache.attach(model) before generating")
            self._init_paged(key_states)
        if not self.seq_ids:
            self.seq_ids = [self.paged.add_sequence() for _ in range(B)]
        if B != len(self.seq_ids):
            raise ValueError(f"PagedHFCache.update: batch size changed from {len(self.seq_ids)} to {B}")
        if layer == 0:
            if not self._attn_seen:
                raise RuntimeError("PagedHFCache evicted tokens but the model does not run the "
                                   f"'{ATTN_IMPLEMENTATION}' attention: pass the model (not its "
                                   "config) to PagedHFCache, or call cache.attach(model)")
            self._extend_valid(B, T)
        # [B, H, T, D] -> [B*T, H, D], sequence-major
        k = key_states.permute(0, 2, 1, 3).reshape(B * T, H, D)
        v = value_states.permute(0, 2, 1, 3).reshape(B * T, H, D)
        self.paged.append(layer, self.seq_ids, k, v)
        K, V, lens = self.paged.gather_dense(layer, self.seq_ids, pad_left=True)
        cols = self._columns(layer)
        aligned = bool((lens == cols).all())
        kvpos = None
        if not aligned:
            L = K.shape[2]
            kvpos = torch.full((B, H, L), -1, dtype=torch.long)
            for b, s in enumerate(self.seq_ids):
                for h in range(H):
                    n = int(lens[b, h])
                    if n:
                        kvpos[b, h, L - n:] = self.paged.positions(s, layer, h)
            kvpos = kvpos.to(K.device)
            self._attn_seen = False
        qpos = torch.arange(cols - T, cols, device=K.device)
        K._fastadapt_info = _DenseInfo(self, layer, kvpos, qpos, aligned)
        return K, V

    def _extend_valid(self, B: int, T: int) -> None:
        cols = 0 if self._valid_cols is None else self._valid_cols.shape[1]
        m, self._pending_mask = self._pending_mask, None  # one forward's mask, used once
        if m is not None and m.shape[0] == B and m.shape[1] >= cols + T:
            new = m[:, cols:cols + T].to("cpu").bool()
        else:
            new = torch.ones(B, T, dtype=torch.bool)
        self._valid_cols = new if self._valid_cols is None else torch.cat([self._valid_cols, new], 1)

    # ------------------------------------------------------------------ attention hooks
    def _dense_mask(self, info: _DenseInfo) -> torch.Tensor:
        kvpos, qpos = info.kvpos, info.qpos  # [B, H, L], [q]
        B = kvpos.shape[0]
        valid = self._valid_cols.to(kvpos.device)  # [B, C]
        present = kvpos >= 0
        col_ok = torch.gather(valid, 1, kvpos.clamp(min=0).reshape(B, -1)).reshape(kvpos.shape)
        keyok = present & col_ok  # [B, H, L]
        causal = kvpos[:, :, None, :] <= qpos[None, None, :, None]  # [B, H, q, L]
        return causal & keyok[:, :, None, :]

    def _row_valid(self, b: int, layer: int):
        cols = self._valid_cols[b]

        def valid(l: int, h: int) -> torch.Tensor:
            return cols[self.paged.positions(self.seq_ids[b], l, h)]
        return valid

    def _after_attention(self, layer: int, query: torch.Tensor, scaling: Optional[float]) -> None:
        self._attn_seen = True
        pol = self.policy
        if isinstance(pol, FullPolicy) or pol.budget.is_full:
            return
        T = query.shape[2]
        if pol.needs_scores:
            q = query.transpose(1, 2)  # [B, T, H_q, D]
            if pol.score_mode == "last":
                self.paged.reset_scores(layer, self.seq_ids)
                q = q[:, -1:]
            elif pol.score_mode == "window" and T > 1:
                w = getattr(pol, "window", 0) or T
                q = q[:, -min(w, T):]
            self.paged.attend(layer, self.seq_ids, q,
                              scale=self.head_dim ** -0.5 if scaling is None else scaling)
        for b, s in enumerate(self.seq_ids):
            total = int(self._valid_cols[b].sum())
            maybe_evict(self.paged, pol, s, layer, prefill=T > 1, chunk=self.chunk,
                        total_len=total, valid=self._row_valid(b, layer))

    def __repr__(self) -> str:
        return (f"PagedHFCache(policy={self.policy!r}, layers={self.num_layers}, "
                f"kv_heads={self.num_kv_heads}, page_size={self.page_size}, "
                f"bytes_held={self.bytes_held()})")
