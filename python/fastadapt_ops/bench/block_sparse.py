"""Bench family ``block_sparse``: ``fastadapt::block_sparse_attention`` at several densities
against ``F.scaled_dot_product_attention(is_causal=True)`` in the same run, one layer's worth of
SmolLM2 heads (9 q heads, 3 KV heads, D = 64), fp32; plus the pattern estimators' cost.

Layouts at density d: every query block keeps its diagonal and sink blocks and a random choice of
its other causal key blocks, d of them (so the measured density, printed, is close to d).
``ideal`` is 1 / density; the issue's target is speed-up >= 0.8 x ideal at 16K tokens.

    python bench/run.py block_sparse [--tokens 4096,8192,16384] [--densities 0.05,0.1,0.2,0.5]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from . import results, timer

COLUMNS = ["op", "tokens", "density", "median_ms", "sdpa_ms", "speedup_vs_sdpa", "ideal",
           "fraction_of_ideal", "gflops", "command"]


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench block_sparse", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="4096,8192,16384", help="comma list of sequence lengths")
    p.add_argument("--densities", default="0.05,0.1,0.2,0.5", help="comma list of block densities")
    p.add_argument("--heads", default="9,3,64", help="H_q,H_kv,D")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--min-time", type=float, default=0.5)
    p.add_argument("--quick", action="store_true", help="one small case (smoke test)")
    p.add_argument("--out", default=None, help="results root (default bench/results)")
    p.add_argument("--no-write", action="store_true")
    return p


def random_layout(T: int, H: int, density: float, seed: int = 0):
    """Per query block: diagonal + sink blocks and random other causal blocks, ~density of them."""
    from fastadapt_ops.attention.block_sparse import BlockSparseLayout, a_shape_block_mask, causal_block_mask

    g = torch.Generator().manual_seed(seed)
    causal = causal_block_mask(T, T)
    forced = a_shape_block_mask(T, T, 1, 1)
    nqb, nkb = causal.shape
    score = torch.rand(H, nqb, nkb, generator=g).masked_fill(forced[None], 2.0).masked_fill(~causal[None], -1.0)
    keep = torch.clamp((causal.sum(-1).float() * density).round().long(), min=1)  # [nqb]
    order = score.argsort(-1, descending=True).argsort(-1)  # rank of each block in its row
    mask = order < keep[None, :, None]
    return BlockSparseLayout.from_block_mask(mask & causal[None], T, T)


def _time(fn, min_time):
    return timer.time_fn(fn, min_time_s=min_time, min_reps=2, slow_reps=2, warmup_reps=1)


def run(args: argparse.Namespace) -> dict:
    import fastadapt_ops  # noqa: F401
    from fastadapt_ops.ops import block_pool_scores, vertical_slash_scores

    if args.threads:
        torch.set_num_threads(args.threads)
    Hq, Hkv, D = (int(x) for x in args.heads.split(","))
    tokens = [int(x) for x in args.tokens.split(",")]
    dens = [float(x) for x in args.densities.split(",")]
    if args.quick:
        tokens, dens = [512], [0.25]
    G = Hq // Hkv
    thr = f" --threads {args.threads}" if args.threads else ""
    rows = []
    for T in tokens:
        g = torch.Generator().manual_seed(T)
        q = torch.randn(T, Hq, D, generator=g)
        k = torch.randn(T, Hkv, D, generator=g)
        v = torch.randn(T, Hkv, D, generator=g)
        qs, ks, vs = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
        kx, vx = ks.repeat_interleave(G, 1), vs.repeat_interleave(G, 1)
        causal_flops = 4 * D * Hq * T * (T + 1) / 2
        t_sdpa = _time(lambda: F.scaled_dot_product_attention(qs, kx, vx, is_causal=True), args.min_time)
        sdpa_ms = t_sdpa.median_us / 1e3
        cmd = f"python bench/run.py block_sparse --tokens {T}{thr}"
        rows.append({"op": "sdpa causal (GQA expanded)", "tokens": T, "density": 1.0, "median_ms": sdpa_ms,
                     "sdpa_ms": sdpa_ms, "speedup_vs_sdpa": 1.0, "ideal": 1.0, "fraction_of_ideal": 1.0,
                     "gflops": causal_flops / (sdpa_ms * 1e6), "command": cmd})
        from fastadapt_ops.attention.block_sparse import BlockSparseLayout

        cases = [("block_sparse dense layout", BlockSparseLayout.dense(T, T, Hq))]
        cases += [(f"block_sparse random d={d}", random_layout(T, Hq, d, seed=T)) for d in dens]
        for name, L in cases:
            dn = L.density()
            t = _time(lambda: L.run(q, k, v), args.min_time)
            ms = t.median_us / 1e3
            ideal = 1.0 / dn
            rows.append({"op": name, "tokens": T, "density": dn, "median_ms": ms, "sdpa_ms": sdpa_ms,
                         "speedup_vs_sdpa": sdpa_ms / ms, "ideal": ideal,
                         "fraction_of_ideal": sdpa_ms / ms / ideal, "gflops": causal_flops * dn / (ms * 1e6),
                         "command": cmd + f" --densities {name.split('=')[-1] if '=' in name else '1.0'}"})
        for name, fn in (("estimate vertical_slash_scores", lambda: vertical_slash_scores(q, k)),
                         ("estimate block_pool_scores", lambda: block_pool_scores(q, k))):
            t = _time(fn, args.min_time)
            ms = t.median_us / 1e3
            rows.append({"op": name, "tokens": T, "density": None, "median_ms": ms, "sdpa_ms": sdpa_ms,
                         "speedup_vs_sdpa": None, "ideal": None, "fraction_of_ideal": None,
                         "gflops": None, "command": cmd})
        for r in rows:
            if r["tokens"] == T:
                sp = "" if r["speedup_vs_sdpa"] is None else f"x{r['speedup_vs_sdpa']:.2f} vs sdpa"
                fr = "" if r["fraction_of_ideal"] is None else f"({r['fraction_of_ideal']:.2f} of ideal)"
                dd = "" if r["density"] is None else f"d={r['density']:.3f}"
                print(f"T={T:<6} {r['op']:>32} {dd:>8} {r['median_ms']:10.1f} ms  {sp} {fr}", flush=True)
    paths = None
    if not args.no_write:
        meta = {"command": results.command_line("block_sparse", getattr(args, "argv", [])),
                **results.environment("cpu"), "threads": torch.get_num_threads()}
        paths = results.write_results("block_sparse", rows, COLUMNS, out_root=args.out, device="cpu", meta=meta)
        print("wrote", *paths)
    return {"rows": rows, "paths": paths}
