"""fastadapt::logit_confidence and fastadapt::hidden_cosine: the confidence measures that
early-exit and draft-stop rules read (top-1 probability, top-1 - top-2 margin, entropy, argmax
from logits in one pass; CALM's saturation, the cosine of consecutive layers' hidden states)."""
from __future__ import annotations

from typing import Tuple

import torch


def logit_confidence(
    logits: torch.Tensor,  # [B, V] float32 | bfloat16 | float16
    temperature: float = 1.0,
) -> Tuple[torch.Tensor, torch.Tensor]:  # stats [B, 3] fp32, argmax [B] int64
    """Of ``softmax(logits / temperature)`` per row: ``stats[:, 0]`` the top-1 probability,
    ``stats[:, 1]`` top-1 minus top-2 probability, ``stats[:, 2]`` the entropy in nats; and the
    first argmax. One pass over the row, fp32 math."""
    return torch.ops.fastadapt.logit_confidence.default(logits, float(temperature))


def hidden_cosine(
    a: torch.Tensor,  # [..., H] float32 | bfloat16 | float16
    b: torch.Tensor,  # same shape and dtype as a
    eps: float = 1e-8,
) -> torch.Tensor:  # [...] fp32
    """``cos(a, b)`` over the last dimension (``a.b / max(|a| |b|, eps)``), fp32."""
    return torch.ops.fastadapt.hidden_cosine.default(a, b, float(eps))


def logit_confidence_reference(logits, temperature=1.0):
    """float64 oracle of :func:`logit_confidence`."""
    x = logits.double() / temperature
    lp = torch.log_softmax(x, -1)
    p = lp.exp()
    top = torch.topk(p, min(2, p.shape[-1]), -1).values
    p1 = top[:, 0]
    p2 = top[:, 1] if top.shape[-1] > 1 else torch.zeros_like(p1)
    ent = -(p * lp.clamp_min(-1e300)).nan_to_num(0.0).sum(-1)
    return torch.stack([p1, p1 - p2, ent], -1).float(), torch.argmax(x, -1)


def hidden_cosine_reference(a, b, eps=1e-8):
    """float64 oracle of :func:`hidden_cosine`."""
    a, b = a.double(), b.double()
    return ((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(eps)).float()


@torch.library.register_fake("fastadapt::logit_confidence")
def _logit_confidence_fake(logits, temperature=1.0):
    torch._check(logits.dim() == 2, lambda: "fastadapt::logit_confidence: logits must be [B, V]")
    B = logits.shape[0]
    return logits.new_empty((B, 3), dtype=torch.float32), logits.new_empty((B,), dtype=torch.long)


@torch.library.register_fake("fastadapt::hidden_cosine")
def _hidden_cosine_fake(a, b, eps=1e-8):
    torch._check(a.shape == b.shape, lambda: "fastadapt::hidden_cosine: b must match a")
    return a.new_empty(a.shape[:-1], dtype=torch.float32)
