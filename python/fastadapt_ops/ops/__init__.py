"""Typed wrappers of every ``torch.ops.fastadapt`` op, their fake kernels, and references."""
from .qlinear import qlinear  # noqa: F401
from .rms_norm import rms_norm  # noqa: F401
from .tokens import (  # noqa: F401
    bipartite_soft_matching,
    merge_tokens,
    proportional_attention,
    prune_tokens,
    unmerge_tokens,
)
