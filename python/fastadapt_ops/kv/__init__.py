"""Paged KV cache with per-(layer, KV head) page tables, eviction policies, and a transformers
``Cache`` backed by them. See ``cache.py`` (layout, sharing), ``policies.py`` (selection and
budgets) and ``hf_cache.py`` (the HF integration)."""
from .allocator import OutOfPagesError, PageAllocator  # noqa: F401
from .cache import PagedKVCache  # noqa: F401
from .policies import (POLICIES, Budget, EvictionContext, Policy, evict, get_policy,  # noqa: F401
                       maybe_evict)

# PagedHFCache lives in fastadapt_ops.kv.hf_cache (imports transformers).
