"""Page allocator: a free list and one int refcount per page.

A page is free exactly when its refcount is 0. ``alloc`` hands out pages with refcount 1;
``incref`` shares a page (fork); ``decref`` drops one reference and returns the page to the free
list at 0. Errors are raised before any state changes (exhaustion, double free, bad ids).
"""
from __future__ import annotations

from typing import Iterable, List

__all__ = ["PageAllocator", "OutOfPagesError"]


class OutOfPagesError(RuntimeError):
    """Raised when an allocation asks for more pages than are free."""


class PageAllocator:
    def __init__(self, num_pages: int):
        if not isinstance(num_pages, int) or isinstance(num_pages, bool) or num_pages <= 0:
            raise ValueError(f"PageAllocator: num_pages must be a positive int, got {num_pages!r}")
        self.num_pages = num_pages
        self._ref: List[int] = [0] * num_pages
        # LIFO free list; popping from the end hands out low page ids first on a fresh pool.
        self._free: List[int] = list(range(num_pages - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    def refcount(self, page: int) -> int:
        self._check_id(page, "page")
        return self._ref[page]

    def refcounts(self) -> List[int]:
        return list(self._ref)

    def alloc(self, n: int = 1) -> List[int]:
        """``n`` fresh pages, each with refcount 1."""
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"PageAllocator.alloc: n must be a non-negative int, got {n!r}")
        if n > len(self._free):
            raise OutOfPagesError(
                f"PageAllocator.alloc: out of pages: asked for {n}, {len(self._free)} free of "
                f"{self.num_pages}")
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._ref[p] = 1
        return pages

    def incref(self, pages: Iterable[int] | int) -> None:
        pages = [pages] if isinstance(pages, int) else list(pages)
        for p in pages:
            self._check_id(p, "page")
            if self._ref[p] <= 0:
                raise ValueError(f"PageAllocator.incref: page {p} is free")
        for p in pages:
            self._ref[p] += 1

    def decref(self, pages: Iterable[int] | int) -> List[int]:
        """Drop one reference of each page (a page may appear several times); returns the pages
        that became free."""
        pages = [pages] if isinstance(pages, int) else list(pages)
        need = {}
        for p in pages:
            self._check_id(p, "page")
            need[p] = need.get(p, 0) + 1
        for p, c in need.items():
            if self._ref[p] < c:
                raise ValueError(
                    f"PageAllocator.decref: double free of page {p} (refcount {self._ref[p]}, "
                    f"{c} release(s) asked)")
        freed = []
        for p in pages:
            self._ref[p] -= 1
            if self._ref[p] == 0:
                self._free.append(p)
                freed.append(p)
        return freed

    def _check_id(self, p: int, what: str) -> None:
        if not isinstance(p, int) or not 0 <= p < self.num_pages:
            raise ValueError(f"PageAllocator: {what} id {p!r} out of range [0, {self.num_pages})")

    def __repr__(self) -> str:
        return f"PageAllocator(num_pages={self.num_pages}, free={self.num_free})"
