"""Bench family ``sparse_prefill``: SmolLM2 prefill at 8K context with block-sparse attention
against the dense prefill, on a long real prompt (concatenated Python standard-library modules).

Per setting: prefill time of the prompt (``--tokens`` minus the continuation), perplexity of the
continuation (teacher-forced, fed densely after the sparse prefill, so it reads the K/V the sparse
layers produced), top-1 agreement of the continuation's next-token predictions with the dense
run, and greedy agreement (the first ``--greedy`` tokens generated after the prompt, compared
with the dense prefill's). Settings: dense; configs tuned by the per-head search on a different
text (other stdlib modules) at each ``--targets`` recall; uniform vertical-slash and block top-k.
The issue's target: 1.5x faster end-to-end prefill at 8K with perplexity within 2%.

    python bench/run.py sparse_prefill [--tokens 8192] [--targets 0.98,0.95] [--config CFG]
"""
from __future__ import annotations

import argparse
import math
import os
import sysconfig
import time

import torch

from . import results

COLUMNS = ["setting", "prompt_tokens", "prefill_s", "speedup_vs_dense", "mean_head_cost", "ppl",
           "ppl_change_pct", "top1_agreement", "greedy_match", "command"]

EVAL_MODULES = ["contextlib.py", "textwrap.py", "heapq.py", "shlex.py", "string.py", "queue.py", "glob.py",
                "fnmatch.py", "bisect.py", "dataclasses.py", "functools.py"]
TUNE_MODULES = ["tempfile.py", "weakref.py", "operator.py", "copy.py", "sched.py", "stat.py", "abc.py",
                "reprlib.py", "keyword.py", "functools.py"]


def stdlib_text(modules) -> str:
    d = sysconfig.get_paths()["stdlib"]
    parts = []
    for m in modules:
        with open(os.path.join(d, m), encoding="utf-8") as f:
            parts.append(f"# ---- {m} ----\n" + f.read())
    return "\n\n".join(parts)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench sparse_prefill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--tokens", type=int, default=8192, help="prompt + continuation tokens")
    p.add_argument("--continuation", type=int, default=256, help="tokens scored after the prompt")
    p.add_argument("--greedy", type=int, default=16, help="greedy tokens compared with the dense run")
    p.add_argument("--targets", default="0.98,0.95", help="recall targets of the tuned configs")
    p.add_argument("--tune-tokens", type=int, default=8192, help="tokens of the tuning text")
    p.add_argument("--config", default=None, help="use this tuned config instead of tuning (one target)")
    p.add_argument("--uniform", default="vs:1024:256,topk:16",
                   help="uniform settings: vs:N_VERT:N_SLASH, topk:K, ashape:SINK:LOCAL (comma list; '' none)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="tiny run (smoke test): 640 tokens, min_len 256")
    p.add_argument("--out", default=None, help="results root (default bench/results)")
    p.add_argument("--no-write", action="store_true")
    return p


def _uniform(spec: str):
    kind, *vals = spec.split(":")
    if kind == "vs":
        return {"pattern": "vertical_slash", "n_vertical": int(vals[0]), "n_slash": int(vals[1])}
    if kind == "topk":
        return {"pattern": "block_topk", "topk": int(vals[0])}
    if kind == "ashape":
        return {"pattern": "a_shape", "sink": int(vals[0]), "local": int(vals[1])}
    raise ValueError(f"bad --uniform entry {spec!r}")


def _evaluate(model, prompt, cont, greedy_n):
    """Prefill time, continuation NLL and argmax predictions, greedy tokens after the prompt."""
    t0 = time.perf_counter()
    last = model.prefill(prompt)
    prefill_s = time.perf_counter() - t0
    # greedy decode on a fork of the sequence, then back to the prompt's cache for the continuation
    s, pos = model._seq, model.pos
    fork = model.kv.fork(s)
    model._seq = fork
    toks, logits = [], last
    with torch.inference_mode():
        for _ in range(greedy_n):
            toks.append(int(torch.argmax(logits)))
            logits = model.decode_one(toks[-1])
    model.kv.free_sequence(fork)
    model._seq, model.pos = s, pos
    with torch.inference_mode():
        lg = torch.cat([last[None], model.forward(cont[:-1], all_logits=True)]).double()
    lp = torch.log_softmax(lg, -1)
    nll = -float(lp.gather(1, torch.tensor(cont)[:, None]).sum())
    return prefill_s, nll / len(cont), lg.argmax(-1), toks


def run(args: argparse.Namespace) -> dict:
    import fastadapt_ops  # noqa: F401
    from fastadapt_ops.attention.sparse_prefill import (
        disable_sparse_prefill,
        enable_sparse_prefill,
        load_config,
        recall_table,
        select_config,
        uniform_config,
    )
    from fastadapt_ops.models import load

    if args.threads:
        torch.set_num_threads(args.threads)
    tokens = 640 if args.quick else args.tokens
    cont_n = 64 if args.quick else args.continuation
    min_len = 256 if args.quick else 2048
    tune_len = 512 if args.quick else args.tune_tokens
    model = load(args.model, threads=args.threads, max_ctx=max(tokens, tune_len) + 64)
    model.configure_kv(None, max_batch=2)  # room for the greedy fork
    tok = model.tokenizer
    ids = tok.encode(stdlib_text(EVAL_MODULES))[:tokens]
    if len(ids) < tokens:
        raise SystemExit(f"bench sparse_prefill: the evaluation text has only {len(ids)} tokens")
    prompt, cont = ids[: tokens - cont_n], ids[tokens - cont_n:]
    c = model.config
    thr = f" --threads {args.threads}" if args.threads else ""
    base_cmd = f"python bench/run.py sparse_prefill --tokens {tokens}{thr}"

    settings = [("dense", None, base_cmd + " --targets '' --uniform ''")]
    tune_info = {}
    if args.config:
        cfg = load_config(args.config)
        settings.append((f"tuned ({args.config})", cfg, base_cmd + f" --config {args.config}"))
    else:
        tune_ids = tok.encode(stdlib_text(TUNE_MODULES))[:tune_len]
        targets = [float(x) for x in args.targets.split(",") if x]
        table = recall_table(model, tune_ids) if targets else None  # one search serves every target
        for tgt in targets:
            cfg = select_config(table, tgt, min_len=min_len)
            tune_info[tgt] = {"seconds": cfg["seconds"], "mean_cost": cfg["mean_cost"]}
            print(f"tuned at recall {tgt} on {len(tune_ids)} tokens ({cfg['seconds']} s search): mean head "
                  f"cost {cfg['mean_cost']:.3f}", flush=True)
            settings.append((f"tuned recall {tgt}", cfg, base_cmd + f" --targets {tgt} --uniform ''"))
    for spec in (s for s in args.uniform.split(",") if s):
        cfg = uniform_config(c.n_layers, c.n_heads, _uniform(spec), min_len=min_len)
        settings.append((f"uniform {spec}", cfg, base_cmd + f" --targets '' --uniform {spec}"))

    rows, dense = [], None
    for name, cfg, cmd in settings:
        if cfg is None:
            disable_sparse_prefill(model)
        else:
            cfg = dict(cfg, min_len=min_len)
            enable_sparse_prefill(model, cfg)
        pre_s, nll, argmax, greedy = _evaluate(model, prompt, cont, args.greedy)
        disable_sparse_prefill(model)
        if dense is None:
            dense = (pre_s, nll, argmax, greedy)
        costs = [h.get("cost", 1.0) for layer in (cfg or {"layers": [[{}]]})["layers"] for h in layer] if cfg else [1.0]
        if cfg and "cost" not in cfg["layers"][0][0]:
            from fastadapt_ops.attention.sparse_prefill import head_cost

            costs = [head_cost(h, len(prompt)) for layer in cfg["layers"] for h in layer]
        match = 0
        for a, b in zip(greedy, dense[3]):
            if a != b:
                break
            match += 1
        row = {"setting": name, "prompt_tokens": len(prompt), "prefill_s": pre_s,
               "speedup_vs_dense": dense[0] / pre_s, "mean_head_cost": sum(costs) / len(costs),
               "ppl": math.exp(nll), "ppl_change_pct": 100 * (math.exp(nll - dense[1]) - 1),
               "top1_agreement": float((argmax == dense[2]).double().mean()),
               "greedy_match": f"{match}/{len(greedy)}", "command": cmd}
        rows.append(row)
        print(f"{name:>28}: prefill {pre_s:7.2f} s (x{row['speedup_vs_dense']:.2f})  ppl {row['ppl']:.4f} "
              f"({row['ppl_change_pct']:+.2f}%)  top1 {row['top1_agreement']:.3f}  greedy {row['greedy_match']}"
              f"  cost {row['mean_head_cost']:.3f}", flush=True)
    paths = None
    if not args.no_write:
        meta = {"command": results.command_line("sparse_prefill", getattr(args, "argv", [])),
                **results.environment("cpu"), "threads": torch.get_num_threads(), "tuning": tune_info,
                "eval_modules": EVAL_MODULES, "tune_modules": TUNE_MODULES}
        paths = results.write_results("sparse_prefill", rows, COLUMNS, out_root=args.out, device="cpu", meta=meta)
        print("wrote", *paths)
    return {"rows": rows, "paths": paths}
