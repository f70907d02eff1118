"""``python -m fleetserve_server.runner.tp_worker RANK SIZE PORT SPEC``: one tensor-parallel worker.

Started by rank 0 (``runner.distributed.Workers``), never by hand. It connects
to rank 0's TCP store, loads its shard and allocates its KV cache, reports
``loaded`` with a barrier, then runs every plan rank 0 broadcasts until the
stop plan (exit 0). A failure before that is written to the store as
``error/RANK`` for rank 0's message, then the worker exits 1; a broken
collective later (rank 0 or another worker died) exits 1 too.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from pathlib import Path


def main(argv: list[str]) -> int:
    rank, size, port, spec_json = int(argv[0]), int(argv[1]), int(argv[2]), argv[3]
    from fleetserve_server.resources import bound_native_caches

    bound_native_caches()  # before torch creates a oneDNN primitive, as `fleetserve serve` does
    import datetime

    import torch
    import torch.distributed as dist

    from fleetserve_server.runner import distributed
    from fleetserve_server.runner.loader import load_model, model_bytes
    from fleetserve_server.runner.model_runner import TorchModelRunner

    logging.basicConfig(level=logging.INFO, format=f"tp-rank{rank} %(levelname)s %(name)s: %(message)s")
    distributed.watch_parent()
    fields = json.loads(spec_json)
    spec = distributed.WorkerSpec(**{**fields, "keep_layers": tuple(fields["keep_layers"])})
    store = dist.TCPStore("127.0.0.1", port, size, False,
                          timeout=datetime.timedelta(seconds=distributed.CONNECT_TIMEOUT_SECONDS))
    store.set(f"connected/{rank}", "1")
    try:
        torch.set_num_threads(spec.threads)
        device = distributed.rank_device(torch.device(spec.device), rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        tp = distributed.TensorParallel(rank, size, device, store)
        loaded = load_model(Path(spec.path), dtype=spec.dtype, device=device, quantization=spec.quantization,
                            max_positions=spec.max_positions, keep_layers=spec.keep_layers, tp=tp)
        if device.type == "cuda":  # its own GPU: check it as rank 0 checks its own (CPU ranks share rank 0's check)
            from fleetserve_server.runner.factory import check_memory_free

            model = loaded.model
            slots = spec.num_blocks * spec.block_size
            elem = torch.empty(0, dtype=model.dtype).element_size()
            per_token = 2 * model.num_layers * model.num_kv_heads * model.head_dim * elem
            check_memory_free(device, kv_bytes=slots * per_token, reserve_bytes=0, capacity=slots)
        runner = TorchModelRunner(loaded.model, num_blocks=spec.num_blocks, block_size=spec.block_size,
                                  eos_token_ids=frozenset())
        # what this rank allocated (after packing), for rank 0's per-device report
        store.set(f"memory/{rank}", json.dumps({"rank": rank, "weights_bytes": model_bytes(runner.model),
                                                "kv_cache_bytes": runner.kv_cache_bytes}))
    except BaseException as exc:
        store.set(f"error/{rank}", f"{type(exc).__name__}: {exc}")
        traceback.print_exc()
        return 1
    try:
        tp.barrier()  # loaded: rank 0 returns from create_engine once every rank is here
        runner.follow()
    except RuntimeError as exc:  # a peer died: its connection closed
        print(f"tp-rank{rank}: stopping: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
