"""What this process may use: memory and CPU limits from its cgroup (v1 and v2), pure Python.

A pod's ``resources.limits`` reach the container as cgroup files, not as a
smaller ``/proc/meminfo`` or ``os.cpu_count()``: a server that sizes itself
from the host overcommits the pod (the OOM killer takes a serving replica;
torch spawns one thread per host core and the CFS quota throttles them all).

Files read (each level from the process's own cgroup up to the mount root;
the effective limit is the smallest):

* cgroup v2 (unified, ``cgroup.controllers`` at the mount root):
  ``memory.max`` (``max`` = none), ``memory.current`` less ``inactive_file``
  (``memory.stat``; the kubelet's working set),
  ``cpu.max`` (``QUOTA PERIOD`` or ``max PERIOD``);
* cgroup v1 (one hierarchy per controller: ``memory/``, ``cpu,cpuacct/``...):
  ``memory.limit_in_bytes`` (a huge number = none), ``memory.usage_in_bytes``
  less ``total_inactive_file``,
  ``cpu.cfs_quota_us`` (-1 = none) / ``cpu.cfs_period_us``.

A machine may mount both (hybrid: v1 controllers plus an empty unified
tree); a controller's v1 hierarchy wins when it exists. Nothing here imports
torch, so the operator and the unit tests can use it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
# v1 reports "no limit" as PAGE_COUNTER_MAX pages (9223372036854771712 on 4 KiB pages); anything
# this large is no limit at all.
_NO_LIMIT = 1 << 60


@dataclass(frozen=True)
class CgroupLimits:
    """Limits of the calling process's cgroup; ``None`` where there is none (or no cgroup)."""

    memory_limit_bytes: int | None
    memory_usage_bytes: int | None
    cpu_quota_cores: float | None  # quota / period, e.g. 1.5 for `cpu: 1500m`
    version: str  # "v1", "v2", "hybrid" or "none"


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _memberships(proc_cgroup: Path) -> dict[str, str]:
    """``/proc/self/cgroup`` as {controller: path}; the v2 entry is under the key ``""``."""
    out: dict[str, str] = {}
    text = _read(proc_cgroup) or ""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:
            out[""] = path
            continue
        for name in controllers.split(","):
            out[name.removeprefix("name=")] = path
        out[controllers] = path  # the joined name is the v1 mount directory ("cpu,cpuacct")
    return out


def _chain(mount: Path, path: str) -> list[Path]:
    """Directories from the process's cgroup up to ``mount``, innermost first.

    Inside a container with a cgroup namespace the path is ``/`` (the mount is
    the container's own cgroup); without one the path names a directory under
    the mount, or one that is not visible there (then only the mount is read).
    """
    rel = path.strip("/")
    leaf = mount / rel if rel else mount
    if not leaf.is_dir():
        return [mount]
    dirs = [leaf]
    while dirs[-1] != mount and mount in dirs[-1].parents:
        dirs.append(dirs[-1].parent)
    return dirs


def _v1_mount(root: Path, memberships: dict[str, str], controller: str) -> tuple[Path, str] | None:
    for key, path in memberships.items():
        if key and controller in key.split(","):
            for name in (key, controller):
                if (root / name).is_dir():
                    return root / name, path
    if (root / controller).is_dir():
        return root / controller, "/"
    return None


def _v2_mount(root: Path, memberships: dict[str, str], controller: str) -> tuple[Path, str] | None:
    for mount in (root, root / "unified"):
        controllers = _read(mount / "cgroup.controllers")
        if controllers is not None and controller in controllers.split():
            return mount, memberships.get("", "/")
    return None


def _int_or_none(text: str | None) -> int | None:
    if text is None or text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value < 0 or value >= _NO_LIMIT else value


def _memory(root: Path, memberships: dict[str, str]) -> tuple[int | None, int | None, str | None]:
    v1 = _v1_mount(root, memberships, "memory")
    if v1 is not None:
        limit_file, usage_file, version = "memory.limit_in_bytes", "memory.usage_in_bytes", "v1"
        mount, path = v1
    else:
        v2 = _v2_mount(root, memberships, "memory")
        if v2 is None:
            return None, None, None
        limit_file, usage_file, version = "memory.max", "memory.current", "v2"
        mount, path = v2
    dirs = _chain(mount, path)
    limits = [v for v in (_int_or_none(_read(d / limit_file)) for d in dirs) if v is not None]
    usage = _int_or_none(_read(dirs[0] / usage_file))
    if usage is not None:
        # The working set, as the kubelet counts it: page cache the kernel can drop is not "used".
        inactive_key = "total_inactive_file" if version == "v1" else "inactive_file"
        for line in (_read(dirs[0] / "memory.stat") or "").splitlines():
            key, _, value = line.partition(" ")
            if key == inactive_key and value.strip().isdigit():
                usage = max(0, usage - int(value))
    return (min(limits) if limits else None), usage, version


def _cpu(root: Path, memberships: dict[str, str]) -> tuple[float | None, str | None]:
    quotas: list[float] = []
    v1 = _v1_mount(root, memberships, "cpu")
    if v1 is not None:
        for d in _chain(*v1):
            quota = _int_or_none(_read(d / "cpu.cfs_quota_us"))
            period = _int_or_none(_read(d / "cpu.cfs_period_us"))
            if quota and period:
                quotas.append(quota / period)
        return (min(quotas) if quotas else None), "v1"
    v2 = _v2_mount(root, memberships, "cpu")
    if v2 is None:
        return None, None
    for d in _chain(*v2):
        fields = (_read(d / "cpu.max") or "").split()
        if len(fields) == 2:
            quota, period = _int_or_none(fields[0]), _int_or_none(fields[1])
            if quota and period:
                quotas.append(quota / period)
    return (min(quotas) if quotas else None), "v2"


def read_cgroup_limits(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP) -> CgroupLimits:
    """The memory and CPU limits of this process's cgroup (``root`` and ``proc_cgroup`` for tests)."""
    memberships = _memberships(proc_cgroup)
    limit, usage, mem_version = _memory(root, memberships)
    quota, cpu_version = _cpu(root, memberships)
    versions = {v for v in (mem_version, cpu_version) if v}
    version = versions.pop() if len(versions) == 1 else ("hybrid" if versions else "none")
    return CgroupLimits(memory_limit_bytes=limit, memory_usage_bytes=usage, cpu_quota_cores=quota, version=version)


def affinity_cpus() -> int:
    """CPUs the scheduler lets this process run on (cpuset / taskset), else the host's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def usable_cores(limits: CgroupLimits | None = None, *, affinity: int | None = None) -> int:
    """Whole cores this process may keep busy: the CPU quota rounded down (at least 1), never
    more than its CPU affinity. Rounded down because a thread per fractional core would be
    throttled by the CFS quota at the end of every period, stalling the step."""
    limits = read_cgroup_limits() if limits is None else limits
    cores = affinity_cpus() if affinity is None else affinity
    if limits.cpu_quota_cores is not None:
        cores = min(cores, max(1, math.floor(limits.cpu_quota_cores + 1e-9)))
    return max(1, cores)


def choose_threads(requested: int | None, *, limits: CgroupLimits | None = None, affinity: int | None = None,
                   environ: dict[str, str] | None = None) -> tuple[int, str]:
    """Torch's intra-op thread count and why: ``--threads`` if given, else ``OMP_NUM_THREADS``
    if set, else the usable cores; always capped at the usable cores."""
    cores = usable_cores(limits, affinity=affinity)
    env = os.environ if environ is None else environ
    if requested is not None:
        if requested < 1:
            raise ValueError(f"threads must be >= 1, got {requested}")
        wanted, source = requested, "--threads"
    elif (env.get("OMP_NUM_THREADS") or "").strip().isdigit() and int(env["OMP_NUM_THREADS"]) >= 1:
        wanted, source = int(env["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    else:
        return cores, f"{cores} usable core(s)"
    if wanted > cores:
        return cores, f"{source}={wanted} capped at the {cores} usable core(s)"
    return wanted, source


def host_memory_bytes() -> int:
    """Physical memory of the host (``MemTotal``)."""
    return _meminfo("MemTotal") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def host_available_bytes() -> int | None:
    """``MemAvailable``: what the host can still give without swapping."""
    return _meminfo("MemAvailable")


def _meminfo(key: str) -> int | None:
    for line in (_read(Path("/proc/meminfo")) or "").splitlines():
        name, _, rest = line.partition(":")
        if name == key:
            fields = rest.split()
            if fields and fields[0].isdigit():
                return int(fields[0]) * 1024
    return None


def process_rss_bytes() -> int:
    """Resident set size of this process (``VmRSS``)."""
    for line in (_read(Path("/proc/self/status")) or "").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


@dataclass(frozen=True)
class MemoryBudget:
    """How much memory this process may hold: the cgroup limit, or the host's memory."""

    limit_bytes: int  # the pod limit, or the host's memory when there is none
    source: str  # "cgroup memory limit" or "host memory"
    available_bytes: int  # what is still free to take now (limit - usage, or MemAvailable)


def memory_budget(limits: CgroupLimits | None = None) -> MemoryBudget:
    """The memory this process may use and what of it is free now."""
    limits = read_cgroup_limits() if limits is None else limits
    host = host_memory_bytes()
    if limits.memory_limit_bytes is not None and limits.memory_limit_bytes < host:
        used = limits.memory_usage_bytes if limits.memory_usage_bytes is not None else process_rss_bytes()
        return MemoryBudget(limits.memory_limit_bytes, "cgroup memory limit",
                            max(0, limits.memory_limit_bytes - used))
    available = host_available_bytes()
    return MemoryBudget(host, "host memory", available if available is not None else host - process_rss_bytes())


# oneDNN (and PyTorch's ideep wrapper over it) cache one compiled primitive per input shape, 1,024
# of each by default. A server's steps come in every token count from 1 to max_batch_tokens, so
# both caches fill slowly for hours: measured on a tiny model, RSS +570 MB in 75 s of mixed load
# with the defaults, +32 MB with 16 entries (BENCHMARKS, soak). 64 entries keep the decode steps'
# few shapes hot; a miss costs one primitive creation (well under a millisecond).
NATIVE_CACHE_CAPACITY = "64"
_NATIVE_CACHES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def bound_native_caches(environ: dict[str, str] | None = None) -> None:
    """Cap oneDNN's and ideep's per-shape primitive caches, unless the user set them.

    Must run before torch creates its first oneDNN primitive (both read their variable once).
    """
    env = os.environ if environ is None else environ
    for name in _NATIVE_CACHES:
        env.setdefault(name, NATIVE_CACHE_CAPACITY)
