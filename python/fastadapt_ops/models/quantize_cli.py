"""``fastadapt quantize``: re-quantize a model's block matrices (RTN or GPTQ) into a checkpoint.

    fastadapt quantize --model M --bits 2|3|4|8|ternary --method rtn|gptq [--group-size G]
        [--calib FILE] [--calib-samples 32] [--calib-len 256] [--no-act-order] [--no-clip-search]
        [--out DIR]

GPTQ defaults to act-order (static groups) with a per-group clipping search, the configuration
of the ``quant_model`` bench; ``--method rtn`` is plain round-to-nearest on the min/max range.

The checkpoint (``models/qcheckpoint.py``) loads with ``fastadapt_ops.models.load(DIR)`` and
``fastadapt generate --model DIR``. Calibration text: ``--calib FILE``, else docstrings of Python
standard-library modules (``models.quantize.default_calibration_text``).
"""

from __future__ import annotations

import json
import os
import sys
import time

__all__ = ["add_quantize_args", "cmd_quantize", "add_quantize_subcommand"]


def _bits(text: str):
    if text == "ternary":
        return text
    try:
        b = int(text)
    except ValueError:
        b = None
    if b not in (2, 3, 4, 8):
        import argparse

        raise argparse.ArgumentTypeError(f"--bits must be 2, 3, 4, 8 or ternary; got {text!r}")
    return b


def add_quantize_args(p) -> None:
    p.add_argument("--model", default="smollm2", help="'smollm2', a .gguf file, an HF directory or a checkpoint")
    p.add_argument("--bits", type=_bits, required=True, help="2, 3, 4, 8 or ternary (int2 codes {0,1,2})")
    p.add_argument("--method", choices=("rtn", "gptq"), default="gptq")
    p.add_argument("--group-size", type=int, default=64, help="values per scale along K (-1 = per channel)")
    p.add_argument("--symmetric", action="store_true", help="no zero points (zero fixed at 2^(b-1))")
    p.add_argument("--calib", default=None, help="calibration text file (default: stdlib docstrings)")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-len", type=int, default=256, help="tokens per calibration sample")
    p.add_argument("--no-act-order", dest="act_order", action="store_false",
                   help="GPTQ columns in order (default: by decreasing Hessian diagonal, static groups)")
    p.add_argument("--percdamp", type=float, default=0.01, help="GPTQ damping, a fraction of mean(diag H)")
    p.add_argument("--no-clip-search", dest="clip_search", action="store_false",
                   help="GPTQ groups on the min/max range (default: search each group's range shrink factor)")
    p.add_argument("--out", default=None, help="output directory (default: ./<model>-<method>-<bits>-g<G>)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _default_out(args) -> str:
    base = os.path.basename(os.path.normpath(str(args.model)))
    base = base[:-5] if base.endswith(".gguf") else base
    return f"{base}-{args.method}-{args.bits}{'' if args.bits == 'ternary' else 'b'}-g{args.group_size}"


def cmd_quantize(args) -> int:
    import torch

    from . import load
    from .qcheckpoint import save_checkpoint
    from .quantize import calibration_ids, quantize_runner

    if args.threads:
        torch.set_num_threads(int(args.threads))
    t0 = time.perf_counter()
    model = load(args.model, max_ctx=max(args.calib_len, 16))
    ternary = args.bits == "ternary"
    bits = 2 if ternary else args.bits
    calib = None
    if args.method == "gptq":
        if model.tokenizer is None:
            raise SystemExit(f"fastadapt quantize: {args.model} has no tokenizer to encode calibration text")
        text = None
        if args.calib:
            with open(args.calib, encoding="utf-8") as f:
                text = f.read()
        calib = calibration_ids(model.tokenizer, args.calib_samples, args.calib_len, text=text)

    def progress(i, n, msg):
        if not args.json:
            sys.stderr.write(f"\rquantizing: {i}/{n} layers")
            if i == n:
                sys.stderr.write("\n")
            sys.stderr.flush()

    gs = None if args.group_size == -1 else args.group_size
    info = quantize_runner(model, bits, args.method, calib, gs, ternary=ternary, symmetric=args.symmetric,
                           act_order=args.act_order, percdamp=args.percdamp,
                           clip_search=args.clip_search and args.method == "gptq",
                           progress=progress)
    out = args.out or _default_out(args)
    files = save_checkpoint(model, out, extra={"source": str(args.model),
                                                "calib": (args.calib or "stdlib docstrings") if calib is not None else None})
    res = {"out": out, "files": list(files), "bytes": sum(os.path.getsize(f) for f in files),
           "seconds": time.perf_counter() - t0, "quantize_seconds": info["seconds"], "method": args.method,
           "bits": args.bits, "group_size": args.group_size}
    if args.json:
        print(json.dumps(res))
    else:
        print(f"wrote {out} ({res['bytes'] / 1e6:.1f} MB) in {res['seconds']:.1f} s "
              f"({args.method}, {args.bits} bits, group {args.group_size}); run it with "
              f"fastadapt generate --model {out} --prompt ...")
    return 0


def add_quantize_subcommand(subparsers) -> None:
    q = subparsers.add_parser("quantize", help="re-quantize a model (RTN or GPTQ) into a checkpoint")
    add_quantize_args(q)
    q.set_defaults(func=cmd_quantize)
