"""Memory a real `fleetserve serve` process commits: all of it before /ready, and within its cgroup limit.

The model is a tiny random Llama with a wide KV (8 layers x 8 KV heads x 32:
16 KiB per token in float32), so a 32,768-token cache is 512 MiB — far more
than the noise of the Python heap — and a load that fills it takes seconds.
"""

from __future__ import annotations

import os
import random
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fleetserve_server.bench.launch import ServerProcess, fleetserve_argv, free_port, start_server
from serve_util import COMMON_FLAGS, SERVER_ENV, launch, metric

KV_TOKENS = 32768
KV_BYTES_PER_TOKEN = 2 * 8 * 8 * 32 * 4


@pytest.fixture(scope="module")
def wide_kv_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fleetserve_server.testing import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("models") / "wide-kv", num_layers=8, hidden_size=256,
                           num_heads=8, num_kv_heads=8, intermediate_size=128, max_position_embeddings=4096)


def status_bytes(pid: int, field: str) -> int:
    """A size from /proc/PID/status: VmRSS (resident), VmHWM (its peak so far), RssAnon (the
    anonymous part: heap, KV cache, weights copied into memory; not the mapped library files)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for pid {pid}")


def rss_bytes(pid: int) -> int:
    return status_bytes(pid, "VmRSS")


def fill_cache(url: str, tokens: int, *, prompt_len: int = 500, max_tokens: int = 8) -> int:
    """Send distinct random prompts until ``tokens`` KV slots have been written; returns the count sent."""
    rng = random.Random(7)
    count = -(-tokens // (prompt_len + max_tokens)) + 2

    def one(_: int) -> int:
        prompt = [rng.randrange(3, 250) for _ in range(prompt_len)]
        body = {"model": "wide-kv", "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
                "temperature": 0}
        return httpx.post(url + "/v1/completions", json=body, timeout=300).status_code

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(one, range(count)))
    assert codes == [200] * count, codes
    return count


def test_kv_cache_is_resident_before_ready(wide_kv_model: Path, tmp_path: Path) -> None:
    # --malloc-trim-seconds 1: once the load is over the server hands the heap the burst left free back
    # to the OS within about a second, so what stays resident is what the process keeps, not glibc's
    # cache of freed activations (40-100 MiB here, more the busier the machine: see README, Serving).
    proc = launch(wide_kv_model, tmp_path, "--kv-cache-tokens", str(KV_TOKENS), "--max-num-seqs", "8",
                  "--malloc-trim-seconds", "1")
    try:
        url, pid = proc.base_url, proc.process.pid
        kv_bytes = metric(url, "fleetserve_model_memory_bytes", kind="kv_cache")
        assert kv_bytes == KV_TOKENS * KV_BYTES_PER_TOKEN  # 512 MiB: unmistakable next to the heap's noise
        ready = rss_bytes(pid)
        assert ready > kv_bytes, f"RSS after /ready ({ready / 2**20:.0f} MiB) does not even hold the KV cache"
        fill_cache(url, KV_TOKENS)
        assert metric(url, "fleetserve_prompt_tokens") >= KV_TOKENS  # every block was written at least once
        # The peak under load: a cache committed by traffic would add its 512 MiB here.
        peak = status_bytes(pid, "VmHWM")
        assert peak <= ready + kv_bytes // 2, (
            f"peak RSS under load {peak / 2**20:.0f} MiB vs {ready / 2**20:.0f} MiB after /ready "
            f"(+{(peak - ready) / 2**20:.0f} MiB): the KV cache was committed by traffic, not at startup")
        # What stays resident once the server is idle again: within 5 % of what it held at /ready.
        deadline = time.monotonic() + 30
        while (kept := rss_bytes(pid)) > ready * 1.05 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert kept <= ready * 1.05, (
            f"RSS grew from {ready / 2**20:.0f} MiB after /ready to {kept / 2**20:.0f} MiB after the load "
            f"(+{(kept - ready) / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB): memory was committed by "
            "traffic, not at startup")
    finally:
        assert proc.stop() == 0, proc.log_tail()


# ---- a real cgroup memory limit (needs a writable cgroup v1 memory hierarchy, e.g. as root) ----------


def _own_memory_cgroup() -> Path | None:
    root = Path("/sys/fs/cgroup/memory")
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            here = root / path.strip("/")
            return here if here.is_dir() else root
    return None


@pytest.fixture
def memory_cgroup() -> Iterator[Path]:
    """A fresh child memory cgroup (v1); skipped where this process may not make one."""
    parent = _own_memory_cgroup()
    if parent is None or not os.access(parent, os.W_OK):
        pytest.skip("needs a writable cgroup v1 memory hierarchy (run as root on a cgroup v1 host)")
    child = parent / f"fleetserve-test-{uuid.uuid4().hex[:8]}"
    try:
        child.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot create a memory cgroup under {parent}: {exc}")
    try:
        yield child
    finally:
        for pid in (child / "cgroup.procs").read_text().split():
            try:
                os.kill(int(pid), 9)
            except ProcessLookupError:
                pass
        try:
            child.rmdir()
        except OSError:
            pass


def _launch_in(cgroup: Path, model: Path, log_dir: Path, *flags: str, common: bool = True) -> ServerProcess:
    """`fleetserve serve` started inside ``cgroup`` (it moves itself in before exec'ing);
    ``common=False`` drops the shared flags' explicit --kv-cache-tokens."""
    port = free_port()
    base = COMMON_FLAGS if common else [f for f in COMMON_FLAGS if f not in ("--kv-cache-tokens", "32768")]
    argv = fleetserve_argv(str(model), port, [*base, *flags])
    wrapped = ["/bin/sh", "-c", f'echo $$ > "{cgroup}/cgroup.procs" && exec "$@"', "sh", *argv]
    return start_server(f"cg-{port}", wrapped, port=port, ready_path="/ready", log_dir=log_dir,
                        timeout=300, env=SERVER_ENV)


def _oom_kills(cgroup: Path) -> int | None:
    """The cgroup's OOM-kill count (``oom_kill`` in memory.oom_control, kernels >= 4.13), None if absent."""
    for line in (cgroup / "memory.oom_control").read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            return int(value)
    return None


def test_kv_cache_sized_from_the_cgroup_limit(wide_kv_model: Path, tmp_path: Path, memory_cgroup: Path) -> None:
    limit = 2 * 2**30
    (memory_cgroup / "memory.limit_in_bytes").write_text(str(limit))
    # No --kv-cache-tokens: the CPU default (max_num_seqs x max_model_len = 64Ki tokens = 1 GiB)
    # does not fit in the 2 GiB limit next to the runtime (~1 GiB); the cache must shrink to what does.
    proc = _launch_in(memory_cgroup, wide_kv_model, tmp_path, common=False)
    try:
        kv_bytes = metric(proc.base_url, "fleetserve_model_memory_bytes", kind="kv_cache")
        # The cache fits beside the rest of the process's own memory (RssAnon: VmRSS also counts torch's
        # library pages mapped from the page cache — 2.155 GB VmRSS in this 2 GiB cgroup in a clean-clone
        # run, with no OOM kill: clean file pages the kernel reclaims, not the server's memory).
        assert 64 * 2**20 < kv_bytes < limit - status_bytes(proc.process.pid, "RssAnon") + kv_bytes
        tokens = int(kv_bytes // KV_BYTES_PER_TOKEN)
        assert tokens < 65536, "the KV cache was not sized from the cgroup limit"
        fill_cache(proc.base_url, tokens)  # the whole cache in use: the limit holds, no OOM kill
        assert proc.process.poll() is None, proc.log_tail()
        assert _oom_kills(memory_cgroup) in (0, None), "the kernel OOM-killed a process in the server's cgroup"
        # The process's own memory fits the limit. (VmRSS may not: it also counts the pages of
        # torch's libraries mapped from the page cache, charged to whichever cgroup read them first.)
        assert status_bytes(proc.process.pid, "RssAnon") < limit
    finally:
        assert proc.stop() == 0, proc.log_tail()


def test_startup_fails_naming_the_numbers_when_the_plan_does_not_fit(
    wide_kv_model: Path, tmp_path: Path, memory_cgroup: Path
) -> None:
    (memory_cgroup / "memory.limit_in_bytes").write_text(str(2 * 2**30))
    # An explicit plan (what the operator writes) of 1.5 GiB of KV in a 2 GiB pod.
    with pytest.raises(RuntimeError, match="exited with code 1") as failed:
        _launch_in(memory_cgroup, wide_kv_model, tmp_path, "--kv-cache-tokens", str(3 * KV_TOKENS),
                   "--max-num-seqs", "64")
    text = str(failed.value)
    assert "cannot commit the planned memory" in text or "exceeds what the memory plan allows" in text, text
    assert "GiB" in text and "kv_cache_tokens" in text, text
