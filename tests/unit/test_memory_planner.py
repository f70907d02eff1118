"""The memory planner's arithmetic, checked against numbers worked out by hand
from the models' published config.json files."""

from __future__ import annotations

import argparse
import json

import pytest
from fleetserve_server.cli import plan as plan_cli
from fleetserve_server.memory import (
    GiB,
    architecture_from_config,
    catalog_names,
    dtype_bytes,
    known_architecture,
    kv_bytes_per_token,
    num_kv_blocks,
    parse_quantity,
    plan_memory,
    weight_bytes,
)
from fleetserve_server.sharding import rank_shards

LLAMA_8B = "hf:meta-llama/Llama-3.1-8B-Instruct"


def test_llama_8b_parameters_and_bf16_weights():
    arch = known_architecture(LLAMA_8B)
    assert arch is not None
    # 2 x 128256 x 4096 embeddings + 32 x (q,k,v,o + MLP + 2 norms) + final norm: the published 8.03 B
    assert arch.num_parameters == 8_030_261_248
    assert weight_bytes(arch, "none", "bfloat16", "cuda") == 16_060_522_496
    assert weight_bytes(arch, "none", "auto", "cuda") == 16_060_522_496  # auto = bf16 on cuda
    assert weight_bytes(arch, "none", "auto", "cpu") == 4 * 8_030_261_248


def test_llama_8b_kv_is_128_kib_per_token():
    arch = known_architecture(LLAMA_8B)
    assert arch is not None
    assert kv_bytes_per_token(arch, "bfloat16", "cuda") == 2 * 32 * 8 * 128 * 2 == 128 * 1024


def test_quantized_weight_bytes_by_hand():
    arch = known_architecture("Llama-3.1-8B")
    assert arch is not None
    linear = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
    assert arch.linear_parameters == linear == 6_979_321_856
    rest_bf16 = (arch.num_parameters - linear) * 2  # embeddings, lm_head, norms stay bf16
    rows = 32 * (4096 + 2 * 1024 + 4096 + 2 * 14336 + 4096)
    assert weight_bytes(arch, "int8", "bfloat16", "cuda") == rest_bf16 + linear + rows * 4
    blocks = linear // 32  # one uint8 absmax per 32 values (the loader's blocksize)
    nf4 = rest_bf16 + linear // 2 + blocks + (-(-blocks // 256)) * 4
    assert weight_bytes(arch, "nf4", "bfloat16", "cuda") == nf4
    assert weight_bytes(arch, "fp4", "bfloat16", "cuda") == nf4
    # the seed's claims for the quantized Linear layers: 8-bit ~50 %, 4-bit ~25-30 % of 16-bit
    int8_linear = weight_bytes(arch, "int8", "bfloat16", "cuda") - rest_bf16
    nf4_linear = nf4 - rest_bf16
    assert int8_linear <= 0.55 * linear * 2
    assert nf4_linear <= 0.30 * linear * 2


def test_tied_embeddings_counted_once():
    arch = known_architecture("builtin:smollm2-135m-instruct")
    assert arch is not None and arch.tie_word_embeddings
    assert arch.num_parameters == 134_515_008  # SmolLM2-135M's published count
    assert arch.embedding_parameters == 49152 * 576
    assert kv_bytes_per_token(arch, "auto", "cpu") == 2 * 30 * 3 * 64 * 4


@pytest.mark.parametrize(
    ("spec", "params"),
    [
        ("SmolLM2-360M-Instruct", 361_821_120),
        ("hf:HuggingFaceTB/SmolLM2-1.7B-Instruct", 1_711_376_384),
        ("meta-llama/Meta-Llama-3.1-70B-Instruct", 70_553_706_496),
        ("mistralai/Mistral-7B-Instruct-v0.3", 7_248_023_552),
        ("Qwen/Qwen2.5-7B-Instruct", 7_615_616_512),  # includes the q/k/v biases
        ("QWEN2.5-72B", 72_706_203_648),
    ],
)
def test_catalog_matches_published_parameter_counts(spec, params):
    arch = known_architecture(spec)
    assert arch is not None
    assert arch.num_parameters == params


def test_unknown_model_is_none_and_catalog_lists_names():
    assert known_architecture("hf:someone/unknown-13b") is None
    assert "Llama-3.1-8B-Instruct" in catalog_names()


def test_config_json_from_local_dir_qwen3(tmp_path):
    config = {
        "model_type": "qwen3", "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
        "tie_word_embeddings": False,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    arch = known_architecture(str(tmp_path))
    assert arch is not None
    assert arch.name == tmp_path.name
    assert arch.num_parameters == 8_190_735_360  # Qwen3-8B, with per-head q/k norms
    assert known_architecture(str(tmp_path / "missing")) is None


def test_config_defaults_and_unsupported_type():
    arch = architecture_from_config({
        "model_type": "mistral", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "vocab_size": 100,
    })
    assert arch.num_kv_heads == 4 and arch.head_dim == 16 and not arch.tie_word_embeddings
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        architecture_from_config({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="hidden_size"):
        architecture_from_config({"model_type": "llama"})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24GiB", 24 * GiB), ("80Gi", 80 * GiB), ("16G", 16 * 10**9), ("512Mi", 512 * 2**20),
        ("1024", 1024), ("1.5Gi", 3 * GiB // 2), ("1e9", 10**9), ("100k", 100_000), ("2Ti", 2 * 2**40),
        ("8GB", 8 * 10**9),
    ],
)
def test_parse_quantity(text, expected):
    assert parse_quantity(text) == expected


@pytest.mark.parametrize("bad", ["", "lots", "12Xi", "-1Gi", "500m", "Gi"])
def test_parse_quantity_rejects(bad):
    with pytest.raises(ValueError, match=repr(bad).replace("\\", "\\\\")):
        parse_quantity(bad)


def test_dtype_bytes():
    assert dtype_bytes("auto", "cpu") == 4
    assert dtype_bytes("auto", "cuda") == 2
    assert dtype_bytes("float16", "cpu") == 2
    with pytest.raises(ValueError, match="float64"):
        dtype_bytes("float64", "cuda")


def test_plan_24gib_llama_8b_by_hand():
    arch = known_architecture(LLAMA_8B)
    assert arch is not None
    plan = plan_memory(arch, quantization="none", dtype="auto", device="cuda",
                       device_memory_bytes=24 * GiB, max_model_len=8192)
    usable = int(24 * GiB * 0.9)
    assert plan.usable_bytes == usable
    # activation reserve: 2048 tokens x (2 hidden + q,k,v + 3 intermediate) x 2 bytes
    # + 32 seqs x vocab x float32 x 2 + 256 MiB on cuda + the paged attention's torch path: a 64 MiB
    # pair window + running float32 max, sum and weighted values per token and head (32 x (128 + 2))
    reserve = (2048 * (2 * 4096 + 48 * 128 + 3 * 14336) * 2 + 32 * 128256 * 8 + 256 * 2**20
               + 64 * 2**20 + 2048 * 32 * 130 * 4)
    assert plan.activation_reserve_bytes == reserve
    tokens = (usable - 16_060_522_496 - reserve) // 131072
    assert plan.kv_capacity_tokens == tokens // 16 * 16 == 49552
    assert plan.kv_capacity_tokens % 16 == 0
    assert plan.fits
    assert plan.max_concurrent_sequences == 6  # 49552 // 8192
    assert plan.dtype == "bfloat16"
    assert num_kv_blocks(plan, 16) == 49552 // 16
    assert plan.to_dict()["kv_capacity_tokens"] == 49552


def test_plan_not_fitting_names_numbers_and_way_out():
    arch = known_architecture(LLAMA_8B)
    assert arch is not None
    plan = plan_memory(arch, quantization="none", dtype="bfloat16", device="cuda",
                       device_memory_bytes=16 * GiB, max_model_len=8192)
    assert not plan.fits
    assert plan.kv_capacity_tokens == 0  # weights alone exceed 16 GiB x 0.9
    assert "15.0 GiB for weights" in plan.message
    assert "1.0 GiB KV at maxModelLen 8192" in plan.message
    assert "use quantization int8" in plan.message
    # with int8 it does fit
    assert plan_memory(arch, quantization="int8", dtype="bfloat16", device="cuda",
                       device_memory_bytes=16 * GiB, max_model_len=8192).fits


def test_plan_suggests_shorter_context_when_only_kv_is_short():
    arch = known_architecture("SmolLM2-1.7B")
    assert arch is not None
    plan = plan_memory(arch, quantization="nf4", dtype="float16", device="cuda",
                       device_memory_bytes=2 * GiB, max_model_len=131072, max_num_seqs=1)
    assert not plan.fits and 0 < plan.kv_capacity_tokens < 131072
    assert f"lower maxModelLen to {plan.kv_capacity_tokens}" in plan.message
    assert plan.max_concurrent_sequences == 0


def test_plan_rejects_bad_arguments():
    arch = known_architecture("smollm2-135m")
    assert arch is not None
    with pytest.raises(ValueError, match="kv_cache_memory_fraction"):
        plan_memory(arch, quantization="none", dtype="auto", device="cpu", device_memory_bytes=GiB,
                    kv_cache_memory_fraction=1.5, max_model_len=128)
    with pytest.raises(ValueError, match="quantization 'int4'"):
        plan_memory(arch, quantization="int4", dtype="auto", device="cpu", device_memory_bytes=GiB,
                    max_model_len=128)


def _run_cli(argv, capsys):
    parser = argparse.ArgumentParser()
    plan_cli.configure(parser)
    args = parser.parse_args(argv)
    code = args.handler(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_json_and_table(capsys):
    code, out, _ = _run_cli(["--model", "Llama-3.1-8B-Instruct", "--gpu-memory", "24GiB",
                             "--max-model-len", "8192", "--output", "json"], capsys)
    assert code == 0
    data = json.loads(out)
    assert data["kv_capacity_tokens"] == 49552 and data["fits"] is True
    code, out, _ = _run_cli(["--model", "Llama-3.1-8B-Instruct", "--gpu-memory", "16GiB",
                             "--max-model-len", "8192"], capsys)
    assert code == 0  # a plan was made; it says it does not fit
    assert "fits" in out and "NO" in out and "use quantization int8" in out
    code, _, _ = _run_cli(["--model", "Llama-3.1-8B-Instruct", "--gpu-memory", "16GiB",
                           "--max-model-len", "8192", "--check"], capsys)
    assert code == 1


def test_cli_bad_input(capsys):
    code, _, err = _run_cli(["--model", "nope", "--gpu-memory", "16GiB", "--max-model-len", "8"], capsys)
    assert code == 2 and "known models" in err
    code, _, err = _run_cli(["--gpu-memory", "lots", "--max-model-len", "8"], capsys)
    assert code == 2 and "'lots'" in err


# --- per device: tensor-parallel shards ---------------------------------------------------------

LLAMA_70B = "hf:meta-llama/Llama-3.1-70B-Instruct"


def _nf4_bytes(unquantized_params: int, linear: int, elem: int = 2) -> int:
    blocks = -(-linear // 32)
    return unquantized_params * elem + -(-linear // 2) + blocks + (-(-blocks // 256)) * 4


def test_70b_nf4_on_two_24gib_gpus_is_planned_per_device_by_hand():
    """The issue's case: 2 x 24 GiB is two 24 GiB devices, never one 48 GiB one."""
    arch = known_architecture(LLAMA_70B)
    assert arch is not None
    one = plan_memory(arch, quantization="nf4", dtype="auto", device="cuda", device_memory_bytes=24 * GiB,
                      max_model_len=8192, max_num_seqs=16)
    # the whole model on one device: 37.8 GiB of nf4 weights cannot fit 21.6 GiB usable
    assert one.tensor_parallel_size == 1 and not one.fits and one.kv_capacity_tokens == 0
    assert one.weights_bytes == _nf4_bytes(arch.num_parameters - arch.linear_parameters, arch.linear_parameters)
    assert "does not fit on one device" in one.message and "37.8 GiB for weights" in one.message
    assert "19.5 GiB short per device" in one.message
    assert "use 2 GPUs (tensor-parallel size 2" in one.message  # the way out, checked below

    two = plan_memory(arch, quantization="nf4", dtype="auto", device="cuda", device_memory_bytes=24 * GiB,
                      max_model_len=8192, max_num_seqs=16, tensor_parallel_size=2)
    # rank 0: 32 of 64 heads, 4 of 8 KV heads, 14336 of 28672 MLP rows, 64128 of 128256 vocab rows
    linear = 80 * (8192 * (32 + 2 * 4) * 128 + 32 * 128 * 8192 + 3 * 8192 * 14336)
    unquantized = 64128 * 8192 * 2 + 80 * 2 * 8192 + 8192  # embedding + lm_head shards, replicated norms
    assert two.weights_bytes == _nf4_bytes(unquantized, linear)
    assert [r.weights_bytes for r in two.ranks] == [two.weights_bytes] * 2
    assert two.kv_bytes_per_token == 2 * 80 * 4 * 128 * 2 == 160 * 1024  # half of one device's 320 KiB
    # 2048 tokens x (2 hidden + rank's q,k,v + 3 x MLP shard + all-reduce buffer) x 2 bytes, logits on rank 0
    # (gathered full vocab + probs + its shard), 256 MiB allocator + 256 MiB NCCL
    reserve = (2048 * (2 * 8192 + (32 + 8) * 128 + 3 * 14336 + 8192) * 2
               + 16 * (2 * 128256 + 64128) * 4 + 512 * 2**20 + 64 * 2**20 + 2048 * 32 * 130 * 4)
    assert two.activation_reserve_bytes == reserve
    usable = int(24 * GiB * 0.9)
    assert two.kv_capacity_tokens == (usable - two.weights_bytes - reserve) // (160 * 1024) // 16 * 16 == 11792
    assert two.fits and two.max_concurrent_sequences == 1
    assert "fits on each of 2 devices" in two.message
    # the old answer (2 x 24 GiB added up: one 48 GiB device) claimed more KV than any device holds
    pooled = plan_memory(arch, quantization="nf4", dtype="auto", device="cuda", device_memory_bytes=48 * GiB,
                         max_model_len=8192, max_num_seqs=16)
    # (15,360 in the issue, before the paged attention's workspace was reserved)
    assert pooled.kv_capacity_tokens == 14944 != two.kv_capacity_tokens


def test_shards_conserve_the_model_and_rank_zero_is_largest():
    """Uneven splits: rank 0 takes the remainder rows, and the shards add up to the whole model."""
    config = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 173,
              "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 1001, "tie_word_embeddings": True}
    arch = architecture_from_config(config, name="odd")
    shards = rank_shards(arch, 4)
    assert [s.intermediate_size for s in shards] == [44, 43, 43, 43]
    assert [s.vocab_rows for s in shards] == [251, 250, 250, 250]
    assert [s.kv_heads for s in shards] == [1, 1, 1, 1]  # 2 KV heads over 4 ranks: each replicated twice
    # 4 KV heads held where the model has 2: 2 layers x hidden 64 x (K and V) x 2 extra heads x head_dim 8
    assert sum(s.linear_parameters for s in shards) == arch.linear_parameters + 2 * 64 * 2 * 2 * 8
    plan = plan_memory(arch, quantization="none", dtype="float32", device="cpu", device_memory_bytes=GiB,
                       max_model_len=64, tensor_parallel_size=4)
    weights = [r.weights_bytes for r in plan.ranks]
    assert weights[0] == max(weights) > weights[1] == weights[3]
    assert plan.weights_bytes == weights[0] and plan.kv_capacity_tokens == min(r.kv_capacity_tokens
                                                                            for r in plan.ranks)
    assert plan.kv_bytes_per_token == 2 * 2 * 1 * 8 * 4
    assert plan.to_dict()["ranks"][1]["rank"] == 1


def test_kv_heads_split_then_replicated():
    arch = known_architecture(LLAMA_8B)  # 32 heads, 8 KV heads
    assert arch is not None
    per = [kv_bytes_per_token(arch, "bfloat16", "cuda", tensor_parallel_size=n) for n in (1, 2, 4, 8, 16, 32)]
    one_head = 2 * 32 * 128 * 2
    assert per == [8 * one_head, 4 * one_head, 2 * one_head, one_head, one_head, one_head]


def test_tensor_parallel_size_must_split_the_heads():
    arch = known_architecture(LLAMA_8B)
    assert arch is not None
    with pytest.raises(ValueError, match=r"tensor_parallel_size 3 cannot split .* valid sizes: 1, 2, 4, 8, 16, 32"):
        plan_memory(arch, quantization="none", dtype="auto", device="cuda", device_memory_bytes=80 * GiB,
                    max_model_len=8192, tensor_parallel_size=3)
    with pytest.raises(ValueError, match="tensor_parallel_size must be an integer >= 1"):
        weight_bytes(arch, "none", "auto", "cuda", tensor_parallel_size=0)


def test_fits_only_when_every_rank_fits_and_suggests_no_more_gpus_than_allowed():
    arch = known_architecture(LLAMA_70B)
    assert arch is not None
    plan = plan_memory(arch, quantization="nf4", dtype="auto", device="cuda", device_memory_bytes=24 * GiB,
                       max_model_len=65536, max_num_seqs=16, tensor_parallel_size=2)
    assert not plan.fits and 0 < plan.kv_capacity_tokens < 65536
    assert "does not fit on each of 2 devices" in plan.message
    assert "use 4 GPUs (tensor-parallel size 4" in plan.message
    assert f"lower maxModelLen to {plan.kv_capacity_tokens}" in plan.message
    capped = plan_memory(arch, quantization="nf4", dtype="auto", device="cuda", device_memory_bytes=24 * GiB,
                         max_model_len=8192, max_num_seqs=16, max_tensor_parallel_size=1)
    assert not capped.fits and "GPUs" not in capped.message.split(" — ")[1].replace("a GPU", "")


def test_cli_prints_per_device_rows(capsys):
    code, out, _ = _run_cli(["--model", "Llama-3.1-70B-Instruct", "--quantization", "nf4", "--gpu-memory", "24GiB",
                             "--max-model-len", "8192", "--max-num-seqs", "16", "--tensor-parallel-size", "2"],
                            capsys)
    assert code == 0
    rows = [line.split() for line in out.splitlines() if line.startswith("rank ")]
    assert [r[:2] for r in rows] == [["rank", "0"], ["rank", "1"]]
    assert "fits on each of 2 devices" in out and "11792" in out
    assert "note:" not in out  # `fleetserve serve --tensor-parallel-size 2` runs this split
    code, out, _ = _run_cli(["--model", "Llama-3.1-70B-Instruct", "--quantization", "nf4", "--gpu-memory", "24GiB",
                             "--max-model-len", "8192", "--tensor-parallel-size", "2", "--output", "json"], capsys)
    data = json.loads(out)
    assert data["tensor_parallel_size"] == 2 and len(data["ranks"]) == 2
    code, _, err = _run_cli(["--model", "Llama-3.1-70B-Instruct", "--gpu-memory", "24GiB", "--max-model-len", "8",
                             "--tensor-parallel-size", "3"], capsys)
    assert code == 2 and "valid sizes" in err
