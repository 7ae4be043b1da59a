"""PNG plots for stage folders and the report (matplotlib, no display needed)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def overoptimization_plot(
    history: list[dict], path: Path, title: str = "", periodic: list[dict] | None = None, alarm_at: int = 0
) -> Path:
    """Reward-model score and gold score against sqrt(KL) from the SFT policy (Gao et al. 2022's axes): while the
    proxy keeps rising, the gold score peaks and falls once the policy exploits the reward model.

    `periodic`: the held-out evaluations ({"iteration", "kl", "reward", "gold"}: fixed prompts, sampled replies,
    exact KL), drawn as lines with markers in iteration order; `history`, the per-iteration training batches (noisy:
    new prompts each time, a sampled KL estimate), as faint points behind them. Without periodic evaluations the
    training points are joined in iteration order. `alarm_at`: the iteration the reward-hacking alarm fired at
    (pipeline/rl/alarm.py), marked by a dashed line at that iteration's KL."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    ax2 = ax.twinx()
    sx = lambda rows: [math.sqrt(max(h["kl"], 0.0)) for h in rows]  # noqa: E731
    blue, red = "tab:blue", "tab:red"
    if periodic:
        pts = sorted(periodic, key=lambda h: h["iteration"])
        x = sx(history)
        ax.scatter(
            x,
            [h["reward"] for h in history],
            s=8,
            color=blue,
            alpha=0.2,
            linewidths=0,
            label="reward model, training batches",
        )
        ax2.scatter(
            x,
            [h["gold"] for h in history],
            s=8,
            color=red,
            alpha=0.2,
            linewidths=0,
            marker="s",
            label="gold, training batches",
        )
        px = sx(pts)
        ax.plot(px, [h["reward"] for h in pts], "o-", ms=4, color=blue, label="reward model (normalised), held-out")
        ax2.plot(px, [h["gold"] for h in pts], "s-", ms=4, color=red, label="gold oracle, held-out")
        for h, x_ in zip(pts, px):
            ax2.annotate(
                str(h["iteration"]),
                (x_, h["gold"]),
                fontsize=6,
                color=red,
                alpha=0.7,
                xytext=(2, 3),
                textcoords="offset points",
            )
    else:
        x = sx(history)
        ax.plot(x, [h["reward"] for h in history], "o-", ms=3, color=blue, label="reward model (normalised)")
        ax2.plot(x, [h["gold"] for h in history], "s-", ms=3, color=red, label="gold oracle")
    hit = [h for h in history if h["iteration"] == alarm_at] if alarm_at else []
    if hit:
        ax.axvline(
            math.sqrt(max(hit[0]["kl"], 0.0)),
            color="black",
            ls="--",
            lw=1,
            label=f"alarm (no gold): iteration {alarm_at}",
        )
    ax.set_xlabel("sqrt KL(policy || SFT)  (nats^1/2)")
    ax.set_ylabel("reward model score", color=blue)
    ax2.set_ylabel("gold score", color=red)
    ax.set_title(title or "over-optimisation")
    fig.legend(loc="lower center", ncol=2, fontsize=7)
    fig.tight_layout(rect=(0, 0.14, 1, 1))  # the legend below the axes, clear of the points and the x label
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def sweep_overoptimization_plot(runs: dict[str, list[dict]], path: Path, title: str = "") -> Path:
    """Several PPO runs' periodic held-out evaluations (`periodic.json`: {"iteration", "kl", "reward", "gold"}),
    gold (left) and reward-model score (right) against sqrt(KL) from SFT, one colour per run: across a kl_coef
    sweep, where the proxy keeps climbing and the truth turns down."""
    fig, (ax_g, ax_r) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for i, (run, rows) in enumerate(runs.items()):
        pts = sorted(rows, key=lambda h: h["iteration"])
        x = [math.sqrt(max(h["kl"], 0.0)) for h in pts]
        color = f"C{i % 10}"
        ax_g.plot(x, [h["gold"] for h in pts], "s-", ms=3, color=color, label=run)
        ax_r.plot(x, [h["reward"] for h in pts], "o-", ms=3, color=color, label=run)
    for ax, what in ((ax_g, "gold score (held-out)"), (ax_r, "reward model score, normalised (held-out)")):
        ax.set_xlabel("sqrt KL(policy || SFT)  (nats^1/2)")
        ax.set_ylabel(what)
    ax_g.legend(fontsize=7)
    fig.suptitle(title or "over-optimisation across runs")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def curves_plot(
    series: dict[str, list[tuple[float, float]]], path: Path, title: str, xlabel: str = "step", ylabel: str = ""
) -> Path:
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


def methods_plot(
    points: dict[str, tuple[float, float]], curves: dict[str, list[tuple[float, float]]], path: Path, title: str = ""
) -> Path:
    """Gold score against KL to SFT for every method of one run: `points` {method: (kl, gold)} from the final
    sampled evaluation; `curves` {label: [(kl, gold), ...]}, best-of-n over n and the RL methods over their training
    (their periodic held-out evaluations), drawn as lines with the final point marked on top."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=110)
    colors = {name: f"C{i % 10}" for i, name in enumerate(dict.fromkeys([*curves, *points]))}
    for label, pts in curves.items():
        if pts:
            ax.plot(
                [p[0] for p in pts], [p[1] for p in pts], "-", lw=1.2, alpha=0.6, color=colors[label], marker=".", ms=4
            )
    for name, (kl, gold) in points.items():
        ax.scatter([kl], [gold], s=40, color=colors[name], zorder=3, label=name)
        ax.annotate(name, (kl, gold), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("KL(method || SFT)  (nats; best-of-n: the bound log n - (n-1)/n)")
    ax.set_ylabel("gold score (held-out, sampled)")
    ax.set_title(title or "gold against KL, every method")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def rounds_plot(rows: list[dict], path: Path, title: str = "") -> Path:
    """Iterated RLHF by round: held-out gold (greedy; SFT's as a dashed line) on the left axis, the win rate over
    SFT and over the previous round with their 95% intervals on the right."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=110)
    rs = [r["round"] for r in rows]
    ax.plot(rs, [r["gold"] for r in rows], "o-", color="C0", label="gold (greedy)")
    if rows and rows[0]["sft_gold"] is not None:
        ax.axhline(rows[0]["sft_gold"], color="C0", ls="--", lw=1, label="SFT gold")
    ax.set_xlabel("round (1: the one-shot PPO of make all)")
    ax.set_ylabel("held-out gold score")
    ax.set_xticks(rs)
    ax2 = ax.twinx()
    for key, lo, hi, color, label in (
        ("win", "lo", "hi", "C1", "win rate vs SFT"),
        ("win_prev", "prev_lo", "prev_hi", "C2", "win rate vs previous round"),
    ):
        pts = [(r["round"], r[key], r[lo], r[hi]) for r in rows if r[key] is not None]
        if pts:
            ax2.errorbar(
                [p[0] for p in pts],
                [p[1] for p in pts],
                yerr=[
                    [p[1] - (p[2] if p[2] is not None else p[1]) for p in pts],
                    [(p[3] if p[3] is not None else p[1]) - p[1] for p in pts],
                ],
                fmt="s-",
                color=color,
                capsize=3,
                label=label,
            )
    ax2.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax2.set_ylabel("win rate (ties half)")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, loc="best")
    ax.set_title(title or "iterated RLHF by round")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
