"""Several runs side by side — the view you want after a Hydra sweep — from the manifests alone (no network).

    make compare RUNS="default lr3e-4"          # = python -m stages.tools.compare 'runs=[default,lr3e-4]'
    make compare                                 # every run under runs/

Writes <paths.root>/compare.md with a table of every run's headline metrics, overlaid curves and, for the runs
with periodic PPO evaluations, their held-out gold and reward-model scores against sqrt(KL) on one figure: over a
`train.kl_coef` sweep it shows which settings over-optimise the reward model. Runs with method stages (make
methods) get their methods tables side by side too.
"""

import json
from pathlib import Path

from omegaconf import DictConfig

from pipeline.core.entry import entry
from pipeline.core.errors import UserError
from pipeline.core.registry import ORDER
from pipeline.report.card import HEADLINE, all_runs, curve, fmt, method_rows, methods_table, stage_manifests
from pipeline.report.plots import curves_plot, sweep_overoptimization_plot

CURVES = [
    ("pretrain", "eval/loss", "Pretraining held-out loss"),
    ("sft", "eval/loss", "SFT held-out loss"),
    ("ppo", "ppo/gold_score", "PPO gold score"),
    ("ppo", "ppo/reward", "PPO reward-model score"),
    ("ppo", "ppo/kl", "PPO KL to SFT"),
]


@entry("compare")
def main(cfg: DictConfig) -> None:
    root = Path(cfg.paths.root)
    runs = list(cfg.runs) or all_runs(root)
    missing = [r for r in runs if not (root / r).is_dir()]
    if missing:
        raise UserError(f"no such run under {root}: {', '.join(missing)} (have: {', '.join(all_runs(root)) or 'none'})")
    if not runs:
        raise UserError(f"no runs under {root}; run the pipeline first: make all")
    out = Path(cfg.out) if cfg.out else root / "compare.md"
    figs = out.parent / (out.stem + "_figs")
    figs.mkdir(parents=True, exist_ok=True)
    manifests = {r: stage_manifests(root, r) for r in runs}

    cols = [
        (s, k)
        for s, keys in HEADLINE.items()
        if s in ORDER
        for k in keys  # the methods get their own table
        if any(k in manifests[r].get(s, {}).get("metrics", {}) for r in runs)
    ]
    L = [
        f"# Comparing {len(runs)} runs",
        "",
        "| run | " + " | ".join(f"{s} `{k}`" for s, k in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for r in runs:
        L.append(
            f"| {r} | " + " | ".join(fmt(manifests[r].get(s, {}).get("metrics", {}).get(k)) for s, k in cols) + " |"
        )
    L.append("")
    methods = {r: rows for r in runs if len(rows := method_rows(manifests[r])) > 1}
    if methods:
        L += [
            "## Methods",
            "",
            "Each run's methods table (make methods): the same sampled evaluation against that run's own SFT policy.",
            "",
        ]
        for r, rows in methods.items():
            L += [f"### {r}", "", *methods_table(rows), ""]
    for stage, key, title in CURVES:
        series = {r: curve(root, r, stage, key) for r in runs}
        if any(series.values()):
            name = f"{stage}_{key.replace('/', '_')}.png"
            curves_plot(series, figs / name, title, ylabel=key)
            L += [f"## {title}", "", f"![{title}]({figs.name}/{name})", ""]
    periodic = {r: json.loads(f.read_text()) for r in runs if (f := root / r / "ppo" / "periodic.json").is_file()}
    if any(periodic.values()):
        sweep_overoptimization_plot(periodic, figs / "ppo_overoptimization.png")
        L += [
            "## Over-optimisation: held-out gold and reward-model score against sqrt(KL)",
            "",
            f"![over-optimisation]({figs.name}/ppo_overoptimization.png)",
            "",
        ]
    out.write_text("\n".join(L))
    print(f"compare: {out} ({len(runs)} runs, {len(cols)} metrics)")


if __name__ == "__main__":
    main()
