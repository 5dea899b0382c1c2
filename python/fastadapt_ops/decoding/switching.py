"""Entropy-adaptive switching between two variants of one model (Entropy-Adaptive Decoding).

The variants are two runners over the same tokenizer: the stored model ("full") and a cheaper
one ("cheap", :func:`make_cheap_variant`): the same checkpoint with its block matrices
re-quantized by RTN to fewer bits, and/or with some blocks dropped (the CLI default drops every
other block from block 10 on: on this CPU the qlinear kernels are compute-bound, so fewer bits
per weight alone did not decode faster, while fewer blocks do). Each token is produced by the active variant; the
rolling mean entropy (natural log) of its next-token distributions over the last ``window``
tokens drives the switch, with hysteresis so it does not flap:

  full  -> cheap  when the rolling entropy drops below ``lo`` (the model is sure: cheap is enough)
  cheap -> full   when it rises above ``hi``

Each variant keeps its own KV cache. A variant that was idle has missed the tokens produced
meanwhile: when it becomes active again it runs all of them plus the new token in one batched
pass (a small prefill), so its cache stays consistent with the text.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

from ..models.generate import sample_next
from ..quant import QuantizedWeight, quantize_weight

__all__ = ["make_cheap_variant", "parse_layers", "switch_generate", "SwitchResult", "entropy",
           "add_switch_args", "run_switch"]


def entropy(logits: torch.Tensor) -> float:
    """Entropy (nats) of softmax(logits) over the last dim of a ``[vocab]`` row."""
    lp = torch.log_softmax(logits.float(), -1)
    return float(-(lp.exp() * lp).sum())


def _requant(w, bits: int, group_size: int):
    if isinstance(w, list):
        return [_requant(p, bits, group_size) for p in w]
    if isinstance(w, QuantizedWeight):
        w = w.dequantize(torch.float32)
    K = w.shape[1]
    gs = group_size if K % group_size == 0 else 32
    return quantize_weight(w.float(), bits=bits, group_size=gs)


def make_cheap_variant(model, bits: Optional[int] = 3, group_size: int = 64, head_bits: Optional[int] = None,
                       layers: Union[None, int, Sequence[int]] = None):
    """A cheaper copy of ``model``: its block matrices re-quantized (RTN, asymmetric, fp16 scales)
    to ``bits`` (2, 3, 4 or 8; None keeps the stored weights) with ``group_size`` values per
    scale, the LM head too when ``head_bits`` is given, and optionally only some of its blocks
    (``layers``: the first L, or a list of block indices, e.g. dropping every other late block).
    Norms, embeddings and the tokenizer are shared (so are the kept blocks' weights when bits is
    None); the copy has its own KV cache."""
    from ..models.llama import _Layer

    if bits is not None and bits not in (2, 3, 4, 8):
        raise ValueError(f"make_cheap_variant: bits must be 2, 3, 4, 8 or None, got {bits!r}")
    n = len(model.layers)
    keep = list(range(n)) if layers is None else list(range(int(layers))) if isinstance(layers, int) \
        else [int(i) for i in layers]
    if not keep or any(not 0 <= i < n for i in keep) or sorted(set(keep)) != keep:
        raise ValueError(f"make_cheap_variant: layers must be 1..{n} or increasing block indices in [0, {n}), "
                         f"got {layers!r}")
    cheap = copy.copy(model)
    cheap._kv, cheap._seq, cheap.pos, cheap.attend_hook = None, None, 0, None
    cheap.config = copy.copy(model.config)
    cheap.config.n_layers = len(keep)
    out = []
    for i in keep:
        L = model.layers[i]
        N = _Layer()
        for name in _Layer.__slots__:
            setattr(N, name, getattr(L, name))
        if bits is not None:
            N.wqkv, N.wo = _requant(L.wqkv, bits, group_size), _requant(L.wo, bits, group_size)
            N.wgu, N.wdown = _requant(L.wgu, bits, group_size), _requant(L.wdown, bits, group_size)
        out.append(N)
    cheap.layers = out
    if head_bits is not None:
        cheap.lm_head = _requant(model.lm_head, head_bits, group_size)
    return cheap


def parse_layers(spec: Optional[str], n_layers: int):
    """``--switch-layers``: None, "L" (the first L blocks), "a,b,c" (block indices) or
    "drop-odd:S" (every block below S, then every other block from S on)."""
    if spec is None or spec == "":
        return None
    if spec.startswith("drop-odd:"):
        s = int(spec.split(":", 1)[1])
        return [i for i in range(n_layers) if i < s or (i - s) % 2 == 0]
    if "," in spec:
        return [int(v) for v in spec.split(",")]
    return int(spec)


@dataclasses.dataclass
class SwitchResult:
    text: str
    tokens: List[int]
    variant: List[str]  # "full" | "cheap": which variant produced the logits of each token
    prompt_tokens: int
    cheap_fraction: float  # tokens whose logits came from the cheap variant
    switches: int
    catchup_tokens: int  # tokens re-run by a variant that had missed them
    prefill_s: float
    decode_s: float
    decode_tokens_per_s: float
    finish_reason: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@torch.inference_mode()
def switch_generate(full, cheap, tokenizer, prompt: Union[str, Sequence[int]], max_new_tokens: int = 64,
                    lo: float = 1.0, hi: float = 2.5, window: int = 4, temperature: float = 0.0,
                    top_k: int = 0, top_p: float = 1.0, seed: Optional[int] = None, chat: bool = False,
                    stop_at_eos: bool = True,
                    stream: Optional[Callable[[str], None]] = None) -> SwitchResult:
    """Generate with per-token switching between ``full`` and ``cheap`` by rolling entropy.

    Starts on ``full`` (which prefills the prompt); the cheap variant prefills lazily, the first
    time it is switched to, together with the tokens generated so far."""
    if not (lo <= hi):
        raise ValueError(f"switch_generate: thresholds must satisfy lo <= hi, got lo={lo}, hi={hi}")
    if window < 1:
        raise ValueError(f"switch_generate: window must be >= 1, got {window}")
    tokenizer = tokenizer if tokenizer is not None else getattr(full, "tokenizer", None)
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("switch_generate: a text prompt needs a tokenizer")
        ids = tokenizer.encode(tokenizer.apply_chat_template(prompt) if chat else prompt)
    else:
        ids = [int(i) for i in prompt]
    if not ids:
        raise ValueError("switch_generate: empty prompt")
    gen = None
    if temperature and temperature > 0:
        gen = torch.Generator().manual_seed(int(seed) if seed is not None else 0)
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else full.config.eos_token_id
    models = {"full": full, "cheap": cheap}
    pending = {"full": [], "cheap": list(ids)}  # tokens each variant has not consumed yet
    fresh = {"full": False, "cheap": True}  # the cheap variant has not prefilled yet
    t0 = time.perf_counter()
    logits = full.prefill(ids)
    t1 = time.perf_counter()
    active, out, var, ents = "full", [], [], []
    switches = catchup = 0
    finish = "length"
    while True:
        tok = sample_next(logits, temperature, top_k, top_p, gen)
        out.append(tok)
        var.append(active)
        if stream is not None and tokenizer is not None:
            stream(tokenizer.decode([tok], skip_special_tokens=True))
        if stop_at_eos and eos is not None and tok == eos:
            finish = "eos"
            break
        if len(out) >= max_new_tokens:
            break
        ents.append(entropy(logits))
        roll = sum(ents[-window:]) / min(window, len(ents))
        nxt = "cheap" if active == "full" and roll < lo else "full" if active == "cheap" and roll > hi else active
        switches += nxt != active
        active = nxt
        for k in pending:
            pending[k].append(tok)
        m = models[active]
        feed = pending[active]
        catchup += len(feed) - 1 if not fresh[active] else 0
        logits = m.prefill(feed, reset=fresh[active]) if len(feed) > 1 or fresh[active] else m.decode_one(feed[0])
        fresh[active] = False
        pending[active] = []
    t2 = time.perf_counter()
    n = len(out)
    text = tokenizer.decode(out, skip_special_tokens=True) if tokenizer is not None else ""
    return SwitchResult(text=text, tokens=out, variant=var, prompt_tokens=len(ids),
                        cheap_fraction=sum(v == "cheap" for v in var) / n if n else 0.0, switches=switches,
                        catchup_tokens=catchup, prefill_s=t1 - t0, decode_s=t2 - t1,
                        decode_tokens_per_s=(n - 1) / (t2 - t1) if n > 1 and t2 > t1 else 0.0,
                        finish_reason=finish)


# ---- CLI -------------------------------------------------------------------------------------
def _thresholds(text: str) -> Tuple[float, float]:
    import argparse

    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--switch-thresholds must be LO,HI (nats), got {text!r}")
    if lo > hi:
        raise argparse.ArgumentTypeError(f"--switch-thresholds: LO must be <= HI, got {text!r}")
    return lo, hi


def add_switch_args(parser) -> None:
    """``--switch entropy [--switch-bits B --switch-thresholds LO,HI --switch-window W]``."""
    g = parser.add_argument_group("entropy-adaptive switching")
    g.add_argument("--switch", choices=("entropy",), default=None,
                   help="switch per token between the model and a cheaper re-quantization by rolling entropy")
    g.add_argument("--switch-bits", type=int, default=0, choices=(0, 2, 3, 4, 8),
                   help="bits of the cheap variant (RTN re-quantization of the block matrices; 0 keeps them)")
    g.add_argument("--switch-layers", default="drop-odd:10",
                   help="blocks of the cheap variant: L (the first L), a,b,c, or drop-odd:S (every other "
                        "block from S on); '' keeps all")
    g.add_argument("--switch-thresholds", type=_thresholds, default=(1.0, 2.5), metavar="LO,HI",
                   help="rolling entropy (nats) below LO switches to the cheap variant, above HI back")
    g.add_argument("--switch-window", type=int, default=4, help="tokens in the rolling entropy")


def run_switch(model, args) -> int:
    """``fastadapt generate --switch entropy``: prints the text (or one JSON object)."""
    import json
    import sys

    cheap = make_cheap_variant(model, bits=args.switch_bits or None,
                               layers=parse_layers(args.switch_layers, len(model.layers)))
    lo, hi = args.switch_thresholds
    stream = None if args.json else (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    r = switch_generate(model, cheap, model.tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, lo=lo,
                        hi=hi, window=args.switch_window, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, seed=args.seed, chat=args.chat, stream=stream)
    if args.json:
        print(json.dumps(r.to_dict()))
    else:
        print()
        print(f"[{len(r.tokens)} tokens, {100 * r.cheap_fraction:.0f}% on the cheap variant "
              f"({len(cheap.layers)} blocks, {'int%d' % args.switch_bits if args.switch_bits else 'stored weights'}), "
              f"{r.switches} switches, {r.catchup_tokens} catch-up tokens; "
              f"{r.decode_tokens_per_s:.1f} tok/s decode]", file=sys.stderr)
    return 0
