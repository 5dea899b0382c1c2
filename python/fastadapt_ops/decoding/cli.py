"""The adaptive decoding flags of ``fastadapt generate`` owned by this package (best-of-N,
entropy switching): one place for models/cli.py to call."""
from __future__ import annotations

from .best_of_n import add_best_of_args, run_best_of
from .switching import add_switch_args, run_switch

__all__ = ["add_args", "wants", "run"]


def add_args(parser) -> None:
    add_best_of_args(parser)
    add_switch_args(parser)


def wants(args) -> bool:
    return bool(getattr(args, "best_of", 0)) or getattr(args, "switch", None) is not None


def run(model, args) -> int:
    if getattr(args, "best_of", 0) and getattr(args, "switch", None):
        raise SystemExit("fastadapt generate: --best-of and --switch cannot be combined")
    if getattr(args, "best_of", 0):
        if args.best_of < 1:
            raise SystemExit(f"fastadapt generate: --best-of must be >= 1, got {args.best_of}")
        return run_best_of(model, args)
    return run_switch(model, args)
