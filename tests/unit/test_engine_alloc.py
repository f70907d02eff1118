"""The engine hands the heap a burst left free back to the OS when it goes idle (issue 23).

The soak showed RSS ratcheting up with each concurrency peak on CPU and coming back down only when
something called ``malloc_trim``: glibc keeps freed activation chunks in its arenas. These tests pin
both halves: the allocator really releases such memory on ``malloc_trim``, and the engine calls it once
per idle period after work (rate-limited), never while idle with nothing done, never when disabled.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import sys

import pytest
from fleetserve_server.engine import alloc
from fleetserve_server.engine.sampling_params import SamplingParams

sys.path.insert(0, os.path.dirname(__file__))
from test_engine_async import collect, make, wait_for  # noqa: E402

pytestmark = pytest.mark.skipif(alloc.libc() is None or not hasattr(alloc.libc(), "malloc_trim"),
                                reason="glibc's malloc_trim is not available")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_malloc_trim_returns_freed_heap_chunks():
    libc = alloc.libc()
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size, count = 100_000, 2_000  # under the mmap threshold: these live in the heap, like activations
    chunks = [libc.malloc(size) for _ in range(count)]
    for c in chunks:
        ctypes.memset(c, 1, size)
    for c in chunks[:-1]:  # the last one pins the top of the heap, so plain free() cannot shrink it
        libc.free(c)
    before = rss_bytes()
    assert alloc.malloc_trim()
    released = before - rss_bytes()
    libc.free(chunks[-1])
    assert released > 100 * 2**20, f"malloc_trim released only {released / 2**20:.0f} MiB of ~190 MiB freed"


def test_engine_trims_once_when_idle_after_work():
    async def main():
        engine, _ = make(idle_wake=0.01)
        engine.malloc_trim_seconds = 0.05
        await asyncio.sleep(0.2)
        assert engine.malloc_trims == 0  # idle with nothing done: nothing to give back
        await collect(engine, "a", "some prompt", SamplingParams(max_tokens=4, temperature=0.0))
        await wait_for(lambda: engine.malloc_trims == 1)
        await asyncio.sleep(0.2)
        assert engine.malloc_trims == 1  # once per idle period, not on every idle wake-up
        await collect(engine, "b", "another prompt", SamplingParams(max_tokens=4, temperature=0.0))
        await wait_for(lambda: engine.malloc_trims == 2)
        engine.shutdown()
    asyncio.run(main())


def test_engine_never_trims_when_disabled():
    async def main():
        engine, _ = make(idle_wake=0.01)
        assert engine.malloc_trim_seconds == 0  # the class default; the server passes --malloc-trim-seconds
        await collect(engine, "a", "some prompt", SamplingParams(max_tokens=4, temperature=0.0))
        await asyncio.sleep(0.2)
        assert engine.malloc_trims == 0
        engine.shutdown()
    asyncio.run(main())
