"""Bench family ``adaptive_decoding``: early exit and self-speculative decoding on SmolLM2 against
plain decoding on our own runner, in the same run, on a dozen real prompts.

    python bench/run.py adaptive_decoding [--threads 2] [--new-tokens 40] [--modes ...] [--quick]

Prompts: six chat questions and six code completions of Python standard-library source (a
function's signature and the start of its body). Per prompt, every mode runs right after plain
decoding (interleaved, so machine load drifts hit all modes alike). Columns:
  decode_tok_s / plain_tok_s / speedup  decode tokens/s of the mode and of plain decoding, summed
                 over prompts (tokens after the first / decode seconds), and their ratio;
  greedy_agree   position-wise agreement of the mode's greedy tokens with plain greedy decoding;
  identical      prompts whose whole output equals plain decoding's;
  ppl            perplexity of held-out prose (``pydoc_data`` topics) under the mode: lossless modes
                 score the full model's; early exit scores each position with the distribution
                 of the exit it takes (teacher-forced on the full model's states);
  layers_per_tok mean layers run per generated token; acceptance / draft_len for speculation.
Early-exit thresholds come from ``calibrate`` on stdlib text (targets 0.95 and 0.9 greedy
agreement); exit adapters are fitted on stdlib text first (seconds). Also times the confidence
op against the torch code it replaces (softmax + topk + entropy) on a [1, 49152] logits row.
A PNG plots speed-up against agreement.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import math
import time
from typing import Dict, List

import torch

from . import results

COLUMNS = ["mode", "setting", "decode_tok_s", "plain_tok_s", "speedup", "greedy_agree", "identical", "ppl",
           "layers_per_tok", "acceptance", "draft_len", "tokens", "command"]

CHAT = ["Why is the sky blue? Answer in two sentences.",
        "Give me three tips for writing clean Python code.",
        "What is the capital of France, and what is it famous for?",
        "Explain what a hash table is to a beginner.",
        "Write a haiku about autumn leaves.",
        "What are the health benefits of drinking water?"]
CODE = [("textwrap", "dedent"), ("json.decoder", "py_scanstring"), ("shutil", "copyfileobj"),
        ("functools", "total_ordering"), ("heapq", "nsmallest"), ("statistics", "median")]

MODES = {
    # SmolLM2's middle layers predict the final token poorly (teacher-forced top-1 agreement with
    # the full model: layer 12 3%, 24 24%, 28 39%; with a fitted exit adapter 10%, 43%, 70%), so
    # the drafts that can be accepted come from deep layers
    "spec-adaptive-L24": ("speculate", dict(draft_layers=24, draft_len="adaptive")),
    "spec-heuristic-L24": ("speculate", dict(draft_layers=24, draft_len="heuristic")),
    "spec-k2-L24": ("speculate", dict(draft_layers=24, draft_len=2)),
    "spec-adaptive-L12": ("speculate", dict(draft_layers=12, draft_len="adaptive")),
    "spec-adaptive-L24-noadapter-fullhead": ("speculate", dict(draft_layers=24, draft_len="adaptive", plain=True)),
    "exit-p1@0.95": ("exit", dict(measure="p1", target=0.95, kv_fill="copy")),
    "exit-p1@0.90": ("exit", dict(measure="p1", target=0.90, kv_fill="copy")),
    "exit-p1@0.95-recompute": ("exit", dict(measure="p1", target=0.95, kv_fill="recompute")),
    "exit-saturation@0.95": ("exit", dict(measure="saturation", target=0.95, kv_fill="copy")),
}
QUICK_MODES = "spec-adaptive-L24,exit-p1@0.95"


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench adaptive_decoding", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=40)
    p.add_argument("--prompts", type=int, default=12, help="how many of the 12 prompts")
    p.add_argument("--modes", default=",".join(MODES), help="comma list of: " + ", ".join(MODES))
    p.add_argument("--draft-vocab", type=int, default=4096, help="candidate vocabulary of drafts and exit checks")
    p.add_argument("--exit-layers", default="12,16,20,22,24,26,28")
    p.add_argument("--fit-tokens", type=int, default=4096, help="stdlib tokens for the exit adapters")
    p.add_argument("--ppl-tokens", type=int, default=512)
    p.add_argument("--quick", action="store_true", help="2 prompts, 8 tokens, 2 modes (smoke test)")
    p.add_argument("--out", default=None)
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--no-plot", action="store_true")
    return p


def prompts_for(model, n: int) -> List[List[int]]:
    tok = model.tokenizer
    out = []
    for i in range(6):
        out.append(tok.encode(tok.apply_chat_template(CHAT[i])))
        mod, fn = CODE[i]
        src = inspect.getsource(getattr(importlib.import_module(mod), fn))
        lines = src.splitlines()
        out.append(tok.encode("\n".join(lines[:max(3, len(lines) // 3)]) + "\n"))
    return out[:n]


def heldout_ids(model, n: int) -> List[int]:
    try:
        from pydoc_data.topics import topics

        text = "\n\n".join(topics[k] for k in ("execmodel", "naming", "exceptions") if k in topics)
    except ImportError:  # pragma: no cover
        text = inspect.getsource(importlib.import_module("heapq"))
    return model.tokenizer.encode(text)[:n]


def exit_ppl(model, ids, dec) -> float:
    """Teacher-forced perplexity of ``ids`` when each position reads the exit the decoder's rule
    picks (full model's states; the last layer when no exit passes)."""
    from ..decoding.adapters import collect_hidden
    from ..decoding.confidence import ExitHead, confidence, saturation

    n = model.config.n_layers
    layers = dec.exit_layers
    want = set(layers) | {n} | ({l - 1 for l in layers} if dec.measure == "saturation" else set())
    want.discard(0)
    hs = collect_hidden(model, ids, sorted(want), ctx=256, max_tokens=len(ids))
    N = hs[n].shape[0]
    chosen = torch.full((N,), n, dtype=torch.long)
    undecided = torch.ones(N, dtype=torch.bool)
    for l in layers:
        if dec.measure == "saturation":
            v = saturation(hs[l - 1], hs[l]) if l - 1 in hs else torch.zeros(N)
            ok = v >= dec.threshold
        else:
            c = confidence(dec.heads[l].logits(hs[l], None)[0])[dec.measure]
            ok = c <= dec.threshold if dec.measure == "entropy" else c >= dec.threshold
        pick = ok & undecided
        chosen[pick] = l
        undecided &= ~pick
    tgt = torch.tensor(ids[1:])
    nll = 0.0
    for l in sorted(set(chosen[:-1].tolist())):
        rows = (chosen[:-1] == l).nonzero()[:, 0]
        head = dec.full_heads[l] if l in dec.full_heads else ExitHead(model, n)
        lp = torch.log_softmax(head.logits(hs[l][rows], None)[0].double(), -1)
        nll -= float(lp.gather(1, tgt[rows][:, None]).sum())
    return math.exp(nll / (N - 1))


def time_confidence(model, adapters=None, cand=None, layer: int = 24) -> Dict[str, float]:
    """Per-check costs (us, one decode row): the confidence op against the torch code it replaces
    on a full logits row, and the exit-check variants: full LM head + op, candidate head + op,
    the exit adapter alone, and the saturation cosine."""
    from ..decoding.confidence import ExitHead, confidence, saturation
    from .timer import time_fn

    x = torch.randn(1, model.config.vocab) * 3

    def torch_way(lg):
        p = torch.softmax(lg, -1)
        top = torch.topk(p, 2, -1)
        ent = -(p * torch.log_softmax(lg, -1)).sum(-1)
        return top.values[:, 0], top.values[:, 0] - top.values[:, 1], ent, top.indices[:, 0]

    out = {"op_us": time_fn(lambda: torch.ops.fastadapt.logit_confidence.default(x, 1.0), min_time_s=0.3).median_us,
           "torch_us": time_fn(lambda: torch_way(x), min_time_s=0.3).median_us}
    h = torch.randn(1, model.config.hidden)
    full = ExitHead(model, layer)
    out["check_full_head_us"] = time_fn(lambda: confidence(full.logits(h, None)[0]), min_time_s=0.3).median_us
    if cand is not None:
        ch = ExitHead(model, layer, None, cand)
        out["check_candidate_head_us"] = time_fn(lambda: confidence(ch.logits(h, None)[0]), min_time_s=0.3).median_us
    if adapters is not None and adapters.get(layer) is not None:
        a = adapters.get(layer)
        out["adapter_us"] = time_fn(lambda: a(h), min_time_s=0.3).median_us
    h2 = torch.randn(1, model.config.hidden)
    out["saturation_us"] = time_fn(lambda: saturation(h, h2), min_time_s=0.3).median_us
    return out


def run(args) -> List[dict]:
    from ..decoding.adapters import fit_exit_adapters, stdlib_text
    from ..decoding.cli import agreement
    from ..decoding.confidence import CandidateHead
    from ..decoding.early_exit import EarlyExitDecoder, calibrate
    from ..decoding.speculative import SelfSpeculativeDecoder
    from ..models import generate, load
    from ..models.generate import perplexity

    torch.set_num_threads(args.threads)
    if args.quick:
        args.prompts, args.new_tokens = 2, min(args.new_tokens, 8)
        args.fit_tokens, args.ppl_tokens = min(args.fit_tokens, 512), min(args.ppl_tokens, 128)
        if args.modes == ",".join(MODES):
            args.modes = QUICK_MODES
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"bench adaptive_decoding: unknown mode {m!r}; choose from {', '.join(MODES)}")
    t_all = time.perf_counter()
    model = load(args.model, threads=args.threads, max_ctx=1024)
    prompts = prompts_for(model, args.prompts)
    exit_layers = [int(x) for x in args.exit_layers.split(",")]
    draft_ls = sorted({MODES[m][1]["draft_layers"] for m in modes if MODES[m][0] == "speculate"})
    t = time.perf_counter()
    adapters = fit_exit_adapters(model, sorted(set(exit_layers) | set(draft_ls)), max_tokens=args.fit_tokens, path="")
    fit_s = time.perf_counter() - t
    cand = CandidateHead.from_text(model, stdlib_text(), size=args.draft_vocab) if args.draft_vocab else None
    calib_text = stdlib_text(30000)
    decoders, settings = {}, {}
    for m in modes:
        kind, kw = MODES[m]
        if kind == "speculate":
            plain = kw.get("plain", False)
            decoders[m] = SelfSpeculativeDecoder(model, kw["draft_layers"], draft_len=kw["draft_len"],
                                                 adapters=None if plain else adapters,
                                                 candidates=None if plain else cand)
            settings[m] = f"L={kw['draft_layers']} draft_len={kw['draft_len']}" + (
                " full head, no adapter" if plain else f" adapter, draft vocab {args.draft_vocab}")
        else:
            cal = calibrate(model, calib_text, exit_layers=exit_layers, measure=kw["measure"],
                            target_agreement=kw["target"], adapters=adapters,
                            candidates=None if kw["measure"] == "saturation" else cand,
                            max_tokens=256 if args.quick else 1024)
            decoders[m] = EarlyExitDecoder(model, exit_layers, measure=kw["measure"], threshold=cal["threshold"],
                                           kv_fill=kw["kv_fill"], adapters=adapters,
                                           candidates=None if kw["measure"] == "saturation" else cand)
            settings[m] = (f"{kw['measure']}>={cal['threshold']:g} (calibrated: agree {cal['agreement']:.3f}, "
                           f"{cal['mean_layers']:.1f} layers) kv={kw['kv_fill']}")
    # warm-up
    generate(model, model.tokenizer, prompts[0], max_new_tokens=4)
    for d in decoders.values():
        d.generate(prompts[0], 4)
    acc = {m: {"tok": 0, "s": 0.0, "agree": [], "same": 0, "layers": [], "accr": [], "dl": []} for m in ["plain"] + modes}
    for ids in prompts:
        p = generate(model, model.tokenizer, ids, max_new_tokens=args.new_tokens, stop_at_eos=False)
        a = acc["plain"]
        a["tok"] += len(p.tokens) - 1
        a["s"] += p.decode_s
        for m in modes:
            r = decoders[m].generate(ids, args.new_tokens, stop_at_eos=False)
            a = acc[m]
            a["tok"] += len(r.tokens) - 1
            a["s"] += r.decode_s
            a["agree"].append((agreement(r.tokens, p.tokens), len(p.tokens)))
            a["same"] += int(r.tokens == p.tokens)
            a["layers"].append(r.stats.get("mean_layers_per_token", model.config.n_layers))
            if "acceptance_rate" in r.stats:
                a["accr"].append(r.stats["acceptance_rate"])
                a["dl"].append(r.stats["mean_draft_len"])
    held = heldout_ids(model, args.ppl_tokens)
    full_ppl = perplexity(model, held, ctx=len(held))["ppl"]
    cmd = results.command_line("adaptive_decoding", getattr(args, "argv", []))
    plain_tps = acc["plain"]["tok"] / acc["plain"]["s"]
    rows = [{"mode": "plain", "setting": "all 30 layers, full head", "decode_tok_s": plain_tps, "plain_tok_s": plain_tps,
             "speedup": 1.0, "greedy_agree": 1.0, "identical": f"{len(prompts)}/{len(prompts)}", "ppl": full_ppl,
             "layers_per_tok": float(model.config.n_layers), "acceptance": None, "draft_len": None,
             "tokens": acc["plain"]["tok"], "command": cmd}]
    for m in modes:
        a = acc[m]
        tps = a["tok"] / a["s"]
        agree = sum(x * n for x, n in a["agree"]) / sum(n for _, n in a["agree"])
        ppl = full_ppl if MODES[m][0] == "speculate" else exit_ppl(model, held, decoders[m])
        rows.append({"mode": m, "setting": settings[m], "decode_tok_s": tps, "plain_tok_s": plain_tps,
                     "speedup": tps / plain_tps, "greedy_agree": agree, "identical": f"{a['same']}/{len(prompts)}",
                     "ppl": ppl, "layers_per_tok": sum(a["layers"]) / len(a["layers"]),
                     "acceptance": sum(a["accr"]) / len(a["accr"]) if a["accr"] else None,
                     "draft_len": sum(a["dl"]) / len(a["dl"]) if a["dl"] else None,
                     "tokens": a["tok"], "command": cmd})
    conf = time_confidence(model, adapters, cand, layer=max(exit_layers))
    print(results.text_table(rows, [(c, c) for c in COLUMNS if c != "command"]))
    print(f"logit_confidence [1, {model.config.vocab}]: {conf['op_us']:.1f} us vs torch softmax+topk+entropy "
          f"{conf['torch_us']:.1f} us ({conf['torch_us'] / conf['op_us']:.1f}x); exit-check costs (us): "
          + ", ".join(f"{k} {v:.1f}" for k, v in conf.items() if k not in ("op_us", "torch_us"))
          + f"; adapters fitted in {fit_s:.1f} s; "
          f"total {time.perf_counter() - t_all:.0f} s")
    if not args.no_write:
        meta = {"command": cmd, "environment": results.environment("cpu"), "threads": args.threads,
                "new_tokens": args.new_tokens, "prompts": len(prompts), "adapter_fit_s": fit_s,
                "confidence_op": conf, "load_average": results.load_average(),
                "note": "plain decoding measured in the same run, interleaved per prompt"}
        tag = "quick" if args.quick else ""
        jp, mp = results.write_results("adaptive_decoding", rows, COLUMNS, out_root=args.out, device="cpu", tag=tag,
                                       meta=meta)
        print(f"wrote {jp} and {mp}")
        if not args.no_plot:
            from .plot import scatter_png

            series = {"self-speculative": [(r["greedy_agree"], r["speedup"]) for r in rows if r["mode"].startswith("spec")],
                      "early exit": [(r["greedy_agree"], r["speedup"]) for r in rows if r["mode"].startswith("exit")]}
            labels = {"self-speculative": [r["mode"] for r in rows if r["mode"].startswith("spec")],
                      "early exit": [r["mode"] for r in rows if r["mode"].startswith("exit")]}
            png = scatter_png(jp.with_suffix(".png"), series, "greedy agreement with plain decoding",
                              "decode speed-up vs plain (same run)", title=f"SmolLM2, {args.threads} threads",
                              labels=labels, baseline=(1.0, 1.0), hline=1.0)
            print(f"wrote {png}")
    return rows
