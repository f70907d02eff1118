"""Tensor parallelism's processes and collectives: one process per rank, rank 0 drives.

Rank 0 is the process that owns the engine (the HTTP server or ``LLM``): the
scheduler and the block manager run there alone. Ranks 1..N-1 are worker
processes (``python -m fleetserve_server.runner.tp_worker``) that load their
shard, allocate their share of the KV cache (their KV heads, every block), and
then follow: each step rank 0 broadcasts the step's plan (token ids,
positions, slot mapping, block tables, logits rows: ``model_runner.StepPlan``)
and every rank runs the same forward on its shard; the row-parallel layers
all-reduce, and the vocabulary-parallel logits are gathered on rank 0, which
samples.

Two groups over one TCP store on 127.0.0.1 (a pod's GPUs share a host):

* ``group``, the forward's collectives: NCCL on CUDA, gloo on CPU;
* ``plan_group``, gloo, for the plans: a worker waits in it for as long as the
  server idles, so its timeout is unbounded, and it stays on the CPU where a
  Python object lives (the CPU's ``group`` is the same group).

Process groups are built directly (``ProcessGroupGloo(store, ...)``), not as
torch.distributed's global default group, so one process may hold several
engines (tests) and nothing else in it sees a group it did not create.

A rank that dies breaks its TCP connections: gloo raises on every other rank
at once (``Connection closed by peer``), so rank 0's step fails instead of
hanging, and the workers, waiting for a plan, exit. ``Workers.check_health``
notices a dead worker while the server idles, for ``/health``.
"""

from __future__ import annotations

import atexit
import datetime
import json
import logging
import os
import pickle
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# A worker waits for the next plan as long as the server idles; a dead peer still fails it at once.
PLAN_TIMEOUT = datetime.timedelta(days=365)
CONNECT_TIMEOUT_SECONDS = 600.0  # spawning a worker and importing torch (and CUDA) on a busy node
STOP_TIMEOUT_SECONDS = 10.0


class WorkerFailedError(RuntimeError):
    """A tensor-parallel worker failed or died; the message names the rank, its pid and why."""


class TensorParallel:
    """One rank's collectives. ``vocab_rows[r]``: rank r's vocabulary rows (set by the loader)."""

    def __init__(self, rank: int, size: int, device: torch.device, store: Any) -> None:
        self.rank, self.size, self.device = rank, size, device
        # backend objects used directly (their collectives return a Work to wait on)
        self.plan_group: Any = dist.ProcessGroupGloo(dist.PrefixStore("plan", store), rank, size, PLAN_TIMEOUT)
        if device.type == "cuda":
            self.group: Any = dist.ProcessGroupNCCL(dist.PrefixStore("nccl", store), rank, size,
                                                    dist.ProcessGroupNCCL.Options())
        else:
            self.group = self.plan_group
        self.vocab_rows: list[int] = []

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place (it must be contiguous); returns it."""
        self.group.allreduce([tensor]).wait()
        return tensor

    def barrier(self) -> None:
        self.plan_group.allreduce([torch.zeros(1)]).wait()

    def broadcast_plan(self, plan: object | None) -> None:
        """Rank 0: send a step's plan (any picklable object), or None to stop the workers."""
        payload = b"" if plan is None else pickle.dumps(plan, protocol=pickle.HIGHEST_PROTOCOL)
        self._broadcast(torch.tensor([len(payload) if plan is not None else -1], dtype=torch.long))
        if payload:
            self._broadcast(torch.frombuffer(bytearray(payload), dtype=torch.uint8))

    def recv_plan(self) -> object | None:
        """Workers: the next plan from rank 0 (None: stop)."""
        header = torch.zeros(1, dtype=torch.long)
        self._broadcast(header)
        size = int(header.item())
        if size < 0:
            return None
        payload = torch.empty(size, dtype=torch.uint8)
        self._broadcast(payload)
        return pickle.loads(payload.numpy().tobytes())

    def _broadcast(self, tensor: torch.Tensor) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.plan_group.broadcast([tensor], opts).wait()

    def gather_vocab(self, local: torch.Tensor) -> torch.Tensor | None:
        """Rank 0: the full ``[rows, vocab]`` from every rank's ``[rows, vocab_rows[r]]`` slice
        (padded to one width for the gather); other ranks: None."""
        width = max(self.vocab_rows)
        padded = local if local.shape[1] == width else torch.nn.functional.pad(local, (0, width - local.shape[1]))
        padded = padded.contiguous()
        opts = dist.GatherOptions()
        opts.rootRank = 0
        if self.rank != 0:
            self.group.gather([], [padded], opts).wait()
            return None
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        self.group.gather([parts], [padded], opts).wait()
        return torch.cat([p[:, :n] for p, n in zip(parts, self.vocab_rows, strict=True)], dim=1)


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to build its rank's runner (passed as JSON on its command line)."""

    path: str
    dtype: str
    device: str  # "cpu" or "cuda" (a worker uses cuda:<rank>)
    quantization: str
    max_positions: int
    num_blocks: int
    block_size: int
    threads: int
    keep_layers: tuple[int, ...] = ()


def rank_device(device: torch.device, rank: int) -> torch.device:
    return torch.device("cuda", rank) if device.type == "cuda" else torch.device("cpu")


class Workers:
    """Rank 0's handle on ranks 1..N-1: spawn, connect, wait until loaded, check, stop.

    Invariant: once ``start`` returned, every worker is connected to ``tp``'s groups; a worker
    that exits before ``stop`` makes ``check_health`` return why, and rank 0's next collective
    raise.
    """

    def __init__(self, size: int, spec: WorkerSpec, device: torch.device) -> None:
        self.size, self.spec = size, spec
        self.store = dist.TCPStore("127.0.0.1", 0, size, True, timeout=datetime.timedelta(
            seconds=CONNECT_TIMEOUT_SECONDS), wait_for_workers=False)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.stopped = False
        args = json.dumps(asdict(spec))
        for rank in range(1, size):
            cmd = [sys.executable, "-m", "fleetserve_server.runner.tp_worker", str(rank), str(size),
                   str(self.store.port), args]
            self.procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL))
        try:
            self._wait_for("connected")
            self.tp = TensorParallel(0, size, device, self.store)
        except BaseException:
            self.stop()
            raise
        atexit.register(self.stop)  # a process that exits without close() still stops its workers

    def _wait_for(self, stage: str) -> None:
        """Until every worker has set ``<stage>/<rank>`` in the store; raise if one exits first."""
        deadline = time.monotonic() + CONNECT_TIMEOUT_SECONDS
        pending = set(range(1, self.size))
        while pending:
            for rank in list(pending):
                if self.store.check([f"{stage}/{rank}"]):
                    pending.discard(rank)
            problem = self.check_health()
            if problem:
                raise WorkerFailedError(problem)
            if time.monotonic() > deadline:
                raise WorkerFailedError(f"tensor-parallel ranks {sorted(pending)} did not report {stage!r} within "
                                        f"{CONNECT_TIMEOUT_SECONDS:.0f} s")
            if pending:
                time.sleep(0.05)

    def wait_loaded(self) -> None:
        """Block until every rank loaded its shard and allocated its KV cache (a barrier)."""
        try:
            self.tp.barrier()
        except RuntimeError as exc:
            deadline = time.monotonic() + 5.0  # its socket closes as it exits: give the exit a moment to land
            while self.check_health() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            raise WorkerFailedError(self.check_health() or f"a tensor-parallel worker failed: {exc}") from None

    def rank_memory(self) -> list[dict[str, int]]:
        """What each worker allocated: ``{"rank", "weights_bytes", "kv_cache_bytes"}``, ranks 1..N-1."""
        return [json.loads(self.store.get(f"memory/{rank}")) for rank in range(1, self.size)]

    def _error(self, rank: int) -> str:
        try:
            if self.store.check([f"error/{rank}"]):
                return ": " + self.store.get(f"error/{rank}").decode(errors="replace")
        except Exception:  # noqa: BLE001 - the store may be gone with the process
            pass
        return " (see its log above)"

    def check_health(self) -> str | None:
        """Why a worker is gone (rank, pid, exit code, its error), or None while all run."""
        if self.stopped:
            return "tensor-parallel workers were stopped"
        for rank, proc in enumerate(self.procs, start=1):
            code = proc.poll()
            if code is not None:
                how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
                return f"tensor-parallel worker rank {rank} (pid {proc.pid}) {how}{self._error(rank)}"
        return None

    def stop(self) -> None:
        """Tell the workers to exit (a None plan) and reap them; kill what does not exit. Idempotent."""
        if self.stopped:
            return
        self.stopped = True
        tp = getattr(self, "tp", None)
        if tp is not None and all(p.poll() is None for p in self.procs):
            try:
                tp.broadcast_plan(None)
            except Exception:  # noqa: BLE001 - a dead peer: terminate below
                pass
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def watch_parent() -> None:
    """Exit this worker when rank 0's process is gone (a collective would notice only at the next step)."""
    import threading

    parent = os.getppid()

    def loop() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=loop, name="fleetserve-tp-parent", daemon=True).start()
