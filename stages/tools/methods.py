"""The methods table of one run: runs/<run>/methods.md, every way of learning from the preferences side by side.

    make methods RUN=<run>                         # every method stage, then this (= python -m stages.tools.methods)
    python -m stages.tools.methods run=<run>        # the table alone, from the manifests already there

AlpacaFarm's table for this run, from the manifests alone (no model is loaded): each method's gold score, win rate
over SFT with its 95% bootstrap interval (over prompts), whether that interval clears 0.5, KL to SFT, reply length,
wall minutes and training tokens, all from the one evaluation every method gets (pipeline.eval.gold.versus_sft,
sampled: best-of-n has no greedy form; PPO's final evaluation is the same function). And one PNG of gold against
KL: a point per method, best-of-n as a curve over n, PPO, RLOO and GRPO as curves over their training.
"""

import json
from pathlib import Path

from omegaconf import DictConfig

from pipeline.core.entry import entry
from pipeline.core.errors import UserError
from pipeline.core.registry import METHODS
from pipeline.core.runs import make_command
from pipeline.report.card import method_rows, methods_table, stage_manifests
from pipeline.report.plots import methods_plot


@entry("methods")
def main(cfg: DictConfig) -> None:
    root = Path(cfg.paths.root)
    run_dir = root / cfg.run
    manifests = stage_manifests(root, cfg.run)
    rows = method_rows(manifests)
    if len(rows) < 2:
        raise UserError(
            f"run '{cfg.run}' has no finished method under {root}; make them first: {make_command('methods', cfg.run)}"
        )

    # ---- gold against KL: points, best-of-n over n, the RL methods over their training ---------------------
    points = {r["method"]: (r["kl"], r["gold"]) for r in rows}
    curves = {}
    bon = manifests.get("bon", {})
    if bon.get("curve"):
        curves["bon"] = [(c["kl"], c["gold"]) for c in bon["curve"]]
    for stage in ("ppo", *METHODS):
        f = run_dir / stage / "periodic.json"
        if stage in points and f.is_file():
            curves[stage] = [
                (r["kl"], r["gold"]) for r in sorted(json.loads(f.read_text()), key=lambda r: r["iteration"])
            ]
    png = methods_plot(points, curves, run_dir / "methods.png", title=f"{cfg.run}: gold against KL to SFT")

    # ---- methods.md ----------------------------------------------------------------------------------------
    n = rows[1]["n"]
    beat = [r["method"] for r in rows if r["beats"] == "above"]
    L = [
        f"# Methods: run `{cfg.run}`",
        "",
        f"Every method starts from this run's SFT policy and learns from its comparisons (or the reward model "
        f"trained on them); all are scored by the gold oracle on the same {n:g} held-out prompts, sampled, against "
        f"SFT's replies to them (ties count half; the interval is a 95% bootstrap over prompts).",
        "",
    ]
    L += methods_table(rows)
    L += [
        "",
        "Beat SFT beyond their confidence interval: " + (", ".join(beat) if beat else "none") + ".",
        "",
        f"![gold against KL]({png.name})",
        "",
        "Points: the final evaluation (KL exact along the replies; best-of-n: its bound). Curves: best-of-n over n "
        "(the first m of the same samples), PPO, RLOO and GRPO over their training (their periodic held-out "
        "evaluations, on the first prompts only).",
        "",
    ]
    out = run_dir / "methods.md"
    out.write_text("\n".join(L))
    print(f"methods: {out} ({len(rows) - 1} methods; beat SFT beyond the interval: {', '.join(beat) or 'none'})")
    for line in methods_table(rows):
        print("  " + line)


if __name__ == "__main__":
    main()
