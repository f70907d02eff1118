"""Greedy identity and the memory proof on a CUDA device (skipped without one; run by
``benchmarks/gpu_check.sh``).

* float16 / bfloat16: ``LLM.generate`` batched (8 prompts, one engine) against Hugging Face
  ``generate(do_sample=False)`` one prompt at a time, same device and dtype.
* int8 / nf4: batched against the same fleetserve model one prompt at a time (bitsandbytes'
  kernels differ from transformers' fused-layer-free reference, so HF is no reference there).

In half precision two runs may round a near-tie differently, so outputs must be identical or
diverge only where the reference's top two logits are within a dtype-sized tolerance
(``identity_util.check_greedy_close``).
* the planner's per-device prediction, made before loading, against what the loaded model and
  its KV cache allocate on the GPU (within 5 %), for none / int8 / nf4.
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fleetserve_server import LLM, SamplingParams  # noqa: E402
from fleetserve_server.memory import GiB, architecture_from_config, plan_memory  # noqa: E402
from fleetserve_server.runner.builtin import resolve_model  # noqa: E402
from fleetserve_server.runner.loader import model_bytes  # noqa: E402
from identity_util import check_greedy_close  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/gpu_check.sh)")

PROMPTS = [
    "The capital of France is", "Hi", "Water boils at a temperature of",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "def fibonacci(n):", "The three primary colors are", "Translate to French: I like apples.",
    "List three animals that live in the ocean: 1.",
]
MAX_NEW = 16
# logit gap under which a divergence is a near-tie: ~2 units in the last place of logits ~20-30 in
# bfloat16 (8 bits of mantissa), tighter for float16 (11 bits)
TOLERANCE = {"bfloat16": 0.5, "float16": 0.1, "int8": 0.5, "nf4": 0.5}


@pytest.fixture(scope="module")
def builtin():  # type: ignore[no-untyped-def]
    path = resolve_model("builtin:smollm2-135m-instruct", progress=False).path
    tok = transformers.AutoTokenizer.from_pretrained(path)
    return path, [tok.encode(p) for p in PROMPTS]


def _fleetserve_logits(llm: LLM):  # type: ignore[no-untyped-def]
    """``context -> logits`` of the next token, from the fleetserve engine itself (one sequence)."""
    sampler = llm.loaded.runner.sampler

    def logits_at(context: list[int]) -> list[float]:
        seen: list[list[float]] = []
        sample = sampler.sample

        def capture(logits, rows):  # type: ignore[no-untyped-def]
            seen.append(logits[0].float().tolist())
            return sample(logits, rows)

        sampler.sample = capture  # type: ignore[method-assign]
        try:
            llm.generate([context], SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
        finally:
            sampler.sample = sample  # type: ignore[method-assign]
        return seen[0]

    return logits_at


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cuda_batched_greedy_close_to_hf(builtin, dtype: str) -> None:  # type: ignore[no-untyped-def]
    path, prompts = builtin
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to("cuda").eval()
    expected = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p], device="cuda")
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=MAX_NEW)
            expected.append(out[0, len(p):].tolist())

    def hf_logits(context: list[int]) -> list[float]:
        with torch.inference_mode():
            return hf(torch.tensor([context], device="cuda")).logits[0, -1].float().tolist()

    llm = LLM(max_model_len=256, max_num_seqs=16, dtype=dtype, device="cuda", block_size=16)
    outs = llm.generate(prompts, SamplingParams(max_tokens=MAX_NEW, temperature=0.0), use_tqdm=False)
    got = [o.outputs[0].token_ids for o in outs]
    bad = check_greedy_close(prompts, got, expected, hf_logits, TOLERANCE[dtype])
    assert not bad, bad
    assert sum(a == b for a, b in zip(got, expected, strict=True)) >= len(prompts) // 2  # mostly identical


@pytest.mark.parametrize("quantization", ["int8", "nf4"])
def test_cuda_quantized_batched_greedy_close_to_one_at_a_time(builtin, quantization: str) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("bitsandbytes")
    path, prompts = builtin
    llm = LLM(max_model_len=256, max_num_seqs=16, dtype="bfloat16", device="cuda", quantization=quantization,
              enable_prefix_caching=False)
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
    alone = [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    batched = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    bad = check_greedy_close(prompts, batched, alone, _fleetserve_logits(llm), TOLERANCE[quantization])
    assert not bad, bad


@pytest.mark.parametrize("quantization", ["none", "int8", "nf4"])
def test_cuda_prediction_before_loading_matches_the_allocation(builtin, quantization: str) -> None:  # type: ignore[no-untyped-def]
    if quantization != "none":
        pytest.importorskip("bitsandbytes")
    path, _ = builtin
    arch = architecture_from_config(json.loads((path / "config.json").read_text()), name="builtin")
    predicted = plan_memory(arch, quantization=quantization, dtype="bfloat16", device="cuda",
                            device_memory_bytes=2 * GiB, max_model_len=512, max_num_seqs=8, max_batch_tokens=512)
    [rank] = predicted.ranks
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    llm = LLM(max_model_len=512, max_num_seqs=8, max_batch_tokens=512, dtype="bfloat16", device="cuda",
              quantization=quantization, kv_cache_tokens=predicted.kv_capacity_tokens)
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated() - before
    weights = model_bytes(llm.loaded.runner.model)
    kv = llm.loaded.runner.kv_cache_bytes
    assert abs(rank.weights_bytes - weights) <= 0.05 * weights, (rank.weights_bytes, weights)
    kv_predicted = predicted.kv_capacity_tokens * rank.kv_bytes_per_token
    assert abs(kv_predicted - kv) <= 0.05 * kv, (kv_predicted, kv)
    # what the device really holds (cos/sin tables and the sampler's buffers included)
    total = rank.weights_bytes + kv_predicted
    assert abs(allocated - total) <= 0.05 * total, (allocated, total)
