"""Re-quantize a :class:`LlamaModel`'s block matrices: RTN, or GPTQ calibrated through the runner.

    quantize_runner(model, bits=4, method="gptq", calib_ids=..., group_size=64, ...) -> dict
    calibration_ids(tokenizer, n_samples=32, seq_len=256, text=None) -> LongTensor [n, T]
    default_calibration_text() -> str      docstrings of Python standard-library modules

The four matrices of each block (fused ``wqkv``, ``wo``, fused ``wgu``, ``wdown``) are
dequantized from their stored format (GGUF Q4_1 / Q8_0, or float) and quantized again into an
int format of ``fastadapt::qlinear`` (int2/int3/int4/int8, or ternary). Embeddings, norms and the
LM head stay as stored.

GPTQ runs layer by layer, as in the paper: the calibration sequences are embedded once, then for
each block its float matrices record the Hessians of their inputs (one pass of
``model.layer(...)`` over the calibration batch), are quantized, and the block is run again with
the quantized matrices to produce the next block's inputs, so every layer is calibrated on the
activations of the already-quantized layers before it. Fused rows (q/k/v, gate/up) share one
Hessian: GPTQ treats rows independently, so fused or split gives the same result.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch

from ..quant import QuantizedWeight, quantize_weight
from ..quant.gptq import HessianAccumulator, gptq_quantize, rtn_quantize

__all__ = ["quantize_runner", "calibration_ids", "default_calibration_text", "MATRICES", "METHODS",
           "CALIB_MODULES"]

MATRICES = ("wqkv", "wo", "wgu", "wdown")
METHODS = ("rtn", "gptq")
#: standard-library modules whose docstrings make the default calibration text (English prose
#: about programming; held out from the bench's evaluation text, pydoc_data's language reference)
CALIB_MODULES = ("argparse", "collections", "textwrap", "json", "logging", "pathlib", "subprocess", "typing",
                 "dataclasses", "functools", "itertools", "threading", "unittest", "email", "http.client",
                 "urllib.parse", "zipfile", "tarfile", "shutil", "random", "statistics", "decimal",
                 "fractions", "datetime", "calendar", "csv", "sqlite3", "asyncio", "contextlib", "inspect")

_P = "quantize_runner: "


def default_calibration_text(modules: Sequence[str] = CALIB_MODULES) -> str:
    """The module, class and function docstrings of ``modules`` (no network, always present)."""
    import importlib
    import inspect
    import warnings

    parts: List[str] = []
    seen = set()

    def add(doc):
        doc = inspect.cleandoc(doc) if isinstance(doc, str) else ""
        if len(doc) > 80 and doc not in seen:
            seen.add(doc)
            parts.append(doc)

    with warnings.catch_warnings():  # deprecated attributes (typing.re...) warn when read
        warnings.simplefilter("ignore")
        for name in modules:
            try:
                mod = importlib.import_module(name)
            except ImportError:
                continue
            add(mod.__doc__)
            for attr, obj in sorted(vars(mod).items()):
                if getattr(obj, "__module__", None) != mod.__name__:
                    continue
                if inspect.isclass(obj) or inspect.isfunction(obj):
                    add(obj.__doc__)
                    if inspect.isclass(obj):
                        for m in sorted(vars(obj)):
                            f = vars(obj)[m]
                            if inspect.isfunction(f):
                                add(f.__doc__)
    return "\n\n".join(parts)


def calibration_ids(tokenizer, n_samples: int = 32, seq_len: int = 256, text: Optional[str] = None,
                    seed: int = 0) -> torch.Tensor:
    """``[n_samples, seq_len]`` token ids: windows at seeded random offsets of ``text``
    (default :func:`default_calibration_text`)."""
    ids = tokenizer.encode(text if text is not None else default_calibration_text())
    if len(ids) < seq_len + 1:
        raise ValueError(f"calibration_ids: the text has {len(ids)} tokens, need more than seq_len={seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len, (n_samples,), generator=g)
    t = torch.tensor(ids, dtype=torch.long)
    return torch.stack([t[s:s + seq_len] for s in starts.tolist()])


def _dense(w) -> torch.Tensor:
    """A block matrix as float32 ``[N, K]`` (stored formats dequantized; row lists joined)."""
    if isinstance(w, QuantizedWeight):
        return w.dequantize(torch.float32)
    if isinstance(w, list):
        return torch.cat([_dense(p) for p in w], 0)
    return w.to(torch.float32)


def _check_args(bits, method, group_size, ternary):
    if method not in METHODS:
        raise ValueError(f"{_P}method must be one of {', '.join(METHODS)}; got {method!r}")
    if not ternary and (isinstance(bits, bool) or bits not in (2, 3, 4, 8)):
        raise ValueError(f"{_P}bits must be 2, 3, 4 or 8; got {bits!r}")
    if group_size is not None and group_size != -1 and (
            isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0 or group_size % 32):
        raise ValueError(f"{_P}group_size must be a positive multiple of 32, or -1 (per channel); got {group_size!r}")


def _quantize_rtn(w: torch.Tensor, bits, group_size, symmetric, ternary, scale_dtype) -> QuantizedWeight:
    if ternary:
        return rtn_quantize(w, group_size=group_size, ternary=True, scale_dtype=scale_dtype)
    return quantize_weight(w, bits=bits, group_size=group_size, symmetric=symmetric, scale_dtype=scale_dtype)


def _run_layer(model, li: int, x: torch.Tensor, delta, positions: torch.Tensor, B: int):
    """One block on ``B`` fresh cache sequences (freed after), so passes never see each other."""
    kv = model.kv
    seqs = [kv.add_sequence() for _ in range(B)]
    try:
        return model.layer(li, x, delta, positions, seqs)
    finally:
        for s in seqs:
            kv.free_sequence(s)


@torch.no_grad()
def quantize_runner(
    model,
    bits: int = 4,
    method: str = "gptq",
    calib_ids: Optional[Union[torch.Tensor, Sequence[Sequence[int]]]] = None,
    group_size: Optional[int] = 64,
    *,
    symmetric: bool = False,
    ternary: bool = False,
    act_order: bool = False,
    percdamp: float = 0.01,
    block_size: int = 128,
    clip_search: bool = False,
    true_sequential: bool = False,
    scale_dtype: torch.dtype = torch.float16,
    batch: int = 8,
    layers: Optional[Sequence[int]] = None,
    progress: Optional[Callable[[int, int, str], None]] = None,
) -> Dict:
    """Re-quantize the block matrices of ``model`` (a LlamaModel) in place; returns an info dict.

    bits: 2, 3, 4, 8 (``ternary=True``: int2 codes {0,1,2} with zeros 1). method: ``"rtn"`` or
    ``"gptq"``. calib_ids: ``[n, T]`` token ids (GPTQ; see :func:`calibration_ids`).
    group_size: values per scale (a multiple of 32 dividing hidden and ffn; -1 per channel).
    act_order / percdamp / block_size / clip_search: GPTQ options (see ``gptq_quantize``).
    true_sequential: calibrate wqkv, wo, wgu, wdown one after the other inside each block (four
    passes instead of one; each sees the block's already-quantized matrices before it).
    batch: calibration sequences per ``model.layer`` call. layers: block indices to quantize
    (default all; the others keep their weights but still pass the activations on).
    progress(i, n, msg) is called after each layer. The model's KV cache is reset.
    """
    _check_args(bits, method, group_size, ternary)
    c = model.config
    todo = set(range(c.n_layers) if layers is None else (int(i) for i in layers))
    opts = dict(symmetric=symmetric, ternary=ternary, scale_dtype=scale_dtype)
    info = {"method": method, "bits": "ternary" if ternary else int(bits), "group_size": group_size,
            "symmetric": symmetric, "act_order": act_order, "layer_seconds": []}
    t_all = time.perf_counter()
    if method == "rtn":
        for li in range(c.n_layers):
            t0 = time.perf_counter()
            L = model.layers[li]
            if li in todo:
                for n in MATRICES:
                    setattr(L, n, _quantize_rtn(_dense(getattr(L, n)), bits, group_size, symmetric, ternary,
                                                scale_dtype))
            info["layer_seconds"].append(time.perf_counter() - t0)
            if progress is not None:
                progress(li + 1, c.n_layers, f"layer {li}")
        info["seconds"] = time.perf_counter() - t_all
        model.quant_info = info
        return info

    if calib_ids is None:
        raise ValueError(f"{_P}method='gptq' needs calib_ids (e.g. calibration_ids(model.tokenizer))")
    ids = torch.as_tensor(calib_ids, dtype=torch.long)
    if ids.dim() != 2 or ids.numel() == 0:
        raise ValueError(f"{_P}calib_ids must be [n_samples, seq_len] token ids; got shape {list(ids.shape)}")
    n, T = ids.shape
    if int(ids.min()) < 0 or int(ids.max()) >= c.vocab:
        raise ValueError(f"{_P}calib_ids must be in [0, {c.vocab})")
    if T > model.max_ctx:
        raise ValueError(f"{_P}calibration seq_len {T} exceeds the model's max_ctx {model.max_ctx}")
    B = max(1, min(int(batch), n))
    # a cache just big enough for one calibration batch (restored afterwards)
    saved = (model.max_ctx, model.page_size, model.max_batch, model.kv_policy)
    model.max_ctx = T
    model.configure_kv(None, page_size=saved[1], max_batch=B)
    positions = torch.arange(T).repeat(B)
    try:
        chunks = [ids[i:i + B] for i in range(0, n, B)]
        states = [(model._embed(ch.reshape(-1)), None) for ch in chunks]  # per chunk: (x, delta)
        pos = [positions[:ch.numel()] for ch in chunks]
        last = max(todo, default=-1)  # later blocks need no inputs
        for li in range(last + 1):
            t0 = time.perf_counter()
            L = model.layers[li]
            if li in todo:
                dense = {nm: _dense(getattr(L, nm)) for nm in MATRICES}
                for nm in MATRICES:
                    setattr(L, nm, dense[nm])
                # one calibration pass for the four matrices, or (true_sequential) one per matrix, each
                # seeing the outputs of the ones quantized before it in the block
                stages = [[nm] for nm in MATRICES] if true_sequential else [list(MATRICES)]
                for stage in stages:
                    acc = {nm: HessianAccumulator(dense[nm].shape[1]) for nm in stage}
                    by_id = {id(dense[nm]): acc[nm] for nm in stage}
                    orig_mm = model._mm

                    def recording_mm(x, w, bias=None, _orig=orig_mm, _by_id=by_id):
                        a = _by_id.get(id(w))
                        if a is not None:
                            a.add(x)
                        return _orig(x, w, bias)

                    model._mm = recording_mm  # instance attribute shadows the method for this pass
                    try:
                        for (x, d), ch, p in zip(states, chunks, pos):
                            _run_layer(model, li, x.clone(), d, p, ch.shape[0])  # layer() adds d into x in place
                    finally:
                        del model._mm
                    for nm in stage:
                        qw = gptq_quantize(dense[nm], acc[nm].hessian(), bits, group_size, act_order=act_order,
                                           percdamp=percdamp, block_size=block_size, clip_search=clip_search,
                                           **opts)
                        setattr(L, nm, qw)
                del dense
            if li < last:
                states = [_run_layer(model, li, x, d, p, ch.shape[0]) for (x, d), ch, p in zip(states, chunks, pos)]
            info["layer_seconds"].append(time.perf_counter() - t0)
            if progress is not None:
                progress(li + 1, c.n_layers, f"layer {li}")
    finally:
        model.max_ctx = saved[0]
        model.configure_kv(None, page_size=saved[1], max_batch=saved[2])
        model.kv_policy = saved[3]
    info.update(calib_samples=int(n), calib_seq_len=int(T), percdamp=percdamp, clip_search=clip_search,
                true_sequential=true_sequential,
                seconds=time.perf_counter() - t_all)
    model.quant_info = info
    return info
