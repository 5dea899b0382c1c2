"""Typed wrappers of every ``torch.ops.fastadapt`` op, their fake kernels, and references."""
from .qlinear import qlinear  # noqa: F401
from .rms_norm import rms_norm  # noqa: F401
