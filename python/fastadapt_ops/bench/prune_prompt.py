"""Bench family ``prune_prompt``: decoder prefill pruning (FastV / PyramidDrop / LazyLLM) on
SmolLM2-135M-Instruct with real 1K-2K-token prompts.

Prompts are Python standard-library source files (docstrings and code, read from
``os.path.dirname(os.__file__)``), cut to 1024 / 1536 / 2048 tokens; the tokens that follow
each prompt in its file are the held-out continuation. Per prompt, first without pruning:

* prefill time (best of 3 runs, the same run as every setting's);
* the greedy continuation of 32 tokens (the reference);
* the perplexity of the held-out continuation (64 tokens, teacher-forced through the cache).

Then per pruning setting (``--settings``, SPECs of ``fastadapt generate --prune-prompt``):
prefill time (best of 2) and speed-up over the unpruned prefill; greedy agreement = share of
the 32 reference positions where the pruned model's argmax equals the reference token, fed the
reference prefix (teacher forcing: one early miss does not fail the rest); ``exact_prefix`` =
tokens until the first miss (= how long free-running greedy decoding stays identical); the
continuation's perplexity and its ratio to the unpruned one. Rows aggregate all prompts (time
sums, token-weighted perplexity, mean agreement). Target: 1.5x prefill at >= 90% agreement.

    python bench/run.py prune_prompt [--threads 2] [--prompt-tokens 1024,1536,2048]
        [--settings 'fastv:layer=3,keep=0.5;pyramid:layers=4/10/18,keep=0.7;...'] [--quick]

Writes ``bench/results/<device>/prune_prompt.{json,md,png}`` (PNG: speed-up vs agreement).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

from . import results

COLUMNS = ["setting", "prompts", "prompt_tokens", "kept_tokens", "prefill_s", "baseline_prefill_s",
           "speedup", "agreement", "exact_prefix", "ppl", "baseline_ppl", "ppl_ratio", "decode_ms",
           "revived", "meets_target", "command"]
COLUMN_DOC = {
    "setting": "--prune-prompt SPEC (none = unpruned baseline); layers are 0-based, drop after the layer",
    "prompts": "prompts (stdlib source files), their token counts in prompt_tokens",
    "prompt_tokens": "total prompt tokens over the prompts",
    "kept_tokens": "tokens left after the last stage, over all prompts",
    "prefill_s": "prefill seconds summed over prompts (best of repeats per prompt)",
    "baseline_prefill_s": "unpruned prefill seconds of the same prompts, same run",
    "speedup": "baseline_prefill_s / prefill_s",
    "agreement": "teacher-forced greedy agreement with the unpruned model over the next N tokens (mean over prompts)",
    "exact_prefix": "mean tokens until the first greedy mismatch (free-running greedy stays identical that long)",
    "ppl": "perplexity of the held-out continuation (the file's next tokens) through the pruned cache",
    "baseline_ppl": "the same without pruning",
    "ppl_ratio": "ppl / baseline_ppl",
    "decode_ms": "mean ms per teacher-forced decode step (LazyLLM revivals included)",
    "revived": "LazyLLM: tokens revived during the decode steps, over all prompts",
    "meets_target": "speedup >= 1.5 and agreement >= 0.9",
}
DEFAULT_SETTINGS = ";".join([
    "fastv:layer=3,keep=0.5",
    "fastv:layer=2,keep=0.35",
    "pyramid:layers=4/10/18,keep=0.7",
    "pyramid:layers=3/8/14,keep=0.6",
    "lazy:layers=3/8/14,keep=0.6",
])
FILES = ("textwrap.py", "functools.py", "heapq.py", "argparse.py")


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench prune_prompt", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", default=DEFAULT_SETTINGS, help="';'-separated --prune-prompt SPECs")
    p.add_argument("--prompt-tokens", default="1024,1536,2048",
                   help="comma list: one prompt per entry, that many tokens (files: " + ", ".join(FILES) + ")")
    p.add_argument("--agree-tokens", type=int, default=32, help="greedy tokens compared")
    p.add_argument("--ppl-tokens", type=int, default=64, help="held-out continuation tokens scored")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--quick", action="store_true", help="2 prompts of 96/128 tokens, 2 settings, 4+8 tokens (smoke)")
    p.add_argument("--out", default=None, help="results root (default bench/results)")
    p.add_argument("--no-write", action="store_true")
    return p


def stdlib_prompts(tokenizer, lengths, extra: int):
    """(name, prompt ids, continuation ids) per length, from standard-library source files."""
    root = os.path.dirname(os.__file__)
    out = []
    for i, n in enumerate(lengths):
        name = FILES[i % len(FILES)]
        with open(os.path.join(root, name), encoding="utf-8") as f:
            ids = tokenizer.encode(f.read())
        if len(ids) < n + extra:
            raise SystemExit(f"bench prune_prompt: {name} has only {len(ids)} tokens (< {n + extra})")
        out.append((name, ids[:n], ids[n:n + extra]))
    return out


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _timed_prefill(runner, ids):
    t = time.perf_counter()
    logits = runner.prefill(ids)
    return time.perf_counter() - t, logits


def _teacher_forced(runner, logits, tokens):
    """Argmax predictions and NLL of ``tokens`` fed one by one after the prefill; ms per step."""
    preds, nll, t = [], 0.0, 0.0
    for i, tok in enumerate(tokens):
        preds.append(int(logits.argmax()))
        nll -= float(torch.log_softmax(logits.double(), -1)[tok])
        if i + 1 < len(tokens):
            t0 = time.perf_counter()
            logits = runner.decode_one(tok)
            t += time.perf_counter() - t0
    return preds, nll, 1e3 * t / max(1, len(tokens) - 1)


def run(args: argparse.Namespace) -> dict:
    import fastadapt_ops  # noqa: F401  (registers the ops)
    from ..models import load
    from ..tokens.prompt_pruning import PromptPruner, parse_prune_spec

    if args.quick:
        args.prompt_tokens = "96,128" if args.prompt_tokens == "1024,1536,2048" else args.prompt_tokens
        if args.settings == DEFAULT_SETTINGS:
            args.settings = "fastv:layer=3,keep=0.5;lazy:layers=3/8,keep=0.6"
        args.agree_tokens, args.ppl_tokens = min(args.agree_tokens, 4), min(args.ppl_tokens, 8)
    settings = [s.strip() for s in args.settings.split(";") if s.strip()]
    for s in settings:
        parse_prune_spec(s)  # fail before loading anything
    lengths = [int(n) for n in args.prompt_tokens.split(",") if n.strip()]
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    model = load(args.model, threads=args.threads,
                 max_ctx=max(lengths) + args.agree_tokens + args.ppl_tokens + 16)
    prompts = stdlib_prompts(model.tokenizer, lengths, max(args.agree_tokens, args.ppl_tokens))
    base = PromptPruner(model, None)
    runners = [(s, PromptPruner(model, s)) for s in settings]
    agg = {s: {"prefill": 0.0, "nll": 0.0, "agree": [], "prefix": [], "kept": 0, "dec": [], "revived": 0}
           for s in ["none"] + settings}
    n_ppl = 0
    for name, ids, cont in prompts:
        _say(f"{name}: {len(ids)} prompt tokens, unpruned ({time.perf_counter() - t_start:.0f} s)")
        # unpruned reference: greedy continuation, continuation perplexity, prefill time
        t1, logits = _timed_prefill(base, ids)
        ref, dec = [], []
        for _ in range(args.agree_tokens):
            ref.append(int(logits.argmax()))
            t0 = time.perf_counter()
            logits = base.decode_one(ref[-1])
            dec.append(time.perf_counter() - t0)
        t2, logits = _timed_prefill(base, ids)
        _, nll, _ = _teacher_forced(base, logits, cont[:args.ppl_tokens])
        a = agg["none"]
        a["nll"] += nll
        a["agree"].append(1.0)
        a["prefix"].append(args.agree_tokens)
        a["kept"] += len(ids)
        a["dec"].append(1e3 * sum(dec) / len(dec))
        _say(f"    prefill {min(t1, t2):.2f} s, nll/token {nll / max(1, len(cont[:args.ppl_tokens])):.3f}")
        n_ppl += len(cont[:args.ppl_tokens])
        times = [t1, t2]
        for s, pr in runners:
            _say(f"  {s} ({time.perf_counter() - t_start:.0f} s)")
            ta, logits = _timed_prefill(pr, ids)
            kept = pr.stats()["prune_kept"]
            preds, _, ms = _teacher_forced(pr, logits, ref)
            revived = pr.stats()["prune_revived"]
            tb, logits = _timed_prefill(pr, ids)
            _, nll, _ = _teacher_forced(pr, logits, cont[:args.ppl_tokens])
            revived += pr.stats()["prune_revived"]
            hits = [p == r for p, r in zip(preds, ref)]
            a = agg[s]
            a["prefill"] += min(ta, tb)
            a["nll"] += nll
            a["agree"].append(sum(hits) / len(hits))
            a["prefix"].append(hits.index(False) if False in hits else len(hits))
            a["kept"] += kept[-1]["kept"] if kept else len(ids)
            a["dec"].append(ms)
            a["revived"] += revived
            _say(f"    prefill {min(ta, tb):.2f} s, agreement {a['agree'][-1]:.3f}, exact prefix {a['prefix'][-1]}, "
                 f"nll/token {nll / max(1, len(cont[:args.ppl_tokens])):.3f}, revived {revived}")
        times.append(_timed_prefill(base, ids)[0])  # baseline once more, after the settings
        agg["none"]["prefill"] += min(times)
    base_s = agg["none"]["prefill"]
    base_ppl = math.exp(agg["none"]["nll"] / n_ppl)
    argv = getattr(args, "argv", [])
    common = (f" --prompt-tokens {args.prompt_tokens} --agree-tokens {args.agree_tokens} "
              f"--ppl-tokens {args.ppl_tokens} --threads {args.threads}")
    rows = []
    for s in ["none"] + settings:
        a = agg[s]
        ppl = math.exp(a["nll"] / n_ppl)
        speed = base_s / a["prefill"] if a["prefill"] > 0 else float("nan")
        agree = sum(a["agree"]) / len(a["agree"])
        rows.append({
            "setting": s, "prompts": " ".join(f"{n}:{len(i)}" for n, i, _ in prompts),
            "prompt_tokens": sum(len(i) for _, i, _ in prompts), "kept_tokens": a["kept"],
            "prefill_s": a["prefill"], "baseline_prefill_s": base_s, "speedup": speed, "agreement": agree,
            "exact_prefix": sum(a["prefix"]) / len(a["prefix"]), "ppl": ppl, "baseline_ppl": base_ppl,
            "ppl_ratio": ppl / base_ppl, "decode_ms": sum(a["dec"]) / len(a["dec"]),
            "revived": a["revived"] if s.startswith("lazy") else None,
            "meets_target": None if s == "none" else bool(speed >= 1.5 and agree >= 0.9),
            "command": (f"python bench/run.py prune_prompt --settings '{s}'{common}" if s != "none"
                        else results.command_line("prune_prompt", argv)),
        })
    winners = [r["setting"] for r in rows if r["meets_target"]]
    note = (f"SmolLM2 Q4_1, {args.threads} threads; prompts {rows[0]['prompts']}; baseline prefill best of "
            f"3 runs per prompt, settings best of 2. Target (1.5x prefill at >= 90% greedy agreement over "
            f"{args.agree_tokens} tokens): " + ("met by " + ", ".join(winners) if winners else "NOT met"))
    print(results.text_table(rows, [(c, c) for c in COLUMNS[:-1] if c not in ("prompts", "baseline_ppl",
                                                                            "baseline_prefill_s")]))
    print(note)
    out = {"rows": rows, "note": note, "paths": [], "seconds": time.perf_counter() - t_start}
    if not args.no_write:
        meta = {"command": results.command_line("prune_prompt", argv), **results.environment("cpu"),
                "notes": [note], "loadavg_end": results.load_average()}
        paths = results.write_results("prune_prompt", rows, COLUMNS, out_root=args.out, device="cpu",
                                      tag="quick" if args.quick else "", meta=meta, column_doc=COLUMN_DOC)
        out["paths"] = list(paths)
        out["plot"] = plot(rows, paths[0].with_suffix(".png"), args.agree_tokens)
        print("wrote", *out["paths"], out["plot"])
    return out


def plot(rows, path, agree_tokens: int):
    """PNG of prefill speed-up against greedy agreement, one series per method."""
    from .plot import scatter_png

    series, labels = {}, {}
    for r in rows:
        if r["setting"] == "none":
            continue
        method = r["setting"].split(":")[0]
        series.setdefault(method, []).append((r["speedup"], r["agreement"]))
        labels.setdefault(method, []).append(r["setting"].split(":", 1)[1])
    for m in series:  # join each method's points left to right
        order = sorted(range(len(series[m])), key=lambda i: series[m][i][0])
        series[m] = [series[m][i] for i in order]
        labels[m] = [labels[m][i] for i in order]
    return scatter_png(path, series, "prefill speed-up vs unpruned (x)",
                       f"greedy agreement over {agree_tokens} tokens",
                       title="Prompt pruning on SmolLM2-135M (CPU)", labels=labels, baseline=(1.0, 1.0),
                       hline=0.9, vline=1.5)
