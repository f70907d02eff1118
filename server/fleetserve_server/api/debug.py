"""``GET /debug/memory``: what the process holds, for finding growth under sustained load (opt-in).

Mounted only when ``FLEETSERVE_DEBUG_MEMORY`` is set (``1``: the endpoint;
``tracemalloc``: the endpoint plus ``tracemalloc`` tracing, which slows every
allocation). Off by default: it walks every live object. The answer has

* ``rss_bytes`` and glibc's ``mallinfo2`` (heap in use / free in arenas, mmapped);
* ``registries``: the length of every container attribute (dict, list, set,
  deque) of the server's own objects, walked from the server state (the
  async engine, the engine, the scheduler, the block manager, the runner and
  its sampler, the metrics, the API's in-flight set) — so that a registry
  added later is reported without anyone listing it here;
* ``gc``: the number of objects the collector tracks, and the most common types;
* ``tracemalloc``: when tracing, traced bytes and the top allocation sites that
  grew since the baseline (``?baseline=1`` takes a new baseline).

``?collect=1`` runs a full collection first; ``?trim=1`` calls ``malloc_trim(0)``
and reports the RSS before and after (how much of the growth is the C
allocator keeping freed memory).
"""

from __future__ import annotations

import collections
import ctypes
import gc
import os
import sys
import tracemalloc
from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter, Request

from fleetserve_server.api.context import APIContext
from fleetserve_server.engine import alloc

ENV = "FLEETSERVE_DEBUG_MEMORY"
router = APIRouter()
_state: dict[str, Any] = {"baseline": None}
_CONTAINERS = (dict, list, set, frozenset, collections.deque, tuple)


def enabled(environ: Mapping[str, str] | None = None) -> bool:
    return bool((os.environ if environ is None else environ).get(ENV, "").strip() not in ("", "0"))


def start_tracing(environ: Mapping[str, str] | None = None) -> None:
    """Start ``tracemalloc`` when ``FLEETSERVE_DEBUG_MEMORY=tracemalloc`` (idempotent)."""
    if (os.environ if environ is None else environ).get(ENV, "").strip() == "tracemalloc" \
            and not tracemalloc.is_tracing():
        tracemalloc.start(8)
        _state["baseline"] = tracemalloc.take_snapshot()


def registries(root: Any, prefix: str = "state", depth: int = 5) -> dict[str, int]:
    """``{"path.attr": len}`` for every container attribute of fleetserve's objects under ``root``."""
    out: dict[str, int] = {}
    seen: set[int] = set()

    def ours(value: Any) -> bool:
        module = type(value).__module__ or ""
        return module.startswith("fleetserve_server") and not _is_torch_module(value)

    def walk(obj: Any, path: str, level: int) -> None:
        if id(obj) in seen or level > depth:
            return
        seen.add(id(obj))
        attrs = getattr(obj, "__dict__", None)
        if not isinstance(attrs, dict):
            return
        for name, value in list(attrs.items()):
            here = f"{path}.{name}"
            if isinstance(value, _CONTAINERS) and not isinstance(value, str):
                out[here] = len(value)
            elif ours(value):
                walk(value, here, level + 1)

    walk(root, prefix, 0)
    return out


def _is_torch_module(value: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.nn.Module)


def _rss() -> int:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]


def _libc() -> Any:
    return alloc.libc()


def mallinfo() -> dict[str, int] | None:
    """glibc's heap figures (None elsewhere): ``uordblks`` in use, ``fordblks`` free but kept."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _Mallinfo2
    info = libc.mallinfo2()
    return {"arena_bytes": info.arena, "in_use_bytes": info.uordblks, "free_in_arenas_bytes": info.fordblks,
            "mmapped_bytes": info.hblkhd, "mmapped_chunks": info.hblks}


def malloc_trim() -> bool:
    return alloc.malloc_trim()


def _top_types(limit: int = 25) -> tuple[int, dict[str, int]]:
    counts: collections.Counter[str] = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
    return sum(counts.values()), dict(counts.most_common(limit))


def _tracemalloc_report(new_baseline: bool) -> dict[str, Any] | None:
    if not tracemalloc.is_tracing():
        return None
    snapshot = tracemalloc.take_snapshot().filter_traces(
        (tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen importlib._bootstrap>")))
    current, peak = tracemalloc.get_traced_memory()
    top = []
    baseline = _state["baseline"]
    if baseline is not None:
        for stat in snapshot.compare_to(baseline, "traceback")[:15]:
            frames = [f"{f.filename}:{f.lineno}" for f in stat.traceback[-4:]]
            top.append({"size_diff_bytes": stat.size_diff, "count_diff": stat.count_diff, "where": frames})
    if new_baseline or baseline is None:
        _state["baseline"] = snapshot
    return {"traced_bytes": current, "peak_bytes": peak, "grown_since_baseline": top}


@router.get("/debug/memory", include_in_schema=False)
def debug_memory(request: Request, baseline: bool = False, trim: bool = False,
                 collect: bool = False) -> dict[str, Any]:
    # A plain def: FastAPI runs it in a worker thread, so walking the heap never blocks the event loop.
    ctx: APIContext = request.app.state.fleetserve
    if collect:
        gc.collect()
    out: dict[str, Any] = {"rss_bytes": _rss(), "mallinfo": mallinfo()}
    if trim:
        before = out["rss_bytes"]
        trimmed = malloc_trim()
        out["trim"] = {"released": trimmed, "rss_before_bytes": before, "rss_after_bytes": _rss()}
    from fleetserve_server.api import generation

    regs = registries(ctx.state)
    regs.update(registries(ctx.metrics, "metrics"))
    regs["generation._BACKGROUND"] = len(generation._BACKGROUND)
    out["registries"] = dict(sorted(regs.items()))
    total, top = _top_types()
    out["gc"] = {"objects": total, "top_types": top, "garbage": len(gc.garbage)}
    out["tracemalloc"] = _tracemalloc_report(baseline)
    return out
