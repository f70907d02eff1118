"""The planner's prediction, made before anything is loaded, against what the runner allocates (CPU).

The prediction comes from ``plan_memory`` over the model's config.json alone;
the allocation is measured afterwards from the tensors themselves (every
unique parameter, buffer and bitsandbytes quantization state, and the KV-cache
tensor). The issue's bar: within 5 % for weights, KV cache and their sum.
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from fleetserve_server.memory import MiB, architecture_from_config, plan_memory  # noqa: E402
from fleetserve_server.runner.factory import create_engine  # noqa: E402
from fleetserve_server.runner.loader import model_bytes  # noqa: E402
from fleetserve_server.testing import make_tiny_llama  # noqa: E402

MAX_MODEL_LEN, MAX_NUM_SEQS, BATCH_TOKENS = 256, 4, 256


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    # wide enough that the Linear layers dominate, as in real models (hidden 256, 4 layers)
    return make_tiny_llama(tmp_path_factory.mktemp("models") / "alloc", num_layers=4, hidden_size=256,
                           num_heads=8, num_kv_heads=2, intermediate_size=688)


@pytest.mark.parametrize("quantization", ["none", "int8", "nf4"])
def test_prediction_before_loading_matches_the_allocation(model_dir, quantization: str) -> None:  # type: ignore[no-untyped-def]
    if quantization != "none":
        pytest.importorskip("bitsandbytes")
    arch = architecture_from_config(json.loads((model_dir / "config.json").read_text()), name="alloc")
    predicted = plan_memory(arch, quantization=quantization, dtype="float32", device="cpu",
                            device_memory_bytes=64 * MiB, max_model_len=MAX_MODEL_LEN, max_num_seqs=MAX_NUM_SEQS,
                            max_batch_tokens=BATCH_TOKENS)
    assert predicted.fits and predicted.kv_capacity_tokens > MAX_NUM_SEQS * MAX_MODEL_LEN
    [rank] = predicted.ranks  # one device: the server does not shard yet

    loaded = create_engine(str(model_dir), quantization=quantization, device="cpu", max_model_len=MAX_MODEL_LEN,
                           max_num_seqs=MAX_NUM_SEQS, max_batch_tokens=BATCH_TOKENS,
                           kv_cache_tokens=predicted.kv_capacity_tokens, progress=False)
    weights = model_bytes(loaded.runner.model)
    kv = loaded.runner.kv_cache.numel() * loaded.runner.kv_cache.element_size()
    assert abs(rank.weights_bytes - weights) <= 0.05 * weights, (rank.weights_bytes, weights)
    kv_predicted = predicted.kv_capacity_tokens * rank.kv_bytes_per_token
    assert abs(kv_predicted - kv) <= 0.05 * kv, (kv_predicted, kv)
    total = weights + kv
    assert abs(rank.weights_bytes + kv_predicted - total) <= 0.05 * total
