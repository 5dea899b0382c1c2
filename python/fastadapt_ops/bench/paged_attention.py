"""Bench family ``paged_attention``: paged decode attention against what a user would otherwise
run, in the same process, and shared-prefix attention against per-sequence paged attention.

  * decode: ``fastadapt.paged_decode_attention`` (one query token per sequence, pages shuffled
    over the pool) vs ``F.scaled_dot_product_attention`` on contiguous ``[B, H, ctx, D]`` K/V
    (``enable_gqa``), contexts 1K/4K/16K, batch 1/4/16, SmolLM2-like heads (H_q 9, H_kv 3,
    D 64) and a Llama-like D 128 case (H_q 32, H_kv 8); achieved GB/s on the KV bytes and their
    share of the machine's measured read bandwidth;
  * prefix: batch 16 sharing a 4K prefix + short suffixes: ``prefix_shared_attention`` (prefix
    read once per batch, then merged) vs ``paged_decode_attention`` over each sequence's own
    page table (prefix pages + suffix pages, so the prefix is read once per sequence).

Inputs rotate over copies larger than the LLC (``--rotation-mib``), so each call reads its
KV from memory as one decode step does.

    python bench/run.py paged_attention [--quick] [--contexts 1024,4096] [--batches 1,4]
        [--heads smollm2,llama] [--dtype bfloat16] [--threads N] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import math
import sys

import torch
import torch.nn.functional as F

from . import results, timer

COLUMNS = ["op", "case", "B", "ctx", "H_q", "H_kv", "D", "dtype", "median_us", "p10_us", "p90_us",
           "speedup", "baseline", "kv_gbps", "pct_read_bw", "max_abs_err", "copies", "command"]
COLUMN_DOC = {
    "ctx": "keys per sequence (prefix rows: prefix + mean suffix)",
    "speedup": "baseline median / this median (1.0 on the baseline's own row)",
    "kv_gbps": "K and V bytes the op must read / median time (1e9 B/s)",
    "pct_read_bw": "kv_gbps / measured streaming read bandwidth",
    "max_abs_err": "max |out - baseline out| (the baseline row: 0)",
    "copies": "input copies rotated between calls (LLC-cold reads)",
}
HEADS = {"smollm2": (9, 3, 64), "llama": (32, 8, 128)}
PAGE_SIZE = 16


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench paged_attention", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    p.add_argument("--contexts", default=None, help="comma list (default 1024,4096,16384)")
    p.add_argument("--batches", default=None, help="comma list (default 1,4,16)")
    p.add_argument("--heads", default="smollm2,llama", help="comma list of smollm2, llama")
    p.add_argument("--llama-batches", default=None,
                   help="batches of the Llama-like case (default 1,4; the bf16 SDPA baseline is slow)")
    p.add_argument("--prefix-len", type=int, default=None, help="shared prefix (default 4096)")
    p.add_argument("--prefix-batch", type=int, default=16)
    p.add_argument("--no-prefix", action="store_true")
    p.add_argument("--dtype", default="bfloat16", help="KV and q dtype")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--min-time", type=float, default=None, help="seconds per case (default 0.2)")
    p.add_argument("--rotation-mib", type=float, default=None, help="default 96 (quick: 1)")
    p.add_argument("--bw-mib", type=float, default=None, help="bandwidth probe size (default 1024)")
    p.add_argument("--out", default=None, help="results root (default bench/results)")
    p.add_argument("--tag", default=None,
                   help="file name suffix (default: 'quick' for --quick, 'custom' for a narrowed run)")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--quiet", action="store_true")
    return p


def _ints(s):
    return [int(v) for v in s.split(",") if v]


def normalize_args(args):
    q = args.quick
    args.context_list = _ints(args.contexts or ("64,300" if q else "1024,4096,16384"))
    args.batch_list = _ints(args.batches or ("1,3" if q else "1,4,16"))
    args.llama_batch_list = _ints(args.llama_batches or ("1" if q else "1,4"))
    args.head_list = [h for h in args.heads.split(",") if h]
    for h in args.head_list:
        if h not in HEADS:
            raise SystemExit(f"bench paged_attention: unknown heads {h!r} (choose from {list(HEADS)})")
    args.prefix_len = args.prefix_len or (128 if q else 4096)
    if args.prefix_len % PAGE_SIZE:
        raise SystemExit(f"bench paged_attention: --prefix-len must be a multiple of {PAGE_SIZE}")
    args.min_time = args.min_time if args.min_time is not None else (0.001 if q else 0.2)
    args.rotation_mib = args.rotation_mib if args.rotation_mib is not None else (1 if q else 96)
    args.bw_mib = args.bw_mib if args.bw_mib is not None else (64 if q else 1024)
    narrowed = (any(v is not None for v in (args.contexts, args.batches, args.llama_batches))
                or args.heads != "smollm2,llama" or args.no_prefix)
    if args.tag is None:  # a partial run never overwrites the full table
        args.tag = "quick" if q else ("custom" if narrowed else "")
    return args


def _paged_layout(lens, H_kv, D, dtype, dev, gen):
    """Pools and a CSR page table of B * H_kv rows (row b * H_kv + h holds lens[b] tokens),
    pages shuffled over the pool, plus the same keys as contiguous [B, H_kv, max_len, D]."""
    B = len(lens)
    pages_per = [math.ceil(n / PAGE_SIZE) for n in lens]
    P = sum(pages_per) * H_kv
    perm = torch.randperm(P, generator=gen)
    kp = torch.randn(P, PAGE_SIZE, D, generator=gen).to(dtype)
    vp = torch.randn(P, PAGE_SIZE, D, generator=gen).to(dtype)
    indptr = [0]
    for b in range(B):
        for _ in range(H_kv):
            indptr.append(indptr[-1] + pages_per[b])
    ip = torch.tensor(indptr, dtype=torch.int32)
    ix = perm.int()
    kl = torch.tensor([n for n in lens for _ in range(H_kv)], dtype=torch.int32)
    return kp.to(dev), vp.to(dev), ip.to(dev), ix.to(dev), kl.to(dev)


def _contiguous_kv(kp, vp, ip, ix, kl, B, H_kv, n, D):
    """[B, H_kv, n, D] K and V holding the same keys as the page table (equal lengths n)."""
    S = kp.shape[1]
    idx = ix.long().view(B * H_kv, -1)[:, :math.ceil(n / S)]
    k = kp[idx].reshape(B, H_kv, -1, D)[:, :, :n].contiguous()
    v = vp[idx].reshape(B, H_kv, -1, D)[:, :, :n].contiguous()
    return k, v


def _say(args, *a):
    if not args.quiet:
        print(*a, file=sys.stderr, flush=True)


def _row(args, op, case, B, ctx, hq, hkv, D, t, kv_bytes, bw, copies, cmd, err=None):
    gbps = kv_bytes / (t.median_us * 1e3)
    return {"op": op, "case": case, "B": B, "ctx": ctx, "H_q": hq, "H_kv": hkv, "D": D,
            "dtype": args.dtype, "median_us": t.median_us, "p10_us": t.p10_us,
            "p90_us": t.p90_us, "speedup": None, "baseline": None, "kv_gbps": gbps,
            "pct_read_bw": 100.0 * gbps / bw if bw else None, "max_abs_err": err,
            "copies": copies, "command": cmd}


def run(args: argparse.Namespace) -> dict:
    import fastadapt_ops  # noqa: F401  (registers the ops)
    from fastadapt_ops.attention import prefix_shared_attention
    from fastadapt_ops.ops import paged_decode_attention

    args = normalize_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    esize = torch.tensor([], dtype=dtype).element_size()
    gen = torch.Generator().manual_seed(0)
    bw = timer.measure_read_bandwidth(dev, nbytes=int(args.bw_mib * timer.MiB))
    _say(args, f"read bandwidth {bw:.1f} GB/s ({torch.get_num_threads()} threads)")
    rot = int(args.rotation_mib * timer.MiB)
    base_cmd = results.BENCH_ENTRY + " paged_attention"
    thr = f" --threads {args.threads}" if args.threads else ""
    rows_out = []

    # ---- decode: paged vs SDPA on contiguous K/V ------------------------------------------
    for heads in args.head_list:
        hq, hkv, D = HEADS[heads]
        batches = args.batch_list if heads == "smollm2" else args.llama_batch_list
        for n in args.context_list:
            for B in batches:
                kv_bytes = 2 * B * hkv * n * D * esize
                cmd = (f"{base_cmd} --heads {heads} --contexts {n} --batches {B} "
                       f"--llama-batches {B} --dtype {args.dtype} --no-prefix{thr}")

                def make(i):
                    kp, vp, ip, ix, kl = _paged_layout([n] * B, hkv, D, dtype, dev, gen)
                    k, v = _contiguous_kv(kp, vp, ip, ix, kl, B, hkv, n, D)
                    return kp, vp, ip, ix, kl, k, v

                copies = timer.rotating_copies(make, kv_bytes * 2, rot)  # pools + contiguous
                q = torch.randn(B, 1, hq, D, generator=gen).to(dtype).to(dev)
                qs = q.transpose(1, 2)  # [B, H_q, 1, D]
                scale = D ** -0.5
                kp, vp, ip, ix, kl, k, v = copies[0]
                want = F.scaled_dot_product_attention(qs, k, v, scale=scale, enable_gqa=True)
                got, _ = paged_decode_attention(q, kp, vp, ip, ix, kl, scale)
                err = (got.float() - want.transpose(1, 2).float()).abs().max().item()
                t_ours = timer.time_fn(
                    lambda kp, vp, ip, ix, kl, k, v: paged_decode_attention(q, kp, vp, ip, ix, kl, scale),
                    copies.copies, device=dev, min_time_s=args.min_time)
                t_sdpa = timer.time_fn(
                    lambda kp, vp, ip, ix, kl, k, v: F.scaled_dot_product_attention(
                        qs, k, v, scale=scale, enable_gqa=True),
                    copies.copies, device=dev, min_time_s=args.min_time)
                case = f"decode {heads}"
                r1 = _row(args, "fastadapt.paged_decode_attention", case, B, n, hq, hkv, D, t_ours,
                          kv_bytes, bw, copies.n, cmd, err)
                r2 = _row(args, "F.scaled_dot_product_attention", case, B, n, hq, hkv, D, t_sdpa,
                          kv_bytes, bw, copies.n, cmd, 0.0)
                for r in (r1, r2):
                    r["baseline"] = "F.scaled_dot_product_attention"
                    r["speedup"] = t_sdpa.median_us / r["median_us"]
                rows_out += [r1, r2]
                _say(args, f"{case:16} B={B:<3} ctx={n:<6} ours {t_ours.median_us:9.1f} us "
                           f"({r1['kv_gbps']:.1f} GB/s)  sdpa {t_sdpa.median_us:9.1f} us  "
                           f"x{r1['speedup']:.2f}  err {err:.1e}")
                del copies

    # ---- shared prefix: prefix-shared vs per-sequence paged attention ----------------------
    if not args.no_prefix:
        hq, hkv, D = HEADS["smollm2"]
        B, Lp = args.prefix_batch, args.prefix_len
        suf = torch.randint(1, 65, (B,), generator=gen).tolist()
        kv_seq = 2 * sum(Lp + s for s in suf) * hkv * D * esize  # what per-sequence reads
        kv_shared = 2 * (Lp + sum(suf)) * hkv * D * esize  # what the shared layout must read
        cmd = (f"{base_cmd} --heads smollm2 --contexts 1 --batches 1 --llama-batches 1 "
               f"--prefix-len {Lp} --prefix-batch {B} --dtype {args.dtype}{thr}")

        def make_prefix(i):
            # prefix rows (one per KV head), suffix rows (b, h), and per-sequence rows that
            # reference the prefix pages then the suffix pages (same pool, nothing duplicated)
            kp, vp, pip, pix, pl = _paged_layout([Lp], hkv, D, dtype, dev, gen)
            skp, svp, sip, six, sl = _paged_layout(suf, hkv, D, dtype, dev, gen)
            off = kp.shape[0]
            kpool, vpool = torch.cat([kp, skp]), torch.cat([vp, svp])
            six = six + off
            seq_ix, seq_ip = [], [0]
            for b in range(B):
                for h in range(hkv):
                    r = b * hkv + h
                    pre = pix[int(pip[h]):int(pip[h + 1])]
                    own = six[int(sip[r]):int(sip[r + 1])]
                    seq_ix.append(torch.cat([pre, own]))
                    seq_ip.append(seq_ip[-1] + len(pre) + len(own))
            seq = (torch.tensor(seq_ip, dtype=torch.int32, device=dev), torch.cat(seq_ix),
                   torch.tensor([Lp + s for s in suf for _ in range(hkv)], dtype=torch.int32,
                                device=dev))
            return kpool, vpool, (pip, pix, pl), (sip, six, sl), seq

        copies = timer.rotating_copies(make_prefix, kv_shared, rot)
        q = torch.randn(B, 1, hq, D, generator=gen).to(dtype).to(dev)
        scale = D ** -0.5
        kpool, vpool, pre, sfx, seq = copies[0]
        want, _ = paged_decode_attention(q, kpool, vpool, *seq, scale)
        got, _ = prefix_shared_attention(q, kpool, vpool, pre, sfx, scale)
        err = (got.float() - want.float()).abs().max().item()
        t_shared = timer.time_fn(
            lambda kpool, vpool, pre, sfx, seq: prefix_shared_attention(q, kpool, vpool, pre, sfx, scale),
            copies.copies, device=dev, min_time_s=args.min_time)
        t_seq = timer.time_fn(
            lambda kpool, vpool, pre, sfx, seq: paged_decode_attention(q, kpool, vpool, *seq, scale),
            copies.copies, device=dev, min_time_s=args.min_time)
        ctx = Lp + round(sum(suf) / B)
        case = f"prefix {Lp} + suffix 1..64"
        r1 = _row(args, "prefix_shared_attention", case, B, ctx, hq, hkv, D, t_shared, kv_shared,
                  bw, copies.n, cmd, err)
        r2 = _row(args, "paged_decode_attention per sequence", case, B, ctx, hq, hkv, D, t_seq,
                  kv_seq, bw, copies.n, cmd, 0.0)
        for r in (r1, r2):
            r["baseline"] = "paged_decode_attention per sequence"
            r["speedup"] = t_seq.median_us / r["median_us"]
        rows_out += [r1, r2]
        _say(args, f"{case}: B={B} shared {t_shared.median_us:.1f} us, per-sequence "
                   f"{t_seq.median_us:.1f} us, x{r1['speedup']:.2f}, err {err:.1e}")

    print(results.text_table(rows_out, [("op", "op"), ("case", "case"), ("B", "B"),
                                        ("ctx", "ctx"), ("median_us", "us"),
                                        ("speedup", "speedup"), ("kv_gbps", "GB/s"),
                                        ("pct_read_bw", "% bw"), ("max_abs_err", "err")]))
    paths = None
    if not args.no_write:
        meta = {"command": results.command_line("paged_attention", getattr(args, "argv", [])),
                "read_bandwidth_gbps": bw, "page_size": PAGE_SIZE, **results.environment(dev)}
        paths = results.write_results("paged_attention", rows_out, COLUMNS, out_root=args.out,
                                      device=dev, tag=args.tag, meta=meta, column_doc=COLUMN_DOC)
        print("wrote", *paths)
    return {"rows": rows_out, "paths": paths}
