"""Mixture-of-experts layers with null experts (AdaMoE) on the fastadapt::moe_* ops."""
from .layer import NullExpertMoE, stack_quantized  # noqa: F401
