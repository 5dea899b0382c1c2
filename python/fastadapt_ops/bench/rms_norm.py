"""Bench family ``rms_norm``: the fused (residual add +) RMSNorm against what a user would
otherwise run, in the same process: ``F.rms_norm`` alone and ``x.add_(d); F.rms_norm(x)``.

    python bench/run.py rms_norm [--rows 1,16,512] [--dims 576,4096] [--threads N] [--device cpu]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from . import results, timer

COLUMNS = ["op", "rows", "D", "dtype", "median_us", "p10_us", "p90_us", "speedup_vs_torch",
           "gbps", "command"]


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench rms_norm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,16,512", help="comma list of rows (tokens)")
    p.add_argument("--dims", default="576,4096", help="comma list of hidden sizes D")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma list of x dtypes")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--min-time", type=float, default=0.2)
    p.add_argument("--out", default=None, help="results root (default bench/results)")
    p.add_argument("--no-write", action="store_true")
    return p


def run(args: argparse.Namespace) -> dict:
    import fastadapt_ops  # noqa: F401  (registers the op)
    from fastadapt_ops.ops import rms_norm

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    rows_out = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for D in (int(v) for v in args.dims.split(",")):
            w = torch.randn(D, device=dev)
            for R in (int(v) for v in args.rows.split(",")):
                x = torch.randn(R, D, device=dev).to(dtype)
                d = torch.randn(R, D, device=dev).to(dtype)
                res = x.clone()
                wt = w.to(dtype)
                cases = [
                    ("fastadapt.rms_norm", lambda: rms_norm(x, w, 1e-6), 2),
                    ("F.rms_norm", lambda: F.rms_norm(x, (D,), wt, 1e-6), 2),
                    ("fastadapt.rms_norm residual", lambda: rms_norm(d, w, 1e-6, res), 4),
                    ("add_ + F.rms_norm", lambda: F.rms_norm(res.add_(d), (D,), wt, 1e-6), 4),
                ]
                timings = {}
                for name, fn, passes in cases:
                    t = timer.time_fn(fn, device=dev, min_time_s=args.min_time)
                    timings[name] = t
                    base = "F.rms_norm" if "residual" not in name and "add_" not in name else "add_ + F.rms_norm"
                    nbytes = passes * R * D * x.element_size()
                    rows_out.append({
                        "op": name, "rows": R, "D": D, "dtype": dtype_name,
                        "median_us": t.median_us, "p10_us": t.p10_us, "p90_us": t.p90_us,
                        "speedup_vs_torch": None, "gbps": nbytes / (t.median_us * 1e3),
                        "command": f"python bench/run.py rms_norm --rows {R} --dims {D} --dtypes {dtype_name}"
                                   + (f" --threads {args.threads}" if args.threads else ""),
                        "_base": base,
                    })
                for r in rows_out[-4:]:
                    r["speedup_vs_torch"] = timings[r.pop("_base")].median_us / r["median_us"]
                for r in rows_out[-4:]:
                    print(f"{r['op']:>28} rows={R:<4} D={D:<5} {dtype_name:8} {r['median_us']:9.1f} us"
                          f"  x{r['speedup_vs_torch']:.2f} vs torch  {r['gbps']:.1f} GB/s")
    paths = None
    if not args.no_write:
        meta = {"command": results.command_line("rms_norm", getattr(args, "argv", [])),
                **results.environment(dev)}
        paths = results.write_results("rms_norm", rows_out, COLUMNS, out_root=args.out,
                                      device=dev, meta=meta)
        print("wrote", *paths)
    return {"rows": rows_out, "paths": paths}
