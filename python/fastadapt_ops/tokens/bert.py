"""ToMe for HF BERT-family encoders (BertModel and models holding one as ``.bert``).

``patch(model, r=...)`` replaces the BertModel's ``forward`` (an instance attribute; the class
is untouched, ``unpatch`` removes it). In every layer with ``r_l > 0``:

    q, k, v = projections(h)                              # [B, H, N, D]
    a = proportional_attention(q, k, v, sizes)            # softmax(q k^T / sqrt(D) + log s) v
    h = attention.output(a, h)                            # dense + residual + LayerNorm
    dest = bipartite_soft_matching(k.mean(heads), r_l, CLS protected)   # ToMe's metric
    h, sizes = merge_tokens(h, dest, N - r_l, sizes)      # size-weighted means
    h = mlp(h)                                            # on N - r_l tokens

Layers after the first merge run the same way with ``r_l = 0`` (proportional attention, no
matching). Layers before the first merge are the model's own layers, untouched: with ``r = 0``
everywhere the patched model is bit-identical to the original.

Padding: a padded position has size 0, so proportional attention masks it (log 0 = -inf) and it
weighs nothing in a merge or in pooling; the ``attention_mask`` is honoured without a mask tensor.

Outputs: ``last_hidden_state`` holds the merged tokens [B, N', C]; the output also carries
``token_sizes`` [B, N'] (fp32: how many real input tokens each row stands for) and
``merge_dest`` [B, N] (each input token's row), and :func:`mean_pool` weights rows by their size.
With ``unmerge=True`` the last hidden state is scattered back to [B, N, C] instead.
"""
from __future__ import annotations

import inspect
import math
import types
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

from ..ops import tokens as T

__all__ = ["ToMeConfig", "patch", "unpatch", "is_patched", "layer_schedule", "mean_pool"]


@dataclass
class ToMeConfig:
    r: Union[int, float, Sequence[int]] = 0  # count per layer, fraction of tokens, or per-layer list
    schedule: str = "constant"  # constant | decreasing (ToMe's linear 2r -> 0, same total)
    unmerge: bool = False  # scatter the last hidden state back to [B, N, C]
    protect_cls: bool = True
    history: list = field(default_factory=list)  # tokens per layer of the last forward (diagnostics)


def _bert_of(model):
    if hasattr(model, "encoder") and hasattr(model, "embeddings"):
        return model
    inner = getattr(model, "bert", None)
    if inner is not None and hasattr(inner, "encoder"):
        return inner
    raise TypeError(f"fastadapt_ops.tokens.patch: expected a BERT-family encoder (BertModel or a model "
                    f"with .bert), got {type(model).__name__}")


def layer_schedule(cfg: ToMeConfig, num_layers: int, N: int) -> list[int]:
    """Tokens to merge in each layer for a sequence of N tokens (clamped to what can merge)."""
    r = cfg.r
    if isinstance(r, (list, tuple)):
        if len(r) != num_layers:
            raise ValueError(f"fastadapt_ops.tokens: r has {len(r)} entries for {num_layers} layers")
        plan = [int(v) for v in r]
    elif isinstance(r, float):
        if not 0.0 <= r < 1.0:
            raise ValueError(f"fastadapt_ops.tokens: a fractional r must be in [0, 1), got {r}")
        plan = None  # resolved per layer from the current count
    else:
        plan = [int(r)] * num_layers
        if cfg.schedule == "decreasing":
            plan = [int(round(2 * int(r) * (1 - i / max(1, num_layers - 1)))) for i in range(num_layers)]
    if cfg.schedule not in ("constant", "decreasing"):
        raise ValueError(f"fastadapt_ops.tokens: schedule must be 'constant' or 'decreasing', got {cfg.schedule!r}")
    out, n = [], N
    for i in range(num_layers):
        if plan is None:
            frac = r if cfg.schedule == "constant" else 2 * r * (1 - i / max(1, num_layers - 1))
            ri = int(math.floor(min(frac, 0.5) * n))
        else:
            ri = plan[i]
        if ri < 0:
            raise ValueError(f"fastadapt_ops.tokens: r must be >= 0, got {ri} for layer {i}")
        # CLS (position 0, an A token) protected: ceil(n/2) - 1 A tokens can merge
        cap = ((n + 1) // 2 - (1 if cfg.protect_cls else 0)) if n >= 2 else 0
        ri = max(0, min(ri, cap))
        out.append(ri)
        n -= ri
    return out


def _attention_heads(layer, h):
    sa = layer.attention.self
    B, N, _ = h.shape
    hd = sa.attention_head_size
    q = sa.query(h).view(B, N, -1, hd).transpose(1, 2)
    k = sa.key(h).view(B, N, -1, hd).transpose(1, 2)
    v = sa.value(h).view(B, N, -1, hd).transpose(1, 2)
    return q, k, v, getattr(sa, "scaling", hd ** -0.5)


def _tome_layer(layer, h, sizes, r, prot_cls):
    """One BERT layer with proportional attention and (r > 0) a ToMe merge before the MLP."""
    B, N, C = h.shape
    q, k, v, scale = _attention_heads(layer, h)
    a = T.proportional_attention(q, k, v, sizes, scale)  # [B, H, N, D]
    a = a.transpose(1, 2).reshape(B, N, C)
    h = layer.attention.output(a, h)
    dest = None
    if r > 0:
        metric = k.mean(1)  # [B, N, D]: ToMe matches on the keys' mean over heads
        prot = T.protected_mask(B, N, first=prot_cls, device=h.device) if prot_cls else None
        dest = T.bipartite_soft_matching(metric, r, prot)
        h, sizes = T.merge_tokens(h, dest, N - r, sizes)
    h = layer.output(layer.intermediate(h), h)
    return h, sizes, dest


def _hf_mask(bert, attention_mask, emb):
    if attention_mask is None:
        return None
    if hasattr(bert, "_create_attention_masks"):
        # its keywords drift across transformers releases (past_key_values became cache, and
        # position_ids was added in 5.x): pass the optional ones it names, all None here
        params = inspect.signature(bert._create_attention_masks).parameters
        kw = {name: None for name in ("past_key_values", "cache", "position_ids") if name in params}
        mask, _ = bert._create_attention_masks(attention_mask=attention_mask, encoder_attention_mask=None,
                                               embedding_output=emb, encoder_hidden_states=None, **kw)
        return mask
    return bert.get_extended_attention_mask(attention_mask, emb.shape[:2])


def _patched_forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                     inputs_embeds=None, **kwargs):
    from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

    cfg: ToMeConfig = self._fastadapt_tome
    if kwargs.get("encoder_hidden_states") is not None or kwargs.get("past_key_values") is not None:
        raise ValueError("fastadapt_ops.tokens: a ToMe-patched BERT is an encoder only (no cross attention, no cache)")
    emb = self.embeddings(input_ids=input_ids, position_ids=position_ids, token_type_ids=token_type_ids,
                          inputs_embeds=inputs_embeds)
    B, N, _ = emb.shape
    layers = self.encoder.layer
    sched = layer_schedule(cfg, len(layers), N)
    first = next((i for i, r in enumerate(sched) if r > 0), len(layers))
    h = emb
    if first > 0:  # the model's own layers, bit-exact, until the first merge
        mask = _hf_mask(self, attention_mask, emb)
        for layer in layers[:first]:
            h = layer(h, mask)
            h = h[0] if isinstance(h, tuple) else h
    sizes = (attention_mask.to(torch.float32) if attention_mask is not None
             else torch.ones(B, N, dtype=torch.float32, device=emb.device))
    dest_total = torch.arange(N, dtype=torch.int32, device=emb.device).expand(B, N).contiguous()
    cfg.history = [N] * (first + 1)
    for i in range(first, len(layers)):
        h, sizes, dest = _tome_layer(layers[i], h, sizes, sched[i], cfg.protect_cls)
        if dest is not None:
            dest_total = T.compose_dest(dest_total, dest)
        cfg.history.append(h.shape[1])
    if cfg.unmerge and h.shape[1] != N:
        h = T.unmerge_tokens(h.contiguous(), dest_total)
        sizes_out = attention_mask.float() if attention_mask is not None else torch.ones(B, N, device=h.device)
    else:
        sizes_out = sizes
    pooled = self.pooler(h) if getattr(self, "pooler", None) is not None else None
    out = BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=h, pooler_output=pooled)
    out.token_sizes = sizes_out
    out.merge_dest = dest_total
    return out


def patch(model, r: Union[int, float, Sequence[int]] = 8, schedule: str = "constant", *,
          unmerge: bool = False, protect_cls: bool = True):
    """Apply ToMe to a BERT-family encoder in place and return it.

    r: tokens merged per layer (int), a fraction of the current tokens per layer (float in
    (0, 1)), or one count per layer (list). schedule: "constant" or "decreasing" (ToMe's linear
    2r -> 0 over the layers, same total). CLS (position 0) is never merged. Patching again
    replaces the settings."""
    bert = _bert_of(model)
    if schedule not in ("constant", "decreasing"):
        raise ValueError(f"fastadapt_ops.tokens.patch: schedule must be 'constant' or 'decreasing', got {schedule!r}")
    if getattr(bert.config, "is_decoder", False):
        raise ValueError("fastadapt_ops.tokens.patch: decoder BERTs are not supported (encoders only)")
    cfg = ToMeConfig(r=r, schedule=schedule, unmerge=unmerge, protect_cls=protect_cls)
    layer_schedule(cfg, len(bert.encoder.layer), 64)  # validate r now
    bert._fastadapt_tome = cfg
    bert.forward = types.MethodType(_patched_forward, bert)
    return model


def unpatch(model):
    """Undo :func:`patch` (no-op on an unpatched model); returns the model."""
    bert = _bert_of(model)
    if "forward" in bert.__dict__:
        del bert.forward
    bert.__dict__.pop("_fastadapt_tome", None)
    return model


def is_patched(model) -> bool:
    return hasattr(_bert_of(model), "_fastadapt_tome")


def mean_pool(output, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:  # [B, C] fp32
    """Mean pooling of an encoder output. Patched outputs are weighted by ``token_sizes`` (each
    merged row counts as the tokens it stands for); plain outputs by ``attention_mask``."""
    h = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
    w = getattr(output, "token_sizes", None)
    if w is None:
        w = attention_mask if attention_mask is not None else torch.ones(h.shape[:2], device=h.device)
    w = w.to(torch.float32)
    return (h.float() * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1e-9)
