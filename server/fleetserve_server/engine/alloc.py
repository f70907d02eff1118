"""The C allocator's view of the heap: glibc's ``malloc_trim`` and ``mallinfo2`` (no-ops elsewhere).

A CPU forward allocates its activations with malloc; after a burst of many concurrent sequences glibc
keeps the freed chunks in its arenas (RSS stays at the peak until something asks for them back). The
engine calls :func:`malloc_trim` when it goes idle, at most once per ``--malloc-trim-seconds``, so a
replica's RSS returns to its committed size between bursts instead of ratcheting up with each peak.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any


@functools.cache
def libc() -> Any:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def malloc_trim() -> bool:
    """Return free heap memory to the OS (``malloc_trim(0)``); True when glibc released some."""
    lib = libc()
    return bool(lib is not None and hasattr(lib, "malloc_trim") and lib.malloc_trim(0))
