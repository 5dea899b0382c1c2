"""The one timer of the benches: warm-up, repeat until a minimum time, per-call percentiles.

Also the two things every memory-bound figure needs next to it:
  * ``measure_read_bandwidth()``: the machine's streaming read rate (GB/s), the roofline that
    effective weight GB/s are compared against;
  * ``rotating_copies()``: enough copies of an op's inputs (weights) that successive calls walk
    more bytes than the last-level cache holds, so every call reads its weights from DRAM (or HBM)
    the way one decode step does, instead of from a cache warmed by the previous repetition.

Nothing here imports the extension; it times any callable.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch

MiB = 1 << 20
GiB = 1 << 30

# Rotation target: three times a 32 MiB L3 (CPU) and about twice a 50 MiB L2 (H100/H200).
DEFAULT_ROTATION_BYTES = 96 * MiB
# Never build more than this much of copies for one op; beyond it rotation is cut short and the
# caller is told (a single copy larger than the LLC needs no rotation anyway).
DEFAULT_MAX_COPY_BYTES = 8 * GiB


# --------------------------------------------------------------------------------------------
# Timer
# --------------------------------------------------------------------------------------------
@dataclass
class Timing:
    """Per-call wall times of one measured case, in microseconds."""

    median_us: float
    p10_us: float
    p90_us: float
    min_us: float
    mean_us: float
    reps: int  # measured calls (warm-up excluded)

    def as_dict(self) -> dict:
        return asdict(self)


def _percentile(sorted_vals: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of an already sorted list."""
    if not sorted_vals:
        return float("nan")
    pos = (len(sorted_vals) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    frac = pos - lo
    return sorted_vals[lo] * (1.0 - frac) + sorted_vals[hi] * frac


def summarize(times_us: Sequence[float]) -> Timing:
    s = sorted(times_us)
    return Timing(
        median_us=_percentile(s, 50),
        p10_us=_percentile(s, 10),
        p90_us=_percentile(s, 90),
        min_us=s[0] if s else float("nan"),
        mean_us=sum(s) / len(s) if s else float("nan"),
        reps=len(s),
    )


def _is_cuda(device: Any) -> bool:
    return device is not None and torch.device(device).type == "cuda"


def time_fn(
    fn: Callable[..., Any],
    inputs: Sequence[Any] | None = None,
    *,
    device: Any = "cpu",
    warmup_s: float = 0.02,
    warmup_reps: int = 2,
    min_time_s: float = 0.2,
    min_reps: int = 5,
    max_reps: int = 50_000,
    slow_reps: int = 3,
) -> Timing:
    """Time ``fn`` call by call and return the median and p10/p90 in microseconds.

    inputs: None, or a sequence of argument tuples (e.g. ``rotating_copies(...).copies``);
      call i runs ``fn(*inputs[i % len(inputs)])``, so successive calls rotate among the copies.
    Warm-up: at least ``warmup_reps`` calls and ``warmup_s`` seconds (not recorded).
    Measurement: calls until both ``min_reps`` calls and ``min_time_s`` seconds of measured time
      are reached, at most ``max_reps``; when the first warm-up call alone took longer than
      ``min_time_s``, warm-up stops there and ``slow_reps`` calls suffice.
    On CUDA each call is bracketed by CUDA events (the device is synchronised before the first
    and after every chunk of calls), so the figure is device time per call, launch gaps included.
    On CPU each call is bracketed by ``time.perf_counter_ns`` (~0.1 us resolution and overhead).
    """
    if inputs is not None and len(inputs) == 0:
        raise ValueError("time_fn: inputs must hold at least one argument tuple")
    n_in = len(inputs) if inputs is not None else 0
    cursor = 0

    def call() -> None:
        nonlocal cursor
        if n_in:
            args = inputs[cursor]
            cursor = cursor + 1 if cursor + 1 < n_in else 0
            fn(*args)
        else:
            fn()

    cuda = _is_cuda(device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    # Warm-up (first-call costs: allocator, oneDNN primitive creation, lazy packing, ...).
    sync()
    t0 = time.perf_counter()
    call()
    sync()
    first_s = time.perf_counter() - t0
    if first_s > max(min_time_s, 0.05):
        # a call slower than the whole time budget: one warm-up call is enough, and a few
        # measured calls (slow_reps) instead of min_reps keep multi-second cases bearable
        min_reps = min(min_reps, slow_reps)
    else:
        done = 1
        while done < warmup_reps or (time.perf_counter() - t0) < warmup_s:
            call()
            done += 1
            if done >= max_reps:
                break
        sync()

    times_us: list[float] = []
    total_us = 0.0
    min_time_us = min_time_s * 1e6
    if cuda:
        chunk = 32
        while len(times_us) < max_reps and (len(times_us) < min_reps or total_us < min_time_us):
            n = min(chunk, max_reps - len(times_us))
            ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(n)]
            for start, end in ev:
                start.record()
                call()
                end.record()
            torch.cuda.synchronize()
            for start, end in ev:
                us = start.elapsed_time(end) * 1e3
                times_us.append(us)
                total_us += us
    else:
        clock = time.perf_counter_ns
        while len(times_us) < max_reps and (len(times_us) < min_reps or total_us < min_time_us):
            a = clock()
            call()
            us = (clock() - a) * 1e-3
            times_us.append(us)
            total_us += us
    return summarize(times_us)


# --------------------------------------------------------------------------------------------
# Read bandwidth
# --------------------------------------------------------------------------------------------
_BW_CACHE: dict[tuple, float] = {}


def measure_read_bandwidth(
    device: Any = "cpu", nbytes: int = GiB, repeats: int = 7, refresh: bool = False
) -> float:
    """Streaming read rate in GB/s (1e9 bytes/s): median over ``repeats`` of ``torch.sum`` over an
    ``nbytes`` fp32 tensor (1 GiB by default, far beyond any LLC), bytes read / time.

    The figure depends on the thread count (CPU), so it is cached per (device, threads, nbytes)
    within the process; ``refresh=True`` measures again.
    """
    dev = torch.device(device)
    key = (str(dev), torch.get_num_threads(), int(nbytes))
    if not refresh and key in _BW_CACHE:
        return _BW_CACHE[key]
    numel = int(nbytes) // 4
    buf = torch.ones(numel, dtype=torch.float32, device=dev)  # written once: pages are touched
    cuda = dev.type == "cuda"
    times_s = []
    buf.sum()  # warm-up
    for _ in range(max(1, repeats)):
        if cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            buf.sum()
            end.record()
            torch.cuda.synchronize()
            times_s.append(start.elapsed_time(end) * 1e-3)
        else:
            a = time.perf_counter()
            buf.sum()
            times_s.append(time.perf_counter() - a)
    del buf
    times_s.sort()
    med = _percentile(times_s, 50)
    gbps = numel * 4 / med / 1e9
    _BW_CACHE[key] = gbps
    return gbps


# --------------------------------------------------------------------------------------------
# Rotation among copies
# --------------------------------------------------------------------------------------------
@dataclass
class RotatingCopies:
    copies: list  # argument tuples, one per copy
    bytes_per_copy: int
    target_bytes: int  # min_total_bytes asked for
    note: str = ""  # non-empty when rotation fell short of the target

    @property
    def n(self) -> int:
        return len(self.copies)

    @property
    def total_bytes(self) -> int:
        return self.n * self.bytes_per_copy

    def __len__(self) -> int:
        return len(self.copies)

    def __getitem__(self, i):
        return self.copies[i]


def num_copies(bytes_per_copy: int, min_total_bytes: int = DEFAULT_ROTATION_BYTES) -> int:
    """Copies needed so that together they span at least ``min_total_bytes`` (at least one)."""
    if bytes_per_copy <= 0:
        return 1
    return max(1, math.ceil(min_total_bytes / bytes_per_copy))


def rotating_copies(
    make_fn: Callable[[int], Any],
    bytes_per_copy: int,
    min_total_bytes: int = DEFAULT_ROTATION_BYTES,
    max_total_bytes: int = DEFAULT_MAX_COPY_BYTES,
) -> RotatingCopies:
    """Build N = ceil(min_total_bytes / bytes_per_copy) copies with ``make_fn(i)``.

    Pass the result as ``inputs`` to ``time_fn``: successive calls then walk at least
    ``min_total_bytes`` before touching a copy again, which is more than the LLC holds, so each
    call reads its weights from memory as a decode step would. ``make_fn`` returns the argument
    tuple of one call (a non-tuple is wrapped). One copy that is already larger than the target
    gives N = 1: it cannot stay cached by itself. If N copies would exceed ``max_total_bytes``,
    fewer are built and ``note`` says so.
    """
    n = num_copies(bytes_per_copy, min_total_bytes)
    note = ""
    if n * bytes_per_copy > max_total_bytes:
        n_cap = max(1, max_total_bytes // max(1, bytes_per_copy))
        note = (
            f"rotation cut to {n_cap} copies ({n_cap * bytes_per_copy / MiB:.0f} MiB < "
            f"{min_total_bytes / MiB:.0f} MiB target): memory cap {max_total_bytes / GiB:.0f} GiB"
        )
        n = n_cap
    copies = []
    for i in range(n):
        c = make_fn(i)
        copies.append(c if isinstance(c, tuple) else (c,))
    return RotatingCopies(copies, int(bytes_per_copy), int(min_total_bytes), note)


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    """Bytes of the given tensors' elements (None counts zero)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)
