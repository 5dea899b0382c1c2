"""Adaptive decoding loops over the model runner."""
from .best_of_n import best_of_n  # noqa: F401
from .switching import make_cheap_variant, switch_generate  # noqa: F401
