"""Bench family ``tokens``: token merging on a real encoder, and the ops' own cost.

1. ``embeddings``: all-MiniLM-L6-v2 sentence embeddings of a few hundred real sentences (prose
   of ``pydoc_data.topics`` split into sentences, plus standard-library docstrings), unpatched and
   ToMe-patched over r schedules: throughput (sentences/s), speedup, mean/min cosine similarity to
   the unmerged embeddings. Target: at 1.5x throughput, mean cosine >= 0.97. A PNG of speed vs
   similarity across the r schedules (``tokens-embeddings.png``, ``bench.plot.scatter_png``) is
   written next to the tables.
2. ``ops``: at N tokens (default 512) of MiniLM's width: one BERT layer's time next to matching
   (keys' mean + bipartite_soft_matching) + merge_tokens (target: <= 10% of the layer), each op
   against what a user would otherwise run (ToMe's PyTorch formulation: similarity matrix,
   argsort, scatter_reduce; SDPA with an additive log-size mask; topk + gather).

    python bench/run.py tokens [--sentences 256] [--configs c1,c2,d2,f0.1] [--n 512] [--quick]
"""
from __future__ import annotations

import argparse
import math
import re

import torch
import torch.nn.functional as F

from . import results, timer

EMB_COLUMNS = ["config", "r", "schedule", "tokens_in", "tokens_out", "sent_per_s", "speedup",
               "mean_cos", "min_cos", "meets_target", "command"]
OPS_COLUMNS = ["op", "B", "N", "C", "r", "median_us", "baseline", "baseline_us", "speedup_vs_baseline",
               "frac_of_layer", "command"]
DEFAULT_CONFIGS = "c1,c2,c3,c4,d1,d2,d3,f0.05,f0.1,f0.15"


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench tokens", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sentences", type=int, default=256, help="how many real sentences to embed")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--configs", default=DEFAULT_CONFIGS,
                   help="comma list: cR constant r=R per layer, dR decreasing (2R -> 0), fX fraction X per layer")
    p.add_argument("--n", type=int, default=512, help="tokens for the op-overhead part")
    p.add_argument("--batch", type=int, default=1, help="batch for the op-overhead part")
    p.add_argument("--parts", default="embeddings,ops", help="embeddings and/or ops")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--min-time", type=float, default=0.5)
    p.add_argument("--quick", action="store_true", help="32 sentences, 3 configs, N=128 (smoke runs)")
    p.add_argument("--out", default=None, help="results root (default bench/results)")
    p.add_argument("--no-write", action="store_true")
    return p


# ---------------------------------------------------------------------------------------------
# real sentences from the standard library
# ---------------------------------------------------------------------------------------------
def stdlib_sentences(n: int) -> list[str]:
    """Up to n prose sentences: pydoc_data.topics (the language reference) and docstrings."""
    import collections
    import json
    import os
    import pathlib
    import string
    import textwrap

    from pydoc_data.topics import topics

    texts = [topics[k] for k in sorted(topics)]
    for mod in (os, json, collections, pathlib, string, textwrap):
        for name in sorted(dir(mod)):
            doc = getattr(getattr(mod, name, None), "__doc__", None)
            if isinstance(doc, str):
                texts.append(doc)
    out, seen = [], set()
    for text in texts:
        prose = " ".join(line.strip() for line in text.splitlines()
                         if line.strip() and not line.startswith((" ", "\t", ">>>", "...")))
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", prose):
            s = s.strip()
            if 40 <= len(s) <= 300 and s[-1] in ".!?" and s not in seen and not re.search(r"[{}=<>]{2}", s):
                seen.add(s)
                out.append(s)
    # a fixed, spread-out sample (every k-th) so topics are mixed
    step = max(1, len(out) // max(1, n))
    return out[::step][:n]


def parse_config(c: str):
    kind, val = c[0], c[1:]
    if kind == "c":
        return int(val), "constant"
    if kind == "d":
        return int(val), "decreasing"
    if kind == "f":
        return float(val), "constant"
    raise SystemExit(f"bench tokens: config must be cR, dR or fX, got {c!r}")


# ---------------------------------------------------------------------------------------------
# part 1: embeddings
# ---------------------------------------------------------------------------------------------
def run_embeddings(args, dev) -> tuple[list[dict], str]:
    from .. import tokens as tk

    model, tok = tk.load_minilm(device=dev)
    sents = stdlib_sentences(args.sentences)
    sents.sort(key=len)  # length-sorted batches (as sentence-transformers does): little padding
    batches = [tok(sents[i:i + args.batch_size], padding=True, truncation=True, max_length=256,
                   return_tensors="pt").to(dev) for i in range(0, len(sents), args.batch_size)]
    # tokens per sentence through the first layer (padded batches: what the model computes)
    tokens_in = sum(b["input_ids"].numel() for b in batches) / len(sents)
    rows_out = []  # tokens per sentence after the last layer, from the patched forward

    @torch.inference_mode()
    def embed_all():
        outs, left = [], 0
        for b in batches:
            o = model(**b)
            left += o.last_hidden_state.shape[0] * o.last_hidden_state.shape[1]
            outs.append(F.normalize(tk.mean_pool(o, b["attention_mask"]), dim=-1))
        rows_out.append(left / len(sents))
        return torch.cat(outs)

    base = embed_all()
    t_base = timer.time_fn(embed_all, device=dev, min_time_s=args.min_time, min_reps=3)
    rows = [{"config": "unmerged", "r": 0, "schedule": "", "tokens_in": tokens_in, "tokens_out": tokens_in,
             "sent_per_s": len(sents) / (t_base.median_us * 1e-6), "speedup": 1.0, "mean_cos": 1.0,
             "min_cos": 1.0, "meets_target": None}]
    for c in args.config_list:
        r, schedule = parse_config(c)
        tk.patch(model, r=r, schedule=schedule)
        try:
            emb = embed_all()
            left = rows_out[-1]
            t = timer.time_fn(embed_all, device=dev, min_time_s=args.min_time, min_reps=3)
        finally:
            tk.unpatch(model)
        cos = (emb * base).sum(-1)
        speed = t_base.median_us / t.median_us
        rows.append({"config": c, "r": r, "schedule": schedule, "tokens_in": tokens_in,
                     "tokens_out": left, "sent_per_s": len(sents) / (t.median_us * 1e-6),
                     "speedup": speed, "mean_cos": float(cos.mean()), "min_cos": float(cos.min()),
                     "meets_target": bool(speed >= 1.5 and float(cos.mean()) >= 0.97)})
    for row in rows:
        row["command"] = (f"python bench/run.py tokens --parts embeddings --sentences {args.sentences} "
                          f"--configs {row['config'] if row['config'] != 'unmerged' else args.configs}"
                          + (f" --threads {args.threads}" if args.threads else ""))
    best = [r for r in rows[1:] if r["speedup"] >= 1.5]
    note = (f"{len(sents)} sentences, {tokens_in:.1f} tokens each on average (padded batches of "
            f"{args.batch_size}, length-sorted). Target (1.5x at mean cos >= 0.97): "
            + ("met by " + ", ".join(r["config"] for r in rows[1:] if r["meets_target"])
               if any(r["meets_target"] for r in rows[1:])
               else "NOT met" + (f"; at >= 1.5x the best mean cos is {max(r['mean_cos'] for r in best):.4f}"
                                 if best else "; no config reached 1.5x")))
    return rows, note


def plot_embeddings(rows, path) -> str:
    """PNG of throughput speed-up against mean cosine similarity, one line per r schedule kind
    (constant r, decreasing r, a fraction per layer), the unmerged model as the baseline star."""
    try:
        from .plot import scatter_png

        names = {"c": "constant r", "d": "decreasing r (2r -> 0)", "f": "fraction per layer"}
        series, labels = {}, {}
        for r in rows[1:]:
            kind = names[r["config"][0]]
            series.setdefault(kind, []).append((r["speedup"], r["mean_cos"]))
            labels.setdefault(kind, []).append(r["config"])
        scatter_png(path, series, "throughput vs unmerged (x)", "mean cosine to unmerged embeddings",
                    title="ToMe on all-MiniLM-L6-v2 (target: 1.5x at cos >= 0.97)", labels=labels,
                    baseline=(1.0, 1.0), hline=0.97, vline=1.5)
    except RuntimeError as e:  # matplotlib missing: the tables still stand
        return f"no plot written: {e}"
    return f"plot: {path}"


# ---------------------------------------------------------------------------------------------
# part 2: op overhead and per-op baselines
# ---------------------------------------------------------------------------------------------
def tome_torch(metric, r):
    """ToMe's PyTorch formulation (the baseline): full Na x Nb similarity, argsort, scatter_reduce."""
    m = metric / metric.norm(dim=-1, keepdim=True)
    a, b = m[..., ::2, :], m[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    scores[..., 0, :] = -math.inf  # CLS
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx, src_idx = edge_idx[..., r:, :], edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
    return unm_idx, src_idx, dst_idx


def merge_torch(x, size, unm_idx, src_idx, dst_idx):
    xs = x * size
    a, b = xs[..., ::2, :], xs[..., 1::2, :]
    n, t1, c = a.shape
    unm = a.gather(dim=-2, index=unm_idx.expand(n, t1 - src_idx.shape[1], c))
    src = a.gather(dim=-2, index=src_idx.expand(n, src_idx.shape[1], c))
    dst = b.scatter_reduce(-2, dst_idx.expand(n, src_idx.shape[1], c), src, reduce="sum")
    out = torch.cat([unm, dst], dim=1)
    sa, sb = size[..., ::2, :], size[..., 1::2, :]
    s = torch.cat([sa.gather(-2, unm_idx), sb.scatter_reduce(-2, dst_idx, sa.gather(-2, src_idx), reduce="sum")], 1)
    return out / s, s


def run_ops(args, dev) -> list[dict]:
    from .. import tokens as tk
    from ..ops import tokens as T

    try:
        model, _ = tk.load_minilm(device=dev)
        layer = model.encoder.layer[0]
        H, C = model.config.num_attention_heads, model.config.hidden_size
    except ImportError:
        import transformers

        cfg = transformers.BertConfig(hidden_size=384, num_attention_heads=12, intermediate_size=1536,
                                      num_hidden_layers=1)
        layer = transformers.BertModel(cfg).encoder.layer[0].to(dev).eval()
        H, C = 12, 384
    B, N = args.batch, args.n
    D = C // H
    r = N // 8
    g = torch.Generator().manual_seed(0)
    h = torch.randn(B, N, C, generator=g).to(dev)
    k = torch.randn(B, H, N, D, generator=g).to(dev)
    q = torch.randn(B, H, N, D, generator=g).to(dev)
    v = torch.randn(B, H, N, D, generator=g).to(dev)
    sizes = torch.ones(B, N, device=dev)
    prot = T.protected_mask(B, N, device=dev)
    dest = T.bipartite_soft_matching(k.mean(1), r, prot)
    mt = args.min_time
    rows = []

    def t(fn):
        return timer.time_fn(fn, device=dev, min_time_s=mt).median_us

    with torch.inference_mode():
        layer_us = t(lambda: layer(h))
        match_us = t(lambda: T.bipartite_soft_matching(k.mean(1), r, prot))
        match_base = t(lambda: tome_torch(k.mean(1), r))
        merge_us = t(lambda: T.merge_tokens(h, dest, N - r, sizes))
        idx = tome_torch(k.mean(1), r)
        merge_base = t(lambda: merge_torch(h, sizes[..., None], *idx))
        attn_us = t(lambda: T.proportional_attention(q, k, v, sizes))
        mask = sizes.log()[:, None, None, :].to(q.dtype)
        attn_base = t(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
        unm_us = t(lambda: T.unmerge_tokens(h[:, :N - r].contiguous(), dest))
        unm_base = t(lambda: h[:, :N - r].gather(1, dest.long().clamp_min(0)[..., None].expand(B, N, C)))
        scores = h.norm(dim=-1)
        keep = N // 2
        prune_us = t(lambda: T.prune_tokens(h, scores, keep))
        prune_base = t(lambda: h.gather(1, scores.topk(keep, dim=1).indices.sort(1).values[..., None]
                                        .expand(B, keep, C)))
    cmd = (f"python bench/run.py tokens --parts ops --n {N} --batch {B}"
           + (f" --threads {args.threads}" if args.threads else ""))
    for op, us, base_name, base_us, frac in [
        ("bert layer (MiniLM, HF)", layer_us, "", None, 1.0),
        ("keys mean + bipartite_soft_matching", match_us, "ToMe torch (matrix + argsort)", match_base,
         match_us / layer_us),
        ("merge_tokens", merge_us, "ToMe torch (gather + scatter_reduce)", merge_base, merge_us / layer_us),
        ("matching + merging", match_us + merge_us, "ToMe torch", match_base + merge_base,
         (match_us + merge_us) / layer_us),
        ("proportional_attention", attn_us, "SDPA + log-size mask", attn_base, attn_us / layer_us),
        ("unmerge_tokens", unm_us, "torch gather", unm_base, unm_us / layer_us),
        ("prune_tokens (keep N/2)", prune_us, "topk + sort + gather", prune_base, prune_us / layer_us),
    ]:
        rows.append({"op": op, "B": B, "N": N, "C": C, "r": r, "median_us": us, "baseline": base_name,
                     "baseline_us": base_us, "speedup_vs_baseline": (base_us / us) if base_us else None,
                     "frac_of_layer": frac, "command": cmd})
    return rows


def run(args: argparse.Namespace) -> dict:
    import fastadapt_ops  # noqa: F401  (registers the ops)

    if args.quick:
        args.sentences, args.n, args.min_time = min(args.sentences, 32), min(args.n, 128), min(args.min_time, 0.05)
        if args.configs == DEFAULT_CONFIGS:
            args.configs = "c1,d2,f0.1"
    args.config_list = [c for c in args.configs.split(",") if c]
    for c in args.config_list:
        parse_config(c)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    parts = set(args.parts.split(","))
    out = {"paths": []}
    meta = {"command": results.command_line("tokens", getattr(args, "argv", [])), **results.environment(dev)}
    if "embeddings" in parts:
        rows, note = run_embeddings(args, dev)
        out["embeddings"] = rows
        print(results.markdown_table(rows, EMB_COLUMNS[:-1]))
        print(note)
        if not args.no_write:
            paths = results.write_results("tokens", rows, EMB_COLUMNS, out_root=args.out, device=dev,
                                          tag="embeddings", meta={**meta, "note": note})
            plot_note = plot_embeddings(rows, paths[0].with_suffix(".png"))
            print(plot_note)
            out["paths"] += list(paths)
            out["plot"] = plot_note
    if "ops" in parts:
        rows = run_ops(args, dev)
        out["ops"] = rows
        print(results.markdown_table(rows, OPS_COLUMNS[:-1]))
        mm = next(r for r in rows if r["op"] == "matching + merging")
        note = (f"matching + merging = {100 * mm['frac_of_layer']:.1f}% of one layer at N = {args.n} "
                f"(target <= 10%: {'met' if mm['frac_of_layer'] <= 0.10 else 'NOT met'})")
        print(note)
        if not args.no_write:
            out["paths"] += list(results.write_results("tokens", rows, OPS_COLUMNS, out_root=args.out, device=dev,
                                                       tag="ops", meta={**meta, "note": note}))
    if out["paths"]:
        print("wrote", *out["paths"])
    return out
