"""Bench family ``kv_quality``: what each KV eviction policy costs in quality, on a real model and
ordinary text, against the full cache in the same run (and kvpress's presses where it runs).

    python bench/run.py kv_quality [--model smollm2] [--context 1536] [--continuation 128]
        [--budgets 0.1,0.25,0.5] [--policies streaming,h2o,...] [--kvpress-python PATH]

Protocol, per policy and budget: prefill ``--context`` tokens of prose (the Python language
reference from the standard library's ``pydoc_data``), evicting to the budget after the prefill;
then feed the true ``--continuation`` tokens in chunks of ``--chunk`` (the policy keeps evicting
between chunks) and score them:
  ppl          perplexity of the continuation (the full cache's is the baseline);
  top1_agree   fraction of continuation positions whose argmax equals the full cache's;
  greedy_agree fraction of ``--greedy`` greedily generated tokens after the context equal to the
               full cache's greedy tokens, position by position;
  kv_bytes_end / kv_bytes_peak, and wall seconds of the whole run.
kvpress (``pip install kvpress``) needs transformers < 5.3: give a Python that has it with
``--kvpress-python`` (its presses then run on HF transformers fp32 loading the same GGUF, with
the same text and protocol: compression at prefill, then the continuation); otherwise the table
says it was not run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import time
from typing import List, Sequence

import torch

from . import results

COLUMNS = ["engine", "policy", "budget", "context", "ppl", "ppl_vs_full", "top1_agree", "greedy_agree",
           "kv_bytes_end", "kv_bytes_peak", "kv_frac_of_full", "seconds", "command"]

TOPICS = ("execmodel", "naming", "exceptions", "assignment", "compound", "import", "datamodel")


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench kv_quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--context", type=int, default=1536)
    p.add_argument("--continuation", type=int, default=128)
    p.add_argument("--greedy", type=int, default=32)
    p.add_argument("--chunk", type=int, default=32)
    p.add_argument("--budgets", default="0.1,0.25,0.5")
    p.add_argument("--policies", default="streaming,h2o,tova,snapkv,pyramidkv,adakv,keynorm")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--kvpress-python", default=os.environ.get("FASTADAPT_KVPRESS_PYTHON"),
                   help="a python with kvpress + transformers<5.3 installed (runs the presses)")
    p.add_argument("--out", default=None)
    p.add_argument("--no-write", action="store_true")
    return p


def bench_text() -> str:
    """Ordinary English prose available on every Python install."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[t] for t in TOPICS if t in topics)


def _score(logits: torch.Tensor, targets: Sequence[int]):
    """(sum of NLL, argmax ids) of ``logits [n, vocab]`` predicting ``targets [n]``."""
    lp = torch.log_softmax(logits.double(), -1)
    nll = -float(lp.gather(1, torch.tensor(list(targets))[:, None]).sum())
    return nll, lp.argmax(-1).tolist()


def run_one(model, ctx_ids: List[int], cont_ids: List[int], n_greedy: int, chunk: int):
    """One protocol run with the model's current KV configuration."""
    t0 = time.perf_counter()
    logits = [model.prefill(ctx_ids)[None]]
    for c in range(0, len(cont_ids) - 1, chunk):
        logits.append(model.prefill(cont_ids[c:min(c + chunk, len(cont_ids) - 1)], all_logits=True,
                                    reset=False))
    nll, preds = _score(torch.cat(logits), cont_ids)
    kv = model.kv_bytes()
    logit = model.prefill(ctx_ids)  # greedy continuation from the (evicted) context
    greedy = []
    for _ in range(n_greedy):
        greedy.append(int(torch.argmax(logit)))
        logit = model.decode_one(greedy[-1])
    kv_peak = max(kv["peak"], model.kv_bytes()["peak"])
    return {"ppl": math.exp(nll / len(cont_ids)), "preds": preds, "greedy": greedy,
            "kv_bytes_end": kv["held"], "kv_bytes_peak": kv_peak, "seconds": time.perf_counter() - t0}


def _kvpress(python: str, path: str, ctx_ids, cont_ids, budgets, n_greedy) -> dict:
    worker = os.path.join(os.path.dirname(__file__), "kvpress_worker.py")
    job = {"gguf": path, "context": ctx_ids, "continuation": cont_ids, "budgets": budgets,
           "greedy": n_greedy, "threads": torch.get_num_threads()}
    proc = subprocess.run([python, worker], input=json.dumps(job), capture_output=True, text=True,
                          timeout=3600)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> dict:
    from ..models import load, resolve

    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve(args.model)
    model = load(path, max_ctx=args.context + args.continuation + args.greedy + 8)
    ids = model.tokenizer.encode(bench_text())
    need = args.context + args.continuation
    if len(ids) < need:
        raise SystemExit(f"bench kv_quality: the text has {len(ids)} tokens, need {need}")
    ctx_ids, cont_ids = ids[:args.context], ids[args.context:need]
    budgets = [float(b) if "." in b else int(b) for b in args.budgets.split(",")]
    policies = [p for p in args.policies.split(",") if p]
    cmd = (f"python bench/run.py kv_quality --context {args.context} --continuation {args.continuation} "
           f"--budgets {args.budgets} --policies {args.policies}")

    model.configure_kv(None, page_size=args.page_size)
    full = run_one(model, ctx_ids, cont_ids, args.greedy, args.chunk)
    rows = [{"engine": "fastadapt", "policy": "full", "budget": 1.0, "context": args.context,
             "ppl": full["ppl"], "ppl_vs_full": 1.0, "top1_agree": 1.0, "greedy_agree": 1.0,
             "kv_bytes_end": full["kv_bytes_end"], "kv_bytes_peak": full["kv_bytes_peak"],
             "kv_frac_of_full": 1.0, "seconds": full["seconds"], "command": cmd}]
    print(f"full cache: ppl {full['ppl']:.3f}, KV {full['kv_bytes_end'] / 1e6:.1f} MB, {full['seconds']:.1f} s")
    for pol in policies:
        for b in budgets:
            model.configure_kv(pol, b, page_size=args.page_size)
            r = run_one(model, ctx_ids, cont_ids, args.greedy, args.chunk)
            row = {"engine": "fastadapt", "policy": pol, "budget": b, "context": args.context,
                   "ppl": r["ppl"], "ppl_vs_full": r["ppl"] / full["ppl"],
                   "top1_agree": sum(a == c for a, c in zip(r["preds"], full["preds"])) / len(full["preds"]),
                   "greedy_agree": sum(a == c for a, c in zip(r["greedy"], full["greedy"])) / max(1, args.greedy),
                   "kv_bytes_end": r["kv_bytes_end"], "kv_bytes_peak": r["kv_bytes_peak"],
                   "kv_frac_of_full": r["kv_bytes_end"] / full["kv_bytes_end"], "seconds": r["seconds"],
                   "command": cmd}
            rows.append(row)
            print(f"{pol:>10} @ {b:<5}: ppl {r['ppl']:8.3f} (x{row['ppl_vs_full']:.3f})  top1 "
                  f"{row['top1_agree']:.2f}  greedy {row['greedy_agree']:.2f}  KV {row['kv_frac_of_full']:.2f} "
                  f"of full  {r['seconds']:.1f} s")
    notes = []
    if args.kvpress_python:
        kp = _kvpress(args.kvpress_python, path, ctx_ids, cont_ids, [b for b in budgets if isinstance(b, float)],
                      args.greedy)
        if "error" in kp:
            notes.append(f"kvpress not run: {kp['error']}")
        else:
            notes.append(f"kvpress {kp.get('version')} on transformers {kp.get('transformers')} fp32 "
                         "(presses compress at prefill only; continuation tokens are kept)")
            notes += [f"kvpress press failed: {f}" for f in kp.get("failed", [])]
            base = kp["full"]
            for r in kp["rows"]:
                rows.append({"engine": "kvpress", "policy": r["press"], "budget": r["budget"],
                             "context": args.context, "ppl": r["ppl"], "ppl_vs_full": r["ppl"] / base["ppl"],
                             "top1_agree": sum(a == c for a, c in zip(r["preds"], base["preds"])) / len(base["preds"]),
                             "greedy_agree": sum(a == c for a, c in zip(r["greedy"], base["greedy"])) / max(1, args.greedy),
                             "kv_bytes_end": r["kv_bytes_end"], "kv_bytes_peak": r["kv_bytes_peak"],
                             "kv_frac_of_full": r["kv_bytes_end"] / base["kv_bytes_end"],
                             "seconds": r["seconds"], "command": cmd + " --kvpress-python PY"})
                print(f"kvpress {r['press']:>18} @ {r['budget']:<5}: ppl {r['ppl']:8.3f} "
                      f"(x{rows[-1]['ppl_vs_full']:.3f} of its full {base['ppl']:.3f})  KV "
                      f"{rows[-1]['kv_frac_of_full']:.2f}  {r['seconds']:.1f} s")
    else:
        notes.append("kvpress not run: it needs transformers<5.3; pass --kvpress-python")
    for n in notes:
        print(n)
    paths = None
    if not args.no_write:
        meta = {"command": results.command_line("kv_quality", getattr(args, "argv", [])),
                **results.environment("cpu"), "model": os.path.basename(path), "notes": notes,
                "text": f"pydoc_data topics {', '.join(TOPICS)}"}
        paths = results.write_results("kv_quality", rows, COLUMNS, out_root=args.out, device="cpu", meta=meta)
        print("wrote", *paths)
    return {"rows": rows, "notes": notes, "paths": paths}
