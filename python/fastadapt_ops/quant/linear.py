"""Quantized linear: the functional ``linear`` and the drop-in module ``QuantLinear``.

``QuantLinear`` keeps the packed weight as buffers (``qdata``, ``scales``, ``zeros``) and its
configuration (format, group size, shape) as the module's extra state, so ``state_dict`` /
``load_state_dict`` round-trip (a module built with another configuration is reshaped on load).
``save_quantized`` / ``load_quantized`` store a whole model in one safetensors file whose
metadata holds every QuantLinear's configuration; ``load_quantized`` also accepts the original,
unquantized model and swaps the listed ``nn.Linear`` modules itself.
"""

from __future__ import annotations

import json
import warnings
from typing import Optional

import torch
import torch.nn as nn

from ..ops import qformats as qf
from ..ops.reference import qlinear_reference
from . import lut as _lut
from .weight import QuantizedWeight

__all__ = [
    "linear",
    "QuantLinear",
    "save_quantized",
    "load_quantized",
    "op_available",
    "set_default_backend",
]

_BACKENDS = ("auto", "op", "reference", "lut", "qlinear")
_default_backend = "auto"
_op_cache = None  # (callable or None, error or None)
_warned = False


def _load_op():
    global _op_cache
    if _op_cache is None:
        try:
            from ..ops.qlinear import qlinear as op  # the C++ op's typed wrapper

            torch.ops.fastadapt.qlinear  # noqa: B018  (raises when the library is not loaded)
            _op_cache = (op, None)
        except (ImportError, AttributeError, RuntimeError) as e:  # _C not built / not loaded
            _op_cache = (None, e)
    return _op_cache


def op_available() -> bool:
    """Whether ``torch.ops.fastadapt.qlinear`` (the compiled kernels) can be called."""
    return _load_op()[0] is not None


def set_default_backend(backend: str) -> None:
    """``"auto"`` (the op where a kernel exists, else the reference; the LUT op where
    :mod:`.lut` picks it), ``"op"``/``"qlinear"``, ``"reference"``, ``"lut"``."""
    global _default_backend
    if backend not in _BACKENDS:
        raise ValueError(f"linear: backend must be one of {', '.join(_BACKENDS)}; got {backend!r}")
    _default_backend = backend


def linear(
    x: torch.Tensor,  # [..., in_features]
    qweight: QuantizedWeight,
    bias: Optional[torch.Tensor] = None,  # [out_features] or None
    act_quant: str = "none",
    *,
    backend: Optional[str] = None,
    out: Optional[torch.Tensor] = None,  # [..., out_features], x's dtype (op backend only)
) -> torch.Tensor:  # [..., out_features] in x's dtype
    """``y = x . W^T (+ bias)`` with ``W`` a :class:`QuantizedWeight`, via ``fastadapt::qlinear``.

    backend: ``"op"`` always calls the compiled op; ``"reference"`` the float64 reference
    (slow); ``"auto"`` (default, see :func:`set_default_backend`) calls the op on CPU and CUDA
    and falls back to the reference on other devices, for float64 inputs, or (with a one-time
    warning) when the extension is not built.
    """
    if not isinstance(qweight, QuantizedWeight):
        raise ValueError(f"linear: qweight must be a QuantizedWeight; got {type(qweight).__name__}")
    y = _lut.dispatch(qweight, lambda: qweight, qweight.fmt, *qweight.shape, x, bias, act_quant,
                      _lut_backend(backend), out)
    if y is not None:
        return y
    return _qlinear(x, qweight.qdata, qweight.scales, qweight.zeros, bias, qweight.fmt,
                    qweight.in_features, qweight.group_size, act_quant, backend, out)


def _lut_backend(backend):
    # the backend handed to the LUT hook: None lets FASTADAPT_LINEAR_BACKEND decide "auto"
    b = _default_backend if backend is None else backend
    return None if b == "auto" else b


def _qlinear(x, qdata, scales, zeros, bias, fmt, in_features, group_size, act_quant, backend, out):
    global _warned
    backend = _default_backend if backend is None else backend
    if backend not in _BACKENDS:
        raise ValueError(f"linear: backend must be one of {', '.join(_BACKENDS)}; got {backend!r}")
    if bias is not None and isinstance(x, torch.Tensor) and x.is_floating_point() and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    args = (x, qdata, scales, zeros, bias, fmt, in_features, group_size, act_quant)
    use_op = backend in ("op", "qlinear")
    if backend == "auto":
        use_op = (
            isinstance(x, torch.Tensor)
            and x.device.type in ("cpu", "cuda")
            and x.dtype != torch.float64
        )
        if use_op and not op_available():
            if not _warned:
                warnings.warn(
                    "fastadapt_ops: the qlinear op is not available "
                    f"({_load_op()[1]!r}); using the slow pure-PyTorch reference",
                    RuntimeWarning,
                    stacklevel=3,
                )
                _warned = True
            use_op = False
    if use_op:
        op, err = _load_op()
        if op is None:
            raise RuntimeError(f"fastadapt_ops: the qlinear op is not available: {err!r}")
        return op(*args, out=out)
    y = qlinear_reference(*args)
    if out is not None:
        out.copy_(y)
        return out
    return y


def _dtype_name(dt: Optional[torch.dtype]) -> Optional[str]:
    return None if dt is None else str(dt).replace("torch.", "")


def _dtype_from_name(name: Optional[str]) -> Optional[torch.dtype]:
    if name is None:
        return None
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"QuantLinear: unknown scale_dtype {name!r}")
    return dt


class QuantLinear(nn.Module):
    """Drop-in replacement of ``nn.Linear`` holding a packed low-bit weight.

    Buffers: ``qdata`` uint8 ``[out, row_bytes]``, ``scales`` ``[out, in // group_size]``
    (None for GGUF), ``zeros`` uint8 ``[out, in // group_size]`` (None when symmetric or GGUF);
    ``bias`` is a frozen parameter (or None). ``model.half()`` / ``.to(dtype)`` convert the bias
    but never the scales (their dtype is part of the format).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        fmt: str = "int4",
        group_size: Optional[int] = 128,
        symmetric: bool = False,
        scale_dtype: torch.dtype = torch.float16,
        act_quant: str = "none",
        device=None,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.backend: Optional[str] = None  # None: the module default (set_default_backend)
        self._configure(
            {"fmt": fmt, "group_size": group_size, "symmetric": symmetric,
             "scale_dtype": _dtype_name(scale_dtype), "act_quant": act_quant},
            device=device,
        )
        if bias:
            self.bias = nn.Parameter(
                torch.zeros(self.out_features, device=device, dtype=dtype or torch.float32),
                requires_grad=False,
            )
        else:
            self.register_parameter("bias", None)

    # ---- configuration -----------------------------------------------------------------------
    def _configure(self, cfg: dict, device=None) -> None:
        """Set format/group size/shape from ``cfg`` and (re)allocate the buffers to match."""
        fmt = qf.normalize_fmt(cfg.get("fmt", "int4"))
        info = qf.FORMATS[fmt]
        self.in_features = int(cfg.get("in_features", self.in_features))
        self.out_features = int(cfg.get("out_features", self.out_features))
        K, N = self.in_features, self.out_features
        gs = cfg.get("group_size", 128)
        if info.is_gguf:
            gs = info.block_values
            symmetric = fmt in ("q4_0", "q8_0", "q6_k")
        else:
            gs = K if gs is None or gs == -1 else int(gs)
            symmetric = bool(cfg.get("symmetric", False))
        qf.validate_group_size(fmt, K, gs)
        act_quant = cfg.get("act_quant", "none")
        if act_quant not in qf.ACT_QUANT_MODES:
            raise ValueError(f"QuantLinear: act_quant must be one of {qf.ACT_QUANT_MODES}; got {act_quant!r}")
        self.fmt, self.group_size, self.symmetric, self.act_quant = fmt, gs, symmetric, act_quant
        old = self._buffers.get("qdata")
        if device is None and old is not None:
            device = old.device
        self.register_buffer("qdata", torch.zeros(N, qf.row_bytes(fmt, K), dtype=torch.uint8, device=device))
        if info.is_gguf:
            self.register_buffer("scales", None)
            self.register_buffer("zeros", None)
        else:
            sdt = _dtype_from_name(cfg.get("scale_dtype") or "float16")
            if sdt not in qf.SCALE_DTYPES:
                raise ValueError(f"QuantLinear: scale_dtype must be float32, float16 or bfloat16; got {sdt}")
            self.register_buffer("scales", torch.ones(N, K // gs, dtype=sdt, device=device))
            self.register_buffer(
                "zeros", None if symmetric else torch.zeros(N, K // gs, dtype=torch.uint8, device=device)
            )

    def config(self) -> dict:
        """JSON-able configuration (stored as extra state and in safetensors metadata)."""
        return {
            "kind": "fastadapt.QuantLinear",
            "fmt": self.fmt,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "scale_dtype": _dtype_name(self.scales.dtype) if self.scales is not None else None,
            "act_quant": self.act_quant,
            "bias": self.bias is not None,
        }

    @property
    def qweight(self) -> QuantizedWeight:
        """The buffers viewed as a :class:`QuantizedWeight` (no copy)."""
        return QuantizedWeight(
            self.qdata, self.scales, self.zeros, self.fmt,
            (self.out_features, self.in_features), self.group_size, self.symmetric,
        )

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.qweight.dequantize(dtype)

    # ---- constructors ------------------------------------------------------------------------
    @classmethod
    def from_quantized(
        cls, qweight: QuantizedWeight, bias: Optional[torch.Tensor] = None, act_quant: str = "none"
    ) -> "QuantLinear":
        qweight.validate()
        N, K = qweight.shape
        m = cls(K, N, bias=bias is not None, fmt=qweight.fmt, group_size=qweight.group_size,
                symmetric=qweight.symmetric,
                scale_dtype=qweight.scales.dtype if qweight.scales is not None else torch.float16,
                act_quant=act_quant, device=qweight.device,
                dtype=bias.dtype if bias is not None else None)
        m.qdata = qweight.qdata
        m.scales = qweight.scales
        m.zeros = qweight.zeros
        if bias is not None:
            m.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return m

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        bits: int = 4,
        group_size: Optional[int] = 128,
        symmetric: bool = False,
        scale_dtype: torch.dtype = torch.float16,
        clip_search: bool = False,
        *,
        fmt: Optional[str] = None,
        act_scale: Optional[torch.Tensor] = None,
        act_scale_kind: str = "mean_abs",
        act_quant: str = "none",
    ) -> "QuantLinear":
        """Quantize ``linear.weight`` (see :func:`quantize_weight`); the bias is kept as is."""
        from .quantize import quantize_weight

        if not isinstance(linear, nn.Linear):
            raise ValueError(f"QuantLinear.from_linear: linear must be an nn.Linear; got {type(linear).__name__}")
        qw = quantize_weight(
            linear.weight.detach(), bits=bits, group_size=group_size, symmetric=symmetric,
            scale_dtype=scale_dtype, clip_search=clip_search, act_scale=act_scale,
            act_scale_kind=act_scale_kind, fmt=fmt,
        )
        return cls.from_quantized(qw, linear.bias, act_quant=act_quant)

    @classmethod
    def from_config(cls, cfg: dict, device=None, dtype: Optional[torch.dtype] = None) -> "QuantLinear":
        """An empty (zero-filled) module of configuration ``cfg`` (see :meth:`config`)."""
        return cls(
            int(cfg["in_features"]), int(cfg["out_features"]), bias=bool(cfg.get("bias", True)),
            fmt=cfg["fmt"], group_size=cfg.get("group_size", 128),
            symmetric=bool(cfg.get("symmetric", False)),
            scale_dtype=_dtype_from_name(cfg.get("scale_dtype") or "float16"),
            act_quant=cfg.get("act_quant", "none"), device=device, dtype=dtype,
        )

    # ---- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in_features] -> [..., out_features]
        y = _lut.dispatch(self, lambda: self.qweight, self.fmt, self.out_features, self.in_features,
                          x, self.bias, self.act_quant, _lut_backend(self.backend))
        if y is not None:
            return y
        # straight to the op (which checks its arguments): no per-call QuantizedWeight
        return _qlinear(x, self.qdata, self.scales, self.zeros, self.bias, self.fmt,
                        self.in_features, self.group_size, self.act_quant, self.backend, None)

    def extra_repr(self) -> str:
        s = (f"in_features={self.in_features}, out_features={self.out_features}, "
             f"bias={self.bias is not None}, fmt={self.fmt}")
        if not qf.FORMATS[self.fmt].is_gguf:
            s += (f", group_size={self.group_size}, symmetric={self.symmetric}, "
                  f"scale_dtype={_dtype_name(self.scales.dtype)}")
        if self.act_quant != "none":
            s += f", act_quant={self.act_quant}"
        return s

    # ---- state ---------------------------------------------------------------------------------
    def get_extra_state(self) -> dict:
        return self.config()

    def set_extra_state(self, state) -> None:
        # the configuration was applied (and the buffers reshaped) in _load_from_state_dict
        pass

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        cfg = state_dict.get(prefix + "_extra_state")
        if isinstance(cfg, dict) and cfg.get("fmt") is not None:
            bias_param = self.bias
            self._configure(cfg)
            self.bias = bias_param
        # take the incoming tensors' shapes/dtypes (a scale dtype is part of the format)
        device = self.qdata.device
        for name in ("qdata", "scales", "zeros"):
            t = state_dict.get(prefix + name)
            cur = self._buffers.get(name)
            if isinstance(t, torch.Tensor) and (cur is None or cur.shape != t.shape or cur.dtype != t.dtype):
                self._buffers[name] = torch.empty(t.shape, dtype=t.dtype, device=device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        try:
            self.qweight  # validates the loaded buffers against the configuration
        except ValueError as e:
            error_msgs.append(f"{prefix or 'QuantLinear'}: {e}")

    def _apply(self, fn, recurse=True):
        scales = self.scales
        super()._apply(fn, recurse)
        if scales is not None and self.scales is not None and self.scales.dtype != scales.dtype:
            # dtype conversions (model.half(), .to(bfloat16)) must not touch the scales
            self._buffers["scales"] = scales.to(device=self.scales.device)
        return self


# ---------------------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------------------
_META_KEY = "fastadapt.quant"
_ALIAS_KEY = "fastadapt.aliases"


def save_quantized(model: nn.Module, path, metadata: Optional[dict] = None) -> None:
    """Save ``model.state_dict()`` to a safetensors file; QuantLinear configurations go to the
    metadata under ``"fastadapt.quant"`` (JSON ``{module_name: config}``). Tensors sharing
    storage (tied weights) are stored once and recorded under ``"fastadapt.aliases"``."""
    from safetensors.torch import save_file

    sd = model.state_dict()
    configs, tensors, aliases, seen = {}, {}, {}, {}
    for k, v in sd.items():
        if k == "_extra_state" or k.endswith("._extra_state"):
            name = k[: -len("_extra_state")].rstrip(".")
            if isinstance(v, dict) and v.get("kind") == "fastadapt.QuantLinear":
                configs[name] = v
            else:
                warnings.warn(f"save_quantized: extra state {k!r} is not a tensor and is not saved")
            continue
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"save_quantized: state_dict entry {k!r} is not a tensor")
        key = (v.device, v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape),
               tuple(v.stride()), v.dtype) if v.numel() else None
        if key is not None and key in seen:
            aliases[k] = seen[key]
            continue
        if key is not None:
            seen[key] = k
        tensors[k] = v.detach()
    # distinct views into one storage: safetensors refuses shared memory, copy them
    by_storage = {}
    for k, v in tensors.items():
        if v.numel():
            by_storage.setdefault((v.device, v.untyped_storage().data_ptr()), []).append(k)
    for ks in by_storage.values():
        for k in ks[1:]:
            tensors[k] = tensors[k].clone()
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta.update({_META_KEY: json.dumps(configs, sort_keys=True), _ALIAS_KEY: json.dumps(aliases), "format": "pt"})
    save_file(tensors, str(path), metadata=meta)


def read_quantized_metadata(path) -> dict:
    """``{module_name: QuantLinear config}`` stored in a file written by :func:`save_quantized`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
    return json.loads(meta.get(_META_KEY, "{}"))


def load_quantized(model: nn.Module, path, strict: bool = True, device=None) -> nn.Module:
    """Load a file written by :func:`save_quantized` into ``model`` and return it.

    ``model`` may be the quantized model or the original one: every module named in the file's
    metadata that is still an ``nn.Linear`` is swapped for a QuantLinear of the stored
    configuration first. ``device``: where new QuantLinear buffers go (default: the device of
    the replaced linear's weight).
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    configs = json.loads(meta.get(_META_KEY, "{}"))
    for dup, orig in json.loads(meta.get(_ALIAS_KEY, "{}")).items():
        tensors[dup] = tensors[orig]
    for name, cfg in configs.items():
        mod = model.get_submodule(name) if name else model
        if isinstance(mod, nn.Linear):
            if not name:
                raise ValueError("load_quantized: the model itself is an nn.Linear; pass a QuantLinear")
            dev = device if device is not None else mod.weight.device
            bdt = mod.bias.dtype if mod.bias is not None else None
            new = QuantLinear.from_config(cfg, device=dev, dtype=bdt)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, new)
        elif not isinstance(mod, QuantLinear):
            raise ValueError(
                f"load_quantized: module {name!r} is a {type(mod).__name__}, expected nn.Linear or QuantLinear"
            )
        tensors[(name + "." if name else "") + "_extra_state"] = cfg
    model.load_state_dict(tensors, strict=strict)
    return model
