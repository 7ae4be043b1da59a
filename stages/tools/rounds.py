"""Iterated RLHF round by round: runs/<run>/rounds.md and rounds.png, from the rounds' manifests alone.

    make iterate RUN=<run> ROUNDS=3                 # the rounds, then this (= python -m stages.tools.rounds)
    python -m stages.tools.rounds run=<run>          # the table alone, from the manifests already there

Round 1 is the one-shot PPO of make all; round r > 1 is reward_r<r> (fresh comparisons of round r-1's policy, the
reward model updated on all of them so far) and ppo_r<r> (round r-1's policy continued against it). Each row: the
greedy held-out gold, the win rate over SFT and over the round before (95% bootstrap intervals over prompts, ties
half), correctness, KL to SFT, the reward model's view of the current policy's own answers before and after the
round's update (the distribution shift iterating is meant to fix), and the labels spent.
"""

from pathlib import Path

from omegaconf import DictConfig

from pipeline.core.entry import entry
from pipeline.core.errors import UserError
from pipeline.core.runs import make_command
from pipeline.report.card import round_rows, rounds_table
from pipeline.report.plots import curves_plot, rounds_plot


def write_rounds(root: Path, run: str, method: str = "ppo") -> Path | None:
    """rounds.md and rounds.png in runs/<run>/ when the run has at least two rounds; their path, else None."""
    rows = round_rows(root, run, method)
    if len(rows) < 2:
        return None
    run_dir = root / run
    png = rounds_plot(
        rows,
        run_dir / f"rounds{'' if method == 'ppo' else '_' + method}.png",
        title=f"{run}: iterated {method.upper()} by round",
    )
    L = [
        f"# Iterated {method.upper()}: run `{run}`",
        "",
        "Round 1 is the one-shot stage; every later round labels fresh comparisons of the round before's policy. "
        "Greedy answers to the same held-out prompts, scored by the gold oracle; win rates count ties half, intervals "
        "are 95% bootstraps over prompts. The reward model's figures "
        "are on the answers of the policy the round starts from (before: the previous round's model; after: this "
        "round's).",
        "",
    ]
    pts = [(r["total_labels"], r["gold"]) for r in rows if r["total_labels"] is not None and r["gold"] is not None]
    labels_png = curves_plot(
        {method: pts},
        run_dir / f"rounds{'' if method == 'ppo' else '_' + method}_labels.png",
        f"{run}: gold against comparisons labelled",
        xlabel="preference pairs labelled, all rounds so far",
        ylabel="held-out gold (greedy)",
    )
    L += rounds_table(rows)
    L += ["", f"![by round]({png.name})", "", f"![gold against labels]({labels_png.name})", ""]
    out = run_dir / f"rounds{'' if method == 'ppo' else '_' + method}.md"
    out.write_text("\n".join(L))
    return out


@entry("rounds")
def main(cfg: DictConfig) -> None:
    root = Path(cfg.paths.root)
    out = write_rounds(root, cfg.run, cfg.method)
    if out is None:
        raise UserError(
            f"run '{cfg.run}' has fewer than two rounds of {cfg.method} under {root}; make them first: "
            f"{make_command('iterate', cfg.run)}"
        )
    print(f"rounds: {out}")
    for line in rounds_table(round_rows(root, cfg.run, cfg.method)):
        print("  " + line)


if __name__ == "__main__":
    main()
