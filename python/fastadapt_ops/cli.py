"""The ``fastadapt`` command (also ``python -m fastadapt_ops``).

    fastadapt demo                 SmolLM2 answers a chat prompt on our kernels; tokens/s vs HF
    fastadapt generate --model M --prompt P [--chat] [--max-new-tokens N] [--json] ...
    fastadapt perplexity --model M --file F [--ctx N] [--json]
    fastadapt quantize --model M --bits B --method rtn|gptq [--group-size G] [--calib F] --out DIR
    fastadapt info                 build and machine facts: torch, CUDA mode, CPU path, threads
    fastadapt bench qlinear [...]  the low-bit linear benchmark (see bench/README.md)
"""
from __future__ import annotations

import argparse
import os
import platform
import sys


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def info() -> dict:
    """The facts ``fastadapt info`` prints, as a dict."""
    import torch

    import fastadapt_ops
    from fastadapt_ops import _build_info, _C
    from fastadapt_ops.cpu import available_cpu_isas

    d = {
        "fastadapt_ops": fastadapt_ops.__version__,
        "torch": torch.__version__,
        "built against torch": _build_info.TORCH_VERSION,
        "cuda mode": f"{_C.CUDA_MODE} (LINK: kernels linked; CHECK: compiled only; NONE: no nvcc)",
        "cuda archs compiled": _C.CUDA_ARCHS or "-",
        "cuda available": torch.cuda.is_available(),
        "cpu": _cpu_model(),
        "cpu features": _C.cpu_features(),
        "cpu path": f"{fastadapt_ops.cpu_isa()} (available: {', '.join(available_cpu_isas())})",
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        d["cuda device"] = torch.cuda.get_device_name()
    return d


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="fastadapt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print build and machine facts")
    from fastadapt_ops.models.cli import add_subcommands  # standard library imports only

    add_subcommands(sub)
    sub.add_parser("bench", help="run a benchmark family: fastadapt bench qlinear --help",
                   add_help=False)
    if argv and argv[0] == "bench":  # the bench families parse their own options
        from fastadapt_ops.bench import main as bench_main
        return bench_main(argv[1:])
    args = parser.parse_args(argv)
    if hasattr(args, "func"):
        return args.func(args)
    if args.command == "info":
        for k, v in info().items():
            print(f"{k:>22}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
