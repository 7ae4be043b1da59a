"""Models: a small Llama built from config, or any Hugging Face causal LM by name or local folder."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.errors import UserError


def dtype_for(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def mixed_precision(precision: str) -> str:
    """accelerate's mixed_precision flag: weights stay fp32, matmuls run in bf16 on GPU."""
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]


def build_from_config(mcfg, tokenizer):
    """A fresh Llama-style model sized by `mcfg`, with the tokenizer's special ids."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if mcfg.arch != "llama":
        raise UserError(f"model.arch={mcfg.arch!r}: only 'llama' is built from scratch; for any other model use "
                        f"model=hf model.name_or_path=<hub name or folder>")
    if mcfg.hidden_size % mcfg.num_heads or mcfg.num_heads % mcfg.num_kv_heads:
        raise UserError(f"model: hidden_size ({mcfg.hidden_size}) must divide by num_heads ({mcfg.num_heads}) "
                        f"and num_heads by num_kv_heads ({mcfg.num_kv_heads})")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=mcfg.hidden_size, num_hidden_layers=mcfg.num_layers,
        num_attention_heads=mcfg.num_heads, num_key_value_heads=mcfg.num_kv_heads,
        intermediate_size=mcfg.intermediate_size, max_position_embeddings=mcfg.max_seq_len,
        rope_theta=mcfg.rope_theta, tie_word_embeddings=mcfg.tie_embeddings, attention_dropout=mcfg.dropout,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


def load_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load model '{path}' (not a local checkpoint, or a hub name while offline): "
                        f"{str(e).splitlines()[0]}")


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token, 6N + attention (PaLM appendix B), N without the embedding matrix."""
    cfg = model.config
    n = n_params(model) - cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    n += cfg.vocab_size * cfg.hidden_size  # the output projection is a real matmul
    return 6 * n + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len
