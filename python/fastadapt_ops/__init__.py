"""fastadapt_ops: fast, tested CPU and CUDA kernels for adaptive LLM inference.

Importing the package registers the ops under ``torch.ops.fastadapt``. The user-facing layers
live in subpackages: ``fastadapt_ops.ops`` (typed op wrappers, fake kernels, references) and
``fastadapt_ops.quant`` (quantized weights and linears).
"""
from __future__ import annotations

import torch  # noqa: F401  (must come first: _C links against libtorch)

from . import _build_info

__version__ = "0.1.0"


def _check_torch_version() -> None:
    built = _build_info.TORCH_VERSION.split("+")[0].split(".")[:2]
    running = torch.__version__.split("+")[0].split(".")[:2]
    if built != running:
        raise ImportError(
            f"fastadapt_ops was built against torch {_build_info.TORCH_VERSION} but torch "
            f"{torch.__version__} is installed; rebuild with "
            "`pip install --no-build-isolation -e .`")


_check_torch_version()
from . import _C  # noqa: E402  (registers the C++ ops)
from . import ops  # noqa: E402,F401  (registers the fake kernels)
from .cpu import cpu_isa, force_cpu_isa, use_cpu_isa  # noqa: E402,F401

CUDA_MODE = _C.CUDA_MODE
CUDA_ARCHS = _C.CUDA_ARCHS
