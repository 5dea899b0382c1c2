"""Where bench results go and what they look like.

Each run writes ``<out>/<device>/<name>.json`` and ``<out>/<device>/<name>.md`` with
  <out>     bench/results at the repository root unless ``--out`` says otherwise;
  <device>  ``cpu-<cpu model slug>-<threads>t`` or the slug of the CUDA device name;
  <name>    the bench family, plus ``-<tag>`` (e.g. ``qlinear-quick``).
Every row carries ``command``: the command line that reproduces it (with its baselines).
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

BENCH_ENTRY = "python bench/run.py"


def slugify(text: str) -> str:
    """Lower-case [a-z0-9-] form of a name, for directory and file names."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s or "unknown"


def device_slug(name: str) -> str:
    """Slug of a CPU/GPU model name without the marketing words ((R), CPU, Processor, ...)."""
    s = re.sub(r"\(r\)|\(tm\)|\bcpu\b|\bprocessor\b|\bwith\b.*$", " ", name.lower())
    return slugify(s)


def cpu_model() -> str:
    """The CPU model name as the OS reports it ('' if unknown)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        if sys.platform == "darwin":
            return subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"],
                capture_output=True, text=True, timeout=5,
            ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The SIMD extensions that matter to the kernels, from /proc/cpuinfo (Linux x86 only)."""
    want = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
            "avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "f16c")
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in want if w in have]
    except OSError:
        pass
    return []


def device_string(device: Any = "cpu", threads: int | None = None) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return device_slug(torch.cuda.get_device_name(dev))
    t = threads if threads is not None else torch.get_num_threads()
    return f"cpu-{device_slug(cpu_model())}-{t}t"


def default_results_root() -> Path:
    """``bench/results`` at the repository root in a checkout, else ``./bench/results``."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "pyproject.toml").is_file() and (parent / "bench").is_dir():
            return parent / "bench" / "results"
    return Path.cwd() / "bench" / "results"


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def load_average() -> list[float] | None:
    """1/5/15-minute load averages (other work on a shared machine skews every timing)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def environment(device: Any = "cpu") -> dict:
    """Facts that make a result comparable: versions, device, threads, time."""
    dev = torch.device(device)
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "git": git_commit(),
        "loadavg": load_average(),
    }
    if dev.type == "cuda":
        env["cuda_device"] = torch.cuda.get_device_name(dev)
        env["cuda"] = torch.version.cuda
    try:
        from fastadapt_ops import _build_info  # type: ignore[attr-defined]

        env["fastadapt_build"] = {k: v for k, v in vars(_build_info).items() if k.isupper()}
    except Exception:  # noqa: BLE001  not built, or no build info: not an error for a bench
        pass
    return env


def command_line(family: str, argv: Sequence[str]) -> str:
    return " ".join([BENCH_ENTRY, family, *(shlex.quote(a) for a in argv)])


# --------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------
def fmt_value(v: Any, digits: int = 3) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        a = abs(v)
        if a == 0:
            return "0"
        if a >= 1000:
            return f"{v:.0f}"
        if a >= 100:
            return f"{v:.1f}"
        if a >= 1e-2:
            return f"{v:.{digits - 1}f}" if a < 10 else f"{v:.{digits - 2}f}"
        return f"{v:.2e}"
    return str(v)


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    def cell(c: str, v: Any) -> str:
        s = fmt_value(v).replace("|", "\\|")
        return f"`{s}`" if c == "command" and s else s

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(cell(c, r.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def text_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """Fixed-width table for stdout; columns are (key, header) pairs."""
    cells = [[h for _, h in columns]]
    for r in rows:
        cells.append([fmt_value(r.get(k)) for k, _ in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    out = []
    for j, row in enumerate(cells):
        parts = [c.ljust(w) if i == 0 or not _numeric(c) else c.rjust(w)
                 for i, (c, w) in enumerate(zip(row, widths))]
        out.append("  ".join(parts).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def _numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
def write_results(
    family: str,
    rows: Sequence[dict],
    columns: Sequence[str],
    *,
    out_root: str | os.PathLike | None = None,
    device: Any = "cpu",
    tag: str = "",
    meta: dict | None = None,
    column_doc: dict | None = None,
) -> tuple[Path, Path]:
    """Write ``<out_root>/<device>/<family>[-<tag>].json`` and ``.md``; return both paths.

    rows: dicts with at least the keys in ``columns`` (missing ones are written empty);
    meta: run-wide facts (the full command, measured bandwidth, environment, ...).
    """
    root = Path(out_root) if out_root is not None else default_results_root()
    dev_str = device_string(device)
    out_dir = root / dev_str
    out_dir.mkdir(parents=True, exist_ok=True)
    name = family + (f"-{slugify(tag)}" if tag else "")
    json_path = out_dir / f"{name}.json"
    md_path = out_dir / f"{name}.md"

    meta = dict(meta or {})
    payload = {
        "family": family,
        "device": dev_str,
        "meta": meta,
        "columns": list(columns),
        "column_doc": dict(column_doc or {}),
        "rows": [{c: _jsonable(r.get(c)) for c in columns} for r in rows],
    }
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    tmp.replace(json_path)

    md = [f"# {family} on {dev_str}", ""]
    for k in ("command", "date", "torch", "threads", "cpu", "cpu_flags", "cuda_device", "git",
              "loadavg", "loadavg_end", "read_bandwidth_gbps", "rotation_bytes"):
        if k in meta and meta[k] not in (None, ""):
            md.append(f"- {k}: `{meta[k]}`" if k == "command" else f"- {k}: {meta[k]}")
    for note in meta.get("notes", []):
        md.append(f"- note: {note}")
    md += ["", markdown_table(rows, columns), ""]
    if column_doc:
        md += ["## Columns", ""]
        md += [f"- `{c}`: {column_doc[c]}" for c in columns if c in column_doc]
        md.append("")
    md_path.write_text("\n".join(md), encoding="utf-8")
    return json_path, md_path


def _jsonable(v: Any) -> Any:
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return None
        return float(f"{v:.6g}")  # timings are not good to more than a few digits
    if isinstance(v, (torch.dtype, torch.device)):
        return str(v)
    return v
