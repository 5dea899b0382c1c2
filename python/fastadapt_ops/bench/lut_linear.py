"""Bench family ``lut_linear``: the lookup-table low-bit linear against ``qlinear`` in one run.

    python bench/run.py lut_linear [--quick] [--shapes smollm2,4096x4096] [--m 1,4,16]
                                   [--threads N] [--write-table [PATH]] [--out DIR]

Per weight shape [N, K] and M (rows of x, fp32), times ``fastadapt::lut_linear`` at 1, 2, 3, 4
bits and ternary, and ``fastadapt::qlinear`` int2 / int3 / int4 both exact (act_quant none) and
with int8 activations (act_quant int8), group size 128 (or the largest that divides K). Weights
of every op rotate among copies spanning more than the LLC (timer.rotating_copies), so each call
streams its weights from memory as a decode step does. Ratios compare rows of the same shape and M:
``vs_q4`` = qlinear int4 (exact) time / this time, ``vs_same_bits`` = qlinear at the same bits
(exact; ternary: int2) / this time, ``vs_same_bits_i8`` = the same with act_quant int8.

``--write-table`` regenerates ``fastadapt_ops/quant/lut_table.py`` (the automatic choice's data).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from . import results as R
from .timer import MiB, measure_read_bandwidth, rotating_copies, tensor_bytes, time_fn

FAMILY = "lut_linear"
SHAPES = {
    "smollm2": [(576, 576, "smollm2 q/o_proj"), (192, 576, "smollm2 k/v_proj"),
                (1536, 576, "smollm2 gate/up_proj"), (576, 1536, "smollm2 down_proj"),
                (49152, 576, "smollm2 lm_head")],
    "4096x4096": [(4096, 4096, "4096^2 (llama-7b attn)")],
}
LUT_KINDS = ("lut1", "lut2", "lut3", "lut4", "lut_ternary")
Q_KINDS = ("q2", "q3", "q4", "q2_i8", "q3_i8", "q4_i8")
COLUMNS = ["layer", "shape", "N", "K", "M", "op", "bits", "median_us", "p10_us", "p90_us", "copies",
           "vs_q4", "vs_same_bits", "vs_same_bits_i8", "weight_bytes", "gbps", "pct_read_bw", "note",
           "command"]
COLUMN_DOC = {
    "op": "lutB = fastadapt::lut_linear at B bits (lut_ternary: BitNet ternary); qB = fastadapt::qlinear "
          "intB exact; qB_i8 = qlinear intB with act_quant int8",
    "median_us": "median wall time per call (p10_us / p90_us: 10th / 90th percentiles)",
    "vs_q4": "qlinear int4 exact time / this time (same shape and M); > 1 is faster",
    "vs_same_bits": "qlinear at the same bits (exact; ternary and 1-bit: int2) time / this time",
    "vs_same_bits_i8": "qlinear at the same bits with act_quant int8 time / this time",
    "weight_bytes": "bytes one call reads: planes/qdata + scales + zeros",
    "gbps": "weight_bytes / median time (1e9 B/s)",
    "pct_read_bw": "gbps as % of the measured streaming read bandwidth",
}
DEFAULT_TABLE = Path(__file__).resolve().parents[1] / "quant" / "lut_table.py"


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench lut_linear", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="smollm2,4096x4096",
                   help="comma list of groups (smollm2, 4096x4096) or NxK shapes")
    p.add_argument("--m", default="1,4,16", help="comma list of M (rows of x)")
    p.add_argument("--ops", default=",".join(LUT_KINDS + Q_KINDS), help="comma list of ops")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--min-time", type=float, default=0.15, help="seconds of measured calls per case")
    p.add_argument("--rotation-mib", type=int, default=96)
    p.add_argument("--bw-mib", type=int, default=1024)
    p.add_argument("--quick", action="store_true", help="576x576 and 1536x576, M=1, short timings")
    p.add_argument("--write-table", nargs="?", const=str(DEFAULT_TABLE), default=None,
                   help="write the automatic choice's table (default: fastadapt_ops/quant/lut_table.py)")
    p.add_argument("--out", default=None, help="results root (default bench/results)")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--quiet", action="store_true")
    return p


def _shapes(spec: str):
    out = []
    for tok in spec.split(","):
        tok = tok.strip()
        if tok in SHAPES:
            out += SHAPES[tok]
        else:
            n, k = (int(v) for v in tok.lower().split("x"))
            out.append((n, k, f"{n}x{k}"))
    return out


def _group(K, gs):
    while gs > 32 and K % gs:
        gs //= 2
    return gs


def _prepare(kind, N, K, gs, gen):
    """(forward(x, *w), proto weights tuple, label bits)."""
    from fastadapt_ops.ops import qformats as qf
    from fastadapt_ops.ops.lut_linear import lut_linear
    from fastadapt_ops.ops.qlinear import qlinear
    from fastadapt_ops.quant.lut import LutWeight

    G = K // gs
    if kind.startswith("lut"):
        tern = kind == "lut_ternary"
        bits = 2 if tern else int(kind[3:])
        codes = torch.randint(0, 3 if tern else 1 << bits, (N, K), generator=gen, dtype=torch.uint8)
        scales = torch.rand(N, G, generator=gen) * 0.01 + 0.001
        zeros = 1.0 if tern else torch.randint(0, 1 << bits, (N, G), generator=gen).float()
        lw = LutWeight.from_codes(codes, scales, zeros, bits, gs, ternary=tern)
        w = (lw.planes, lw.scales, lw.zoffs)

        def fwd(x, planes, scales, zoffs, _b=bits, _z=lw.zoff):
            return lut_linear(x, planes, scales, zoffs, None, _b, N, gs, _z)

        return fwd, w, ("ternary" if tern else bits)
    bits = int(kind[1])
    aq = "int8" if kind.endswith("_i8") else "none"
    fmt = f"int{bits}"
    qdata, scales, zeros = qf.random_packed_weight(fmt, N, K, group_size=gs, generator=gen)

    def fwd(x, qd, sc, zr, _f=fmt, _aq=aq):
        return qlinear(x, qd, sc, zr, None, _f, K, gs, _aq)

    return fwd, (qdata, scales, zeros), bits


def run(args: argparse.Namespace) -> dict:
    import fastadapt_ops  # noqa: F401

    if args.quick:
        args.shapes, args.m, args.min_time = "576x576,1536x576", "1", min(args.min_time, 0.03)
        args.rotation_mib, args.bw_mib = min(args.rotation_mib, 32), min(args.bw_mib, 128)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device("cpu")
    bw = measure_read_bandwidth(dev, nbytes=args.bw_mib * MiB)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    ms = [int(v) for v in args.m.split(",")]
    argv = getattr(args, "argv", [])
    thr = f" --threads {args.threads}" if args.threads else ""
    rows = []
    gen = torch.Generator().manual_seed(0)
    for N, K, layer in _shapes(args.shapes):
        gs = _group(K, args.group_size)
        note = f"g{gs}" + ("" if gs == args.group_size else f" (g{args.group_size} does not divide K)")
        prepared = {}
        for kind in ops:
            fwd, proto, bits = _prepare(kind, N, K, gs, gen)
            nbytes = tensor_bytes(*[t for t in proto if t is not None])
            rot = rotating_copies(lambda i, p=proto: p if i == 0 else tuple(
                None if t is None else t.clone() for t in p), nbytes, args.rotation_mib * MiB)
            prepared[kind] = (fwd, rot, bits, nbytes)
        for M in ms:
            x = torch.randn(M, K, generator=gen)
            times = {}
            for kind in ops:
                fwd, rot, bits, nbytes = prepared[kind]
                t = time_fn(lambda *w, f=fwd: f(x, *w), rot.copies, min_time_s=args.min_time)
                times[kind] = t.median_us
                gb = nbytes / (t.median_us * 1e3)
                rows.append({
                    "layer": layer, "shape": f"{N}x{K}", "N": N, "K": K, "M": M, "op": kind, "bits": bits,
                    "median_us": t.median_us, "p10_us": t.p10_us, "p90_us": t.p90_us, "copies": rot.n,
                    "weight_bytes": nbytes, "gbps": gb, "pct_read_bw": 100 * gb / bw,
                    "note": " ".join(v for v in (note, rot.note) if v),
                    "command": f"python bench/run.py lut_linear --shapes {N}x{K} --m {M}{thr}",
                })
            for r in rows[-len(ops):]:
                b = r["bits"]
                same = "q2" if b in ("ternary", 1) else f"q{b}"
                if "q4" in times:
                    r["vs_q4"] = times["q4"] / r["median_us"]
                if same in times:
                    r["vs_same_bits"] = times[same] / r["median_us"]
                if same + "_i8" in times:
                    r["vs_same_bits_i8"] = times[same + "_i8"] / r["median_us"]
            if not args.quiet:
                print(f"{N}x{K} M={M}: " + "  ".join(f"{k}={times[k]:.1f}us" for k in ops), flush=True)
        del prepared
    summary = _summary(rows)
    if not args.quiet:
        print("\n".join(summary))
    paths = None
    if not args.no_write:
        meta = {"command": R.command_line(FAMILY, argv), **R.environment(dev),
                "read_bandwidth_gbps": round(bw, 2), "rotation_bytes": args.rotation_mib * MiB,
                "notes": summary}
        paths = R.write_results(FAMILY, rows, COLUMNS, out_root=args.out, device=dev, meta=meta,
                                column_doc=COLUMN_DOC)
        if not args.quiet:
            print("wrote", *paths)
    if args.write_table:
        write_table(rows, args.write_table, R.command_line(FAMILY, argv), R.device_string(dev))
    return {"rows": rows, "paths": paths, "summary": summary}


def _summary(rows) -> list:
    """Target lines: 2-bit LUT vs qlinear int4 / int2 at M=1, and time per bit."""
    out = []
    by = {(r["shape"], r["M"], r["op"]): r["median_us"] for r in rows}
    for shape in dict.fromkeys(r["shape"] for r in rows):
        t = {op: by.get((shape, 1, op)) for op in LUT_KINDS + Q_KINDS}
        if t["lut2"] and t["q4"] and t["q2"]:
            lin = " ".join(f"{b}b={t[f'lut{b}']:.1f}" for b in (1, 2, 3, 4) if t[f"lut{b}"])
            out.append(f"M=1 {shape}: lut2 {t['lut2']:.1f}us = x{t['q4'] / t['lut2']:.2f} vs q4 (target 1.6), "
                       f"x{t['q2'] / t['lut2']:.2f} vs q2 (target 1.3); lut us per bits: {lin}")
    return out


def write_table(rows, path, command, device) -> None:
    """``TABLE[(bits, N, K, M)] = {lut_us, qlinear_us, qlinear_int8_us}`` for bits 2, 3, 4."""
    by = {(r["N"], r["K"], r["M"], r["op"]): r["median_us"] for r in rows}
    if "--write-table" not in command:
        command += " --write-table"
    lines = ['"""Measured lut_linear vs qlinear times per (bits, N, K, M): the automatic choice\'s table.',
             "", "Generated by the bench (do not edit):", "", f"    {command}", '"""',
             f"COMMAND = {command!r}", f"DEVICE = {device!r}", "TABLE = {"]
    for (N, K, M, op) in sorted(by):
        if op not in ("lut2", "lut3", "lut4"):
            continue
        b = int(op[3])
        q, qi = by.get((N, K, M, f"q{b}")), by.get((N, K, M, f"q{b}_i8"))
        if q is None:
            continue
        ent = {"lut_us": round(by[(N, K, M, op)], 2), "qlinear_us": round(q, 2)}
        if qi is not None:
            ent["qlinear_int8_us"] = round(qi, 2)
        lines.append(f"    ({b}, {N}, {K}, {M}): {ent!r},")
    lines.append("}")
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
