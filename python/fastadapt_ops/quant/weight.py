"""QuantizedWeight: one packed low-bit weight matrix (any format of fastadapt::qlinear)."""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch

from ..ops import qformats as qf

__all__ = ["QuantizedWeight"]


@dataclasses.dataclass
class QuantizedWeight:
    """A weight ``W [out_features, in_features]`` in a packed format (layouts: qformat.h).

    qdata:  uint8 ``[N, row_bytes]``: packed codes (int formats) or raw GGUF blocks
    scales: ``[N, K // group_size]`` fp32/fp16/bf16 (int formats), None for GGUF
    zeros:  uint8 ``[N, K // group_size]``, None when symmetric or GGUF
    fmt:    ``int2 | int3 | int4 | int8 | q4_0 | q4_1 | q8_0 | q4_k | q6_k``
    shape:  ``(out_features, in_features)``
    group_size: values per scale (``in_features`` = per-channel); GGUF: the block size
    """

    qdata: torch.Tensor
    scales: Optional[torch.Tensor]
    zeros: Optional[torch.Tensor]
    fmt: str
    shape: Tuple[int, int]
    group_size: int
    symmetric: bool = False

    def __post_init__(self):
        self.fmt = qf.normalize_fmt(self.fmt)
        self.shape = tuple(int(s) for s in self.shape)
        info = qf.FORMATS[self.fmt]
        if info.is_gguf:
            if self.group_size in (0, -1, None):
                self.group_size = info.block_values
            self.symmetric = self.fmt in ("q4_0", "q8_0", "q6_k")
        else:  # the stored zero points decide: without them the zero is 2^(b-1)
            self.symmetric = self.zeros is None
        self.validate()

    # ---- description -------------------------------------------------------------------------
    @property
    def info(self) -> qf.QFormatInfo:
        return qf.FORMATS[self.fmt]

    @property
    def bits(self) -> int:
        """Width of one code (GGUF formats: 4 for q4_*, 8 for q8_0, 6 for q6_k)."""
        return self.info.bits

    @property
    def is_gguf(self) -> bool:
        return self.info.is_gguf

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def device(self) -> torch.device:
        return self.qdata.device

    @property
    def nbytes(self) -> int:
        """Bytes of qdata + scales + zeros."""
        n = self.qdata.numel() * self.qdata.element_size()
        for t in (self.scales, self.zeros):
            if t is not None:
                n += t.numel() * t.element_size()
        return n

    @property
    def bits_per_weight(self) -> float:
        n = self.shape[0] * self.shape[1]
        return 8.0 * self.nbytes / n if n else 0.0

    def config(self) -> dict:
        """JSON-able description (everything but the tensors)."""
        return {
            "fmt": self.fmt,
            "out_features": self.shape[0],
            "in_features": self.shape[1],
            "group_size": int(self.group_size),
            "symmetric": bool(self.symmetric),
            "scale_dtype": str(self.scales.dtype).replace("torch.", "") if self.scales is not None else None,
        }

    def __repr__(self) -> str:
        sd = "" if self.scales is None else f", scale_dtype={str(self.scales.dtype).replace('torch.', '')}"
        gs = "" if self.is_gguf else f", group_size={self.group_size}"
        sym = "" if self.is_gguf else f", symmetric={self.symmetric}"
        return (
            f"QuantizedWeight(fmt={self.fmt}, shape={tuple(self.shape)}{gs}{sym}{sd}, "
            f"nbytes={self.nbytes}, bits_per_weight={self.bits_per_weight:.3f}, device={self.device})"
        )

    # ---- behaviour ---------------------------------------------------------------------------
    def validate(self) -> "QuantizedWeight":
        qf.validate_packed(self.qdata, self.scales, self.zeros, self.fmt, self.shape, self.group_size)
        return self

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense ``[out_features, in_features]`` weight in ``dtype``."""
        return qf.dequantize(self.qdata, self.scales, self.zeros, self.fmt, self.shape, self.group_size, dtype)

    def to(self, device=None) -> "QuantizedWeight":
        """Copy to ``device`` (dtypes never change: the packed data is the format)."""
        if device is None:
            return self
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return dataclasses.replace(self, qdata=mv(self.qdata), scales=mv(self.scales), zeros=mv(self.zeros))

    def cpu(self) -> "QuantizedWeight":
        return self.to("cpu")

    def cuda(self, device=None) -> "QuantizedWeight":
        return self.to(torch.device("cuda") if device is None else device)

    # ---- constructors ------------------------------------------------------------------------
    @classmethod
    def from_float(cls, w: torch.Tensor, **kwargs) -> "QuantizedWeight":
        """Quantize a float weight; same keywords as :func:`fastadapt_ops.quant.quantize_weight`."""
        from .quantize import quantize_weight

        return quantize_weight(w, **kwargs)

    @classmethod
    def from_gguf(cls, data, ggml_type, shape) -> "QuantizedWeight":
        """Wrap raw GGUF blocks (no conversion: the kernels read llama.cpp's bytes as stored).

        data: uint8 tensor or numpy array, either ``[out_features, row_bytes]`` as
            ``gguf.GGUFReader`` returns it (``ReaderTensor.data``) or a flat buffer.
        ggml_type: the GGUF type name (``"Q4_1"``, ``"q8_0"``...) or a ``GGMLQuantizationType``.
        shape: ``(out_features, in_features)``, i.e. the reader's ``tensor.shape`` reversed.
        """
        name = getattr(ggml_type, "name", ggml_type)
        if not isinstance(name, str) or name.strip().lower() not in qf.GGUF_FORMATS:
            raise ValueError(
                f"fastadapt::qlinear: ggml_type must be one of "
                f"{', '.join(f.upper() for f in qf.GGUF_FORMATS)}; got {ggml_type!r}"
            )
        fmt = name.strip().lower()
        if len(tuple(shape)) != 2:
            raise ValueError(f"fastadapt::qlinear: shape must be (out_features, in_features); got {shape!r}")
        N, K = (int(s) for s in shape)
        if not isinstance(data, torch.Tensor):
            import numpy as np

            arr = np.ascontiguousarray(np.asarray(data))
            if arr.dtype != np.uint8:
                raise ValueError(f"fastadapt::qlinear: data must be uint8; got {arr.dtype}")
            data = torch.from_numpy(arr.copy())
        if data.dtype != torch.uint8:
            raise ValueError(f"fastadapt::qlinear: data must be uint8; got {data.dtype}")
        rb = qf.row_bytes(fmt, K)
        if data.numel() != N * rb:
            raise ValueError(
                f"fastadapt::qlinear: data must hold {N} x {rb} bytes for {fmt.upper()} of shape "
                f"{(N, K)}; got {data.numel()} bytes (shape {list(data.shape)})"
            )
        qdata = data.reshape(N, rb).contiguous()
        info = qf.FORMATS[fmt]
        return cls(qdata, None, None, fmt, (N, K), info.block_values)
