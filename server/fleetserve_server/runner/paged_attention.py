"""Attention that reads the paged KV cache in place, for every token of a step in one call.

Semantics (shared by the C++ kernel and the torch fallback): token ``t`` of a step
attends, causally, to positions ``0 .. ctx[t] - 1`` of the sequence whose block
table is ``tables[seq[t]]``; position ``p`` lives in cache slot ``tables[seq[t]][p //
block_size] * block_size + p % block_size`` of a layer cache laid out ``[2, kv_heads,
num_slots, head_dim]`` (``runner.model``). A decode token has ``ctx`` = its context
length; the tokens of a prefill chunk have ``ctx`` = position + 1 (their own K/V are
written to the cache before attention), so decode and varlen prefill, with or without
a cached prefix, are one call with no Python loop over sequences. Query heads
``g * group .. (g + 1) * group - 1`` share kv head ``g`` (GQA).

On CPU the work runs in a C++ extension (``csrc/paged_attention.cpp``; the same module carries the
fused norm and rotary ops of ``csrc/fused_ops.cpp``, see ``runner.model``) that walks each
sequence's block table: its cost grows with the live tokens, not with batch x longest
context, and it allocates no per-step copy of the KV. The extension is compiled with
``torch.utils.cpp_extension`` at install time (``python -m
fleetserve_server.runner.paged_attention --build``, run by ``make install``) or on first
use, into ``$FLEETSERVE_CACHE_DIR/torch_extensions/<key>`` where the key hashes the
source, the torch version, the compile flags and the CPU's instruction-set flags
(``-march=native`` code is only reused on a CPU with the same flags). When it cannot
be built or loaded, ``paged_attention`` logs why once and uses ``paged_attention_torch``
(same semantics, tested to give the same results); CUDA always uses the torch path.
``gathered_decode_attention`` is the previous decode algorithm (a padded gather of
every sequence's blocks), kept as the reference for tests and benchmarks.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import logging
import os
import platform
import sys
from pathlib import Path
from types import ModuleType

import torch

from fleetserve_server.memory import FALLBACK_ATTENTION_BYTES, fallback_attention_pair_bytes

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "paged_attention.cpp"
# compiled into the same module: the fused elementwise ops of a decoder layer (see ``runner.model``)
SOURCES = (SOURCE, Path(__file__).parent / "csrc" / "fused_ops.cpp")
# included by both sources: part of the cache key, not compiled on its own
HEADERS = (Path(__file__).parent / "csrc" / "vec.h",)
# -fopenmp: at::parallel_for is inlined into the extension and is serial without it
CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp"]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_key() -> str:
    """Hash of everything the compiled module depends on (source, torch, flags, CPU ISA)."""
    h = hashlib.sha256()
    for part in (*(src.read_bytes() for src in (*SOURCES, *HEADERS)), torch.__version__.encode(), " ".join(CFLAGS).encode(),
                 platform.machine().encode(), _cpu_flags().encode(), sys.version.encode()):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def build_dir() -> Path:
    from fleetserve_server.runner.builtin import cache_root

    return cache_root() / "torch_extensions" / f"paged_attention-{cache_key()}"


def _module_name() -> str:
    return f"fleetserve_paged_attention_{cache_key()}"


def _import_built(directory: Path) -> ModuleType | None:
    name = _module_name()
    for path in directory.glob(f"{name}*.so"):
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            continue
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return None


def build(verbose: bool = False) -> ModuleType:
    """Compile (or reuse) the extension; raises when the toolchain is missing or fails."""
    directory = build_dir()
    module = _import_built(directory)
    if module is not None:
        return module
    from torch.utils import cpp_extension

    directory.mkdir(parents=True, exist_ok=True)
    bin_dir = str(Path(sys.executable).parent)  # ninja installed in the venv, not on PATH
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    return cpp_extension.load(
        name=_module_name(), sources=[str(src) for src in SOURCES], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"], build_directory=str(directory),
        verbose=verbose,
    )


@functools.cache
def extension() -> ModuleType | None:
    """The compiled kernel module, or None (logged once, with the reason) when unavailable."""
    if os.environ.get("FLEETSERVE_PAGED_ATTENTION") == "torch":
        log.info("paged attention: FLEETSERVE_PAGED_ATTENTION=torch, using the torch fallback")
        return None
    try:
        return build()
    except Exception as exc:  # noqa: BLE001 - any build/load failure means: use the fallback
        last_line = (str(exc).strip().splitlines() or [""])[-1]  # a failed build's error is its last line
        log.warning("paged attention: C++ kernel unavailable (%s: %s); using the torch fallback",
                    type(exc).__name__, last_line)
        return None


def paged_attention(
    q: torch.Tensor, cache: torch.Tensor, tables: torch.Tensor, seq: torch.Tensor, ctx: torch.Tensor,
    block_size: int, scale: float, *, use_kernel: bool = True,
) -> torch.Tensor:
    """Attention of every token of a step over the paged cache (module docstring).

    q [T, heads, head_dim]; cache [2, kv_heads, num_slots, head_dim] (one layer);
    tables [S, W] int32 (padded with any valid block); seq, ctx [T] int32. Returns [T, heads, head_dim].
    """
    module = extension() if use_kernel and q.device.type == "cpu" else None
    if module is None:
        return paged_attention_torch(q, cache, tables, seq, ctx, block_size, scale)
    out = torch.empty(q.shape, dtype=q.dtype)
    module.paged_attention(out, q.contiguous(), cache, tables, seq, ctx, block_size, scale)
    return out


def paged_attention_torch(
    q: torch.Tensor, cache: torch.Tensor, tables: torch.Tensor, seq: torch.Tensor, ctx: torch.Tensor,
    block_size: int, scale: float,
) -> torch.Tensor:
    """The kernel's semantics in torch, over only the live (token, position) pairs: the pairs, in
    token order, are taken a window at a time (at most ``memory.FALLBACK_ATTENTION_BYTES`` of
    working memory, however long one token's context), each window's partial softmax is merged
    into running per-token maxima, sums and weighted values (no padding to the longest context)."""
    num_tokens, heads, hd = q.shape
    kv = cache.shape[1]
    group = heads // kv
    dev = q.device
    ctx64 = ctx.long()
    ends = torch.cumsum(ctx64, 0)
    total_pairs = int(ends[-1])
    window = max(1, FALLBACK_ATTENTION_BYTES // fallback_attention_pair_bytes(heads, kv, hd))
    best = torch.full((num_tokens, kv, group), float("-inf"), device=dev)
    total = torch.zeros(num_tokens, kv, group, device=dev)
    acc = torch.zeros(num_tokens, kv, group, hd, device=dev)
    qs = q.float().reshape(num_tokens, kv, group, hd) * scale
    tables64, seq64 = tables.long(), seq.long()
    for p0 in range(0, total_pairs, window):
        pairs = torch.arange(p0, min(p0 + window, total_pairs), device=dev)
        tok = torch.searchsorted(ends, pairs, right=True)
        pos = pairs - (ends - ctx64)[tok]
        slots = tables64[seq64[tok], pos // block_size] * block_size + pos % block_size
        keys = cache[0].index_select(1, slots).transpose(0, 1).float()  # [P, kv, hd]
        vals = cache[1].index_select(1, slots).transpose(0, 1).float()
        lo, hi = int(tok[0]), int(tok[-1]) + 1  # the window's tokens: a contiguous range
        local = tok - lo
        scores = torch.einsum("pkgd,pkd->pkg", qs[tok], keys)  # [P, kv, g]
        index = local[:, None, None].expand_as(scores)
        part_best = torch.full((hi - lo, kv, group), float("-inf"), device=dev).scatter_reduce(
            0, index, scores, reduce="amax")
        weights = torch.exp(scores - part_best[local])
        part_total = torch.zeros(hi - lo, kv, group, device=dev).index_add_(0, local, weights)
        part_acc = torch.zeros(hi - lo, kv, group, hd, device=dev).index_add_(
            0, local, weights[..., None] * vals[:, :, None, :])
        # merge with what earlier windows found for the same tokens (online softmax)
        new_best = torch.maximum(best[lo:hi], part_best)
        alpha, beta = torch.exp(best[lo:hi] - new_best), torch.exp(part_best - new_best)
        total[lo:hi] = total[lo:hi] * alpha + part_total * beta
        acc[lo:hi] = acc[lo:hi] * alpha[..., None] + part_acc * beta[..., None]
        best[lo:hi] = new_best
    return (acc / total[..., None]).view(num_tokens, heads, hd).to(q.dtype)


def gathered_decode_attention(
    q: torch.Tensor, cache: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor, block_size: int, scale: float,
) -> torch.Tensor:
    """The previous decode path: one index_select of every decode sequence's blocks, padded
    to the longest table ([2, kv, B, W * block_size, hd]), then two batched matmuls under an
    additive mask. q [B, heads, hd] (one token per sequence), tables [B, W], lens [B]."""
    b, heads, hd = q.shape
    kv, slots = cache.shape[1], cache.shape[2]
    group, width = heads // kv, tables.shape[1]
    num_blocks = slots // block_size
    rows = (torch.arange(2 * kv, device=q.device)[:, None] * num_blocks + tables.long().view(-1)[None, :]).view(-1)
    gathered = cache.view(-1, block_size * hd).index_select(0, rows).view(2, kv, b, -1, hd)
    mask = torch.zeros(b, 1, width * block_size, dtype=q.dtype, device=q.device)
    mask.masked_fill_((torch.arange(width * block_size, device=q.device) >= lens[:, None])[:, None, :],
                      torch.finfo(q.dtype).min)
    qd = (q * scale).view(b, kv, group, hd).transpose(0, 1)  # [kv, B, g, hd]
    scores = torch.matmul(qd, gathered[0].transpose(-1, -2)).add_(mask)  # [kv, B, g, S]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(gathered.dtype)
    return torch.matmul(probs, gathered[1]).transpose(0, 1).reshape(b, heads, hd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build (or check) the paged attention C++ kernel.")
    parser.add_argument("--build", action="store_true", help="compile it into the cache now (make install)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.build:
        try:
            build(verbose=args.verbose)
        except Exception as exc:  # noqa: BLE001 - the server falls back to torch; say so, do not fail install
            print(f"paged attention kernel: not built ({type(exc).__name__}: {exc}); the server will use the "
                  "torch fallback", file=sys.stderr)
            return 0
    print(f"paged attention kernel: {build_dir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
