"""Attention functions composed from the paged attention ops (``fastadapt_ops.ops``)."""
from .prefix_shared import prefix_shared_attention  # noqa: F401

__all__ = ["prefix_shared_attention"]
