"""Confidence measures for early exit and draft stopping, and the cheap heads that feed them.

``confidence(logits)`` runs ``fastadapt::logit_confidence`` (top-1 probability, top-1 - top-2
margin, entropy, argmax in one pass over the row); ``saturation(h_prev, h)`` runs
``fastadapt::hidden_cosine`` (CALM's state saturation: no LM head at all). The LM head is about a
third of SmolLM2's bytes per token, so an exit test that needs logits should not read all of it:
:class:`CandidateHead` is the LM head restricted to a candidate subset of the vocabulary (the most
frequent tokens of a reference text plus the prompt's tokens), its rows taken from the stored
quantized matrix once. :class:`ExitHead` is what an exit layer (or a draft) reads out with:
optional exit adapter -> final RMSNorm -> full or candidate LM head.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence

import torch

from ..quant import QuantizedWeight

__all__ = ["confidence", "saturation", "CandidateHead", "ExitHead"]


def _ops_ready() -> bool:
    try:
        import fastadapt_ops.ops.confidence  # noqa: F401

        return hasattr(torch.ops.fastadapt, "logit_confidence")
    except (ImportError, AttributeError, RuntimeError):
        return False


_HAS_OPS = _ops_ready()


def confidence(logits: torch.Tensor, temperature: float = 1.0) -> Dict[str, torch.Tensor]:
    """``{"p1", "margin", "entropy"}`` (fp32 ``[B]``) and ``"argmax"`` (int64 ``[B]``) of
    ``softmax(logits / temperature)`` rows (``logits [B, V]`` or ``[V]``)."""
    x = logits if logits.dim() == 2 else logits.reshape(1, -1)
    if _HAS_OPS and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
        stats, arg = torch.ops.fastadapt.logit_confidence.default(x, float(temperature))
    else:
        from ..ops.confidence import logit_confidence_reference

        stats, arg = logit_confidence_reference(x, temperature)
    return {"p1": stats[:, 0], "margin": stats[:, 1], "entropy": stats[:, 2], "argmax": arg}


def saturation(h_prev: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Cosine ``[...]`` fp32 between two layers' hidden states ``[..., H]``."""
    if _HAS_OPS and h.dtype in (torch.float32, torch.bfloat16, torch.float16):
        return torch.ops.fastadapt.hidden_cosine.default(h_prev, h, 1e-8)
    from ..ops.confidence import hidden_cosine_reference

    return hidden_cosine_reference(h_prev, h)


def _take_rows(w, idx: torch.Tensor):
    if isinstance(w, QuantizedWeight):
        pick = lambda t: None if t is None else t.index_select(0, idx).contiguous()  # noqa: E731
        return QuantizedWeight(pick(w.qdata), pick(w.scales), pick(w.zeros), w.fmt,
                               (idx.numel(), w.in_features), w.group_size)
    return w.index_select(0, idx).contiguous()


class CandidateHead:
    """The LM head on a candidate subset of the vocabulary: ``logits(h) -> [T, C]`` for the token
    ids ``self.ids`` (sorted int64). ``full_logits`` scatters them into ``[T, V]`` with ``-inf``
    elsewhere (a draft distribution with zero mass off the subset keeps the rejection rule exact).
    """

    def __init__(self, model, ids: Iterable[int]):
        ids = torch.as_tensor(sorted(set(int(i) for i in ids)), dtype=torch.long)
        if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= model.config.vocab:
            raise ValueError(f"CandidateHead: ids must be a non-empty set of token ids in [0, {model.config.vocab})")
        self.model = model
        self.ids = ids
        self.weight = _take_rows(model.lm_head, ids)

    @classmethod
    def from_text(cls, model, text: str, size: int = 4096, extra: Sequence[int] = ()) -> "CandidateHead":
        """The ``size`` most frequent token ids of ``text`` (tokenized by the model's tokenizer),
        plus ``extra`` (e.g. the prompt's ids) and the special tokens."""
        ids = model.tokenizer.encode(text)
        counts = torch.bincount(torch.as_tensor(ids, dtype=torch.long), minlength=model.config.vocab)
        top = torch.topk(counts, min(size, int((counts > 0).sum()))).indices.tolist()
        special = [t for t in (model.config.eos_token_id, getattr(model.config, "bos_token_id", None))
                   if t is not None]
        return cls(model, list(top) + list(extra) + special)

    def with_extra(self, extra: Sequence[int]) -> "CandidateHead":
        """This subset plus ``extra`` ids (a new head; this one is unchanged)."""
        new = set(int(i) for i in extra) - set(self.ids.tolist())
        return self if not new else CandidateHead(self.model, self.ids.tolist() + sorted(new))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """``[T, C]`` logits of the candidates for already-normalised hidden rows ``h [T, H]``."""
        return self.model._mm(h, self.weight)

    def full_logits(self, h: torch.Tensor) -> torch.Tensor:
        lg = self.logits(h)
        out = lg.new_full((lg.shape[0], self.model.config.vocab), float("-inf"))
        out[:, self.ids] = lg
        return out


class ExitHead:
    """Read out an exit: ``(x, delta)`` residual of layer ``layer`` -> optional adapter -> final
    RMSNorm -> LM head (``candidates``: a :class:`CandidateHead`, else the full head).

    ``logits(x, delta)`` returns ``(logits, ids)``: logits ``[T, C]`` over ``ids`` (None: the full
    vocabulary, ``C = V``)."""

    def __init__(self, model, layer: int, adapters=None, candidates: Optional[CandidateHead] = None):
        self.model, self.layer, self.candidates = model, int(layer), candidates
        self.adapter = adapters.get(layer) if adapters is not None else None

    def normed(self, x: torch.Tensor, delta: Optional[torch.Tensor]) -> torch.Tensor:
        from ..ops.rms_norm import rms_norm

        m = self.model
        h = x if delta is None else x + delta
        if self.adapter is not None:
            h = self.adapter(h)
        return rms_norm(h, m.out_norm, m.config.rms_eps)

    def logits(self, x: torch.Tensor, delta: Optional[torch.Tensor]):
        h = self.normed(x, delta)
        if self.candidates is None:
            return self.model._mm(h, self.model.lm_head), None
        return self.candidates.logits(h), self.candidates.ids

    def full_logits(self, x: torch.Tensor, delta: Optional[torch.Tensor]) -> torch.Tensor:
        """``[T, V]`` (``-inf`` off the candidate subset)."""
        h = self.normed(x, delta)
        if self.candidates is None:
            return self.model._mm(h, self.model.lm_head)
        return self.candidates.full_logits(h)
