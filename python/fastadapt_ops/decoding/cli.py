"""``fastadapt generate`` flags of the adaptive decoding loops (wired in ``models/cli.py``):

    --early-exit [--exit-measure p1|margin|entropy|saturation] [--exit-threshold T|auto]
                 [--exit-layers 8,12,...] [--exit-kv copy|recompute] [--exit-decay D]
    --speculate self --draft-layers L [--draft-len adaptive|heuristic|K] [--max-draft K]
    --draft-vocab N   (draft / exit checks read only the N most frequent vocabulary rows)
    --adapters PATH|fit|auto   (exit adapters: load; fit on stdlib text and save beside the model;
                  or load the saved ones, fitting when missing)
    --compare         (plain decoding of the same prompt in the same run: speed-up, agreement)
    --best-of N [--answer-regex R ...]   (best_of_n.py)
    --switch entropy [--switch-bits B ...]   (switching.py)

The JSON adds mean_layers_per_token, acceptance_rate, mean_draft_len and, with --compare,
plain_decode_tokens_per_s, speedup_vs_plain and agreement_with_plain.
"""
from __future__ import annotations

import json
import sys
from typing import List, Optional

__all__ = ["add_decoding_args", "run_decoding", "agreement", "add_sampling_args", "wants_sampling",
           "run_sampling"]


def add_decoding_args(p) -> None:
    from .early_exit import MEASURES

    g = p.add_argument_group("adaptive decoding")
    g.add_argument("--early-exit", action="store_true", help="exit early per token on a confidence threshold")
    g.add_argument("--exit-measure", choices=MEASURES, default="p1")
    g.add_argument("--exit-threshold", default="0.9",
                   help="threshold of the exit measure, or 'auto' (calibrated on stdlib text for --exit-target)")
    g.add_argument("--exit-target", type=float, default=0.95, help="greedy agreement target of --exit-threshold auto")
    g.add_argument("--exit-layers", default=None, help="comma-separated exit layers (layer counts)")
    g.add_argument("--exit-kv", choices=("copy", "recompute"), default="copy",
                   help="skipped layers' KV: CALM's copy of the exit state, or lazy exact recompute")
    g.add_argument("--exit-decay", type=float, default=0.0, help="CALM threshold decay over the sequence")
    g.add_argument("--speculate", choices=("self",), default=None, help="self-speculative decoding")
    g.add_argument("--draft-layers", type=int, default=None, help="layers of the self-speculative draft")
    g.add_argument("--draft-len", default="adaptive", help="adaptive (SpecDec++ stop rule) | heuristic (HF) | K")
    g.add_argument("--max-draft", type=int, default=6)
    g.add_argument("--stop-threshold", type=float, default=0.7,
                   help="SpecDec++ rule: stop drafting when P(some draft rejected) exceeds this")
    g.add_argument("--draft-vocab", type=int, default=0,
                   help="draft/exit-check head over the N most frequent tokens (0 = full vocabulary)")
    g.add_argument("--adapters", default=None,
                   help="exit adapters: a path to load, 'fit' (fit on stdlib text, save beside the model), or "
                        "'auto' (load the saved ones, fitting first when missing)")
    g.add_argument("--compare", action="store_true", help="also run plain decoding: speed-up and agreement")


def agreement(a: List[int], b: List[int]) -> float:
    """Position-wise agreement of two greedy outputs over the shorter length."""
    n = min(len(a), len(b))
    return sum(x == y for x, y in zip(a[:n], b[:n])) / n if n else 1.0


def _layers(text: Optional[str]) -> Optional[List[int]]:
    return None if not text else [int(t) for t in text.split(",") if t.strip()]


def build_decoder(model, args, prompt_ids=()):
    """The decoder the flags ask for (or None)."""
    from .adapters import ExitAdapters, fit_exit_adapters, stdlib_text
    from .confidence import CandidateHead
    from .early_exit import EarlyExitDecoder, calibrate, default_exit_layers
    from .speculative import SelfSpeculativeDecoder

    if not args.early_exit and not args.speculate:
        return None
    if args.early_exit and args.speculate:
        raise SystemExit("fastadapt generate: choose --early-exit or --speculate, not both")
    n = model.config.n_layers
    layers = _layers(args.exit_layers) or default_exit_layers(n)
    if args.speculate:
        L = args.draft_layers if args.draft_layers is not None else n // 2
        layers = [L]
    cand = None
    if args.draft_vocab:
        cand = CandidateHead.from_text(model, stdlib_text(), size=args.draft_vocab, extra=list(prompt_ids))
    adapters = None
    if args.adapters == "auto":  # the saved ones when they cover these layers, else fit and save
        import os

        from .adapters import default_path
        path = default_path(model)
        if os.path.exists(path):
            adapters = ExitAdapters.load(path, model)
            if not set(layers) <= set(adapters.layers):
                adapters = None
        if adapters is None:
            adapters = fit_exit_adapters(model, layers, path=path)
    elif args.adapters == "fit":
        adapters = fit_exit_adapters(model, layers)
    elif args.adapters:
        adapters = ExitAdapters.load(args.adapters, model)
    if args.speculate:
        dl = args.draft_len if args.draft_len in ("adaptive", "heuristic") else int(args.draft_len)
        return SelfSpeculativeDecoder(model, L, draft_len=dl, max_draft=args.max_draft,
                                      stop_threshold=args.stop_threshold, adapters=adapters, candidates=cand)
    thr = args.exit_threshold
    if thr == "auto":
        thr = calibrate(model, stdlib_text(20000), exit_layers=layers, measure=args.exit_measure,
                        target_agreement=args.exit_target, adapters=adapters, candidates=cand)["threshold"]
    return EarlyExitDecoder(model, layers, measure=args.exit_measure, threshold=float(thr), decay=args.exit_decay,
                            kv_fill=args.exit_kv, adapters=adapters, candidates=cand)


def run_decoding(args, model) -> bool:
    """Run ``fastadapt generate`` with an adaptive decoder when its flags are given; False otherwise."""
    if not getattr(args, "early_exit", False) and not getattr(args, "speculate", None):
        return False
    from ..models.generate import generate
    from .early_exit import EarlyExitDecoder

    tok = model.tokenizer
    ids = tok.encode(tok.apply_chat_template(args.prompt) if args.chat else args.prompt)
    dec = build_decoder(model, args, ids)
    kw = {}
    if not isinstance(dec, EarlyExitDecoder):
        kw = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    elif args.temperature and args.temperature > 0:
        raise SystemExit("fastadapt generate: --early-exit decodes greedily (temperature 0)")
    dec.generate(ids, 4, **kw)  # warm-up (first calls pay one-time costs)
    r = dec.generate(ids, args.max_new_tokens, **kw)
    out = {"text": tok.decode(r.tokens, skip_special_tokens=True), **r.to_dict()}
    out.pop("stats")
    out["mode"] = "speculate-self" if args.speculate else "early-exit"
    out.update(r.stats)
    out.setdefault("acceptance_rate", None)
    out.setdefault("mean_draft_len", None)
    if args.compare:
        p = generate(model, tok, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                     top_k=args.top_k, top_p=args.top_p, seed=args.seed)
        out["plain_tokens"] = p.tokens
        out["plain_decode_tokens_per_s"] = p.decode_tokens_per_s
        out["speedup_vs_plain"] = r.decode_tokens_per_s / p.decode_tokens_per_s if p.decode_tokens_per_s else None
        out["agreement_with_plain"] = agreement(r.tokens, p.tokens)
        out["identical_to_plain"] = r.tokens == p.tokens
    if args.json:
        print(json.dumps(out))
    else:
        print(out["text"])
        extra = ""
        if args.compare:
            extra = (f"; plain {out['plain_decode_tokens_per_s']:.1f} tok/s, speed-up {out['speedup_vs_plain']:.2f}x, "
                     f"agreement {out['agreement_with_plain']:.3f}")
        acc = f", acceptance {out['acceptance_rate']:.2f}" if out["acceptance_rate"] is not None else ""
        print(f"[{out['mode']}: {r.decode_tokens_per_s:.1f} tok/s decode, {out['mean_layers_per_token']:.1f} "
              f"layers/token{acc}{extra}]", file=sys.stderr)
    return True


# ---- best-of-N and entropy switching: loops of their own (best_of_n.py, switching.py) ----------
def add_sampling_args(parser) -> None:
    from .best_of_n import add_best_of_args
    from .switching import add_switch_args

    add_best_of_args(parser)
    add_switch_args(parser)


def wants_sampling(args) -> bool:
    return bool(getattr(args, "best_of", 0)) or getattr(args, "switch", None) is not None


def run_sampling(model, args) -> int:
    from .best_of_n import run_best_of
    from .switching import run_switch

    if getattr(args, "best_of", 0) and getattr(args, "switch", None):
        raise SystemExit("fastadapt generate: --best-of and --switch cannot be combined")
    if getattr(args, "best_of", 0):
        if args.best_of < 1:
            raise SystemExit(f"fastadapt generate: --best-of must be >= 1, got {args.best_of}")
        return run_best_of(model, args)
    return run_switch(model, args)
