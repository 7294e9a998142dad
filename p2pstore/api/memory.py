"""Giving freed heap back to the OS after a large answer.

A big result is many medium-sized objects (a 100 KB blob, its base64 text,
the JSON line); glibc's malloc keeps the memory they freed in its arenas
rather than returning it, so one 256 MiB query left a daemon hundreds of MB
bigger for good. ``malloc_trim(0)`` hands free pages of every arena back. It
costs a walk of the heap, so it runs only after an answer or a failed
result of at least ``TRIM_AFTER_BYTES``. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

#: Answers (or results given up) at least this big are followed by a trim.
TRIM_AFTER_BYTES = 16 << 20


def _load_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_TRIM = _load_trim()


def give_back_memory() -> None:
    """Return freed heap pages to the OS (glibc), after something big was freed."""
    if _TRIM is not None:
        _TRIM(0)
