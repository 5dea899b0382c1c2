"""Benchmarks: ``python bench/run.py <family> [options]`` or ``fastadapt bench <family> ...``.

One timer (``timer.time_fn``: warm-up, repeat until a minimum time, median and p10/p90), weight
rotation over copies larger than the LLC (``timer.rotating_copies``), the machine's measured read
bandwidth (``timer.measure_read_bandwidth``) and one result writer (``results.write_results``:
JSON + markdown under ``bench/results/<device>/``, every row with the command that reproduces it).
Each family module (``qlinear``, ...) exposes ``make_parser()`` and ``run(args)``.
"""
from __future__ import annotations

import importlib
import sys

FAMILIES = ("qlinear", "rms_norm", "rope_swiglu", "paged_attention", "kv_cache", "kv_quality", "e2e",
            "tokens", "block_sparse", "sparse_prefill", "best_of_n", "adaptive_decoding", "lut_linear",
            "quant_model", "prune_prompt")

__all__ = ["FAMILIES", "main"]


def _usage() -> str:
    return ("usage: python bench/run.py <family> [options]   (or: fastadapt bench <family> ...)\n"
            f"families: {', '.join(FAMILIES)}; '<family> --help' lists its options")


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``[family, *options]`` to ``fastadapt_ops.bench.<family>.run``; returns 0.

    An exit status, so a CLI may ``sys.exit(main(...))``; bad options and an unknown family
    raise ``SystemExit(2)``. Call ``<family>.run(args)`` directly for the rows and file paths.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        if not argv:
            raise SystemExit(2)
        return 0
    family, rest = argv[0], argv[1:]
    if family not in FAMILIES:
        print(f"unknown bench family {family!r}\n{_usage()}", file=sys.stderr)
        raise SystemExit(2)
    mod = importlib.import_module(f"{__name__}.{family}")
    args = mod.make_parser().parse_args(rest)
    args.argv = rest
    mod.run(args)
    return 0
