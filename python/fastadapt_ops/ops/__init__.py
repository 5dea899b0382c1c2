"""Typed wrappers of every ``torch.ops.fastadapt`` op, their fake kernels, and references."""
from .qlinear import qlinear  # noqa: F401
from .lut_linear import lut_linear  # noqa: F401
from .rms_norm import rms_norm  # noqa: F401
from .paged_attention import (  # noqa: F401
    merge_attention_states,
    paged_decode_attention,
    paged_prefix_attention,
)
from .paged_kv import kv_append, kv_compact  # noqa: F401
from .rope import rope  # noqa: F401
from .silu_mul import silu_mul  # noqa: F401
from .tokens import (  # noqa: F401
    bipartite_soft_matching,
    merge_tokens,
    proportional_attention,
    prune_tokens,
    unmerge_tokens,
)
from .block_sparse import block_pool_scores, block_sparse_attention, vertical_slash_scores  # noqa: F401
from .moe import moe_combine, moe_grouped_qlinear, moe_route  # noqa: F401
from .confidence import hidden_cosine, logit_confidence  # noqa: F401
