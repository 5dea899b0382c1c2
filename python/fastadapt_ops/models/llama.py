"""LlamaModel: a lean Llama-family decoder on ``fastadapt::qlinear`` (batch 1, one sequence).

Per layer: RMSNorm -> fused QKV projection -> RoPE -> GQA attention (scaled_dot_product_attention
over a preallocated KV cache ``[layers, 2, kv_heads, max_ctx, head_dim]``) -> output projection ->
residual -> RMSNorm -> fused gate/up projection -> SwiGLU -> down projection -> residual.

Quantized weights stay in their stored GGUF format; q, k and v (and gate and up) are concatenated
row-wise into one packed weight when they share a format, so one kernel call reads the activation
once. GGUF stores attn_q / attn_k rows permuted for llama.cpp's interleaved RoPE; the loader undoes
that row permutation (rows are whole in the packed data), so RoPE here is the rotate-half form.
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
        return QuantizedWeight(w.qdata[idx].contiguous(), None, None, w.fmt, w.shape, w.group_size)
    return w[idx].contiguous()


def _fuse(parts: Sequence[Weight]) -> Weight:
    """Concatenate output rows into one weight (same format), or keep a list when impossible."""
    if all(isinstance(p, QuantizedWeight) and p.is_gguf for p in parts):
        fmts = {p.fmt for p in parts}
        ks = {p.in_features for p in parts}
        if len(fmts) == 1 and len(ks) == 1:
            q = torch.cat([p.qdata for p in parts], 0).contiguous()
            n = sum(p.out_features for p in parts)
            return QuantizedWeight(q, None, None, parts[0].fmt, (n, parts[0].in_features), parts[0].group_size)
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(list(parts), 0).contiguous()
    return list(parts)  # mixed formats: one call each


class _Layer:
    __slots__ = ("attn_norm", "wqkv", "wo", "ffn_norm", "wgu", "wdown")


class LlamaModel:
    """A Llama-family decoder. Build with :func:`fastadapt_ops.models.load` or :meth:`from_tensors`.

    ``prefill(tokens)`` runs a prompt from position 0 (resetting the cache) and returns the
    logits of the last position (``[vocab]``) or of all positions (``[T, vocab]``);
    ``decode_one(token)`` appends one token and returns its logits ``[vocab]``.
    """

    def __init__(self, config: ModelConfig, tensors: Dict[str, Weight], tokenizer=None,
                 max_ctx: Optional[int] = None, dtype: torch.dtype = torch.float32):
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

        H, hd, nh, nkv = c.hidden, c.head_dim, c.n_heads, c.n_kv_heads
        perm_q = _unpermute_rows(nh, nh * hd)
        perm_k = _unpermute_rows(nkv, nkv * hd)
        self.layers: List[_Layer] = []
        for i in range(c.n_layers):
            p = f"blk.{i}."
            L = _Layer()
            L.attn_norm = vec(p + "attn_norm.weight")
            L.ffn_norm = vec(p + "ffn_norm.weight")
            wq = _take_rows(mat(p + "attn_q.weight", (nh * hd, H)), perm_q)
            wk = _take_rows(mat(p + "attn_k.weight", (nkv * hd, H)), perm_k)
            wv = mat(p + "attn_v.weight", (nkv * hd, H))
            L.wqkv = _fuse([wq, wk, wv])
            L.wo = mat(p + "attn_output.weight", (H, nh * hd))
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
        self._cache: Optional[torch.Tensor] = None
        self.pos = 0

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def from_tensors(cls, config: ModelConfig, tensors: Dict[str, Weight], **kw) -> "LlamaModel":
        return cls(config, tensors, **kw)

    # ---- cache ---------------------------------------------------------------------------
    @property
    def kv_cache(self) -> torch.Tensor:
        """``[layers, 2, kv_heads, max_ctx, head_dim]`` (allocated on first use)."""
        if self._cache is None:
            c = self.config
            self._cache = torch.zeros(c.n_layers, 2, c.n_kv_heads, self.max_ctx, c.head_dim, dtype=self.dtype)
        return self._cache

    def reset(self) -> None:
        """Forget the sequence (the cache memory is kept)."""
        self.pos = 0

    # ---- kernels -------------------------------------------------------------------------
    @staticmethod
    def _mm(x: torch.Tensor, w) -> torch.Tensor:
        if isinstance(w, QuantizedWeight):
            if _QLINEAR is not None and x.dtype != torch.float64:
                return _QLINEAR(x, w.qdata, None, None, None, w.fmt, w.in_features, w.group_size, "none")
            from ..quant import linear

            return linear(x, w)
        if isinstance(w, list):
            return torch.cat([LlamaModel._mm(x, p) for p in w], -1)
        return F.linear(x, w)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        e = self.embed
        if isinstance(e, QuantizedWeight):  # dequantize only the looked-up rows
            rows = e.qdata.index_select(0, ids)
            return qf.dequantize(rows, None, None, e.fmt, (ids.numel(), e.in_features), e.group_size,
                                 torch.float32).to(self.dtype)
        return e.index_select(0, ids)

    # ---- forward -------------------------------------------------------------------------
    def forward(self, tokens: Union[Sequence[int], torch.Tensor], all_logits: bool = False) -> torch.Tensor:
        """Append ``tokens`` at the current position; logits ``[T, vocab]`` or ``[1, vocab]``."""
        c = self.config
        ids = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
        T = ids.numel()
        if T == 0:
            raise ValueError("fastadapt_ops.models: no tokens to run")
        p0 = self.pos
        if p0 + T > self.max_ctx:
            raise ValueError(f"fastadapt_ops.models: sequence of {p0 + T} tokens exceeds max_ctx="
                             f"{self.max_ctx} (pass max_ctx= to load)")
        if int(ids.min()) < 0 or int(ids.max()) >= c.vocab:
            raise ValueError(f"fastadapt_ops.models: token ids must be in [0, {c.vocab})")
        nh, nkv, hd, eps = c.n_heads, c.n_kv_heads, c.head_dim, c.rms_eps
        nq, nk = nh * hd, nkv * hd
        S = p0 + T
        cache = self.kv_cache
        positions = torch.arange(p0, S)  # [T], rows of the RoPE table
        mask = None
        if T > 1 and p0 > 0:  # queries at p0..S-1 see keys 0..their own position
            mask = torch.ones(T, S, dtype=torch.bool).tril(diagonal=p0)

        x = self._embed(ids)  # [T, H], the residual stream
        delta = None  # the last block output not yet added into x (added by the fused norm)
        for li, L in enumerate(self.layers):
            # x += delta; h = rmsnorm(x): one fused op instead of an add and a norm
            h = rms_norm(x, L.attn_norm, eps) if delta is None else rms_norm(delta, L.attn_norm, eps, x)
            qkv = self._mm(h, L.wqkv)  # [T, nq + 2 nk]
            q = qkv[:, :nq].view(T, nh, hd)  # views into qkv, rotated in place (rotate-half:
            k = qkv[:, nq:nq + nk].view(T, nkv, hd)  # the q/k rows were un-permuted at load)
            rope(q, k, positions, self._cos_sin)
            v = qkv[:, nq + nk:].view(T, nkv, hd)
            kc = cache[li, 0]  # [nkv, max_ctx, hd]
            vc = cache[li, 1]
            kc[:, p0:S].copy_(k.transpose(0, 1))
            vc[:, p0:S].copy_(v.transpose(0, 1))
            K = kc[:, :S]
            V = vc[:, :S]
            if T == 1:  # group the query heads of each KV head: [nkv, groups, hd] against [nkv, S, hd]
                # (4-D inputs take the fused CPU flash kernel)
                o = F.scaled_dot_product_attention(q.reshape(1, nkv, nh // nkv, hd), K[None], V[None])
                o = o.reshape(1, nq)
            else:
                qt = q.transpose(0, 1)[None]  # [1, nh, T, hd]
                if mask is None:
                    o = F.scaled_dot_product_attention(qt, K[None], V[None], is_causal=True, enable_gqa=True)
                else:
                    o = F.scaled_dot_product_attention(qt, K[None], V[None], attn_mask=mask, enable_gqa=True)
                o = o[0].transpose(0, 1).reshape(T, nq)
            h = rms_norm(self._mm(o, L.wo), L.ffn_norm, eps, x)  # x += attn out; h = norm(x)
            gu = self._mm(h, L.wgu)  # [T, 2 ffn]
            a = silu_mul(gu)  # silu(gate) * up: [T, ffn]
            delta = self._mm(a, L.wdown)
        self.pos = S
        if not all_logits:  # only the last position's logits are needed
            x, delta = x[-1:], delta[-1:]
        h = rms_norm(delta, self.out_norm, eps, x)
        return self._mm(h, self.lm_head)

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
