"""Adaptive decoding loops over the model runner: early exit, self-speculative decoding with
adaptive draft length, exit adapters, adaptive best-of-N, entropy-adaptive switching."""
from .confidence import CandidateHead, ExitHead, confidence, saturation  # noqa: F401
from .adapters import ExitAdapters, fit_exit_adapters  # noqa: F401
from .early_exit import EarlyExitDecoder, calibrate  # noqa: F401
from .speculative import SelfSpeculativeDecoder  # noqa: F401
from .best_of_n import best_of_n  # noqa: F401
from .switching import make_cheap_variant, switch_generate  # noqa: F401
