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
    # + 32 seqs x vocab x float32 x 2 + 256 MiB on cuda
    reserve = 2048 * (2 * 4096 + 48 * 128 + 3 * 14336) * 2 + 32 * 128256 * 8 + 256 * 2**20
    assert plan.activation_reserve_bytes == reserve
    tokens = (usable - 16_060_522_496 - reserve) // 131072
    assert plan.kv_capacity_tokens == tokens // 16 * 16 == 50320
    assert plan.kv_capacity_tokens % 16 == 0
    assert plan.fits
    assert plan.max_concurrent_sequences == 6  # 50320 // 8192
    assert plan.dtype == "bfloat16"
    assert num_kv_blocks(plan, 16) == 50320 // 16
    assert plan.to_dict()["kv_capacity_tokens"] == 50320


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
    assert data["kv_capacity_tokens"] == 50320 and data["fits"] is True
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
