"""Token-level helpers that sampling and the RL core share, below both (pipeline/inference and pipeline/rl import
them; they import neither): the log-probs of chosen tokens under a temperature, and where a reply ends.

Masks follow pipeline/rl/ops.py's conventions: batch-first ``[B, T]`` over response tokens, True up to and including
the first end-of-turn token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def logprobs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature)[label], ``[B, T, V], [B, T] -> [B, T]`` (computed in fp32).

    Pass the *sampling* temperature: the behaviour policy that generated the tokens is
    softmax(z / tau), so the PPO ratio must be computed under the same tau (Huang et al. 2024).
    """
    z = logits.float() / temperature
    return z.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - z.logsumexp(-1)


def first_true_index(bools: Tensor) -> Tensor:
    """Index of the first True along the last dim, ``[B, T] -> [B]`` (long); T where a row has none."""
    T = bools.size(-1)
    idx = torch.arange(T, device=bools.device).expand_as(bools)
    return torch.where(bools, idx, T).min(-1).values


def _ids(token_id: int | Sequence[int]) -> list[int]:
    return [token_id] if isinstance(token_id, int) else list(token_id)


def _is_eos(response_ids: Tensor, eos_token_id: int | Sequence[int]) -> Tensor:
    return torch.isin(response_ids, torch.tensor(_ids(eos_token_id), device=response_ids.device))


def ended(response_ids: Tensor, eos_token_id: int | Sequence[int]) -> Tensor:
    """Bool ``[B]``: did the row produce an end-of-turn token (one id or several) at all?"""
    return _is_eos(response_ids, eos_token_id).any(-1)


def response_mask(response_ids: Tensor, eos_token_id: int | Sequence[int], pad_token_id: int | None) -> Tensor:
    """Bool ``[B, T]``: True up to and including the first end-of-turn token, False after it.

    A row without end-of-turn (truncated at max length) is True up to the first pad token
    (exclusive), or everywhere. ``pad_token_id`` is ignored when it is None or an eos id,
    since the first eos then already marks the end.
    """
    T = response_ids.size(-1)
    end = first_true_index(_is_eos(response_ids, eos_token_id)) + 1  # one past the eos
    if pad_token_id is not None and pad_token_id not in _ids(eos_token_id):
        end = torch.minimum(end, first_true_index(response_ids == pad_token_id))
    return torch.arange(T, device=response_ids.device) < end.clamp_max(T).unsqueeze(-1)
