"""Streaming load vs the transformers route: peak host memory while loading a multi-GB checkpoint.

Writes a synthetic checkpoint once (random bf16 weights, the real
Llama-3.2-1B config: 1.24 B parameters, 2.5 GB of safetensors), then loads it
in a fresh process per measurement — both routes, interleaved, for
none/int8/nf4 — and reports each process's peak resident memory (VmHWM)
against what the loaded model itself keeps:

    .venv/bin/python benchmarks/streaming_load.py [--dir /tmp/fleetserve-streaming-ckpt] [--repeats 1]

Columns: ``model`` = bytes of the loaded model (``model_bytes``), ``peak over
model`` = VmHWM - RSS before loading - model bytes (the loader's own transient
host memory), against the largest single tensor of the model in the compute
dtype (the embedding here). The compute dtype is bfloat16 so that the old
route's peak stays within a shared machine's memory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

LLAMA_32_1B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
    "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
    "vocab_size": 128256, "tie_word_embeddings": True, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "hidden_act": "silu", "attention_bias": False,
    "mlp_bias": False, "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16",
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}


def write_checkpoint(directory: Path) -> Path:
    """The synthetic checkpoint (kept for later runs: writing it takes a minute)."""
    import torch
    from fleetserve_server.runner.safetensors_io import write_safetensors

    if (directory / "model.safetensors").is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    c = LLAMA_32_1B
    h, i, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (c["vocab_size"], h))]
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                   (p + "self_attn.q_proj.weight", (q, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                   (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, q)),
                   (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                   (p + "mlp.down_proj.weight", (h, i))]
    shapes.append(("model.norm.weight", (h,)))
    gen = torch.Generator().manual_seed(0)

    def fill(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if len(shape) == 1:
            return torch.ones(shape, dtype=dtype)
        return (torch.randn(shape, generator=gen) * 0.02).to(dtype)

    tmp = directory / "model.safetensors.tmp"
    write_safetensors(tmp, [(n, torch.bfloat16, s) for n, s in shapes], fill)
    (directory / "config.json").write_text(json.dumps(c, indent=1))
    tmp.rename(directory / "model.safetensors")
    return directory


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(directory: Path, route: str, quantization: str) -> None:
    """One load in this (fresh) process; prints one JSON line."""
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401  (imported before the baseline)
    from fleetserve_server.runner.loader import import_bnb, load_model, model_bytes
    from transformers import AutoModelForCausalLM  # noqa: F401

    if quantization != "none":
        import_bnb(quantization)
    torch.set_num_threads(2)
    before = _status_kib("VmRSS") * 1024
    start = time.perf_counter()
    loaded = load_model(directory, dtype="bfloat16", device=torch.device("cpu"), quantization=quantization,
                        max_positions=4096, streaming=route == "streaming")
    seconds = time.perf_counter() - start
    peak, after = _status_kib("VmHWM") * 1024, _status_kib("VmRSS") * 1024
    weights = model_bytes(loaded.model)
    largest = max(p.numel() * p.element_size() for p in loaded.model.parameters()
                  if p.dtype == torch.bfloat16)
    print(json.dumps({"route": route, "quantization": quantization, "seconds": seconds, "rss_before": before,
                      "peak": peak, "rss_after": after, "model_bytes": weights, "largest_tensor": largest}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/fleetserve-streaming-ckpt"))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--quantizations", default="none,int8,nf4")
    parser.add_argument("--child", nargs=2, metavar=("ROUTE", "QUANTIZATION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.dir, *args.child)
        return
    directory = write_checkpoint(args.dir)
    size = (directory / "model.safetensors").stat().st_size
    print(f"checkpoint: {directory} ({size / 1e9:.2f} GB, Llama-3.2-1B config, random bf16)", flush=True)
    rows = []
    for _ in range(args.repeats):
        for quantization in args.quantizations.split(","):
            for route in ("transformers", "streaming"):  # interleaved: the same machine state for both
                out = subprocess.run([sys.executable, __file__, "--dir", str(directory), "--child", route,
                                      quantization], check=True, capture_output=True, text=True).stdout
                row = json.loads(out.strip().splitlines()[-1])
                rows.append(row)
                print(json.dumps(row), flush=True)
    gb = 1e9
    print("\n| quantization | route | load s | model GB | peak RSS GB | peak over model GB | largest tensor GB |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        over = r["peak"] - r["rss_before"] - r["model_bytes"]
        print(f"| {r['quantization']} | {r['route']} | {r['seconds']:.1f} | {r['model_bytes'] / gb:.2f} | "
              f"{r['peak'] / gb:.2f} | {over / gb:.2f} | {r['largest_tensor'] / gb:.2f} |")


if __name__ == "__main__":
    main()
