"""Tiny random-weight models for tests: a real Hugging Face checkpoint on disk.

``make_tiny_llama(path)`` writes a ``LlamaForCausalLM`` (or a Mistral / Qwen2 /
Qwen3 variant) with random weights, a ``config.json``, a safetensors file and a
fast byte-level tokenizer with a ChatML chat template, so that
``fleetserve serve --model <path>`` and ``LLM(model=str(path))`` work offline in
a fraction of a second. The same seed always yields the same weights.

The tokenizer has no merges: every UTF-8 byte is one token, plus the special
tokens ``<|endoftext|>``, ``<|im_start|>`` and ``<|im_end|>``. The model's
vocabulary is exactly the tokenizer's, so every id the model can produce decodes.
"""

from __future__ import annotations

import json
from pathlib import Path

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# ChatML, the format SmolLM2 and Qwen use, so chat tests read the same everywhere.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}


def build_tokenizer():  # type: ignore[no-untyped-def]
    """A byte-level BPE tokenizer without merges, wrapped as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS),
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_llama(
    path: str | Path,
    *,
    seed: int = 0,
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 2048,
    architecture: str = "llama",
    tie_word_embeddings: bool = True,
    rope_scaling: dict | None = None,
) -> Path:
    """Write a random-weight causal LM plus tokenizer to ``path`` and return it.

    ``architecture`` is one of llama, mistral, qwen2, qwen3. ``rope_scaling``
    (e.g. ``{"rope_type": "llama3", ...}``) is passed to the config as is.
    """
    import torch
    import transformers

    if architecture not in _ARCHITECTURES:
        raise ValueError(
            f"architecture must be one of {sorted(_ARCHITECTURES)}, got {architecture!r}"
        )
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(
            "hidden_size must be divisible by num_heads and num_heads by num_kv_heads, "
            f"got hidden_size={hidden_size}, num_heads={num_heads}, num_kv_heads={num_kv_heads}"
        )
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config_cls_name, model_cls_name = _ARCHITECTURES[architecture]
    config_cls = getattr(transformers, config_cls_name)
    model_cls = getattr(transformers, model_cls_name)
    kwargs: dict = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        rms_norm_eps=1e-5,
    )
    if architecture == "qwen3":
        kwargs["head_dim"] = hidden_size // num_heads
    if rope_scaling is not None:
        kwargs["rope_scaling"] = rope_scaling
    config = config_cls(**kwargs)
    # Seeded CPU generator: identical weights for identical arguments on any machine.
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = model_cls(config)
        # Random init gives near-uniform logits; a larger spread makes greedy
        # decoding decisive, so token-for-token comparisons are meaningful.
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.dim() >= 2:
                    param.normal_(0.0, 1.0 / (param.shape[-1] ** 0.5))
                elif "bias" in name:
                    param.normal_(0.0, 0.1)
                else:
                    param.uniform_(0.8, 1.2)
    finally:
        torch.random.set_rng_state(gen_state)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    gen_cfg = out / "generation_config.json"
    if gen_cfg.exists():
        data = json.loads(gen_cfg.read_text())
        data["eos_token_id"] = config.eos_token_id
        gen_cfg.write_text(json.dumps(data, indent=2))
    # safetensors writes its file 0600: readable by any user, as a model in an image is, so a
    # server pod running as a non-root user (the dev cluster enforces it) can load it.
    for entry in out.iterdir():
        if entry.is_file():
            entry.chmod(0o644)
    return out
