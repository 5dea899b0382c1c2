"""CPU kernel paths: which one runs, and a switch that forces one (tests cover every path)."""
from __future__ import annotations

import contextlib
from typing import Iterator

from . import _C


def cpu_isa() -> str:
    """The CPU kernel path in use: 'avx2' or 'generic' (forced, or the best this CPU runs)."""
    return _C.cpu_isa()


def available_cpu_isas() -> list[str]:
    """Paths that are built and that this CPU can run, best last."""
    return [name for name, (built, ok) in _C.cpu_isa_available().items() if built and ok]


def force_cpu_isa(name: str) -> None:
    """Force a path ('generic', 'avx2') for every later call, or 'auto' to pick the best.

    Raises ValueError when the path is unknown, not built, or unsupported by this CPU."""
    try:
        _C.force_cpu_isa(name)
    except ValueError as e:  # pybind11 maps std::invalid_argument to ValueError
        raise ValueError(str(e)) from None


@contextlib.contextmanager
def use_cpu_isa(name: str) -> Iterator[None]:
    """Run a block on one CPU path, then go back to automatic choice."""
    force_cpu_isa(name)
    try:
        yield
    finally:
        force_cpu_isa("auto")
