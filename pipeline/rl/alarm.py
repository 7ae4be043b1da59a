"""The reward-hacking alarm: a warning of over-optimisation from what a researcher without a gold oracle has.

Gao et al. (2022) show the proxy reward rising while the true reward falls once a policy is optimised too far
against a learnt reward model; Coste et al. (2023) show that where that happens the members of a reward-model
ensemble start to disagree, because the policy has moved to replies none of them was fitted on. So the alarm
watches two series PPO computes every iteration on its own samples, with no gold: the proxy (the members' mean
normalised score) and the disagreement (the members' standard deviation, averaged over the samples). The rule,
fixed before it was validated (docs/ppo.md has the sweep):

    P_t, D_t = trailing means over `window` iterations of the proxy and of the disagreement
    condition at t: P_t > P_{t-window}  (the proxy is rising)
                and D_t >= (1 + rise) * min_{s <= t} D_s  (the members disagree far more than they did at best)
    fires at the first t where the condition has held for `patience` iterations in a row.

KL to the reference and reply length are reported beside it (alarm/kl, alarm/length_ratio) as what to look at next:
they rise in every RLHF run, hacking or not, so the rule does not use them. `alarm_series` is a pure function of the
per-iteration history, so a resumed run reaches the same verdict.
"""

from __future__ import annotations

from typing import Sequence


def trailing_mean(xs: Sequence[float], w: int) -> list[float]:
    """The mean of the last min(w, t + 1) values at every t."""
    out, total = [], 0.0
    for t, x in enumerate(xs):
        total += x
        if t >= w:
            total -= xs[t - w]
        out.append(total / min(w, t + 1))
    return out


def alarm_series(
    proxy: Sequence[float],
    disagreement: Sequence[float],
    window: int = 5,
    rise: float = 1.0,
    patience: int = 3,
    kl: Sequence[float] | None = None,
    length: Sequence[float] | None = None,
) -> list[dict]:
    """The alarm's state after each iteration: {proxy_trend, disagreement, disagreement_ratio, condition, fired,
    fired_at (the 1-based iteration it first fired at, or 0)} and, when given, kl (trailing mean) and length_ratio
    (trailing mean over the first window's). Nothing can fire before `window` + `patience` - 1 iterations."""
    n = len(proxy)
    if len(disagreement) != n:
        raise ValueError(f"alarm_series: {n} proxy values against {len(disagreement)} disagreement values")
    P, D = trailing_mean(proxy, window), trailing_mean(disagreement, window)
    K = trailing_mean(kl, window) if kl is not None else None
    L = trailing_mean(length, window) if length is not None else None
    out, low, run, fired_at = [], float("inf"), 0, 0
    for t in range(n):
        if t >= window - 1:
            low = min(low, D[t])  # the baseline: the lowest full-window disagreement so far
        trend = P[t] - P[t - window] if t >= window else 0.0
        ratio = D[t] / low if low not in (0.0, float("inf")) else 0.0
        cond = t >= window and trend > 0 and low < float("inf") and D[t] >= (1 + rise) * low and D[t] > 0
        run = run + 1 if cond else 0
        if run >= patience and not fired_at:
            fired_at = t + 1
        row = {
            "proxy_trend": trend,
            "disagreement": D[t],
            "disagreement_ratio": ratio,
            "condition": float(cond),
            "fired": float(bool(fired_at)),
            "fired_at": fired_at,
        }
        if K is not None:
            row["kl"] = K[t]
        if L is not None:
            row["length_ratio"] = L[t] / L[min(window, n) - 1] if L[min(window, n) - 1] else 0.0
        out.append(row)
    return out
