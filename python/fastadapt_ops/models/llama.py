"""LlamaModel: a lean Llama-family decoder on ``fastadapt::qlinear`` (batch 1, one sequence).

Per layer: RMSNorm -> fused QKV projection -> RoPE -> K/V appended to a paged KV cache
(``fastadapt_ops.kv.PagedKVCache``: pages per (sequence, layer, KV head)) -> GQA paged attention
(``fastadapt::paged_decode_attention``, causal among the new tokens) -> output projection ->
residual -> RMSNorm -> fused gate/up projection -> SwiGLU -> down projection -> residual.

An eviction policy (``configure_kv(policy, budget)``: StreamingLLM, H2O, TOVA, SnapKV, PyramidKV,
AdaKV, key-norm) compacts the cache after the prefill and every ``page_size`` decode steps;
policies that need attention scores read the per-key mass the attention kernel accumulates in
the same pass. RoPE positions stay logical (``self.pos``) however many tokens are kept.

Quantized weights stay in their stored GGUF format; q, k and v (and gate and up) are concatenated
row-wise into one packed weight when they share a format, so one kernel call reads the activation
once. GGUF stores attn_q / attn_k rows permuted for llama.cpp's interleaved RoPE; the loader undoes
that row permutation (rows are whole in the packed data), so RoPE here is the rotate-half form.
HF checkpoints (and GGUF qwen2, which llama.cpp runs with NEOX RoPE) are already in rotate-half
layout: build those with ``qk_permuted=False``. Optional biases (Qwen2's q/k/v, Llama's
``attention_bias``) are fused in the same row order and added by the projection itself.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ..ops import qformats as qf
from ..ops.rms_norm import rms_norm
from ..ops.rope import rope
from ..ops.silu_mul import silu_mul
from ..quant import QuantizedWeight
from ..quant.lut import LUT_FORMATS as _LUT_FORMATS, dispatch as _lut_dispatch
from .config import ModelConfig
from .rope import rope_cos_sin_for

__all__ = ["LlamaModel"]

Weight = Union[torch.Tensor, QuantizedWeight]


def _op():
    try:
        import fastadapt_ops.ops.qlinear  # noqa: F401  (registers the fake kernel / loads _C)

        return torch.ops.fastadapt.qlinear.default
    except (ImportError, AttributeError, RuntimeError):
        return None


_QLINEAR = _op()


def _paged_attention_op():
    try:
        import fastadapt_ops.ops.paged_attention  # noqa: F401

        return torch.ops.fastadapt.paged_decode_attention.default
    except (ImportError, AttributeError, RuntimeError):
        from ..ops.kv_reference import paged_decode_attention_reference

        return paged_decode_attention_reference


_PAGED_ATTN = _paged_attention_op()


def _unpermute_rows(n_heads: int, rows: int) -> torch.Tensor:
    """Index ``idx`` with ``hf_rows = gguf_rows[idx]`` (undo llama.cpp's q/k permutation)."""
    hd = rows // n_heads
    half = hd // 2
    idx = torch.empty(rows, dtype=torch.long)
    for h in range(n_heads):
        for j in range(2):
            for i in range(half):
                idx[h * hd + j * half + i] = h * hd + 2 * i + j
    return idx


def _take_rows(w: Weight, idx: torch.Tensor) -> Weight:
    if isinstance(w, QuantizedWeight):
        pick = lambda t: None if t is None else t[idx].contiguous()  # noqa: E731
        return QuantizedWeight(pick(w.qdata), pick(w.scales), pick(w.zeros), w.fmt, w.shape, w.group_size)
    return w[idx].contiguous()


def _fuse(parts: Sequence[Weight]) -> Weight:
    """Concatenate output rows into one weight (same format), or keep a list when impossible."""
    if all(isinstance(p, QuantizedWeight) for p in parts):
        # same packing (format, K, groups, scale dtype, zero points or none): rows concatenate
        keys = {(p.fmt, p.in_features, p.group_size, p.scales is None or p.scales.dtype, p.zeros is None)
                for p in parts}
        if len(keys) == 1:
            cat = lambda ts: None if ts[0] is None else torch.cat(ts, 0).contiguous()  # noqa: E731
            n = sum(p.out_features for p in parts)
            return QuantizedWeight(cat([p.qdata for p in parts]), cat([p.scales for p in parts]),
                                   cat([p.zeros for p in parts]), parts[0].fmt, (n, parts[0].in_features),
                                   parts[0].group_size)
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(list(parts), 0).contiguous()
    return list(parts)  # mixed formats: one call each


_LAYER_EDITS = [0]  # bumped by every weight assignment on any _Layer (DecodeStack staleness)


class _Layer:
    __slots__ = ("attn_norm", "wqkv", "bqkv", "wo", "bo", "ffn_norm", "wgu", "wdown")

    def __setattr__(self, name, value):  # weights are swapped in place (re-quantization, switching)
        object.__setattr__(self, name, value)
        _LAYER_EDITS[0] += 1


def _decode_stack_class():
    try:
        import fastadapt_ops  # noqa: F401  (loads _C, which registers the class)

        return torch.classes.fastadapt.DecodeStack
    except (ImportError, AttributeError, RuntimeError):
        return None


class LlamaModel:
    """A Llama-family decoder. Build with :func:`fastadapt_ops.models.load` or :meth:`from_tensors`.

    ``prefill(tokens)`` runs a prompt from position 0 (resetting the cache) and returns the
    logits of the last position (``[vocab]``) or of all positions (``[T, vocab]``);
    ``decode_one(token)`` appends one token and returns its logits ``[vocab]``.

    qk_permuted: attn_q / attn_k rows (and biases) are in llama.cpp's interleaved-RoPE order
    (GGUF llama) and get un-permuted; False for rotate-half checkpoints (HF, GGUF qwen2).
    Optional tensors ``blk.{i}.attn_{q,k,v,output}.bias`` add biases to the projections.
    """

    def __init__(self, config: ModelConfig, tensors: Dict[str, Weight], tokenizer=None,
                 max_ctx: Optional[int] = None, dtype: torch.dtype = torch.float32, qk_permuted: bool = True):
        self.config = c = config
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.max_ctx = int(max_ctx or min(c.context_length, 4096))

        def get(name, required=True):
            if name not in tensors:
                if required:
                    raise ValueError(f"fastadapt_ops.models: the checkpoint lacks tensor {name!r}")
                return None
            return tensors[name]

        def vec(name):
            t = get(name)
            if isinstance(t, QuantizedWeight):
                raise ValueError(f"fastadapt_ops.models: tensor {name!r} must be float; got {t.fmt}")
            return t.to(dtype).contiguous()

        def mat(name, shape):
            w = get(name)
            if tuple(w.shape) != tuple(shape):
                raise ValueError(f"fastadapt_ops.models: tensor {name!r} has shape {tuple(w.shape)}; "
                                 f"expected {tuple(shape)}")
            return w if isinstance(w, QuantizedWeight) else w.to(dtype).contiguous()

        def bias(name, n):  # optional float bias [n]
            b = get(name, required=False)
            if b is None:
                return None
            if isinstance(b, QuantizedWeight) or tuple(b.shape) != (n,):
                raise ValueError(f"fastadapt_ops.models: tensor {name!r} must be a float vector of {n}; got "
                                 f"{b.fmt if isinstance(b, QuantizedWeight) else tuple(b.shape)}")
            return b.to(dtype).contiguous()

        H, hd, nh, nkv = c.hidden, c.head_dim, c.n_heads, c.n_kv_heads
        self.qk_permuted = bool(qk_permuted)
        perm_q = _unpermute_rows(nh, nh * hd) if qk_permuted else None
        perm_k = _unpermute_rows(nkv, nkv * hd) if qk_permuted else None
        take = lambda w, idx: w if idx is None else _take_rows(w, idx)  # noqa: E731
        self.layers: List[_Layer] = []
        for i in range(c.n_layers):
            p = f"blk.{i}."
            L = _Layer()
            L.attn_norm = vec(p + "attn_norm.weight")
            L.ffn_norm = vec(p + "ffn_norm.weight")
            wq = take(mat(p + "attn_q.weight", (nh * hd, H)), perm_q)
            wk = take(mat(p + "attn_k.weight", (nkv * hd, H)), perm_k)
            wv = mat(p + "attn_v.weight", (nkv * hd, H))
            L.wqkv = _fuse([wq, wk, wv])
            bq, bk, bv = (bias(p + "attn_q.bias", nh * hd), bias(p + "attn_k.bias", nkv * hd),
                          bias(p + "attn_v.bias", nkv * hd))
            L.bqkv = None
            if bq is not None or bk is not None or bv is not None:  # fused like the rows: [nq + 2 nk]
                zero = lambda b, n: torch.zeros(n, dtype=dtype) if b is None else b  # noqa: E731
                L.bqkv = torch.cat([take(zero(bq, nh * hd), perm_q), take(zero(bk, nkv * hd), perm_k),
                                    zero(bv, nkv * hd)]).contiguous()
            L.wo = mat(p + "attn_output.weight", (H, nh * hd))
            L.bo = bias(p + "attn_output.bias", H)
            L.wgu = _fuse([mat(p + "ffn_gate.weight", (c.ffn, H)), mat(p + "ffn_up.weight", (c.ffn, H))])
            L.wdown = mat(p + "ffn_down.weight", (H, c.ffn))
            self.layers.append(L)
        self.out_norm = vec("output_norm.weight")
        self.embed = mat("token_embd.weight", (c.vocab, H))
        head = get("output.weight", required=False)
        if head is None:
            self.lm_head = self.embed
            c.tie_embeddings = True
        else:
            self.lm_head = mat("output.weight", (c.vocab, H))
            c.tie_embeddings = False

        # RoPE table [max_ctx, hd] fp32: cos then sin of position * frequency (base and scaling
        # from the config), read by the fused rope op
        self._cos_sin = rope_cos_sin_for(c, self.max_ctx)
        self.pos = 0
        # "none": exact fp32 activations; "int8": decode rows quantized per token to int8 with
        # integer dot products per weight block (llama.cpp's numerics for Q4/Q8 blocks; faster)
        self.act_quant = "none"
        self._kv = None  # PagedKVCache, built on first use (configure_kv changes it)
        self._seq: Optional[int] = None
        self.page_size = 16
        self.max_batch = 1  # full-length sequences the page pool holds (configure_kv)
        self.kv_dtype: Optional[torch.dtype] = None  # KV page dtype (None: self.dtype)
        self.kv_policy = None  # fastadapt_ops.kv.policies.Policy or None (keep everything)
        self._evict_due = 0  # decode steps since the last eviction check
        # prefill attention override: f(model, li, q, k, v, positions, seqs) -> [N, H_q, D] or None
        # (None: the paged attention below); e.g. block-sparse prefill (attention/sparse_prefill.py)
        self.prefill_attention = None
        # attend_hook(model, li, q, scale, seqs) -> out or None: replaces the paged attention of a
        # step (e.g. prefix-shared attention for forked samples); None falls through to it
        self.attend_hook = None
        # decode steps (one token, full cache, no hooks) run every layer in one C++ call
        # (torch.classes.fastadapt.DecodeStack, bit-identical to layer()); False: always the
        # per-layer Python loop
        self.fused_decode = True
        self._stack = None  # (key, DecodeStack or None), rebuilt when the weights change

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def from_tensors(cls, config: ModelConfig, tensors: Dict[str, Weight], **kw) -> "LlamaModel":
        return cls(config, tensors, **kw)

    # ---- cache ---------------------------------------------------------------------------
    def configure_kv(self, policy: Optional[str] = None, budget: Union[int, float] = 1.0,
                     page_size: int = 16, max_batch: int = 1, kv_dtype: Optional[torch.dtype] = None,
                     **policy_kw) -> None:
        """Choose the KV eviction policy (a name from ``fastadapt_ops.kv.POLICIES`` or None for
        the full cache), its budget (a ratio of the tokens seen, or a token count per row), the
        page size, how many full-length sequences the page pool holds at once (forks share
        their prefix pages, so N samples of one prompt need far fewer), and the pages' dtype
        (``kv_dtype``: float32 | bfloat16 | float16; None = the model's dtype; float16 halves the
        attention's bytes, as llama.cpp's default f16 cache does). Drops the current sequence."""
        from ..kv.policies import FullPolicy, get_policy

        if not isinstance(page_size, int) or page_size <= 0:
            raise ValueError(f"fastadapt_ops.models: page_size must be a positive int, got {page_size!r}")
        if kv_dtype is not None and kv_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"fastadapt_ops.models: kv_dtype must be float32, bfloat16 or float16, got {kv_dtype!r}")
        if not isinstance(max_batch, int) or max_batch <= 0:
            raise ValueError(f"fastadapt_ops.models: max_batch must be a positive int, got {max_batch!r}")
        pol = None if policy is None else get_policy(policy, budget=budget, **policy_kw)
        if pol is not None and (isinstance(pol, FullPolicy) or pol.budget.is_full):
            pol = None  # a 100% budget keeps everything: the full cache, bit for bit
        self.kv_policy = pol
        self.page_size = page_size
        self.max_batch = max_batch
        self.kv_dtype = kv_dtype
        self._kv = None
        self._seq = None
        self.pos = 0

    @property
    def kv(self):
        """The paged KV cache (``fastadapt_ops.kv.PagedKVCache``), built on first use with room
        for ``max_ctx`` tokens in every row."""
        if self._kv is None:
            from ..kv import PagedKVCache

            c = self.config
            pages_per_row = -(-self.max_ctx // self.page_size)
            self._kv = PagedKVCache(c.n_layers, c.n_kv_heads, c.head_dim, page_size=self.page_size,
                                    num_pages=self.max_batch * c.n_kv_heads * (pages_per_row + 1),
                                    dtype=self.kv_dtype or self.dtype,
                                    track_scores=self.kv_policy is not None and self.kv_policy.needs_scores)
        return self._kv

    def kv_bytes(self) -> Dict[str, int]:
        """KV cache bytes held now and at peak (pages in use x page bytes, all layers)."""
        if self._kv is None:
            return {"held": 0, "peak": 0}
        return {"held": self._kv.bytes_held(), "peak": self._kv.peak_bytes}

    def reset(self) -> None:
        """Forget the sequence: its pages go back to the pool (which stays allocated)."""
        kv = self.kv
        if self._seq is not None:
            kv.free_sequence(self._seq)
        self._seq = kv.add_sequence()
        self.pos = 0
        self._evict_due = 0

    def _attend(self, li: int, q: torch.Tensor, scale: float, seqs: Optional[List[int]] = None) -> torch.Tensor:
        """Paged attention of ``q [B*T, H_q, D]`` (the newest T tokens of each of the B sequences
        ``seqs``, sequence-major; default the current one) over layer ``li``: ``[B*T, H_q, D]``.
        Feeds the score pool the way the policy asks (see ``fastadapt_ops.kv.policies``)."""
        if self.attend_hook is not None:
            o = self.attend_hook(self, li, q, scale, seqs)
            if o is not None:
                return o
        kv, pol = self._kv, self.kv_policy
        seqs = [self._seq] if seqs is None else seqs
        B = len(seqs)
        T = q.shape[0] // B
        q = q.view(B, T, *q.shape[1:])
        indptr, indices, lens = kv.plan(li, seqs)
        mode = pol.score_mode if pol is not None else None
        acc = kv.scores[li] if mode == "accumulate" or (mode is not None and T == 1) else None
        if mode == "last" and T == 1:
            kv.reset_scores(li, seqs)
        o, _ = _PAGED_ATTN(q, kv.k_pages[li], kv.v_pages[li], indptr, indices, lens, scale, acc)
        if mode is not None and acc is None:  # prefill: scores of the last queries only
            w = 1 if mode == "last" else min(T, getattr(pol, "window", 0) or T)
            if mode == "last":
                kv.reset_scores(li, seqs)
            _PAGED_ATTN(q[:, T - w:], kv.k_pages[li], kv.v_pages[li], indptr, indices, lens, scale,
                        kv.scores[li])
        return o.reshape(B * T, *o.shape[2:])

    def _maybe_evict(self, T: int) -> None:
        """Compact the cache to the policy's budget after a prefill, then every page_size steps."""
        from ..kv.policies import maybe_evict

        if T == 1:
            self._evict_due += 1
            if self._evict_due < self.page_size:
                return
        self._evict_due = 0
        for li in range(self.config.n_layers):
            maybe_evict(self._kv, self.kv_policy, self._seq, li, prefill=T > 1, chunk=self.page_size,
                        total_len=self.pos)

    # ---- kernels -------------------------------------------------------------------------
    def _mm(self, x: torch.Tensor, w, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x @ w^T (+ bias)``; w: float, QuantizedWeight, or a list of them (bias split by rows).
        Quantized weights use ``self.act_quant`` for single-token (decode) rows."""
        if isinstance(w, QuantizedWeight):
            if _QLINEAR is not None and x.dtype != torch.float64:
                aq = self.act_quant if x.shape[0] == 1 else "none"
                if w.fmt in _LUT_FORMATS:  # int2/3/4 only: GGUF decode skips the hook entirely
                    y = _lut_dispatch(w, lambda: w, w.fmt, *w.shape, x, bias, aq, None)  # LUT where measured faster
                    if y is not None:
                        return y
                return _QLINEAR(x, w.qdata, w.scales, w.zeros, bias, w.fmt, w.in_features, w.group_size, aq)
            from ..quant import linear

            return linear(x, w, bias)
        if isinstance(w, list):
            bs = [None] * len(w) if bias is None else bias.split([p.shape[0] for p in w])
            return torch.cat([self._mm(x, p, b) for p, b in zip(w, bs)], -1)
        return F.linear(x, w, bias)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        e = self.embed
        if isinstance(e, QuantizedWeight):  # dequantize only the looked-up rows
            rows = e.qdata.index_select(0, ids)
            return qf.dequantize(rows, None, None, e.fmt, (ids.numel(), e.in_features), e.group_size,
                                 torch.float32).to(self.dtype)
        return e.index_select(0, ids)

    # ---- fused decode ----------------------------------------------------------------------
    def decode_stack(self):
        """The layers as a ``torch.classes.fastadapt.DecodeStack`` (built once, rebuilt after a
        weight assignment), or None where some layer cannot run in it: a weight that is float,
        split over formats, or of an int2/3/4 format (those may take the LUT kernel per call)."""
        key = (id(self.layers), len(self.layers), _LAYER_EDITS[0])
        if self._stack is not None and self._stack[0] == key:
            return self._stack[1]
        cls = _decode_stack_class()
        stack = None
        names = (("qkv", "wqkv", "bqkv"), ("o", "wo", "bo"), ("gate_up", "wgu", None), ("down", "wdown", None))
        ok = cls is not None and _QLINEAR is not None and self.dtype != torch.float64 and all(
            isinstance(getattr(L, w), QuantizedWeight) and getattr(L, w).fmt not in _LUT_FORMATS
            for L in self.layers for _, w, _b in names)
        if ok:
            c = self.config
            stack = cls(len(self.layers), c.n_heads, c.n_kv_heads, c.head_dim, float(c.rms_eps))
            for li, L in enumerate(self.layers):
                stack.set_norms(li, L.attn_norm, L.ffn_norm)
                for which, w, b in names:
                    qw = getattr(L, w)
                    stack.set_linear(li, which, qw.qdata, qw.scales, qw.zeros, getattr(L, b) if b else None,
                                     qw.fmt, qw.in_features, qw.group_size)
        self._stack = (key, stack)
        return stack

    def _fused_decode_step(self, x: torch.Tensor, positions: torch.Tensor):
        """All layers of a one-token step in one C++ call, or None (nothing ran) where the step
        needs the Python loop: hooks, an eviction policy, a cache row needing copy-on-write."""
        if not self.fused_decode or self.kv_policy is not None or self.attend_hook is not None:
            return None
        stack = self.decode_stack()
        if stack is None:
            return None
        booked = self._kv.decode_slots(self._seq)
        if booked is None:
            return None
        slots, plans = booked
        x, delta = stack.step(x, None, positions, self._cos_sin, slots, self._kv.k_pages, self._kv.v_pages,
                              plans, 1, self.act_quant)
        return x, delta

    # ---- forward -------------------------------------------------------------------------
    def _check_tokens(self, tokens: Union[Sequence[int], torch.Tensor]) -> torch.Tensor:
        """Token ids as a 1-D long tensor, checked against the vocabulary and ``max_ctx``."""
        ids = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
        T = ids.numel()
        if T == 0:
            raise ValueError("fastadapt_ops.models: no tokens to run")
        if self.pos + T > self.max_ctx:
            raise ValueError(f"fastadapt_ops.models: sequence of {self.pos + T} tokens exceeds max_ctx="
                             f"{self.max_ctx} (pass max_ctx= to load)")
        if int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab:
            raise ValueError(f"fastadapt_ops.models: token ids must be in [0, {self.config.vocab})")
        if self._seq is None:
            self.reset()
        return ids

    def layer(self, li: int, x: torch.Tensor, delta: Optional[torch.Tensor], positions: torch.Tensor,
              seqs: Optional[List[int]] = None) -> "tuple[torch.Tensor, torch.Tensor]":
        """Run block ``li`` on the residual stream of new tokens at RoPE ``positions``.

        ``x [B*T, H]`` holds T new tokens of each of the B cache sequences ``seqs`` (sequence-major;
        default: the current sequence, B = 1); ``positions [B*T]`` are their RoPE rows. The
        residual is carried as ``(x, delta)``: ``delta`` is the previous block's output not yet
        added into ``x`` (None before the first block), so the add fuses into the next norm. The
        block's K/V are appended to layer ``li``'s pages of each sequence; attention is causal
        among each sequence's T new tokens, which must be the newest of its rows. Returns the new
        ``(x, delta)``; ``x + delta`` is the hidden state after the block."""
        c = self.config
        N = x.shape[0]
        nh, nkv, hd, eps = c.n_heads, c.n_kv_heads, c.head_dim, c.rms_eps
        nq, nk = nh * hd, nkv * hd
        L = self.layers[li]
        kv = self._kv
        seqs = [self._seq] if seqs is None else list(seqs)
        T = N // len(seqs)
        # x += delta; h = rmsnorm(x): one fused op instead of an add and a norm
        h = rms_norm(x, L.attn_norm, eps) if delta is None else rms_norm(delta, L.attn_norm, eps, x)
        qkv = self._mm(h, L.wqkv, L.bqkv)  # [T, nq + 2 nk]
        q = qkv[:, :nq].view(N, nh, hd)  # views into qkv, rotated in place (rotate-half:
        k = qkv[:, nq:nq + nk].view(N, nkv, hd)  # the q/k rows were un-permuted at load)
        rope(q, k, positions, self._cos_sin)
        v = qkv[:, nq + nk:].view(N, nkv, hd)
        if T == 1:
            kv.append_decode(li, seqs, k, v)  # decode: no re-checks per layer
        else:
            kv.append(li, seqs, k, v)  # [B*T, nkv, hd] into this layer's pages
        o = None
        if T > 1 and self.prefill_attention is not None:  # K/V are in the pages either way
            o = self.prefill_attention(self, li, q, k, v, positions, seqs)
        if o is None:
            o = self._attend(li, q, hd ** -0.5, seqs)  # causal among each row's new tokens
        o = o.reshape(N, nq)
        h = rms_norm(self._mm(o, L.wo, L.bo), L.ffn_norm, eps, x)  # x += attn out; h = norm(x)
        gu = self._mm(h, L.wgu)  # [T, 2 ffn]
        a = silu_mul(gu)  # silu(gate) * up: [T, ffn]
        return x, self._mm(a, L.wdown)

    def logits(self, x: torch.Tensor, delta: Optional[torch.Tensor], all_logits: bool = False) -> torch.Tensor:
        """Final norm and LM head on the residual ``(x, delta)``: ``[T, vocab]``, or ``[1, vocab]``
        for the last row only."""
        if not all_logits:  # only the last position's logits are needed
            x = x[-1:]
            delta = None if delta is None else delta[-1:]
        eps = self.config.rms_eps
        h = rms_norm(x, self.out_norm, eps) if delta is None else rms_norm(delta, self.out_norm, eps, x)
        return self._mm(h, self.lm_head)

    def forward(self, tokens: Union[Sequence[int], torch.Tensor], all_logits: bool = False) -> torch.Tensor:
        """Append ``tokens`` at the current position; logits ``[T, vocab]`` or ``[1, vocab]``."""
        ids = self._check_tokens(tokens)
        T, p0 = ids.numel(), self.pos
        positions = torch.arange(p0, p0 + T)  # [T], rows of the RoPE table
        x, delta = self._embed(ids), None  # the residual stream
        fused = self._fused_decode_step(x, positions) if T == 1 else None
        if fused is not None:
            x, delta = fused
        else:
            for li in range(self.config.n_layers):
                x, delta = self.layer(li, x, delta, positions)
        self.pos = p0 + T
        if self.kv_policy is not None:
            self._maybe_evict(T)
        return self.logits(x, delta, all_logits)

    @torch.inference_mode()
    def prefill(self, tokens: Union[Sequence[int], torch.Tensor], all_logits: bool = False,
                reset: bool = True) -> torch.Tensor:
        """Run a prompt (from position 0 unless ``reset=False``); logits ``[vocab]`` of the last
        position, or ``[T, vocab]`` with ``all_logits=True``."""
        if reset:
            self.reset()
        out = self.forward(tokens, all_logits=all_logits)
        return out if all_logits else out[0]

    @torch.inference_mode()
    def decode_one(self, token: int) -> torch.Tensor:
        """Append one token; its logits ``[vocab]``."""
        return self.forward([int(token)])[0]

    def __repr__(self) -> str:
        c = self.config
        return (f"LlamaModel({c.name or c.arch}: {c.n_layers} layers, hidden {c.hidden}, heads "
                f"{c.n_heads}/{c.n_kv_heads}, ffn {c.ffn}, vocab {c.vocab}, max_ctx {self.max_ctx})")
