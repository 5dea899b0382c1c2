"""Bench family ``quant_model``: SmolLM2 re-quantized from its stored weights (RTN and GPTQ at 2,
3 and 4 bits) against the stored Q4_1 model, in one run: perplexity and decode tokens/s.

    python bench/run.py quant_model [--model smollm2] [--bits 2,3,4] [--methods rtn,gptq]
        [--group-size 32] [--calib-samples 32] [--calib-len 256] [--eval-tokens 2048] [--ctx 512]

Protocol. The block matrices (q k v o gate up down) are dequantized from the stored GGUF Q4_1
and quantized again (``fastadapt_ops.models.quantize.quantize_runner``); embeddings, norms and
the tied LM head stay as stored (Q8_0). GPTQ calibrates on ``--calib-samples`` windows of
``--calib-len`` tokens of Python standard-library docstrings; perplexity is measured on the first
``--eval-tokens`` tokens of pydoc_data's language reference (held out: different text) in
windows of ``--ctx``. GPTQ runs with act-order (static groups) and a per-group clipping search
(``--no-act-order``, ``--no-clip-search`` turn them off); the RTN rows are plain round-to-nearest
on the min/max range (``quantize_weight``). Decode tokens/s: ``--decode`` greedy tokens after a short prompt, the best
of two runs. ``ppl_vs_stored`` and ``decode_vs_stored`` are ratios to the stored model measured in
the same run. ``bpw``: bits per weight of the block matrices (codes + scales + zeros).
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from . import results

COLUMNS = ["model", "method", "bits", "group_size", "bpw", "ppl", "ppl_vs_stored", "decode_tok_s",
           "decode_vs_stored", "quantize_s", "command"]

PROMPT = "The history of the printing press begins"


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench quant_model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--bits", default="2,3,4", help="comma list of 2, 3, 4, 8, ternary")
    p.add_argument("--methods", default="rtn,gptq")
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-len", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=2048)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--decode", type=int, default=64, help="greedy tokens timed for decode tok/s")
    p.add_argument("--no-act-order", dest="act_order", action="store_false",
                   help="GPTQ columns in order (default: by decreasing Hessian diagonal, static groups)")
    p.add_argument("--no-clip-search", dest="clip_search", action="store_false",
                   help="GPTQ groups on the plain min/max range (default: search the range shrink factor)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny calibration and evaluation, only blocks 0 and 1 re-quantized")
    p.add_argument("--out", default=None)
    p.add_argument("--no-write", action="store_true")
    return p


def eval_text() -> str:
    """Ordinary English prose on every Python install (the kv_quality bench's text)."""
    from .kv_quality import bench_text

    return bench_text()


def _bpw(model) -> float:
    from ..quant import QuantizedWeight

    bits = n = 0
    for L in model.layers:
        for w in (L.wqkv, L.wo, L.wgu, L.wdown):
            for p in (w if isinstance(w, list) else [w]):
                if isinstance(p, QuantizedWeight):
                    bits += 8 * p.nbytes
                else:
                    bits += 8 * p.numel() * p.element_size()
                n += p.shape[0] * p.shape[1]
    return bits / n


def _decode_tps(model, prompt_ids, n: int):
    """Best of two greedy runs of ``n`` tokens (None when ``n`` is 0: a quality-only run)."""
    from ..models import generate

    if n <= 0:
        return None
    best = 0.0
    for _ in range(2):
        r = generate(model, model.tokenizer, prompt_ids, max_new_tokens=n, stop_at_eos=False)
        best = max(best, r.decode_tokens_per_s)
    return best


def run(args: argparse.Namespace) -> dict:
    from ..models import load, perplexity, resolve
    from ..models.quantize import calibration_ids, quantize_runner

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.calib_samples, args.calib_len, args.eval_tokens, args.ctx, args.decode = 2, 64, 128, 64, 4
    path = resolve(args.model)
    max_ctx = max(args.ctx, args.calib_len) + args.decode + 32
    model = load(path, max_ctx=max_ctx)
    tok = model.tokenizer
    ids = tok.encode(eval_text())[:args.eval_tokens]
    prompt_ids = tok.encode(PROMPT)
    calib = calibration_ids(tok, args.calib_samples, args.calib_len)
    bits_list = [b if b == "ternary" else int(b) for b in args.bits.split(",") if b]
    methods = [m for m in args.methods.split(",") if m]
    gs = args.group_size
    cmd = (f"python bench/run.py quant_model --bits {args.bits} --methods {args.methods} --group-size {gs} "
           f"--calib-samples {args.calib_samples} --calib-len {args.calib_len} --eval-tokens {args.eval_tokens} "
           f"--ctx {args.ctx}" + ("" if args.decode == 64 else f" --decode {args.decode}") +
           ("" if args.act_order else " --no-act-order") +
           ("" if args.clip_search else " --no-clip-search") + (" --quick" if args.quick else ""))

    base_ppl = perplexity(model, ids, ctx=args.ctx)["ppl"]
    base_tps = _decode_tps(model, prompt_ids, args.decode)
    rows = [{"model": os.path.basename(path), "method": "stored", "bits": "q4_1", "group_size": 32,
             "bpw": _bpw(model), "ppl": base_ppl, "ppl_vs_stored": 1.0, "decode_tok_s": base_tps,
             "decode_vs_stored": 1.0 if base_tps else None, "quantize_s": 0.0, "command": cmd}]
    print(f"stored Q4_1: ppl {base_ppl:.3f}, decode {base_tps or 0:.1f} tok/s, {rows[0]['bpw']:.2f} bpw", flush=True)
    for bits in bits_list:
        for method in methods:
            m = load(path, max_ctx=max_ctx)
            t0 = time.perf_counter()
            quantize_runner(m, 2 if bits == "ternary" else bits, method, calib if method == "gptq" else None, gs,
                            ternary=bits == "ternary", act_order=args.act_order,
                            clip_search=args.clip_search and method == "gptq",
                            layers=[0, 1] if args.quick else None)
            qs = time.perf_counter() - t0
            ppl = perplexity(m, ids, ctx=args.ctx)["ppl"]
            tps = _decode_tps(m, prompt_ids, args.decode)
            rows.append({"model": os.path.basename(path), "method": method, "bits": bits, "group_size": gs,
                         "bpw": _bpw(m), "ppl": ppl, "ppl_vs_stored": ppl / base_ppl, "decode_tok_s": tps,
                         "decode_vs_stored": tps / base_tps if tps else None, "quantize_s": qs, "command": cmd})
            dec = f"decode {tps:6.1f} tok/s (x{tps / base_tps:.2f})" if tps else "decode not timed"
            print(f"{method:>5} {bits} bits g{gs}: ppl {ppl:9.3f} (x{ppl / base_ppl:.3f})  {dec}  "
                  f"{rows[-1]['bpw']:.2f} bpw  quantized in {qs:.1f} s", flush=True)
            del m
    target = [r for r in rows if r["method"] == "gptq" and r["bits"] == 3]
    notes = [f"eval: first {len(ids)} tokens of pydoc_data topics, ctx {args.ctx}; calibration: "
             f"{args.calib_samples} x {args.calib_len} tokens of stdlib docstrings; threads {torch.get_num_threads()}"]
    if target:
        ok = target[0]["ppl_vs_stored"] <= 1.15
        notes.append(f"target GPTQ 3-bit within 15% of the stored model's perplexity: "
                     f"{'met' if ok else 'NOT met'} (x{target[0]['ppl_vs_stored']:.3f})")
    for n in notes:
        print(n)
    paths = None
    if not args.no_write:
        meta = {"command": results.command_line("quant_model", getattr(args, "argv", [])),
                **results.environment("cpu"), "model": os.path.basename(path), "notes": notes}
        paths = results.write_results("quant_model", rows, COLUMNS, out_root=args.out, device="cpu", meta=meta,
                                      tag="quick" if args.quick else ("ppl-only" if args.decode <= 0 else ""))
        print("wrote", *paths)
    return {"rows": rows, "notes": notes, "paths": paths}
