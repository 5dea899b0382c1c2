"""Bench family ``rope_swiglu``: the fused RoPE and SwiGLU ops of a decoder layer against the torch
code a runner would otherwise use (the code the Llama runner used before them), in the same run:

- ``fastadapt.rope`` (q and k rotated in place, as views of the fused QKV output) against the
  rotate-half in torch: ``addcmul(qk * cos, cat([-qk2, qk1]) * sin)`` with cos/sin in x's dtype;
- ``fastadapt.silu_mul`` (and its ``out=`` form) against ``F.silu(g).mul_(u)`` on the halves of
  the fused gate/up output.

Shapes default to SmolLM2-135M (9 query heads, 3 KV heads, head dim 64, FFN 1536); T=1 is a decode
step, T=512 a prefill chunk.

    python bench/run.py rope_swiglu [--T 1,512] [--dtypes float32,bfloat16] [--threads N]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from . import results, timer

COLUMNS = ["op", "T", "shape", "dtype", "median_us", "p10_us", "p90_us", "speedup_vs_torch",
           "gbps", "max_abs_diff", "command"]
COLUMN_DOC = {
    "T": "tokens per call (1: a decode step; 512: a prefill chunk)",
    "shape": "rope: H_q/H_kv x head dim; silu_mul: F (x is [T, 2F])",
    "speedup_vs_torch": "median of the torch baseline of the same block / this median",
    "gbps": "bytes the block must move (read + write of q/k, or of x and the output) / median",
    "max_abs_diff": "max |this - torch baseline| on the same input (fp32 math vs the dtype's)",
}
ROPE_TORCH = "torch rotate-half (addcmul/cat)"
SILU_TORCH = "F.silu(g) * u"


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench rope_swiglu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", default="1,512", help="comma list of tokens per call")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma list of activation dtypes")
    p.add_argument("--heads", default="9,3", help="query heads,KV heads (default SmolLM2's 9,3)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--ffn", type=int, default=1536, help="F: the SwiGLU width (x is [T, 2F])")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--min-time", type=float, default=0.2)
    p.add_argument("--out", default=None, help="results root (default bench/results)")
    p.add_argument("--tag", default="", help="file name suffix")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no table on stdout")
    return p


def _row_command(args, T, dtype_name) -> str:
    cmd = (f"python bench/run.py rope_swiglu --T {T} --dtypes {dtype_name} --heads {args.heads} "
           f"--head-dim {args.head_dim} --ffn {args.ffn}")
    if args.threads:
        cmd += f" --threads {args.threads}"
    if args.device != "cpu":
        cmd += f" --device {args.device}"
    return cmd


def run(args: argparse.Namespace) -> dict:
    import fastadapt_ops  # noqa: F401  (registers the ops)
    from fastadapt_ops.models.rope import rope_cos_sin
    from fastadapt_ops.ops import rope, silu_mul

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    hq, hk = (int(v) for v in args.heads.split(","))
    D, Fw = args.head_dim, args.ffn
    nq, nk, half = hq * D, hk * D, D // 2
    max_pos = 4096
    cs = rope_cos_sin(D, max_pos, 100000.0).to(dev)
    rows_out = []

    def add(op, T, shape, dtype_name, t, nbytes, base, diff, cmd):
        rows_out.append({"op": op, "T": T, "shape": shape, "dtype": dtype_name,
                         "median_us": t.median_us, "p10_us": t.p10_us, "p90_us": t.p90_us,
                         "speedup_vs_torch": None, "gbps": nbytes / (t.median_us * 1e3),
                         "max_abs_diff": diff, "command": cmd, "_base": base})

    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        esize = torch.empty(0, dtype=dtype).element_size()
        for T in (int(v) for v in args.T.split(",")):
            cmd = _row_command(args, T, dtype_name)
            start = len(rows_out)
            g = torch.Generator().manual_seed(T)
            # ---- RoPE on views of the fused QKV output
            p0 = 1000 if T == 1 else 0
            pos = torch.arange(p0, p0 + T, device=dev)
            qkv = torch.randn(T, nq + 2 * nk, generator=g).to(dtype).to(dev)
            q = qkv[:, :nq].view(T, hq, D)
            k = qkv[:, nq:nq + nk].view(T, hk, D)
            cos = cs[p0:p0 + T, :half].repeat(1, 2).to(dtype).unsqueeze(1)  # [T, 1, D], x's dtype
            sin = cs[p0:p0 + T, half:].repeat(1, 2).to(dtype).unsqueeze(1)

            def rope_torch():
                qk = qkv[:, :nq + nk].view(T, hq + hk, D)
                return torch.addcmul(qk * cos, torch.cat([qk[..., half:].neg(), qk[..., :half]], -1), sin)

            fresh = qkv.clone()
            want = rope_torch()
            rope(q, k, pos, cs)
            diff = float((qkv[:, :nq + nk].view(T, hq + hk, D).float() - want.float()).abs().max())
            qkv.copy_(fresh)
            nbytes = 2 * T * (nq + nk) * esize + T * D * 4
            t_ours = timer.time_fn(lambda: rope(q, k, pos, cs), device=dev, min_time_s=args.min_time)
            t_torch = timer.time_fn(rope_torch, device=dev, min_time_s=args.min_time)
            add("fastadapt.rope", T, f"{hq}/{hk}x{D}", dtype_name, t_ours, nbytes, ROPE_TORCH, diff, cmd)
            add(ROPE_TORCH, T, f"{hq}/{hk}x{D}", dtype_name, t_torch, nbytes, ROPE_TORCH, 0.0, cmd)
            # ---- SwiGLU on the fused gate/up output
            gu = (torch.randn(T, 2 * Fw, generator=g) * 3).to(dtype).to(dev)
            out = torch.empty(T, Fw, dtype=dtype, device=dev)

            def silu_torch():
                return F.silu(gu[:, :Fw]).mul_(gu[:, Fw:])

            diff = float((silu_mul(gu).float() - silu_torch().float()).abs().max())
            nbytes = 3 * T * Fw * esize
            t_ours = timer.time_fn(lambda: silu_mul(gu), device=dev, min_time_s=args.min_time)
            t_out = timer.time_fn(lambda: silu_mul(gu, out=out), device=dev, min_time_s=args.min_time)
            t_torch = timer.time_fn(silu_torch, device=dev, min_time_s=args.min_time)
            add("fastadapt.silu_mul", T, f"{Fw}", dtype_name, t_ours, nbytes, SILU_TORCH, diff, cmd)
            add("fastadapt.silu_mul out=", T, f"{Fw}", dtype_name, t_out, nbytes, SILU_TORCH, diff, cmd)
            add(SILU_TORCH, T, f"{Fw}", dtype_name, t_torch, nbytes, SILU_TORCH, 0.0, cmd)

            block = rows_out[start:]
            med = {r["op"]: r["median_us"] for r in block}
            for r in block:
                r["speedup_vs_torch"] = med[r.pop("_base")] / r["median_us"]
                if not args.quiet:
                    print(f"{r['op']:>32} T={T:<4} {dtype_name:8} {r['median_us']:9.2f} us  "
                          f"x{r['speedup_vs_torch']:.2f} vs torch  {r['gbps']:6.2f} GB/s  "
                          f"max|diff| {r['max_abs_diff']:.2e}")
    paths = None
    if not args.no_write:
        meta = {"command": results.command_line("rope_swiglu", getattr(args, "argv", [])),
                **results.environment(dev)}
        paths = results.write_results("rope_swiglu", rows_out, COLUMNS, out_root=args.out,
                                      device=dev, tag=args.tag, meta=meta, column_doc=COLUMN_DOC)
        if not args.quiet:
            print("wrote", *paths)
    return {"rows": rows_out, "paths": paths}
