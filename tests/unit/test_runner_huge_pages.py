"""The CPU KV cache is backed by transparent huge pages (runner.model_runner._zeros).

Decode attention reads each sequence's scattered KV blocks; on 4 KiB pages every block is a TLB
miss of its own (BENCHMARKS.md, "KV cache on huge pages"). The system default THP mode here is
``madvise``: nothing is huge unless the process asks, which is what these tests check it does.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from fleetserve_server.runner.model_runner import HUGE_PAGE, _zeros, advise_huge_pages

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str | None:
    try:
        text = THP.read_text()
    except OSError:
        return None
    return text[text.index("[") + 1 : text.index("]")]


def anon_huge_bytes(address: int) -> int:
    """AnonHugePages of the mapping of this process that contains ``address``."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1]) * 1024
    return 0


needs_thp = pytest.mark.skipif(
    not sys.platform.startswith("linux") or thp_mode() in (None, "never"),
    reason="transparent huge pages unavailable (no /sys/kernel/mm/transparent_hugepage or mode never)",
)


@needs_thp
def test_kv_cache_memory_is_on_huge_pages() -> None:
    cache = _zeros((4, 2, 3, 16 * 1024, 64), torch.float32, torch.device("cpu"))  # 48 MiB
    assert torch.count_nonzero(cache) == 0
    huge = anon_huge_bytes(cache.data_ptr() + cache.numel() * cache.element_size() // 2)
    # most of the cache (the whole 2 MiB-aligned interior, if the kernel had huge pages to give)
    assert huge >= 16 * HUGE_PAGE, f"only {huge} bytes of the 48 MiB cache on huge pages"


def test_small_or_non_cpu_tensors_are_left_alone() -> None:
    assert advise_huge_pages(torch.empty(1024)) == 0  # smaller than one huge page
    assert advise_huge_pages(torch.empty(0)) == 0


@needs_thp
def test_advised_bytes_are_the_aligned_interior() -> None:
    t = torch.empty(5 * HUGE_PAGE // 4)  # float32: 5 huge pages of bytes, at any alignment
    advised = advise_huge_pages(t)
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * 4
    assert advised % HUGE_PAGE == 0
    assert end - start - 2 * HUGE_PAGE < advised <= end - start


def test_environment_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEETSERVE_HUGE_PAGES", "0")
    assert advise_huge_pages(torch.empty(8 * HUGE_PAGE // 4)) == 0
