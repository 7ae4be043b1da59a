"""Prompts as the models read them: messages in, chat-templated token ids out.

    as_messages("How old is Tovi?")        # [{"role": "user", "content": "How old is Tovi?"}]
    encode_prompts(tok, prompts, 192)      # token ids, each prompt through the chat template with the generation prompt
    left_pad(ids, tok.pad_token_id, dev)    # [B, P] ids and mask, left-padded (generation continues on the right)
    prompt_batch(tok, prompts, 192, dev)    # both at once; a prompt over the limit is an error (PPO)

Generation keeps the end of a prompt that is too long (the model's context is the limit, and the question comes
last); the RL stages refuse it instead (`too_long="error"`), because a truncated prompt is not the prompt the data
asked about.
"""

from __future__ import annotations

from typing import Optional

import torch

from pipeline.core.errors import UserError


def as_messages(p) -> list[dict]:
    """A prompt as a list of messages: accepts a list of messages, {"messages": [...]}, or a bare string."""
    if isinstance(p, str):
        return [{"role": "user", "content": p}]
    if isinstance(p, dict):
        return p["messages"]
    return list(p)


def encode_prompts(
    tokenizer,
    prompts,
    max_prompt_len: Optional[int] = None,
    too_long: str = "truncate",
    limit_name: str = "the prompt limit",
) -> list[list[int]]:
    """Chat-template each prompt with the generation prompt. Longer than max_prompt_len tokens: keep the last ones
    (too_long="truncate"), or raise a UserError naming `limit_name` (too_long="error")."""
    texts = [tokenizer.apply_chat_template(as_messages(p), add_generation_prompt=True, tokenize=False) for p in prompts]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]  # the template already holds any bos
    if max_prompt_len:
        longest = max(map(len, ids), default=0)
        if too_long == "error" and longest > max_prompt_len:
            raise UserError(
                f"a prompt has {longest} tokens, more than {limit_name}={max_prompt_len}; raise it or "
                f"filter the prompts"
            )
        ids = [x[-max_prompt_len:] for x in ids]
    return ids


def prompt_batch(tokenizer, prompts, max_prompt_len: int, device, limit_name: str = "train.max_prompt_tokens"):
    """(ids, mask) [B, P] of the chat-templated prompts, left-padded; a prompt over the limit is a UserError."""
    ids = encode_prompts(tokenizer, prompts, max_prompt_len, too_long="error", limit_name=limit_name)
    return left_pad(ids, tokenizer.pad_token_id, device)


def left_pad(batch: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, x in enumerate(batch):
        ids[i, width - len(x) :] = torch.tensor(x, dtype=torch.long)
        mask[i, width - len(x) :] = 1
    return ids.to(device), mask.to(device)
