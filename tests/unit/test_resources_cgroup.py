"""The cgroup reader on synthetic cgroup v1, v2 and hybrid trees, and the limits derived from it."""

from __future__ import annotations

from pathlib import Path

import pytest
from fleetserve_server import memory, resources
from fleetserve_server.resources import CgroupLimits, choose_threads, read_cgroup_limits, usable_cores

GiB = 1024**3
V1_NO_LIMIT = "9223372036854771712"


def write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")


def v1_tree(tmp_path: Path, *, pod_limit: str, parent_limit: str = V1_NO_LIMIT, quota: str = "-1",
            period: str = "100000", usage: str = "1000", inactive: str = "0") -> tuple[Path, Path]:
    """A v1 host: memory and cpu,cpuacct hierarchies, the process in /kubepods/pod1/c1."""
    root = tmp_path / "cgroup"
    pod = "kubepods/pod1/c1"
    write(root, {
        "memory/memory.limit_in_bytes": V1_NO_LIMIT,
        "memory/kubepods/memory.limit_in_bytes": parent_limit,
        f"memory/{pod}/memory.limit_in_bytes": pod_limit,
        f"memory/{pod}/memory.usage_in_bytes": usage,
        f"memory/{pod}/memory.stat": f"cache 5\ntotal_inactive_file {inactive}\n",
        "cpu,cpuacct/cpu.cfs_quota_us": "-1",
        "cpu,cpuacct/cpu.cfs_period_us": "100000",
        f"cpu,cpuacct/{pod}/cpu.cfs_quota_us": quota,
        f"cpu,cpuacct/{pod}/cpu.cfs_period_us": period,
    })
    proc = tmp_path / "proc-cgroup"
    proc.write_text(f"12:memory:/{pod}\n4:cpu,cpuacct:/{pod}\n1:name=systemd:/{pod}\n0::/{pod}\n")
    return root, proc


def test_v1_limits_of_the_process_cgroup(tmp_path: Path) -> None:
    root, proc = v1_tree(tmp_path, pod_limit=str(4 * GiB), quota="150000", usage=str(GiB), inactive=str(GiB // 4))
    limits = read_cgroup_limits(root, proc)
    assert limits == CgroupLimits(memory_limit_bytes=4 * GiB, memory_usage_bytes=GiB - GiB // 4,
                                  cpu_quota_cores=1.5, version="v1")


def test_v1_a_parent_limit_below_the_pod_wins_and_no_limit_is_none(tmp_path: Path) -> None:
    root, proc = v1_tree(tmp_path, pod_limit=V1_NO_LIMIT, parent_limit=str(2 * GiB))
    assert read_cgroup_limits(root, proc).memory_limit_bytes == 2 * GiB
    root, proc = v1_tree(tmp_path / "b", pod_limit=V1_NO_LIMIT)
    limits = read_cgroup_limits(root, proc)
    assert limits.memory_limit_bytes is None and limits.cpu_quota_cores is None


def test_v1_inside_a_cgroup_namespace(tmp_path: Path) -> None:
    # In a container the process sees its own cgroup as "/" and the mount is that cgroup.
    root = tmp_path / "cgroup"
    write(root, {"memory/memory.limit_in_bytes": str(3 * GiB), "memory/memory.usage_in_bytes": "10",
                 "cpu/cpu.cfs_quota_us": "200000", "cpu/cpu.cfs_period_us": "100000"})
    proc = tmp_path / "proc-cgroup"
    proc.write_text("9:memory:/\n3:cpu,cpuacct:/\n0::/\n")
    assert read_cgroup_limits(root, proc) == CgroupLimits(3 * GiB, 10, 2.0, "v1")


def test_v2_unified(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    write(root, {
        "cgroup.controllers": "cpuset cpu io memory pids",
        "memory.max": "max",
        "kubepods.slice/memory.max": str(8 * GiB),
        "kubepods.slice/pod.scope/memory.max": str(6 * GiB),
        "kubepods.slice/pod.scope/memory.current": str(2 * GiB),
        "kubepods.slice/pod.scope/memory.stat": f"anon 5\ninactive_file {GiB}\n",
        "kubepods.slice/pod.scope/cpu.max": "250000 100000",
    })
    proc = tmp_path / "proc-cgroup"
    proc.write_text("0::/kubepods.slice/pod.scope\n")
    assert read_cgroup_limits(root, proc) == CgroupLimits(6 * GiB, GiB, 2.5, "v2")
    write(root, {"kubepods.slice/pod.scope/cpu.max": "max 100000", "kubepods.slice/memory.max": "max",
                 "kubepods.slice/pod.scope/memory.max": "max"})
    limits = read_cgroup_limits(root, proc)
    assert limits.memory_limit_bytes is None and limits.cpu_quota_cores is None


def test_hybrid_host_reads_v1_controllers_and_no_cgroup_at_all(tmp_path: Path) -> None:
    # systemd's hybrid layout: v1 controllers plus an empty unified tree (no controllers in it).
    root, proc = v1_tree(tmp_path, pod_limit=str(GiB), quota="100000")
    write(root, {"unified/cgroup.controllers": ""})
    assert read_cgroup_limits(root, proc).memory_limit_bytes == GiB
    empty = read_cgroup_limits(tmp_path / "nothing", tmp_path / "no-such-file")
    assert empty == CgroupLimits(None, None, None, "none")


@pytest.mark.parametrize(("quota", "affinity", "cores"), [
    (None, 8, 8),  # no quota: the CPU affinity
    (1.5, 8, 1),  # 1500m: one whole core (a second thread would be throttled)
    (0.5, 8, 1),  # below one core: still one thread
    (4.0, 2, 2),  # a quota above the cpuset: the cpuset
    (2.0, 16, 2),
])
def test_usable_cores(quota: float | None, affinity: int, cores: int) -> None:
    assert usable_cores(CgroupLimits(None, None, quota, "v2"), affinity=affinity) == cores


def test_choose_threads_never_exceeds_usable_cores() -> None:
    limits = CgroupLimits(None, None, 2.0, "v1")
    assert choose_threads(None, limits=limits, affinity=16, environ={}) == (2, "2 usable core(s)")
    assert choose_threads(1, limits=limits, affinity=16, environ={}) == (1, "--threads")
    assert choose_threads(8, limits=limits, affinity=16, environ={})[0] == 2
    assert "capped" in choose_threads(8, limits=limits, affinity=16, environ={})[1]
    assert choose_threads(None, limits=limits, affinity=16, environ={"OMP_NUM_THREADS": "1"}) == (1, "OMP_NUM_THREADS")
    assert choose_threads(None, limits=limits, affinity=16, environ={"OMP_NUM_THREADS": "64"})[0] == 2
    assert choose_threads(None, limits=limits, affinity=16, environ={"OMP_NUM_THREADS": "junk"})[0] == 2
    with pytest.raises(ValueError, match="threads must be >= 1"):
        choose_threads(0, limits=limits, affinity=16, environ={})


def test_memory_budget_uses_the_cgroup_limit_below_the_host() -> None:
    host = resources.host_memory_bytes()
    budget = resources.memory_budget(CgroupLimits(2 * GiB, GiB // 2, None, "v1"))
    assert (budget.limit_bytes, budget.source, budget.available_bytes) == (2 * GiB, "cgroup memory limit",
                                                                          2 * GiB - GiB // 2)
    unlimited = resources.memory_budget(CgroupLimits(None, None, None, "none"))
    assert unlimited.limit_bytes == host and unlimited.source == "host memory"
    assert 0 < unlimited.available_bytes <= host
    # A "limit" above the host's memory is no limit at all.
    assert resources.memory_budget(CgroupLimits(host * 2, 1, None, "v1")).source == "host memory"


def test_cpu_step_budget_follows_the_cores() -> None:
    from fleetserve_server.runner.factory import DEFAULT_MAX_BATCH_TOKENS, cpu_max_batch_tokens

    arch = memory.known_architecture("builtin:smollm2-135m-instruct")
    assert arch is not None
    budgets = [cpu_max_batch_tokens(arch, cores=c, max_model_len=2048, max_num_seqs=32, block_size=16)
               for c in (1, 2, 4, 8, 64)]
    assert budgets == sorted(budgets) and budgets[0] < budgets[1] < budgets[3]
    assert all(b % 16 == 0 and 32 <= b <= DEFAULT_MAX_BATCH_TOKENS for b in budgets)
    assert budgets[-1] == DEFAULT_MAX_BATCH_TOKENS
    big = memory.known_architecture("llama-3.1-8b")
    assert big is not None
    # a model too big for a one-second step still lets every running sequence decode each step
    assert cpu_max_batch_tokens(big, cores=2, max_model_len=2048, max_num_seqs=32, block_size=16) == 32


def test_startup_refuses_memory_that_is_not_free() -> None:
    import torch
    from fleetserve_server.runner.factory import InsufficientMemoryError, check_memory_free

    check_memory_free(torch.device("cpu"), kv_bytes=GiB // 64, reserve_bytes=1, capacity=4096)
    with pytest.raises(InsufficientMemoryError, match=r"KV cache \(123 tokens = .* GiB\).* only .* GiB is free"):
        check_memory_free(torch.device("cpu"), kv_bytes=1 << 50, reserve_bytes=GiB, capacity=123)


def test_native_caches_are_capped_unless_the_user_chose() -> None:
    env: dict[str, str] = {"LRU_CACHE_CAPACITY": "8"}
    resources.bound_native_caches(env)
    assert env == {"LRU_CACHE_CAPACITY": "8", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": resources.NATIVE_CACHE_CAPACITY}
