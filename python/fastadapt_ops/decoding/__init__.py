"""Adaptive decoding loops over the model runner: early exit, self-speculative decoding with
adaptive draft length, exit adapters (and, from the bon helper, best-of-N and switching)."""
from .confidence import CandidateHead, ExitHead, confidence, saturation  # noqa: F401
from .adapters import ExitAdapters, fit_exit_adapters  # noqa: F401
from .early_exit import EarlyExitDecoder, calibrate  # noqa: F401
from .speculative import SelfSpeculativeDecoder  # noqa: F401
