"""Quantized weights and linears on top of ``fastadapt::qlinear``.

Stable public API::

    quantize_weight(w, bits=4, group_size=128, symmetric=False, ...) -> QuantizedWeight
    QuantizedWeight                      packed weight (any qlinear format; .from_gguf, .dequantize)
    linear(x, qweight, bias=None, act_quant="none") -> y
    QuantLinear                          nn.Module drop-in for nn.Linear (.from_linear)
    quantize_model(model, bits=4, group_size=128, skip=("lm_head",), fmt=None, ...) -> model
"""

from .linear import QuantLinear, linear, load_quantized, op_available, save_quantized, set_default_backend
from .model import QuantizeInfo, calibrate_act_scales, quantize_model
from .quantize import quantize_weight
from .weight import QuantizedWeight

__all__ = [
    "quantize_weight",
    "QuantizedWeight",
    "linear",
    "QuantLinear",
    "quantize_model",
    "QuantizeInfo",
    "calibrate_act_scales",
    "save_quantized",
    "load_quantized",
    "op_available",
    "set_default_backend",
]
