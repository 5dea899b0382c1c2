"""Typed wrappers of every ``torch.ops.fastadapt`` op, their fake kernels, and references."""
from .qlinear import qlinear  # noqa: F401
from .rms_norm import rms_norm  # noqa: F401
from .rope import rope  # noqa: F401
from .silu_mul import silu_mul  # noqa: F401
