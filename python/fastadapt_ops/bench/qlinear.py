"""qlinear against the matmuls a user would otherwise call, in the same run.

    python bench/run.py qlinear [--quick] [--shapes 576x576,smollm2] [--m 1,16] [--threads 2]
                                [--formats int4,q4_1] [--check] [--out DIR]

Per weight shape [N, K] (out_features, in_features) and per M (tokens in the batch), times:
  baselines  F.linear fp32 | F.linear bf16 | aten._weight_int8pack_mm (bf16 x, int8 per-channel)
             | aten._weight_int4pack_mm_for_cpu (bf16 x, and fp32 x; tinygemm int4 with the same
               group size as ours; on CUDA aten._weight_int4pack_mm)
  fastadapt  torch.ops.fastadapt.qlinear for each format (default: int4 with fp32/bf16 x and
             act_quant none/int8; int2, int3, int8, q4_0, q4_1, q8_0 with fp32 x)
Weights of every op, baselines included, rotate among copies spanning more than the LLC
(timer.rotating_copies), so each call streams its weights from memory as a decode step does.
The activations x stay the same across calls (a decode step finds them in cache too).
"""
from __future__ import annotations

import argparse
import gc
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable

import torch
import torch.nn.functional as F

from . import results as R
from .timer import MiB, measure_read_bandwidth, rotating_copies, tensor_bytes, time_fn

FAMILY = "qlinear"

# ---- shapes: [N, K] = [out_features, in_features] ------------------------------------------
SHAPE_GROUPS: dict[str, list[tuple[int, int, str]]] = {
    "smollm2": [  # SmolLM2-135M: hidden 576, 9 q heads / 3 kv heads of 64, FFN 1536, vocab 49152
        (576, 576, "smollm2 q/o_proj"),
        (192, 576, "smollm2 k/v_proj"),
        (1536, 576, "smollm2 gate/up_proj"),
        (576, 1536, "smollm2 down_proj"),
        (49152, 576, "smollm2 lm_head"),
    ],
    "llama": [  # Llama-2-7B: hidden 4096, FFN 11008
        (4096, 4096, "llama-7b attn proj"),
        (11008, 4096, "llama-7b gate/up_proj"),
    ],
}
SHAPE_GROUPS["all"] = SHAPE_GROUPS["smollm2"] + SHAPE_GROUPS["llama"]
DEFAULT_M = [1, 4, 16, 64, 512]

QUICK_SHAPES = "576x576,1536x576"
QUICK_M = "1,16"
QUICK_MIN_TIME_S = 0.05

# ---- formats -----------------------------------------------------------------------------
INT_FORMATS = ("int2", "int3", "int4", "int8")
GGUF_BLOCK = {"q4_0": 32, "q4_1": 32, "q8_0": 32, "q4_k": 256, "q6_k": 256}
ALL_FORMATS = INT_FORMATS + tuple(GGUF_BLOCK)
DEFAULT_FORMATS = ("int4", "int2", "int3", "int8", "q4_0", "q4_1", "q8_0")
QUICK_FORMATS = DEFAULT_FORMATS
# (x dtypes, act_quant modes) per format when --x-dtypes / --act-quant are not given
DEFAULT_VARIANTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "int4": (("fp32", "bf16"), ("none", "int8")),
}
DEFAULT_VARIANT = (("fp32",), ("none",))

BASELINES = ("fp32", "bf16", "int8pack", "int4_bf16", "int4_fp32")
RATIO_BASELINES = ("fp32", "int4_bf16")  # the rows every ratio column refers to

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

DEFAULT_GROUP_SIZE = 128
DEFAULT_MIN_TIME_S = 0.2
DEFAULT_MAX_CALL_S = 5.0
DEFAULT_ROTATION_MIB = 96
DEFAULT_BW_MIB = 1024

COLUMNS = [
    "layer", "shape", "N", "K", "M", "op", "weights", "x_dtype", "act_quant",
    "median_us", "p10_us", "p90_us", "reps", "copies",
    "speedup_vs_fp32", "speedup_vs_int4_bf16",
    "weight_bytes", "gbps", "pct_read_bw", "gflops", "max_rel_err", "note", "command",
]
COLUMN_DOC = {
    "layer": "which model matrix the shape is",
    "shape": "weight [N, K] = [out_features, in_features]",
    "M": "rows of x (tokens per call)",
    "op": "the function timed",
    "weights": "weight storage (format, group size)",
    "x_dtype": "activation dtype (the output has the same dtype)",
    "act_quant": "fastadapt activation quantization ('none' exact, 'int8'); '-' for baselines",
    "median_us": "median wall time per call, microseconds (p10_us / p90_us: 10th / 90th pct)",
    "reps": "measured calls",
    "copies": "weight copies rotated among (together > LLC, see README)",
    "speedup_vs_fp32": "time of F.linear fp32 / time of this row (same shape and M); > 1 is faster",
    "speedup_vs_int4_bf16": "time of aten int4pack bf16 / time of this row; > 1 is faster",
    "weight_bytes": "bytes of weight data one call reads: qdata + scales + zeros (ours); "
                    "weight (+ scales/zeros) tensors (baselines)",
    "gbps": "weight_bytes / median time, GB/s (1e9 B/s)",
    "pct_read_bw": "gbps as % of the measured streaming read bandwidth",
    "gflops": "2*M*N*K / median time, GFLOP/s",
    "max_rel_err": "--check: max|y - reference| / max|reference| against qlinear_reference",
    "note": "skips, errors, group-size changes, rotation limits",
    "command": "reproduces this row (with the baselines its ratios need)",
}


# ---- the extension (looked up late: the bench must load without it for --formats none) -----
def fastadapt_api() -> SimpleNamespace:
    """The ops this bench calls; raises ImportError (or AttributeError) if they are missing."""
    from fastadapt_ops import ops
    from fastadapt_ops.ops import qformats, reference

    return SimpleNamespace(
        qlinear=ops.qlinear,
        random_packed_weight=qformats.random_packed_weight,
        row_bytes=qformats.row_bytes,
        qlinear_reference=reference.qlinear_reference,
    )


class SkipCase(Exception):
    """This case cannot run on this shape/device; the message goes into the row's note."""


# ---- cases -------------------------------------------------------------------------------
@dataclass
class Prepared:
    proto: tuple  # weight tensors passed after x to forward
    forward: Callable[..., torch.Tensor]  # forward(x, *weights) -> y [M, N]
    weights_label: str
    weight_bytes: int
    reference: Callable[[torch.Tensor], torch.Tensor] | None = None  # fp32 y from proto
    note: str = ""

    def make_copy(self, i: int) -> tuple:
        if i == 0:
            return self.proto
        return tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in self.proto)


@dataclass
class Case:
    key: str  # baseline key, or fastadapt format
    op: str
    x_dtype: torch.dtype
    act_quant: str  # '-' for baselines
    baseline: bool
    prepare: Callable[[int, int, torch.device, torch.Generator], Prepared] = field(repr=False)

    @property
    def label(self) -> str:
        return f"{self.op} {self.key} x={DTYPE_NAMES[self.x_dtype]} aq={self.act_quant}"


def pick_group_size(K: int, requested: int) -> int:
    """``requested`` if it divides K, else the largest power-of-two halving (>= 32) that does."""
    g = requested
    while g >= 32:
        if K % g == 0:
            return g
        g //= 2
    raise SkipCase(f"no group size <= {requested} (multiple of 32) divides K={K}")


def _group_note(K: int, requested: int, g: int) -> str:
    return f"g{requested} does not divide K={K}: g{g}" if g != requested else ""


def _randn(shape, gen, device, dtype, std=0.02):
    return (torch.randn(shape, generator=gen) * std).to(device=device, dtype=dtype)


def make_linear_case(dtype: torch.dtype) -> Case:
    name = DTYPE_NAMES[dtype]

    def prepare(N, K, device, gen):
        w = _randn((N, K), gen, device, dtype)  # [N, K]
        return Prepared((w,), lambda x, w: F.linear(x, w), name, tensor_bytes(w))

    return Case(name, "F.linear", dtype, "-", True, prepare)


def make_int8pack_case() -> Case:
    def prepare(N, K, device, gen):
        w = torch.randint(-127, 128, (N, K), generator=gen, dtype=torch.int8).to(device)  # [N, K]
        s = (torch.rand(N, generator=gen) * 2e-4 + 1e-4).to(device, torch.bfloat16)  # [N]
        fwd = lambda x, w, s: torch.ops.aten._weight_int8pack_mm(x, w, s)  # noqa: E731
        return Prepared((w, s), fwd, "int8 per-channel", tensor_bytes(w, s))

    return Case("int8pack", "aten._weight_int8pack_mm", torch.bfloat16, "-", True, prepare)


def int4pack_weight(N: int, K: int, g: int, x_dtype: torch.dtype, device: torch.device,
                    gen: torch.Generator) -> tuple[tuple, Callable, torch.Tensor]:
    """Random tinygemm int4 weight: (packed, scales_and_zeros), forward, dequantized fp32 [N, K].

    tinygemm semantics: w = (q - 8) * scale + zero, q in [0, 15], one (scale, zero) per group of
    g along K; scales_and_zeros: [K / g, N, 2] in x's dtype.
    """
    q = torch.randint(0, 16, (N, K), generator=gen, dtype=torch.int32)  # [N, K]
    scale = torch.rand(N, K // g, generator=gen) * 4e-3 + 1e-3  # [N, K/g]
    zero = torch.randn(N, K // g, generator=gen) * 1e-2  # [N, K/g]
    sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(x_dtype)  # [K/g, N, 2]
    szf = sz.float()
    w_deq = (q.float() - 8) * szf[..., 0].t().repeat_interleave(g, 1) \
        + szf[..., 1].t().repeat_interleave(g, 1)  # [N, K]
    if device.type == "cpu":
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)  # uint8 [N, K/2]
        fwd = lambda x, p, sz: torch.ops.aten._weight_int4pack_mm_for_cpu(x, p, g, sz)  # noqa: E731
    else:
        u8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8).to(device)  # [N, K/2]
        tiles = next((t for t in (8, 4, 2) if K % (t * 16) == 0), None)
        if tiles is None:
            raise SkipCase(f"tinygemm needs K % 32 == 0, K={K}")
        packed = torch.ops.aten._convert_weight_to_int4pack(u8, tiles)
        fwd = lambda x, p, sz: torch.ops.aten._weight_int4pack_mm(x, p, g, sz)  # noqa: E731
    return (packed, sz.to(device)), fwd, w_deq


def make_int4pack_case(x_dtype: torch.dtype, group_size: int, device: torch.device) -> Case:
    name = DTYPE_NAMES[x_dtype]

    def prepare(N, K, dev, gen):
        if dev.type == "cuda" and x_dtype != torch.bfloat16:
            raise SkipCase("tinygemm on CUDA takes bf16 x only")
        g = pick_group_size(K, group_size)
        (packed, sz), fwd, _ = int4pack_weight(N, K, g, x_dtype, dev, gen)
        return Prepared((packed, sz), fwd, f"int4 g{g} (tinygemm)", tensor_bytes(packed, sz),
                        note=_group_note(K, group_size, g))

    op = "aten._weight_int4pack_mm_for_cpu" if device.type == "cpu" else "aten._weight_int4pack_mm"
    return Case(f"int4_{name}", op, x_dtype, "-", True, prepare)


def make_fastadapt_case(fmt: str, x_dtype: torch.dtype, act_quant: str, group_size: int,
                        api_fn: Callable[[], SimpleNamespace]) -> Case:
    def prepare(N, K, dev, gen):
        api = api_fn()
        if fmt in GGUF_BLOCK:
            g = GGUF_BLOCK[fmt]
            if K % g:
                raise SkipCase(f"{fmt} needs K % {g} == 0, K={K}")
            label, note = fmt, ""
        else:
            g = pick_group_size(K, group_size)
            label, note = f"{fmt} g{g}", _group_note(K, group_size, g)
        qdata, scales, zeros = api.random_packed_weight(fmt, N, K, group_size=g, generator=gen)
        w = tuple(t.to(dev) if isinstance(t, torch.Tensor) else t for t in (qdata, scales, zeros))

        def fwd(x, qd, sc, zr):
            return api.qlinear(x, qd, sc, zr, None, fmt, K, g, act_quant=act_quant)

        def ref(x):
            return api.qlinear_reference(x, *w, None, fmt, K, g, act_quant=act_quant)

        return Prepared(w, fwd, label, tensor_bytes(*w), reference=ref, note=note)

    return Case(fmt, "fastadapt.qlinear", x_dtype, act_quant, False, prepare)


def build_cases(args, device: torch.device) -> list[Case]:
    cases: list[Case] = []
    for key in args.baseline_list:
        if key in ("fp32", "bf16"):
            cases.append(make_linear_case(DTYPES[key]))
        elif key == "int8pack":
            cases.append(make_int8pack_case())
        elif key.startswith("int4_"):
            cases.append(make_int4pack_case(DTYPES[key[5:]], args.group_size, device))
    for fmt in args.format_list:
        xds, aqs = DEFAULT_VARIANTS.get(fmt, DEFAULT_VARIANT)
        xds = args.x_dtype_list or xds
        aqs = args.act_quant_list or aqs
        for xd in xds:
            for aq in aqs:
                cases.append(make_fastadapt_case(fmt, DTYPES[xd], aq, args.group_size,
                                                 args.api_fn))
    return cases


# ---- baseline sanity: the packing recipes above must still mean what we think --------------
def verify_baselines(device: torch.device, group_size: int, tol: float = 3e-2) -> dict:
    """Compare int8pack / int4pack against a dequantized fp32 matmul once (N=256, K=512).

    Returns {case key: max rel err}; raises RuntimeError above ``tol`` (a changed packing
    convention would otherwise make every baseline row silently wrong).
    """
    gen = torch.Generator().manual_seed(1)
    N, K, M = 256, 512, 8
    errs = {}

    def rel(y, ref):
        return ((y.float().cpu() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()

    x32 = torch.randn(M, K, generator=gen)
    w8 = torch.randint(-127, 128, (N, K), generator=gen, dtype=torch.int8)
    s8 = (torch.rand(N, generator=gen) * 2e-4 + 1e-4).to(torch.bfloat16)
    xb = x32.to(torch.bfloat16)
    try:
        y = torch.ops.aten._weight_int8pack_mm(xb.to(device), w8.to(device), s8.to(device))
        errs["int8pack"] = rel(y, xb.float() @ (w8.float() * s8.float()[:, None]).t())
    except RuntimeError as e:  # e.g. no kernel on this device
        errs["int8pack"] = f"unavailable: {str(e).splitlines()[0][:120]}"
    g = pick_group_size(K, group_size)
    for xdt in (torch.bfloat16, torch.float32):
        key = f"int4_{DTYPE_NAMES[xdt]}"
        try:
            (p, sz), fwd, w_deq = int4pack_weight(N, K, g, xdt, device, gen)
            x = x32.to(xdt)
            errs[key] = rel(fwd(x.to(device), p, sz), x.float() @ w_deq.t())
        except (RuntimeError, SkipCase) as e:
            errs[key] = f"unavailable: {str(e).splitlines()[0][:120]}"
    bad = {k: v for k, v in errs.items() if isinstance(v, float) and not v <= tol}
    if bad:
        raise RuntimeError(f"torch baseline packing no longer matches its dequantization: {bad}")
    return errs


# ---- argument parsing ----------------------------------------------------------------------
def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"{R.BENCH_ENTRY} {FAMILY}",
        description="Benchmark fastadapt.qlinear against torch matmul baselines.",
    )
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run (< 60 s): shapes {QUICK_SHAPES}, M {QUICK_M}, "
                        f"min-time {QUICK_MIN_TIME_S}s, unless given explicitly")
    p.add_argument("--shapes", default=None,
                   help="comma list of NxK and/or groups: smollm2, llama, all (default all)")
    p.add_argument("--m", default=None, help="comma list of M (default 1,4,16,64,512)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N)")
    p.add_argument("--formats", default=None,
                   help=f"comma list of {','.join(ALL_FORMATS)}; 'default' "
                        f"({','.join(DEFAULT_FORMATS)}), 'all', or 'none' (baselines only)")
    p.add_argument("--x-dtypes", default=None,
                   help="fp32,bf16 for every format (default: int4 both, others fp32)")
    p.add_argument("--act-quant", default=None,
                   help="none,int8 for every format (default: int4 both, others none)")
    p.add_argument("--baselines", default="all",
                   help=f"comma list of {','.join(BASELINES)}, 'all' or 'none'")
    p.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE,
                   help="group size of the int formats and of the torch int4 baseline; halved "
                        "where it does not divide K (noted in the row)")
    p.add_argument("--check", action="store_true",
                   help="compare every fastadapt result against qlinear_reference once per case")
    p.add_argument("--out", default=None,
                   help="results root (default <repo>/bench/results); files go to OUT/<device>/")
    p.add_argument("--tag", default=None,
                   help="file name suffix (default: 'quick' for --quick, 'custom' for a narrowed "
                        "run, none for the full default run)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--min-time", type=float, default=None,
                   help=f"measured seconds per case (default {DEFAULT_MIN_TIME_S})")
    p.add_argument("--max-call-s", type=float, default=DEFAULT_MAX_CALL_S,
                   help="skip an M whose call is predicted (linearly from the previous M) to "
                        "take longer than this many seconds")
    p.add_argument("--rotation-mib", type=float, default=DEFAULT_ROTATION_MIB,
                   help="weight copies per op span at least this many MiB (> LLC)")
    p.add_argument("--bw-mib", type=float, default=DEFAULT_BW_MIB,
                   help="size of the read-bandwidth probe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-write", action="store_true", help="print only, write no files")
    p.add_argument("--quiet", action="store_true", help="no per-case progress on stderr")
    return p


def _split(s: str) -> list[str]:
    return [t.strip() for t in s.split(",") if t.strip()]


def parse_shapes(spec: str) -> list[tuple[int, int, str]]:
    known = {(n, k): lay for n, k, lay in SHAPE_GROUPS["all"]}
    out: list[tuple[int, int, str]] = []
    for tok in _split(spec):
        if tok.lower() in SHAPE_GROUPS:
            items = SHAPE_GROUPS[tok.lower()]
        else:
            try:
                n, k = (int(v) for v in tok.lower().split("x"))
            except ValueError:
                raise SystemExit(f"qlinear bench: bad shape {tok!r} (want NxK, e.g. 576x576)")
            items = [(n, k, known.get((n, k), "custom"))]
        out += [s for s in items if s[:2] not in [o[:2] for o in out]]
    return out


def normalize_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill defaults (--quick), parse the comma lists; records which options were narrowed."""
    narrowed = any(v is not None for v in (args.shapes, args.m, args.formats, args.x_dtypes,
                                           args.act_quant)) or args.baselines != "all"
    if args.quick:
        args.shapes = args.shapes or QUICK_SHAPES
        args.m = args.m or QUICK_M
        args.formats = args.formats or ",".join(QUICK_FORMATS)
        args.min_time = QUICK_MIN_TIME_S if args.min_time is None else args.min_time
    args.shape_list = parse_shapes(args.shapes or "all")
    try:
        args.m_list = sorted({int(v) for v in _split(args.m)}) if args.m else list(DEFAULT_M)
    except ValueError:
        raise SystemExit(f"qlinear bench: bad --m {args.m!r} (want e.g. 1,4,16)")
    fmts = _split((args.formats or "default").lower())
    if fmts == ["none"]:
        args.format_list = []
    elif fmts == ["default"]:
        args.format_list = list(DEFAULT_FORMATS)
    elif fmts == ["all"]:
        args.format_list = list(ALL_FORMATS)
    else:
        bad = [f for f in fmts if f not in ALL_FORMATS]
        if bad:
            raise SystemExit(f"qlinear bench: unknown format(s) {bad}; known: {ALL_FORMATS}")
        args.format_list = fmts
    bl = _split(args.baselines.lower())
    args.baseline_list = (list(BASELINES) if bl == ["all"] else [] if bl == ["none"] else bl)
    bad = [b for b in args.baseline_list if b not in BASELINES]
    if bad:
        raise SystemExit(f"qlinear bench: unknown baseline(s) {bad}; known: {BASELINES}")
    args.x_dtype_list = _split(args.x_dtypes) if args.x_dtypes else None
    if args.x_dtype_list and any(d not in DTYPES for d in args.x_dtype_list):
        raise SystemExit(f"qlinear bench: --x-dtypes takes {list(DTYPES)}")
    args.act_quant_list = _split(args.act_quant) if args.act_quant else None
    if args.min_time is None:
        args.min_time = DEFAULT_MIN_TIME_S
    if args.tag is None:
        args.tag = "quick" if args.quick else ("custom" if narrowed else "")
    if not hasattr(args, "api_fn"):
        args.api_fn = fastadapt_api
    return args


def row_command(args, N: int, K: int, M: int, case: Case) -> str:
    """The command line that reproduces one row, with the two baselines its ratios refer to."""
    parts = ["--shapes", f"{N}x{K}", "--m", str(M), "--threads", str(torch.get_num_threads())]
    baselines = list(dict.fromkeys(([case.key] if case.baseline else []) + list(RATIO_BASELINES)))
    if case.baseline:
        parts += ["--formats", "none"]
    else:
        parts += ["--formats", case.key, "--x-dtypes", DTYPE_NAMES[case.x_dtype],
                  "--act-quant", case.act_quant]
    parts += ["--baselines", ",".join(baselines)]
    if args.group_size != DEFAULT_GROUP_SIZE:
        parts += ["--group-size", str(args.group_size)]
    if args.device != "cpu":
        parts += ["--device", args.device]
    if args.min_time != DEFAULT_MIN_TIME_S:
        parts += ["--min-time", f"{args.min_time:g}"]
    if args.rotation_mib != DEFAULT_ROTATION_MIB:
        parts += ["--rotation-mib", f"{args.rotation_mib:g}"]
    return R.command_line(FAMILY, parts)


# ---- the run -------------------------------------------------------------------------------
STDOUT_COLUMNS = [
    ("op", "op"), ("weights", "weights"), ("x_dtype", "x"), ("act_quant", "aq"), ("M", "M"),
    ("median_us", "median us"), ("p10_us", "p10"), ("p90_us", "p90"),
    ("speedup_vs_fp32", "x fp32"), ("speedup_vs_int4_bf16", "x int4bf16"),
    ("gbps", "GB/s"), ("pct_read_bw", "%BW"), ("gflops", "GFLOP/s"),
    ("max_rel_err", "rel err"), ("note", "note"),
]


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.detach().float().cpu(), ref.detach().float().cpu()
    if y.shape != ref.shape:
        raise RuntimeError(f"check: output shape {tuple(y.shape)} != reference {tuple(ref.shape)}")
    return ((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:200] if msg else ''}"


def _log(args, msg: str) -> None:
    if not args.quiet:
        print(msg, file=sys.stderr, flush=True)


def bench_shape(args, N: int, K: int, layer: str, cases: list[Case], device: torch.device,
                bw_gbps: float) -> list[dict]:
    rows: list[dict] = []
    rot_bytes = int(args.rotation_mib * MiB)
    for ci, case in enumerate(cases):
        base = dict(layer=layer, shape=f"{N}x{K}", N=N, K=K, op=case.op,
                    x_dtype=DTYPE_NAMES[case.x_dtype], act_quant=case.act_quant,
                    _case=ci, _key=case.key, _baseline=case.baseline)
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + N * 7919 + K)
        prep = None
        try:
            prep = case.prepare(N, K, device, gen)
            copies = rotating_copies(prep.make_copy, prep.weight_bytes, rot_bytes)
        except SkipCase as e:
            err_note = f"skipped: {e}"
        except Exception as e:  # noqa: BLE001  one broken case must not end the run
            err_note = f"error preparing: {_first_line(e)}"
        else:
            err_note = ""
        if err_note:
            for M in args.m_list:
                rows.append(dict(base, M=M, weights=case.key, note=err_note,
                                 command=row_command(args, N, K, M, case)))
            _log(args, f"  {N}x{K} {case.label}: {err_note}")
            continue

        prev: tuple[int, float] | None = None
        for M in args.m_list:
            row = dict(base, M=M, weights=prep.weights_label, weight_bytes=prep.weight_bytes,
                       copies=copies.n, command=row_command(args, N, K, M, case))
            notes = [n for n in (prep.note, copies.note) if n]
            if prev is not None:
                predicted_s = prev[1] * 1e-6 * M / prev[0]
                if predicted_s > args.max_call_s:
                    notes.append(f"skipped: predicted {predicted_s:.1f} s/call > --max-call-s")
                    row["note"] = "; ".join(notes)
                    rows.append(row)
                    _log(args, f"  {N}x{K} M={M} {case.label}: {row['note']}")
                    continue
            gx = torch.Generator().manual_seed(args.seed + M)
            x = torch.randn(M, K, generator=gx).to(device=device, dtype=case.x_dtype)  # [M, K]
            try:
                if args.check and prep.reference is not None:
                    y = prep.forward(x, *copies[0])
                    row["max_rel_err"] = _rel_err(y, prep.reference(x))
                    del y
                t = time_fn(lambda *w: prep.forward(x, *w), copies.copies, device=device,
                            min_time_s=args.min_time)
            except Exception as e:  # noqa: BLE001
                notes.append(f"error: {_first_line(e)}")
                row["note"] = "; ".join(notes)
                rows.append(row)
                _log(args, f"  {N}x{K} M={M} {case.label}: {row['note']}")
                continue
            prev = (M, t.median_us)
            sec = t.median_us * 1e-6
            gbps = prep.weight_bytes / sec / 1e9
            row.update(median_us=t.median_us, p10_us=t.p10_us, p90_us=t.p90_us, reps=t.reps,
                       gbps=gbps, pct_read_bw=100.0 * gbps / bw_gbps if bw_gbps else None,
                       gflops=2.0 * M * N * K / sec / 1e9, note="; ".join(notes))
            rows.append(row)
            err = f" err {row['max_rel_err']:.2e}" if "max_rel_err" in row else ""
            _log(args, f"  {N}x{K} M={M} {case.label}: {t.median_us:.1f} us, {gbps:.1f} GB/s"
                       f" ({copies.n} copies){err}")
        copies = prep = None  # release this case's weight copies before the next one
        gc.collect()

    # ratios against the baselines measured in this run, same shape and M
    ref_t = {(r["_key"], r["M"]): r.get("median_us") for r in rows if r["_baseline"]}
    for r in rows:
        t = r.get("median_us")
        for key, col in (("fp32", "speedup_vs_fp32"), ("int4_bf16", "speedup_vs_int4_bf16")):
            b = ref_t.get((key, r["M"]))
            r[col] = b / t if (t and b) else None
    rows.sort(key=lambda r: (r["M"], r["_case"]))
    return rows


def run(args: argparse.Namespace) -> dict:
    """Run the qlinear bench; returns {'rows', 'json', 'md', 'read_bandwidth_gbps'}."""
    args = normalize_args(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("qlinear bench: --device cuda but torch.cuda.is_available() is False")
    if args.format_list:
        try:
            args.api_fn()
        except (ImportError, AttributeError) as e:
            raise SystemExit(
                f"qlinear bench: fastadapt_ops ops are not importable ({_first_line(e)}); build "
                "the extension (pip install --no-build-isolation -e .) or pass --formats none "
                "to time the baselines alone") from e

    full_cmd = R.command_line(FAMILY, getattr(args, "argv", None) or [])
    env = R.environment(device)
    notes = []
    if env.get("loadavg") and env["loadavg"][0] > (env.get("cpu_count") or 1) - 0.5:
        notes.append(f"machine busy at start (load {env['loadavg'][0]} on {env['cpu_count']} "
                     "cores): timings are noisy")
        print(f"warning: {notes[-1]}", file=sys.stderr, flush=True)
    verify = verify_baselines(device, args.group_size) if args.baseline_list else {}
    bw = measure_read_bandwidth(device, nbytes=int(args.bw_mib * MiB))
    threads = torch.get_num_threads()
    dev_str = R.device_string(device)
    print(f"qlinear bench on {dev_str}: {threads} threads, torch {torch.__version__}, "
          f"read bandwidth {bw:.1f} GB/s (torch.sum over {args.bw_mib:g} MiB), weights rotated "
          f"over >= {args.rotation_mib:g} MiB of copies", flush=True)
    if verify:
        print("baseline packing check (max rel err vs dequantized matmul): "
              + ", ".join(f"{k} {v:.1e}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in verify.items()), flush=True)
    if any(K % args.group_size for _, K, _ in args.shape_list):
        notes.append(f"g{args.group_size} does not divide every K (e.g. K=576): those shapes use "
                     "the largest halving that does, for our int formats and torch int4 alike")

    cases = build_cases(args, device)
    all_rows: list[dict] = []
    for N, K, layer in args.shape_list:
        rows = bench_shape(args, N, K, layer, cases, device, bw)
        print(f"\n[{N}x{K}] {layer}", flush=True)
        print(R.text_table(rows, STDOUT_COLUMNS), flush=True)
        all_rows += rows

    out_rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in all_rows]
    meta = dict(env, loadavg_end=R.load_average(), command=full_cmd,
                read_bandwidth_gbps=round(bw, 2),
                read_bandwidth_probe=f"median of 7 torch.sum over {args.bw_mib:g} MiB fp32",
                rotation_bytes=int(args.rotation_mib * MiB), min_time_s=args.min_time,
                baseline_check=verify, notes=notes)
    paths = (None, None)
    if not args.no_write:
        paths = R.write_results(FAMILY, out_rows, COLUMNS, out_root=args.out, device=device,
                                tag=args.tag, meta=meta, column_doc=COLUMN_DOC)
        print(f"\nwrote {paths[0]}\n      {paths[1]}", flush=True)
    return {"rows": out_rows, "json": paths[0], "md": paths[1], "read_bandwidth_gbps": bw}


if __name__ == "__main__":
    from . import main

    sys.exit(main([FAMILY, *sys.argv[1:]]))
