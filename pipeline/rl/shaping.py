"""What the policy is trained on: the score, unfinished replies put below finished ones, and the per-token KL
penalty to the reference, with its coefficient fixed or steered (Ziegler et al. 2019).
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.rl.ops import kl_estimate


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


# ---- reward-model ensembles (Coste et al. 2023): the members' scores, each on its own normalised scale ---------

OBJECTIVES = ("mean", "worst", "uwo")


def ensemble_spread(z: Tensor) -> dict[str, Tensor]:
    """The mean, standard deviation and minimum over an ensemble's members: `z` is ``[B, K]``, member k's score of
    episode b normalised with member k's own statistics. The deviation is the population one (divide by K), so one
    member gives 0; it is the members' disagreement the reward-hacking alarm watches."""
    return {"mean": z.mean(-1), "std": z.std(-1, correction=0), "min": z.amin(-1)}


def reward_objective(z: Tensor, objective: str = "mean", uwo_lambda: float = 1.0) -> Tensor:
    """What a method optimises of an ensemble's normalised scores ``[B, K]``: mean (the members' average), worst
    (their minimum: worst-case optimisation, WCO) or uwo (uncertainty-weighted: mean - uwo_lambda * the members'
    variance, as Coste et al. define UWO). With one member all three are its score."""
    if objective == "mean":
        return z.mean(-1)
    if objective == "worst":
        return z.amin(-1)
    if objective == "uwo":
        return z.mean(-1) - uwo_lambda * z.var(-1, correction=0)
    raise ValueError(f"reward objective {objective!r}: one of {', '.join(OBJECTIVES)}")
