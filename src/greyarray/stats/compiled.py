"""numba's njit with a disk cache where one can be written (compiling the kernels takes a few
seconds; a read-only install with a read-only home still works, compiling in each process)."""

from __future__ import annotations

from collections.abc import Callable

from numba import njit


def compiled(function: Callable) -> Callable:
    """``numba.njit(nogil=True)``, cached on disk when numba finds a writable place."""
    try:
        return njit(cache=True, nogil=True)(function)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return njit(nogil=True)(function)
