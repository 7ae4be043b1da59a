"""A small Llama built from config (pretraining from scratch), and what a model costs: parameters, FLOPs per token."""

from __future__ import annotations

from pipeline.core.errors import UserError


def build_from_config(mcfg, tokenizer):
    """A fresh Llama-style model sized by `mcfg`, with the tokenizer's special ids."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if mcfg.arch != "llama":
        raise UserError(
            f"model.arch={mcfg.arch!r}: only 'llama' is built from scratch; for any other model use "
            f"model=hf model.name_or_path=<hub name or folder>"
        )
    if mcfg.hidden_size % mcfg.num_heads or mcfg.num_heads % mcfg.num_kv_heads:
        raise UserError(
            f"model: hidden_size ({mcfg.hidden_size}) must divide by num_heads ({mcfg.num_heads}) "
            f"and num_heads by num_kv_heads ({mcfg.num_kv_heads})"
        )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=mcfg.hidden_size,
        num_hidden_layers=mcfg.num_layers,
        num_attention_heads=mcfg.num_heads,
        num_key_value_heads=mcfg.num_kv_heads,
        intermediate_size=mcfg.intermediate_size,
        max_position_embeddings=mcfg.max_seq_len,
        rope_theta=mcfg.rope_theta,
        tie_word_embeddings=mcfg.tie_embeddings,
        attention_dropout=mcfg.dropout,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token, 6N + attention (PaLM appendix B), N without the embedding matrix."""
    cfg = model.config
    n = n_params(model) - cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    n += cfg.vocab_size * cfg.hidden_size  # the output projection is a real matmul
    return 6 * n + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len
