"""RLHF-PPO math as small pure torch functions.

Follows InstructGPT / Ziegler et al. 2019 and "The N+ Implementation Details of RLHF with PPO"
(Huang et al. 2024). Conventions everywhere:

* tensors are batch-first ``[B, T]`` over *response tokens only* (the prompt is sliced off);
* ``mask`` is bool or 0/1 float ``[B, T]``: 1 for real response tokens up to and including the
  first end-of-turn token, 0 for padding and anything after end-of-turn. It is assumed to be a
  prefix (ones, then zeros), which is what `response_mask` returns;
* masked positions never enter a statistic, even if they hold garbage (NaN, +-inf): we select
  with ``torch.where`` rather than multiplying by the mask, because ``nan * 0 = nan``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

# ---------------------------------------------------------------- log-probs and entropy


def logprobs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature)[label], ``[B, T, V], [B, T] -> [B, T]`` (computed in fp32).

    Pass the *sampling* temperature: the behaviour policy that generated the tokens is
    softmax(z / tau), so the PPO ratio must be computed under the same tau (Huang et al. 2024).
    """
    z = logits.float() / temperature
    return z.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - z.logsumexp(-1)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-token entropy H = logsumexp(z) - sum_v softmax(z)_v z_v, with z = logits / temperature."""
    z = logits.float() / temperature
    return z.logsumexp(-1) - (z.softmax(-1) * z).sum(-1)


# ---------------------------------------------------------------- masked statistics


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


# ---------------------------------------------------------------- response masks


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


def response_mask(
    response_ids: Tensor, eos_token_id: int | Sequence[int], pad_token_id: int | None
) -> Tensor:
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


# ---------------------------------------------------------------- KL and rewards


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


def penalised_rewards(
    score: Tensor, logp: Tensor, ref_logp: Tensor, mask: Tensor, kl_coef: float, kind: str = "k1"
) -> tuple[Tensor, Tensor]:
    """Per-token rewards r_t = -kl_coef * kl_t, plus the scalar score ``[B]`` at the last real token.

    The last real token is index ``mask.sum(-1) - 1`` (the end-of-turn token if one was made).
    Returns (rewards, kl), both ``[B, T]`` and 0 at masked positions. A row with an empty mask
    gets no score (there is no token to credit).
    """
    m = mask.bool()
    kl = torch.where(m, kl_estimate(logp, ref_logp, kind), 0)
    rewards = -kl_coef * kl
    n = m.sum(-1)
    last = (n - 1).clamp_min(0).unsqueeze(-1)
    credit = torch.where(n > 0, score.to(rewards.dtype), 0).unsqueeze(-1)
    return rewards.scatter_add(-1, last, credit), kl


def penalise_unfinished(score: Tensor, ended: Tensor, penalty: float) -> Tensor:
    """Scores ``[B]`` with every reply that never ended put ``penalty`` below the batch's lowest finished reply:
    an unfinished reply's score becomes min(its own, the lowest finished score) - penalty; finished ones keep theirs.
    Without a finished reply in the batch it is its own score - penalty.

    A clamp below the batch's minimum rather than TRL's plain subtraction (score - penalty): a constant taken off a
    normalised score leaves an unfinished reply above every finished reply that scored lower by more than the
    penalty, and replacing the score with a constant (e.g. -1) leaves it above about one finished reply in six.
    Taking the minimum with its own score keeps a very bad unfinished reply as bad as the reward model says.
    """
    ended = ended.bool()
    if not ended.any():
        return torch.where(ended, score, score - penalty)
    lowest = torch.where(ended, score, torch.inf).min()
    return torch.where(ended, score, torch.minimum(score, lowest) - penalty)


# ---------------------------------------------------------------- advantages and losses


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


def _token_mean(x: Tensor, mask: Tensor, n_tokens: Tensor | float | None) -> Tensor:
    """masked_mean, or with ``n_tokens`` the masked sum divided by it (a micro-batch's share of a larger batch's
    token mean: summed over the micro-batches it is that mean, however the batch was split)."""
    if n_tokens is None:
        return masked_mean(x, mask)
    return torch.where(mask.bool(), x, 0).sum() / n_tokens


def policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip_range: float,
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
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range_value: float,
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


# ---------------------------------------------------------------- KL coefficient control


class FixedKLController:
    """Constant KL coefficient; ``update`` is a no-op."""

    def __init__(self, coef: float):
        self.value = coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """Ziegler et al. 2019, eq. (2): steer the measured KL towards ``target``.

    e = clip(KL / target - 1, -0.2, 0.2);  beta <- beta * (1 + e * n_steps / horizon).
    ``n_steps`` is the number of samples (episodes) in the batch the KL was measured on.
    """

    def __init__(self, init_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(float(current_kl) / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon


# ---------------------------------------------------------------- running moments and EMA


class RunningMoments:
    """Running mean / std of a stream of scalars (e.g. reward-model scores), fp64.

    Batches are merged exactly with the parallel update of Chan et al. (1979). For data-parallel
    training, gather the batch across processes first (e.g. ``accelerator.gather``) so every rank
    holds identical moments. ``std`` is the Bessel-corrected sample std; it reads 1 until two
    values have been seen, so dividing by it is then a no-op.
    """

    def __init__(self):
        self.count, self.mean, self._m2 = 0, 0.0, 0.0

    def update(self, x: Tensor) -> None:
        x = x.detach().double().flatten()
        n = x.numel()
        if n == 0:
            return
        mean, m2 = x.mean().item(), (x - x.mean()).square().sum().item()
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self._m2 += m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def var(self) -> float:
        return self._m2 / (self.count - 1) if self.count > 1 else 1.0

    @property
    def std(self) -> float:
        return self.var**0.5


@torch.no_grad()
def ema_update(target_params: Iterable[Tensor], online_params: Iterable[Tensor], decay: float) -> None:
    """In place: target <- decay * target + (1 - decay) * online, parameter by parameter."""
    target_params, online_params = list(target_params), list(online_params)
    if len(target_params) != len(online_params):
        raise ValueError(f"ema_update: {len(target_params)} target vs {len(online_params)} online tensors")
    for tgt, src in zip(target_params, online_params):
        tgt.lerp_(src.to(tgt.dtype), 1 - decay)
