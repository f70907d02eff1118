"""A compact Llama-family forward over a paged KV cache (nano-vllm's route).

One ``PagedCausalLM`` covers Llama / SmolLM2 / Mistral / Qwen2 / Qwen3: RMSNorm,
RoPE (the cos/sin table comes from the checkpoint's own HF rotary module, so
llama3 / linear / dynamic-free scalings match HF exactly), grouped-query
attention, SwiGLU, tied embeddings, Qwen2's q/k/v biases and Qwen3's q/k norm.
It reuses the weights of a loaded HF model (no copy for unfused layers).

All sequences of a step run as one flat token batch through the projections,
and through attention too: every token of the step (decode tokens and the tokens
of multi-token prefill chunks, with or without a cached prefix) attends in one
``paged_attention`` call per layer that reads the paged cache in place through
each sequence's block table (a C++ kernel on CPU, a torch fallback elsewhere;
see ``runner.paged_attention``). A step's K/V are written to the cache first, so
a prefill token at position ``p`` simply attends to positions ``0 .. p``.

On CPU float32 the elementwise glue runs in the same C++ module (``csrc/fused_ops.cpp``): one
``rms_norm`` call per norm (ATen's CPU ``rms_norm`` took ~14 ms for a 2048-token chunk of
SmolLM2's 576 values a row, a single vectorized pass a fraction of that) and one ``rope_write_kv``
call per layer that rotates q and k and writes the step's K/V to their cache slots (the ATen
path: ~15 ops, slices, products, cat, stack and ``index_copy_``, each allocating), and one
``silu_mul`` for SwiGLU. The rotation is bit-identical to the ATen path; the norm differs only in
the order of its sum of squares, silu in its exp (a polynomial as accurate as ATen's, ~2e-7).
``fused_ops = False`` (or a kernel that does not build) keeps the ATen ops.

KV cache layout: ``[layers, 2, kv_heads, num_blocks * block_size, head_dim]``;
position ``p`` of a sequence lives in slot ``block_table[p // block_size] *
block_size + p % block_size``. Heads outermost, so that one (K or V, head) row
of a block is ``block_size * head_dim`` contiguous values, which the kernel
reads in order.

CPU float32 linears run through oneDNN with a weight packed once at load
(``pack_cpu_linears``, called by the runner): MKL's fp32 GEMM is poor at the
small M of a decode step (batch 32: ~30-80 GFLOPS on a 2-core EPYC against
~110-120 packed, lm_head 34 vs 82), and the packed weight serves every M
(prefill too) with max relative error ~1e-6 against ``F.linear``. Memory
trade-off: packing copies the weight into oneDNN's blocked layout; for
untied layers (q/k/v/o, gate/up/down, an untied lm_head) the plain weight is
dropped (nothing else references it once the HF model object is gone), so
their memory is unchanged. A *tied* lm_head shares its weight with the
embedding, whose lookup needs the plain ``[vocab, hidden]`` matrix, so
packing it costs ``vocab x hidden x 4`` bytes more (SmolLM2-135M: 113 MB,
+21 % of its weights) for ~2.4x on the largest matmul of a decode step;
``model_bytes`` counts the packed copy and ``memory.weight_bytes`` predicts
it (CPU float32, tied embeddings, no quantization). A quantized model (the
user asked for less memory) keeps its tied lm_head plain. bfloat16 (needs AVX512-BW/-VL/-DQ or
AVX-NE-CONVERT in oneDNN), bitsandbytes layers and CUDA keep ``F.linear``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fleetserve_server.runner.paged_attention import extension as paged_attention_extension
from fleetserve_server.runner.paged_attention import gathered_decode_attention, paged_attention

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


@dataclass
class StepMetadata:
    """Tensors describing one step's flat token batch (built by the runner).

    A layer's cache is addressed as rows ``[2 * kv_heads * num_slots, head_dim]``
    for writes (an index over slots ``s`` becomes the rows ``c * num_slots + s``
    for every ``c`` in K/V x heads).
    Decode sequences (one new token each) come first: tokens ``0 .. num_decode-1``.
    ``write_index``: slot rows receiving this step's K/V ([2, kv, T] order).
    ``tables`` [S, W] int32: the block table of each sequence of the step (decode
    sequences first, in token order), padded with block 0; ``token_seq`` [T] int32:
    each token's row of ``tables``; ``token_ctx`` [T] int32: how many positions each
    token attends to (its position + 1).
    ``logits_idx`` [S]: flat index of the last token of each sampling sequence.
    ``slots`` [T] int64: each token's cache slot (``write_index`` before its expansion to rows),
    for the fused rope-and-write; None takes the ATen path.
    """

    positions: torch.Tensor
    write_index: torch.Tensor
    num_decode: int
    tables: torch.Tensor
    token_seq: torch.Tensor
    token_ctx: torch.Tensor
    logits_idx: torch.Tensor
    block_size: int
    slots: torch.Tensor | None = None


def _fuse_linear(parts: list[nn.Module]) -> nn.Module:
    """Concatenate plain nn.Linear layers along the output dim (one matmul
    instead of several); anything else (bitsandbytes layers) stays separate."""
    if not all(type(p) is nn.Linear for p in parts):
        return _Split(parts)
    weight = torch.cat([p.weight for p in parts], dim=0)  # type: ignore[union-attr]
    has_bias = parts[0].bias is not None  # type: ignore[union-attr]
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device=weight.device, dtype=weight.dtype)
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if has_bias:
        fused.bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)  # type: ignore[union-attr]
    return fused


class _Split(nn.Module):
    def __init__(self, parts: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)


def cpu_packing_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``pack_cpu_linears`` packs on this device/dtype (CPU float32 with oneDNN)."""
    return (
        device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


class PackedLinear(nn.Module):
    """``nn.Linear`` over a oneDNN-packed copy of its weight (CPU only).

    Holds only the packed weight (an opaque mkldnn tensor, a buffer so that
    ``model_bytes`` counts it) and the bias; the plain weight is not kept.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.register_buffer("packed_weight", packed, persistent=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``residual + self(x)`` in one oneDNN call (a sum post-op; bit-identical)."""
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.packed_weight, self.bias, "add")


def _add_linear(residual: torch.Tensor, linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(linear, PackedLinear):
        return linear.forward_add(x, residual)
    return residual + linear(x)


class _Layer(nn.Module):
    def __init__(self, hf_layer: nn.Module) -> None:
        super().__init__()
        attn, mlp = hf_layer.self_attn, hf_layer.mlp
        self.qkv = _fuse_linear([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o_proj = attn.o_proj
        self.gate_up = _fuse_linear([mlp.gate_proj, mlp.up_proj])
        self.down = mlp.down_proj
        self.in_norm = hf_layer.input_layernorm.weight
        self.post_norm = hf_layer.post_attention_layernorm.weight
        self.q_norm = attn.q_norm.weight if hasattr(attn, "q_norm") else None
        self.k_norm = attn.k_norm.weight if hasattr(attn, "k_norm") else None


class PagedCausalLM(nn.Module):
    """Forward of a Llama-family HF model over a paged KV cache.

    Invariant: ``kv_cache`` is the only per-sequence state; a forward writes
    exactly the slots in ``slot_mapping`` and reads only slots of the block
    tables it is given.
    """

    def __init__(self, hf_model: nn.Module, max_positions: int) -> None:
        super().__init__()
        cfg = hf_model.config
        arch = (getattr(cfg, "architectures", None) or [type(hf_model).__name__])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"model: architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.group = self.num_heads // self.num_kv_heads
        self.eps = cfg.rms_norm_eps
        self.scale = self.head_dim**-0.5
        self.vocab_size = cfg.vocab_size
        self.num_layers = cfg.num_hidden_layers
        inner = hf_model.model
        self.embed = inner.embed_tokens
        self.layers = nn.ModuleList(_Layer(layer) for layer in inner.layers)
        self.norm = inner.norm.weight
        self.lm_head = hf_model.lm_head
        weight = inner.norm.weight
        self.dtype = weight.dtype
        self.device = weight.device
        # cos/sin for every position from HF's own rotary module: identical
        # numbers to HF for every rope_type (default, llama3, linear, yarn...).
        pos = torch.arange(max_positions, device=self.device)[None]
        probe = torch.zeros(1, 1, self.head_dim, dtype=self.dtype, device=self.device)
        with torch.inference_mode():
            cos, sin = inner.rotary_emb(probe, pos)
        half = self.head_dim // 2
        self.register_buffer("cos", cos[0, :, :half].contiguous(), persistent=False)
        self.register_buffer("sin", sin[0, :, :half].contiguous(), persistent=False)
        self.max_positions = max_positions
        # "paged": the C++ kernel where it loads, else the torch fallback; "torch": the fallback;
        # "gather": decode through the previous padded gather (a reference for benchmarks)
        self.attention = "paged"
        # the C++ rms_norm / rope_write_kv / silu_mul on CPU float32 (csrc/fused_ops.cpp); False: the ATen ops
        self.fused_ops = True
        # tensor parallelism (set by ``shard``): the collectives and the first vocabulary row held here
        self.tp: Any = None
        self.vocab_start = 0

    def shard(self, layout: Any, tp: Any) -> None:
        """Make this model rank ``layout.rank``'s shard (``runner.tp.ShardLayout``): its q and KV heads,
        its vocabulary rows; the loader fills the weights with the matching slices."""
        self.num_heads, self.num_kv_heads = layout.num_heads, layout.num_kv_heads
        self.group = self.num_heads // self.num_kv_heads
        self.vocab_start = layout.vocab[0]
        self.tp = tp

    def pack_cpu_linears(self) -> int:
        """Replace every plain ``nn.Linear`` (fused qkv/gate_up, o_proj, down,
        lm_head; a tied lm_head only when no layer is quantized) by a
        ``PackedLinear`` where ``cpu_packing_supported``; returns
        how many were packed (0 elsewhere; idempotent). See the module docstring
        for the memory trade-off."""
        if not cpu_packing_supported(self.device, self.dtype):
            return 0
        count = 0
        for layer in self.layers:
            for name in ("qkv", "o_proj", "gate_up", "down"):
                if type(getattr(layer, name)) is nn.Linear:
                    setattr(layer, name, PackedLinear(getattr(layer, name)))
                    count += 1
        quantized = any(type(getattr(layer, name)) is not PackedLinear
                        for layer in self.layers for name in ("qkv", "o_proj", "gate_up", "down"))
        # a tied lm_head's packed copy is extra memory: not for a model quantized to save memory
        if type(self.lm_head) is nn.Linear and not (quantized and self.lm_head.weight is self.embed.weight):
            self.lm_head = PackedLinear(self.lm_head)
            count += 1
        if count:
            import gc

            gc.collect()  # free the replaced plain weights now, should a reference cycle hold them
        return count

    def _rms(self, x: torch.Tensor, w: torch.Tensor, ext: Any = None) -> torch.Tensor:
        if ext is not None and x.dim() == 2 and x.stride(1) == 1:
            out = x.new_empty(x.shape)
            ext.rms_norm(out, x, w, self.eps)
            return out
        return F.rms_norm(x, (x.shape[-1],), w, self.eps)

    @staticmethod
    def _silu_mul(gate_up: torch.Tensor, ext: Any = None) -> torch.Tensor:
        """SwiGLU's ``silu(gate) * up`` of a fused [T, 2 * intermediate] projection."""
        if ext is not None and gate_up.dim() == 2 and gate_up.stride(1) == 1:
            out = gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)
            ext.silu_mul(out, gate_up)
            return out
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x [T, heads, hd]; HF's rotate_half convention (first half / second half).
        half = self.head_dim // 2
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    def _fused_module(self, kv_cache: torch.Tensor) -> Any:
        """The C++ module whose fused ops this forward uses (``csrc/fused_ops.cpp``), or None: CPU
        float32 weights and cache with the kernels loaded, unless ``fused_ops`` is off."""
        if not self.fused_ops or self.device.type != "cpu" or self.dtype != torch.float32 \
                or kv_cache.dtype != torch.float32:
            return None
        return paged_attention_extension()

    def forward(self, input_ids: torch.Tensor, meta: StepMetadata, kv_cache: torch.Tensor) -> torch.Tensor:
        """Return logits [len(meta.logits_idx), vocab] (float32) after writing KV."""
        num_tokens = input_ids.shape[0]
        nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        ext = self._fused_module(kv_cache)
        # one C++ call rotates q and k and writes the step's K/V (Qwen3's q/k norms take the torch path)
        fused_rope = ext is not None and meta.slots is not None and self.layers[0].q_norm is None
        if not fused_rope:
            cos = self.cos[meta.positions].unsqueeze(1)
            sin = self.sin[meta.positions].unsqueeze(1)
        num_slots = kv_cache.shape[3]
        h = self._embed(input_ids)
        for li, layer in enumerate(self.layers):
            x = self._rms(h, layer.in_norm, ext)
            qkv = layer.qkv(x)
            # rows of [2 * kv * slots, hd]: dim-0 index ops are plain row copies
            # (index_select/index_copy_ on an inner dim take a slow generic path on CPU)
            kv_rows = kv_cache[li].view(-1, hd)
            if fused_rope:
                q = qkv.new_empty(num_tokens, nh, hd)
                ext.rope_write_kv(q, kv_rows, qkv, self.cos, self.sin, meta.positions, meta.slots, nh, nkv,
                                  num_slots)
            else:
                v = qkv[:, (nh + nkv) * hd :].view(num_tokens, nkv, hd)
                if layer.q_norm is not None:
                    q = self._rope(self._rms(qkv[:, : nh * hd].view(num_tokens, nh, hd), layer.q_norm), cos, sin)
                    k = self._rope(self._rms(qkv[:, nh * hd : (nh + nkv) * hd].view(num_tokens, nkv, hd),
                                             layer.k_norm), cos, sin)
                else:
                    # q and k heads rotated together: one set of elementwise ops instead of two
                    qk = self._rope(qkv[:, : (nh + nkv) * hd].view(num_tokens, nh + nkv, hd), cos, sin)
                    q, k = qk[:, :nh], qk[:, nh:]
                new_kv = torch.stack((k.transpose(0, 1), v.transpose(0, 1))).to(kv_cache.dtype)  # [2, kv, T, hd]
                kv_rows.index_copy_(0, meta.write_index, new_kv.view(-1, hd))
            out = self._attention(q, kv_cache[li], meta)
            h = self._add_row_parallel(h, layer.o_proj, out.view(num_tokens, nh * hd))
            x = self._rms(h, layer.post_norm, ext)
            h = self._add_row_parallel(h, layer.down, self._silu_mul(layer.gate_up(x), ext))
        h = self._rms(h[meta.logits_idx], self.norm, ext)
        logits = self.lm_head(h).float()
        if self.tp is not None:  # vocabulary-parallel: rank 0 gathers every rank's columns
            return self.tp.gather_vocab(logits)
        return logits

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return self.embed(input_ids)
        # vocabulary-parallel lookup: each rank embeds the ids in its rows, zeros elsewhere; the sum
        # over ranks adds exactly one non-zero row per token (bit-identical to the full table)
        weight = self.embed.weight
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= weight.shape[0])
        h = F.embedding(local.masked_fill(outside, 0), weight)
        h.masked_fill_(outside[:, None], 0.0)
        return self.tp.all_reduce(h)

    def _add_row_parallel(self, residual: torch.Tensor, linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``residual + linear(x)``; tensor-parallel: each rank's partial sum over its input columns,
        all-reduced (a row-parallel layer's bias lives on rank 0 alone)."""
        if self.tp is None:
            return _add_linear(residual, linear, x)
        return residual + self.tp.all_reduce(linear(x).contiguous())

    def _attention(self, q: torch.Tensor, layer_cache: torch.Tensor, meta: StepMetadata) -> torch.Tensor:
        # the step's k and v are already in the cache (written by forward); every token reads them from there
        cache = layer_cache.view(2, self.num_kv_heads, -1, self.head_dim)
        b = meta.num_decode
        if self.attention == "gather" and b:
            out = q.new_empty(q.shape)
            out[:b] = gathered_decode_attention(q[:b], cache, meta.tables[:b], meta.token_ctx[:b],
                                                meta.block_size, self.scale)
            if b < q.shape[0]:
                out[b:] = paged_attention(q[b:], cache, meta.tables, meta.token_seq[b:], meta.token_ctx[b:],
                                          meta.block_size, self.scale)
            return out
        return paged_attention(q, cache, meta.tables, meta.token_seq, meta.token_ctx, meta.block_size,
                               self.scale, use_kernel=self.attention == "paged")
