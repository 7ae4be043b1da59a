"""The RL core's small pure torch functions: entropy, masked statistics, KL (log-probs of tokens and response masks,
which sampling needs too, are pipeline/models/tokens.py).

Conventions everywhere:

* tensors are batch-first ``[B, T]`` over *response tokens only* (the prompt is sliced off);
* ``mask`` is bool or 0/1 float ``[B, T]``: 1 for real response tokens up to and including the
  first end-of-turn token, 0 for padding and anything after end-of-turn. It is assumed to be a
  prefix (ones, then zeros), which is what `response_mask` returns;
* masked positions never enter a statistic, even if they hold garbage (NaN, +-inf): we select
  with ``torch.where`` rather than multiplying by the mask, because ``nan * 0 = nan``.

PPO builds on these; tests/test_rl_ops.py checks them against
hand-computed tensors.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-token entropy H = logsumexp(z) - sum_v softmax(z)_v z_v, with z = logits / temperature."""
    z = logits.float() / temperature
    return z.logsumexp(-1) - (z.softmax(-1) * z).sum(-1)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """sum(x * m) / sum(m) over ``dim`` (all entries if None). An empty selection gives 0, not NaN."""
    m = mask.bool()
    total = torch.where(m, x, 0).sum() if dim is None else torch.where(m, x, 0).sum(dim)
    count = m.sum() if dim is None else m.sum(dim)
    return total / count.clamp_min(1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the masked entries (all of them, one scalar); Bessel-corrected if ``unbiased``.

    Raises ValueError with no entries, or with one entry when ``unbiased``.
    """
    m = mask.bool()
    n = int(m.sum())
    if n == 0 or (unbiased and n < 2):
        raise ValueError(f"masked_var needs {'2' if unbiased else '1'}+ unmasked entries, got {n}")
    centred = torch.where(m, x - masked_mean(x, m), 0)
    return centred.square().sum() / (n - 1 if unbiased else n)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) with mean/var (unbiased) over the masked entries only.

    ``shift_mean=False`` adds the mean back (scale only; N+ details use it for rewards, and
    ``shift_mean=True`` for advantages). Masked positions are set to 0 in the output, so they
    stay inert in later masked sums.
    """
    m = mask.bool()
    mean, var = masked_mean(x, m), masked_var(x, m)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, 0)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 - Var[R - V] / Var[R] over masked tokens: 1 is perfect, 0 is no better than a constant.

    NaN when the returns are constant (the ratio is undefined).
    """
    var_r = masked_var(returns, mask, unbiased=False)
    if var_r == 0:
        return torch.tensor(float("nan"), device=returns.device)
    return 1 - masked_var(returns - values, mask, unbiased=False) / var_r


def kl_estimate(logp: Tensor, ref_logp: Tensor, kind: str = "k1") -> Tensor:
    """Per-token estimate of KL(pi || ref) from samples of pi (Schulman, "Approximating KL").

    With d = logp - ref_logp and r = exp(-d) = pi_ref / pi:
    k1 = d (unbiased, can be negative); k2 = d^2 / 2 (biased, low variance);
    k3 = (r - 1) - log r (unbiased, always >= 0); abs = |d|.
    """
    d = logp - ref_logp
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d.square()
    if kind == "k3":
        return torch.expm1(-d) + d
    if kind == "abs":
        return d.abs()
    raise ValueError(f"unknown KL estimator {kind!r}; expected k1, k2, k3 or abs")


@torch.no_grad()
def ema_update(target_params: Iterable[Tensor], online_params: Iterable[Tensor], decay: float) -> None:
    """In place: target <- decay * target + (1 - decay) * online, parameter by parameter."""
    target_params, online_params = list(target_params), list(online_params)
    if len(target_params) != len(online_params):
        raise ValueError(f"ema_update: {len(target_params)} target vs {len(online_params)} online tensors")
    for tgt, src in zip(target_params, online_params):
        tgt.lerp_(src.to(tgt.dtype), 1 - decay)


def full_kl(logits: Tensor, ref_logits: Tensor, mask: Tensor, temperature: float = 1.0) -> Tensor:
    """Exact KL(pi || pi_ref) of the next-token distributions, summed over each response's tokens ([B]).
    Unlike the sampled k1 estimate it is >= 0 for any responses, greedy ones included (used for evaluation)."""
    logp, logq = (torch.log_softmax(x.float() / temperature, -1) for x in (logits, ref_logits))
    per_token = (logp.exp() * (logp - logq)).sum(-1)
    return torch.where(mask.bool(), per_token, 0.0).sum(-1)
