"""Speed-against-quality scatter plots (PNG) for the bench tables.

matplotlib is a bench dependency only (requirements-test.txt installs it); it is imported lazily
so the library itself never needs it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

__all__ = ["scatter_png"]

Point = Tuple[float, float]


def scatter_png(path: Union[str, Path], series: Dict[str, Sequence[Point]], xlabel: str, ylabel: str,
                title: str = "", labels: Optional[Dict[str, Sequence[str]]] = None,
                baseline: Optional[Point] = None, hline: Optional[float] = None,
                vline: Optional[float] = None) -> Path:
    """Write a scatter plot of ``series`` (name -> [(x, y), ...], joined by a line in the given
    order) to ``path`` and return it.

    ``labels[name]`` annotates each point of a series; ``baseline`` is drawn as a black star (the
    unmodified model); ``hline``/``vline`` draw target lines (e.g. a 0.97 similarity floor)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - bench-only dependency
        raise RuntimeError("fastadapt bench: plots need matplotlib (pip install matplotlib)") from e
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for name, pts in series.items():
        if not pts:
            continue
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", linewidth=1, markersize=4, label=name)
        for (x, y), text in zip(pts, (labels or {}).get(name, ())):
            ax.annotate(str(text), (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    if baseline is not None:
        ax.plot([baseline[0]], [baseline[1]], marker="*", color="black", markersize=11, linestyle="",
                label="baseline")
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle="--", linewidth=0.8)
    if vline is not None:
        ax.axvline(vline, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
