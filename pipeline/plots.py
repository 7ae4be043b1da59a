"""PNG plots for stage folders and the report (matplotlib, no display needed)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def overoptimization_plot(history: list[dict], path: Path, title: str = "") -> Path:
    """Reward-model score and gold score against sqrt(KL) from the SFT policy (Gao et al. 2022's axes):
    while the proxy keeps rising, the gold score peaks and falls once the policy exploits the reward model."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    x = [math.sqrt(max(h["kl"], 0.0)) for h in history]
    ax.plot(x, [h["reward"] for h in history], "o-", ms=3, color="tab:blue", label="reward model (normalised)")
    ax.set_xlabel("sqrt KL(policy || SFT)  (nats^1/2)")
    ax.set_ylabel("reward model score", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(x, [h["gold"] for h in history], "s-", ms=3, color="tab:red", label="gold oracle")
    ax2.set_ylabel("gold score", color="tab:red")
    ax.set_title(title or "over-optimisation")
    fig.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def curves_plot(series: dict[str, list[tuple[float, float]]], path: Path, title: str, xlabel: str = "step",
                ylabel: str = "") -> Path:
    """Several (x, y) curves on one axis; `series` maps a legend label to its points."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for label, pts in series.items():
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
