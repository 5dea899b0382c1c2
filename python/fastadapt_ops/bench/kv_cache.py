"""Bench family ``kv_cache``: one decode step through ``PagedKVCache`` against the dense cache a
user would otherwise keep (``torch.cat`` + ``F.scaled_dot_product_attention``), and the memory
each eviction policy leaves at a budget. The paged ops run the ``torch.ops.fastadapt`` kernels
when registered, else the Python references (the ``impl`` column says which; references are
float64 loops, so their times are not kernel figures).

    python bench/run.py kv_cache [--batch 1,4] [--context 256,1024] [--heads 9:3] [--dim 64]
                                 [--page-size 16] [--dtypes float32] [--budget 0.25]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from . import results, timer

COLUMNS = ["case", "impl", "B", "T", "H_q", "H_kv", "D", "dtype", "median_us", "p10_us",
           "p90_us", "ratio_vs_dense", "bytes", "bytes_vs_dense", "command"]
COLUMN_DOC = {
    "case": "decode attention, decode append, or 'held <policy>' (memory after eviction)",
    "impl": "kernel (torch.ops.fastadapt) | reference (Python) | torch (dense baseline)",
    "ratio_vs_dense": "dense baseline time / this time (>1: faster than the dense cache)",
    "bytes": "KV bytes held for the batch (one layer)",
    "bytes_vs_dense": "bytes / dense cache bytes",
}
POLICY_NAMES = ("full", "streaming", "h2o", "snapkv", "keynorm")


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench kv_cache", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", default="1,4", help="comma list of batch sizes")
    p.add_argument("--context", default="256,1024", help="comma list of context lengths")
    p.add_argument("--heads", default="9:3", help="H_q:H_kv")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--dtypes", default="float32")
    p.add_argument("--budget", type=float, default=0.25, help="policy budget (ratio)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--min-time", type=float, default=0.2)
    p.add_argument("--out", default=None, help="results root (default bench/results)")
    p.add_argument("--no-write", action="store_true")
    return p


def run(args: argparse.Namespace) -> dict:
    from fastadapt_ops.kv import PagedKVCache, _ops
    from fastadapt_ops.kv.policies import evict, get_policy

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    Hq, Hkv = (int(x) for x in args.heads.split(":"))
    D, S = args.dim, args.page_size
    G = Hq // Hkv
    rows = []

    def cmd(B, T, dt):
        return (f"python bench/run.py kv_cache --batch {B} --context {T} --heads {Hq}:{Hkv} "
                f"--dim {D} --page-size {S} --dtypes {dt} --budget {args.budget}"
                + (f" --threads {args.threads}" if args.threads else ""))

    for dt_name in args.dtypes.split(","):
        dtype = getattr(torch, dt_name)
        for B in (int(x) for x in args.batch.split(",")):
            for T in (int(x) for x in args.context.split(",")):
                base = dict(B=B, T=T, H_q=Hq, H_kv=Hkv, D=D, dtype=dt_name, command=cmd(B, T, dt_name))
                # room for the timed appends: 256 pages per row (4096 tokens); the append case
                # is capped below that (each call adds a token to every row)
                pages = B * Hkv * (T // S + 256)
                cache = PagedKVCache(1, Hkv, D, page_size=S, num_pages=pages, dtype=dtype,
                                     track_scores=True, device=dev)
                sids = [cache.add_sequence() for _ in range(B)]
                k = torch.randn(B * T, Hkv, D, device=dev, dtype=dtype)
                cache.append(0, sids, k, k.clone())
                kd = k.view(B, T, Hkv, D).transpose(1, 2).contiguous()  # [B, H_kv, T, D]
                vd = kd.clone()
                dense_bytes = 2 * kd.numel() * kd.element_size()
                q = torch.randn(B, 1, Hq, D, device=dev, dtype=dtype)
                qd = q.transpose(1, 2)  # [B, H_q, 1, D]
                k1 = torch.randn(B, Hkv, D, device=dev, dtype=dtype)

                def dense_attn():
                    return F.scaled_dot_product_attention(qd, kd.repeat_interleave(G, 1),
                                                          vd.repeat_interleave(G, 1))

                def dense_append():
                    return torch.cat([kd, k1[:, :, None]], 2), torch.cat([vd, k1[:, :, None]], 2)

                cases = [
                    ("decode attention", "torch", dense_attn, dense_bytes),
                    ("decode attention", _ops.implementation("paged_decode_attention"),
                     lambda: cache.attend(0, sids, q), cache.bytes_held()),
                    ("decode append", "torch", dense_append, dense_bytes),
                    ("decode append", _ops.implementation("kv_append"),
                     lambda: cache.append(0, sids, k1, k1), cache.bytes_held()),
                ]
                timings = {}
                for case, impl, fn, nbytes in cases:
                    cap = dict(warmup_s=0.0, warmup_reps=8, max_reps=3000) if case == "decode append" else {}
                    t = timer.time_fn(fn, device=dev, min_time_s=args.min_time, **cap)
                    timings[(case, impl)] = t
                    dense_t = timings[(case, "torch")]
                    rows.append({**base, "case": case, "impl": impl, "median_us": t.median_us,
                                 "p10_us": t.p10_us, "p90_us": t.p90_us,
                                 "ratio_vs_dense": dense_t.median_us / t.median_us,
                                 "bytes": nbytes, "bytes_vs_dense": nbytes / dense_bytes})
                # memory after eviction, per policy (scores from one attention of the last query)
                for name in POLICY_NAMES:
                    c2 = PagedKVCache(1, Hkv, D, page_size=S, num_pages=pages, dtype=dtype,
                                      track_scores=True, device=dev)
                    s2 = [c2.add_sequence() for _ in range(B)]
                    c2.append(0, s2, k, k)
                    c2.attend(0, s2, q)
                    pol = get_policy(name, budget=args.budget if name != "full" else 1.0)
                    for s in s2:
                        evict(c2, pol, s)
                    held = c2.bytes_held()
                    rows.append({**base, "case": f"held {name}", "impl": "-", "bytes": held,
                                 "bytes_vs_dense": held / dense_bytes})
                for r in rows[-(len(cases) + len(POLICY_NAMES)):]:
                    tm = f"{r['median_us']:10.1f} us  x{r['ratio_vs_dense']:.2f} vs dense" \
                        if r.get("median_us") is not None else " " * 28
                    print(f"{r['case']:>18} {r['impl']:>9} B={B:<3} T={T:<5} {dt_name:8} {tm}"
                          f"  {r['bytes'] / 1024:9.1f} KiB ({r['bytes_vs_dense']:.2f} of dense)")
    paths = None
    if not args.no_write:
        meta = {"command": results.command_line("kv_cache", getattr(args, "argv", [])),
                **results.environment(dev),
                "notes": ["impl=reference means the Python reference ran (kernels not registered)"]}
        paths = results.write_results("kv_cache", rows, COLUMNS, out_root=args.out, device=dev,
                                      meta=meta, column_doc=COLUMN_DOC)
        print("wrote", *paths)
    return {"rows": rows, "paths": paths}
