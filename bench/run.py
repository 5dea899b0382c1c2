#!/usr/bin/env python
"""Entry point of the benches: ``python bench/run.py <family> [options]``.

Families live in ``python/fastadapt_ops/bench/<family>.py`` (``qlinear``, ...); this file only
dispatches to ``fastadapt_ops.bench.main``, which the ``fastadapt bench`` CLI calls too.
See bench/README.md.
"""
import sys
from pathlib import Path


def _import_main():
    try:
        import fastadapt_ops  # noqa: F401
    except ImportError:
        # not installed: try the checkout's sources (they need a built _C next to them)
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
    try:
        from fastadapt_ops.bench import main
    except ImportError as e:
        raise SystemExit(
            f"bench/run.py: cannot import fastadapt_ops.bench ({e}).\n"
            "Install the package with `pip install --no-build-isolation -e .`; an editable install "
            "made before python/fastadapt_ops/bench/ existed maps it as an empty namespace, so "
            "re-run that command.") from e
    return main


if __name__ == "__main__":
    sys.exit(_import_main()(sys.argv[1:]))
