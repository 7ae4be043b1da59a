"""PPO's clipped losses (Schulman et al. 2017; the N+ implementation details of Huang et al. 2024), token-level."""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.rl.ops import masked_mean


def _token_mean(x: Tensor, mask: Tensor, n_tokens: Tensor | float | None) -> Tensor:
    """masked_mean, or with ``n_tokens`` the masked sum divided by it (a micro-batch's share of a larger batch's
    token mean: summed over the micro-batches it is that mean, however the batch was split)."""
    if n_tokens is None:
        return masked_mean(x, mask)
    return torch.where(mask.bool(), x, 0).sum() / n_tokens


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_range: float,
    n_tokens: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate, token-level masked mean over the whole batch (or, with ``n_tokens``, the masked sum
    divided by it: see `_token_mean`; the stats stay means over this batch's tokens).

    rho = exp(logp - old_logp);  L = mean_t max(-A rho, -A clip(rho, 1 - eps, 1 + eps)).
    Stats (detached): clipfrac = share of tokens where the clipped term is the larger one (zero
    gradient there); approx_kl = mean (logp - old_logp)^2 / 2 (the k2 estimator, as in the N+
    details and TRL); ratio_mean / ratio_max / ratio_min over real tokens.
    """
    m = mask.bool()
    log_ratio = torch.where(m, logp - old_logp, 0)  # padding: ratio 1, never inf or NaN
    ratio = log_ratio.exp()
    pg1 = -advantages * ratio
    pg2 = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = _token_mean(torch.maximum(pg1, pg2), m, n_tokens)
    with torch.no_grad():
        real = ratio[m]
        stats = {
            "clipfrac": masked_mean((pg2 > pg1).float(), m),
            "approx_kl": masked_mean(0.5 * log_ratio.square(), m),
            "ratio_mean": masked_mean(ratio, m),
            "ratio_max": real.max() if real.numel() else ratio.new_tensor(1.0),
            "ratio_min": real.min() if real.numel() else ratio.new_tensor(1.0),
        }
    return loss, stats


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_range_value: float,
    n_tokens: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss 0.5 * mean_t max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2) (``n_tokens``: as
    in `policy_loss`).

    Stats (detached): vf_clipfrac = share of tokens where the clipped error is the larger one.
    """
    m = mask.bool()
    v, v_old, ret = (torch.where(m, t, 0) for t in (values, old_values, returns))
    v_clipped = v_old + (v - v_old).clamp(-clip_range_value, clip_range_value)
    err1, err2 = (v - ret).square(), (v_clipped - ret).square()
    loss = 0.5 * _token_mean(torch.maximum(err1, err2), m, n_tokens)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((err2 > err1).float(), m)}
    return loss, stats
