"""The memory-fit proof: does one replica hold the model and one full-length sequence?

Computed before any pod exists, from the spec alone, with the server's own
planner (``fleetserve_server.memory``), so the KV-cache size written into the
server's config is the number the proof was made with.

The proof is per device: GPU memory is never pooled. ``resources.gpus`` N is
the server's tensor-parallel size (``--tensor-parallel-size``, up to
``memory.SERVER_MAX_TENSOR_PARALLEL_SIZE``): each of N processes holds its
Megatron shard on its own GPU, so the proof plans every rank's shard against
one GPU's memory (``memory.plan_memory``), never the sum of the GPUs' memory,
which no process can use. A size that cannot split the model's attention
heads never runs: that is MemoryFits=False, naming the sizes that would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from fleetserve_server.memory import (
    SERVER_MAX_TENSOR_PARALLEL_SIZE,
    GiB,
    MemoryPlan,
    known_architecture,
    parse_quantity,
    plan_memory,
)
from fleetserve_server.sharding import check_tensor_parallel_size

from ..api.spec import LLMDeploymentSpec

# With gpus: 0 the whole process lives in resources.memory: Python, torch and
# transformers take this much before the first weight is loaded.
CPU_RUNTIME_RESERVE_BYTES = 1 * GiB

FitStatus = Literal["True", "False", "Unknown"]


@dataclass(frozen=True)
class MemoryFit:
    """Outcome of the proof. ``plan`` is set whenever the planner ran.

    ``status`` is the MemoryFits condition: True (fits), False (never fits —
    no pod is created) or Unknown (the model's config is not known offline;
    the pods are created and the server checks at load time).
    """

    status: FitStatus
    reason: str
    message: str
    device: str
    available_bytes: int | None  # one device's memory (or the CPU's, after the runtime reserve)
    plan: MemoryPlan | None = None
    devices: int = 1  # GPUs in the pod (1 on CPU)
    tensor_parallel_size: int = 1  # how many of them the server splits the model across

    @property
    def fits(self) -> bool | None:
        return {"True": True, "False": False}.get(self.status)

    def to_status(self) -> dict[str, Any]:
        """``status.memory`` (camelCase); every size is what one device holds."""
        out: dict[str, Any] = {"device": self.device, "message": self.message, "devices": self.devices,
                               "tensorParallelSize": self.tensor_parallel_size}
        if self.fits is not None:
            out["fits"] = self.fits
        if self.available_bytes is not None:
            out["availableBytes"] = self.available_bytes
        if self.plan is not None:
            out.update(
                weightsBytes=self.plan.weights_bytes,
                kvBytesPerToken=self.plan.kv_bytes_per_token,
                kvCapacityTokens=self.plan.kv_capacity_tokens,
                maxConcurrentSequences=self.plan.max_concurrent_sequences,
            )
        return out


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def _bytes(field: str, quantity: str, device: str) -> int | MemoryFit:
    """Bytes of a memory quantity, or the MemoryFit that explains why it is not one."""
    try:
        value = parse_quantity(quantity)
    except ValueError as exc:
        value, problem = -1, str(exc)
    else:
        problem = "" if value > 0 else "it is not a positive amount"
    if problem:
        return MemoryFit("False", "InvalidMemoryQuantity",
                         f"{field} {quantity!r} is not a usable amount of memory ({problem}); "
                         f"write bytes with a binary suffix, e.g. 24Gi or 512Mi", device, None)
    return value


def check_memory_fit(spec: LLMDeploymentSpec) -> MemoryFit:
    """Run the planner for one device of one replica of ``spec``; never raises for a valid spec."""
    res = spec.resources
    devices, tp, idle_note = 1, 1, ""
    if res.gpus > 0:
        device = "cuda"
        assert res.gpu_memory is not None  # guaranteed by the Resources rule
        per_gpu = _bytes("resources.gpuMemory", res.gpu_memory, device)
        if isinstance(per_gpu, MemoryFit):
            return per_gpu
        available, devices = per_gpu, res.gpus
        tp = min(res.gpus, SERVER_MAX_TENSOR_PARALLEL_SIZE)
        where = f"one {res.gpu_memory} GPU" if tp == 1 else f"each of {tp} x {res.gpu_memory} GPUs"
        if res.gpus > tp:
            idle_note = (
                f"resources.gpus is {res.gpus}, but the server splits a model over at most {tp} GPUs (tensor "
                f"parallelism): the other {res.gpus - tp} stay idle; "
            )
    else:
        device = "cpu"
        assert res.memory is not None  # guaranteed by the Resources rule
        memory = _bytes("resources.memory", res.memory, device)
        if isinstance(memory, MemoryFit):
            return memory
        available = memory - CPU_RUNTIME_RESERVE_BYTES
        where = f"resources.memory {res.memory} minus {_gib(CPU_RUNTIME_RESERVE_BYTES)} for the Python runtime"
        if available <= 0:
            return MemoryFit(
                "False", "InsufficientMemory",
                f"resources.memory {res.memory} leaves nothing for the model after the "
                f"{_gib(CPU_RUNTIME_RESERVE_BYTES)} the server's runtime needs; set resources.memory "
                f"to at least 2Gi", device, 0,
            )
    arch = known_architecture(spec.model.source)
    if arch is None:
        return MemoryFit(
            "Unknown", "ModelConfigUnknown",
            f"{idle_note}the memory planner has no config for {spec.model.source!r} offline (it knows the "
            f"builtin model, a catalog of common models and local directories with a config.json); pods are "
            f"created and the server sizes its KV cache when it loads the model",
            device, available, None, devices, tp,
        )
    try:
        check_tensor_parallel_size(arch, tp)
    except ValueError as exc:
        return MemoryFit("False", "InvalidTensorParallelSize",
                         f"resources.gpus {res.gpus} is the server's tensor-parallel size, and {exc}; set "
                         f"resources.gpus to one of those", device, available, None, devices, tp)
    try:
        plan = plan_memory(
            arch,
            quantization=spec.quantization,
            dtype=spec.dtype,
            device=device,
            device_memory_bytes=available,
            kv_cache_memory_fraction=spec.engine.kv_cache_memory_fraction,
            max_model_len=spec.engine.max_model_len,
            max_num_seqs=spec.engine.max_num_seqs,
            block_size=spec.engine.block_size,
            max_batch_tokens=spec.engine.effective_max_batch_tokens,
            tensor_parallel_size=tp,
            # never suggest more GPUs than the server can split a model across
            max_tensor_parallel_size=SERVER_MAX_TENSOR_PARALLEL_SIZE,
        )
    except ValueError as exc:
        return MemoryFit("Unknown", "PlannerError", f"the memory planner rejected the spec: {exc}",
                         device, available, None, devices, tp)
    message = f"{idle_note}{arch.name} on {where}: {plan.message}"
    if plan.fits:
        return MemoryFit("True", "Fits", message, device, available, plan, devices, tp)
    return MemoryFit("False", "DoesNotFit", message, device, available, plan, devices, tp)
