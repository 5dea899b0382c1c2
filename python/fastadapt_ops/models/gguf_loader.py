"""Read a GGUF file: metadata as python values, tensors as QuantizedWeight or torch tensors.

A small parser of the format (``gguf.GGUFReader`` takes seconds on a 49k-token vocabulary);
the ``gguf`` package supplies the type names and block sizes.

Quantized tensors stay in their stored format (raw GGUF blocks, run through ``fastadapt::qlinear``);
F32 / F16 / BF16 tensors become torch tensors (2-D ones are used as dense weights).
"""

from __future__ import annotations

import os
import struct
from typing import Any, Dict, Union

import numpy as np
import torch

from ..ops import qformats as qf
from ..quant import QuantizedWeight

__all__ = ["GGUFContents", "read_gguf", "read_metadata"]

_FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

Tensor = Union[torch.Tensor, QuantizedWeight]


class GGUFContents:
    """``metadata`` (dict) and ``tensors`` (name -> QuantizedWeight | torch.Tensor)."""

    def __init__(self, path: str, metadata: Dict[str, Any], tensors: Dict[str, Tensor]):
        self.path = path
        self.metadata = metadata
        self.tensors = tensors


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
            12: "<d"}
_NP = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
       7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}


class _Cursor:
    def __init__(self, buf: memoryview):
        self.buf = buf
        self.pos = 0

    def unpack(self, fmt: str):
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.unpack("<Q")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9:
            etype = self.unpack("<I")
            n = self.unpack("<Q")
            if etype in _NP:  # numeric arrays in one read
                arr = np.frombuffer(self.buf, dtype=_NP[etype], count=n, offset=self.pos)
                self.pos += arr.nbytes
                return arr.tolist()
            return [self.value(etype) for _ in range(n)]
        raise ValueError(f"fastadapt_ops.models: unknown GGUF metadata value type {vtype}")


def _parse(path: str):
    """(metadata, [(name, shape_in_gguf_order, ggml_type, offset)], data_start, file bytes)."""
    data = np.fromfile(path, dtype=np.uint8)
    cur = _Cursor(memoryview(data))
    if bytes(data[:4]) != b"GGUF":
        raise ValueError(f"fastadapt_ops.models: {path} is not a GGUF file")
    cur.pos = 4
    version = cur.unpack("<I")
    if version < 2:
        raise ValueError(f"fastadapt_ops.models: GGUF version {version} is not supported (need >= 2)")
    n_tensors = cur.unpack("<Q")
    n_kv = cur.unpack("<Q")
    meta: Dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        meta[key] = cur.value(cur.unpack("<I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        nd = cur.unpack("<I")
        dims = [cur.unpack("<Q") for _ in range(nd)]
        ttype = cur.unpack("<I")
        off = cur.unpack("<Q")
        infos.append((name, dims, ttype, off))
    align = int(meta.get("general.alignment", 32))
    start = (cur.pos + align - 1) // align * align
    return meta, infos, start, data


def _convert(name: str, dims, ttype: int, raw: np.ndarray) -> Tensor:
    from gguf import GGMLQuantizationType

    try:
        tname = GGMLQuantizationType(ttype).name
    except ValueError:
        tname = f"type {ttype}"
    shape = tuple(int(s) for s in reversed(dims))  # torch order: (rows, cols)
    if tname in _FLOAT_TYPES:
        dt = {"F32": np.float32, "F16": np.float16, "BF16": np.int16}[tname]
        arr = raw.view(dt)
        ten = torch.from_numpy(arr.copy())
        if tname == "BF16":
            ten = ten.view(torch.bfloat16)
        return ten.reshape(shape).to(torch.float32)
    if tname.lower() in qf.GGUF_FORMATS:
        if len(shape) != 2:
            raise ValueError(f"fastadapt_ops.models: tensor {name!r} of type {tname} must be 2-D; "
                             f"got shape {shape}")
        return QuantizedWeight.from_gguf(raw, tname, shape)
    raise ValueError(
        f"fastadapt_ops.models: tensor {name!r} has unsupported GGUF type {tname} (supported: "
        f"{', '.join(list(_FLOAT_TYPES) + [f.upper() for f in qf.GGUF_FORMATS])})")


def _nbytes(dims, ttype: int, name: str) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, tsize = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
    except (ValueError, KeyError):
        raise ValueError(f"fastadapt_ops.models: tensor {name!r} has unknown GGUF type {ttype}") from None
    n = 1
    for d in dims:
        n *= int(d)
    return n // block * tsize


def read_metadata(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """The metadata of a GGUF file (``key -> python value``)."""
    return _parse(os.fspath(path))[0]


def read_gguf(path: Union[str, os.PathLike], progress=None) -> GGUFContents:
    """Read all metadata and tensors. ``progress(i, n, name)`` is called per tensor when given."""
    path = os.fspath(path)
    meta, infos, start, data = _parse(path)
    from .config import SUPPORTED_ARCHITECTURES

    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"fastadapt_ops.models: unsupported architecture {arch!r} in {os.path.basename(path)} "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    tensors: Dict[str, Tensor] = {}
    n = len(infos)
    for i, (name, dims, ttype, off) in enumerate(infos):
        nb = _nbytes(dims, ttype, name)
        raw = data[start + off:start + off + nb]
        if raw.size != nb:
            raise ValueError(f"fastadapt_ops.models: {path} is truncated (tensor {name!r})")
        tensors[name] = _convert(name, dims, ttype, raw)
        if progress is not None:
            progress(i + 1, n, name)
    return GGUFContents(path, meta, tensors)
