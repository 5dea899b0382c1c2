"""A quantized runner checkpoint: what ``fastadapt quantize`` writes and ``load(DIR)`` reads.

    save_checkpoint(model, out_dir, extra=None)      a LlamaModel -> DIR
    load_checkpoint(out_dir, max_ctx=None) -> LlamaModel
    is_checkpoint(path) -> bool

Layout of ``DIR`` (format ``fastadapt-quantized-llama``, version 1):

``fastadapt_quant.json``
    ``format``, ``version``; ``config``: every :class:`ModelConfig` field (chat template included);
    ``qk_permuted``: always false (q/k rows are stored in rotate-half order, as the runner holds
    them); ``quantization``: how the weights were made (method, bits, group size, calibration...);
    ``tensors``: ``name -> {"kind": "quantized", "fmt", "shape": [N, K], "group_size",
    "symmetric"}`` or ``{"kind": "float", "shape"}``; ``tokenizer``: null or ``{"file":
    "tokenizer.json", "bos_token_id", "eos_token_id", "add_bos", "special_ids"}``.
``weights.safetensors``
    Standard safetensors (any safetensors reader opens it). A quantized tensor ``name`` is stored
    as ``name.qdata`` (U8 ``[N, row_bytes]``, the packed layout of ``fastadapt::qlinear``:
    ``csrc/cpu/kernels/qformat.h``; GGUF formats as raw llama.cpp blocks), ``name.scales``
    (F16/BF16/F32 ``[N, K / group_size]``; absent for GGUF) and ``name.zeros`` (U8, absent when
    symmetric or GGUF). A float tensor ``name`` is stored as F32.
``tokenizer.json``
    The HF ``tokenizers`` serialisation of the BPE tokenizer (absent when the model has none).

Tensor names are the runner's GGUF-style names (``blk.{i}.attn_q.weight``, ``token_embd.weight``,
...); the fused q/k/v and gate/up rows are split back into their parts.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..quant import QuantizedWeight
from .config import ModelConfig

__all__ = ["save_checkpoint", "load_checkpoint", "is_checkpoint", "CONFIG_FILE", "WEIGHTS_FILE", "FORMAT"]

FORMAT = "fastadapt-quantized-llama"
VERSION = 1
CONFIG_FILE = "fastadapt_quant.json"
WEIGHTS_FILE = "weights.safetensors"
TOKENIZER_FILE = "tokenizer.json"
_P = "fastadapt_ops.models: "

_ST = {torch.uint8: "U8", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_ST_BACK = {v: k for k, v in _ST.items()}


# ---- safetensors (written and read here: the runtime does not depend on the package) ----------
def _write_safetensors(path: str, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str]) -> None:
    header: Dict[str, Any] = {"__metadata__": metadata}
    blobs: List[bytes] = []
    off = 0
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        if t.dtype not in _ST:
            raise ValueError(f"{_P}cannot store tensor {name!r} of dtype {t.dtype}")
        b = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _ST[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * (-len(h) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for b in blobs:
            f.write(b)


def _read_safetensors(path: str) -> Dict[str, torch.Tensor]:
    data = np.fromfile(path, dtype=np.uint8)
    if data.size < 8:
        raise ValueError(f"{_P}{path} is not a safetensors file")
    n = int.from_bytes(data[:8].tobytes(), "little")
    if 8 + n > data.size:
        raise ValueError(f"{_P}{path} is truncated (header length {n})")
    header = json.loads(data[8:8 + n].tobytes().decode("utf-8"))
    header.pop("__metadata__", None)
    base = 8 + n
    out = {}
    for name, info in header.items():
        dt = _ST_BACK.get(info.get("dtype"))
        if dt is None:
            raise ValueError(f"{_P}{path}: tensor {name!r} has unsupported dtype {info.get('dtype')}")
        b, e = info["data_offsets"]
        if base + e > data.size:
            raise ValueError(f"{_P}{path} is truncated (tensor {name!r})")
        raw = torch.from_numpy(data[base + b:base + e].copy())
        out[name] = raw.view(dt).reshape(info["shape"])
    return out


# ---- model <-> named tensors -----------------------------------------------------------------
def _rows(w, sizes: List[int]) -> List[Any]:
    """Split a (fused) weight into row blocks of ``sizes``; a list of parts is already split."""
    if isinstance(w, list):
        if [p.shape[0] for p in w] != sizes:
            raise ValueError(f"{_P}unexpected fused parts {[p.shape[0] for p in w]} (expected {sizes})")
        return list(w)
    out, r0 = [], 0
    for n in sizes:
        if isinstance(w, QuantizedWeight):
            pick = lambda t: None if t is None else t[r0:r0 + n].contiguous()  # noqa: E731
            out.append(QuantizedWeight(pick(w.qdata), pick(w.scales), pick(w.zeros), w.fmt, (n, w.in_features),
                                       w.group_size))
        else:
            out.append(w[r0:r0 + n].contiguous())
        r0 += n
    return out


def _named_tensors(model) -> Dict[str, Any]:
    c = model.config
    nq, nk = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    t: Dict[str, Any] = {}
    for i, L in enumerate(model.layers):
        p = f"blk.{i}."
        t[p + "attn_norm.weight"] = L.attn_norm
        t[p + "ffn_norm.weight"] = L.ffn_norm
        for nm, w in zip(("attn_q", "attn_k", "attn_v"), _rows(L.wqkv, [nq, nk, nk])):
            t[p + nm + ".weight"] = w
        if L.bqkv is not None:
            for nm, b in zip(("attn_q", "attn_k", "attn_v"), L.bqkv.split([nq, nk, nk])):
                t[p + nm + ".bias"] = b
        t[p + "attn_output.weight"] = L.wo
        if L.bo is not None:
            t[p + "attn_output.bias"] = L.bo
        for nm, w in zip(("ffn_gate", "ffn_up"), _rows(L.wgu, [c.ffn, c.ffn])):
            t[p + nm + ".weight"] = w
        t[p + "ffn_down.weight"] = L.wdown
    t["output_norm.weight"] = model.out_norm
    t["token_embd.weight"] = model.embed
    if model.lm_head is not model.embed:
        t["output.weight"] = model.lm_head
    return t


def is_checkpoint(path) -> bool:
    """True for a directory holding a ``fastadapt_quant.json``."""
    return os.path.isdir(os.fspath(path)) and os.path.isfile(os.path.join(os.fspath(path), CONFIG_FILE))


def save_checkpoint(model, out_dir, extra: Optional[Dict[str, Any]] = None) -> Tuple[str, ...]:
    """Write ``model`` (a LlamaModel) to ``out_dir`` (created if needed); returns the file paths.

    ``extra`` is merged into the ``quantization`` entry (the model's ``quant_info`` when it has one)."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    named = _named_tensors(model)
    store: Dict[str, torch.Tensor] = {}
    desc: Dict[str, Any] = {}
    for name, w in named.items():
        if isinstance(w, QuantizedWeight):
            desc[name] = {"kind": "quantized", "fmt": w.fmt, "shape": list(w.shape), "group_size": int(w.group_size),
                          "symmetric": bool(w.symmetric)}
            store[name + ".qdata"] = w.qdata
            if w.scales is not None:
                store[name + ".scales"] = w.scales
            if w.zeros is not None:
                store[name + ".zeros"] = w.zeros
        else:
            desc[name] = {"kind": "float", "shape": list(w.shape)}
            store[name] = w.to(torch.float32)
    tok = model.tokenizer
    tok_desc = None
    files = [os.path.join(out_dir, CONFIG_FILE), os.path.join(out_dir, WEIGHTS_FILE)]
    if tok is not None:
        with open(os.path.join(out_dir, TOKENIZER_FILE), "w", encoding="utf-8") as f:
            f.write(tok.backend.to_str())
        files.append(os.path.join(out_dir, TOKENIZER_FILE))
        tok_desc = {"file": TOKENIZER_FILE, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                    "add_bos": tok.add_bos, "special_ids": sorted(tok.special_ids)}
    quant = dict(getattr(model, "quant_info", None) or {})
    quant.pop("layer_seconds", None)
    quant.update(extra or {})
    cfg = {"format": FORMAT, "version": VERSION, "config": dataclasses.asdict(model.config), "qk_permuted": False,
           "quantization": quant, "tensors": desc, "tokenizer": tok_desc}
    _write_safetensors(files[1], store, {"format": "pt", "fastadapt": FORMAT})
    with open(files[0], "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=1, default=str)
    return tuple(files)


def load_checkpoint(path, max_ctx: Optional[int] = None, dtype: torch.dtype = torch.float32):
    """A directory written by :func:`save_checkpoint` as a :class:`LlamaModel`."""
    from .llama import LlamaModel

    path = os.fspath(path)
    with open(os.path.join(path, CONFIG_FILE), encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{_P}{path}/{CONFIG_FILE} is not a {FORMAT} checkpoint (format {meta.get('format')!r})")
    if int(meta.get("version", 0)) > VERSION:
        raise ValueError(f"{_P}{path} has checkpoint version {meta.get('version')}; this build reads <= {VERSION}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = ModelConfig(**{k: v for k, v in meta["config"].items() if k in fields})
    raw = _read_safetensors(os.path.join(path, WEIGHTS_FILE))
    tensors: Dict[str, Any] = {}
    for name, d in meta["tensors"].items():
        try:
            if d["kind"] == "quantized":
                tensors[name] = QuantizedWeight(raw[name + ".qdata"], raw.get(name + ".scales"),
                                                raw.get(name + ".zeros"), d["fmt"], tuple(d["shape"]),
                                                int(d["group_size"]))
            else:
                tensors[name] = raw[name]
        except KeyError as e:
            raise ValueError(f"{_P}{path}/{WEIGHTS_FILE} lacks tensor {e.args[0]!r}") from None
    tok = None
    td = meta.get("tokenizer")
    if td:
        from tokenizers import Tokenizer as HFTokenizer

        from .tokenizer import Tokenizer

        tok = Tokenizer(HFTokenizer.from_file(os.path.join(path, td["file"])), bos_token_id=td.get("bos_token_id"),
                        eos_token_id=td.get("eos_token_id"), add_bos=bool(td.get("add_bos")),
                        chat_template=cfg.chat_template, special_ids=td.get("special_ids") or ())
    ctx = int(max_ctx or min(cfg.context_length, 4096))
    model = LlamaModel(cfg, tensors, tokenizer=tok, max_ctx=ctx, dtype=dtype, qk_permuted=bool(meta.get("qk_permuted")))
    model.path = path
    model.quant_info = meta.get("quantization") or {}
    return model
