"""Advantages from per-token rewards and values (conventions as in pipeline/rl/ops.py)."""

from __future__ import annotations

import torch
from torch import Tensor


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), backwards over T.

    delta_t = r_t + gamma * V_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1};  R_t = A_t + V_t.
    The episode ends at the last real token, so V after it is 0 (also for truncated rows: the
    "no end-of-turn" case is handled by the score, not by bootstrapping). Rewards and values at
    masked positions are ignored; masked positions get A = R = 0. Returns (advantages, returns).
    """
    m = mask.bool()
    r, v = torch.where(m, rewards, 0), torch.where(m, values, 0)
    adv = torch.zeros_like(v)
    next_v = next_adv = torch.zeros_like(v[:, 0])
    for t in reversed(range(v.size(1))):
        delta = r[:, t] + gamma * next_v - v[:, t]
        next_adv = torch.where(m[:, t], delta + gamma * lam * next_adv, 0)
        adv[:, t], next_v = next_adv, v[:, t]
    return adv, adv + v
