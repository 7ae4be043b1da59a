"""Reward-model ensembles against over-optimisation, and the reward-hacking alarm against gold (issue 27).

    python bench/ensemble.py --runs-root /tmp/ens                                  # worlds 1234 7, seeds 0 1 2, K 4
    python bench/ensemble.py --runs-root /tmp/ens --world-seeds 1234 --seeds 0 --parts reward overopt
    python bench/ensemble.py --runs-root /tmp/ens --parts sweep --kl 0.02 0.05 0.1 0.2

Per world seed (`data.world.seed`), under <runs-root>/world<ws>: `make all`'s chain up to the reward stage in run
`default` (the single reward model), then
  reward   the reward stage again with train.ensemble=K, one run per --diversity (ens<K>-seed, ens<K>-bootstrap):
           wall time against the single model's, each member's and the ensemble's gold accuracy, and the members'
           disagreement and correlation on the SFT policy's answers (the diversity figure);
  overopt  per seed, PPO in the over-optimisation setting (train.kl_coef=0.05 optim.lr=1e-4 train.iterations=80)
           against the single reward model and against the ensemble with reward_objective worst and uwo;
  default  per seed, PPO in the preset's setting against the single model and the ensemble (--default-objectives);
  sweep    per seed, the ensemble optimised by its mean (nothing held back, so over-optimisation can happen) at lr
           1e-4 for 80 iterations and each --kl: where the alarm fires against where held-out gold peaks.
For every PPO run the held-out curve (periodic.json: sampled, the first train.periodic_eval_prompts prompts) gives the
peak gold, its iteration, the final gold and the fall from the peak; the manifest gives the alarm's first iteration
(alarm/fired_at, 0: never) and the final greedy evaluation (gold, win rate over SFT, length-controlled win rate).

The alarm's rule and parameters (conf alarm.window=5, rise=1.0, patience=3; pipeline/rl/alarm.py) were fixed before
any of these runs. Targets (issue 27, cpu preset): over-optimisation setting, K = 4 with worst or uwo, the final gold
within 0.03 of the run's own peak (the single model falls by more than 0.2); default setting, the ensemble's final
gold at least the single model's; the alarm fires in every run whose gold falls by more than 0.1 from its peak, within
10 iterations after the peak, and in none of the default-setting runs; the reward stage with K = 4 at most twice the
single model's time. Rows go to the "## Reward-model ensembles" section of bench/results.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from _common import REPO, machine, stage_env, update_results  # (bench/ is on sys.path)
from pipeline_time import run_stage

sys.path.insert(0, str(REPO))
from pipeline.core.registry import ORDER

SECTION = "## Reward-model ensembles"
HEADER = (
    "| date | machine | preset | world seed | seed | run | setting | reward | peak gold (held-out) @ it | final "
    "gold | fall from peak | alarm fired at | greedy gold / SFT | win vs SFT [95% CI] | length-controlled win "
    "[95% CI] | KL | minutes |"
)
INTRO = (
    "`python bench/ensemble.py`: PPO against one reward model and against an ensemble of K (reward stage "
    "train.ensemble=K) optimised by the members' worst (WCO), their mean minus lambda times their variance (UWO) "
    "or their mean. overopt: train.kl_coef=0.05 optim.lr=1e-4 train.iterations=80; default: the preset; sweep: "
    "the ensemble's mean at lr 1e-4, 80 iterations, at each KL coefficient. Peak and final gold: the periodic "
    "held-out evaluation (sampled, every 10 iterations); the alarm (no gold: the members' disagreement and the "
    "proxy) fired at that iteration, 0 never. Reward rows: the reward stage with K members against the single "
    "model, wall time, gold accuracy on the test pairs, the members' disagreement and correlation on the SFT "
    "policy's answers. One row per run, newest last."
)
REWARD_HEADER = (
    "| date | machine | preset | world seed | run | K | diversity | minutes (single: "
    "minutes) | gold accuracy: ensemble (members) / single | RM pairs of SFT answers in gold order: "
    "ensemble / single | members' disagreement | members' correlation |"
)
REWARD_SECTION = "## Reward-model ensembles: the reward stage"
REWARD_INTRO = (
    "`python bench/ensemble.py --parts reward`: the reward stage with train.ensemble=K against the single "
    "reward model of the same chain (same SFT policy, same comparisons). Disagreement: the members' "
    "standard deviation of normalised scores on the SFT policy's answers, averaged; correlation: the mean "
    "Pearson correlation of two members' scores there (1: no diversity). One row per run, newest last."
)
OVEROPT = ["train.kl_coef=0.05", "optim.lr=1e-4", "train.iterations=80"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs-root", required=True, help="one folder per world seed goes here")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--world-seeds", type=int, nargs="+", default=[1234, 7])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--k", type=int, default=4, help="ensemble members")
    ap.add_argument(
        "--diversity",
        nargs="+",
        default=["seed"],
        help="seed and/or bootstrap: one ensemble each (the first is the one PPO uses)",
    )
    ap.add_argument("--parts", nargs="+", default=["reward", "overopt", "default", "sweep"])
    ap.add_argument("--objectives", nargs="+", default=["worst", "uwo"], help="overopt: the ensemble's objectives")
    ap.add_argument("--default-objectives", nargs="+", default=["worst", "uwo"])
    ap.add_argument("--kl", type=float, nargs="+", default=[0.02, 0.1, 0.2], help="sweep: KL coefficients")
    ap.add_argument("--args", nargs="*", default=[], help="extra overrides for every stage")
    ap.add_argument("--no-results", action="store_true", help="print only; leave bench/results.md alone")
    args = ap.parse_args()

    env = stage_env()
    where = machine()
    for ws in args.world_seeds:
        root = Path(args.runs_root) / f"world{ws}"
        root.mkdir(parents=True, exist_ok=True)
        common = [f"preset={args.preset}", f"paths.root={root}", f"data.world.seed={ws}", "logger=none", *args.args]
        for stage in ORDER[: ORDER.index("ppo")]:  # make all's chain up to the (single) reward model
            w, peak = run_stage(stage, common, root / f"{stage}.log", env)
            print(f"[world {ws}] {stage:<10} {w:7.1f} s   peak {peak:.2f} GB", flush=True)
        ens = {}
        for div in args.diversity:
            name = f"ens{args.k}-{div}"
            ens[div] = name
            if not (root / name / "sft").exists():  # the ensemble's own reward stage beside the same SFT policy
                shutil.copytree(root / "default" / "sft", root / name / "sft")
            if "reward" in args.parts or div == args.diversity[0]:
                w, _ = run_stage(
                    "reward",
                    common + [f"run={name}", f"train.ensemble={args.k}", f"train.ensemble_diversity={div}"],
                    root / f"{name}.log",
                    env,
                )
                print(f"[world {ws}] {name} reward {w:7.1f} s", flush=True)
                if "reward" in args.parts:
                    report_reward(root, name, args, ws, where)
        main_ens = ens[args.diversity[0]]
        plan = []  # (run, setting, reward label, parent run, overrides)
        for s in args.seeds:
            if "overopt" in args.parts:
                plan.append((f"oo-single-s{s}", "overopt", "single", "default", OVEROPT))
                plan += [
                    (f"oo-{o}-s{s}", "overopt", f"{o} of {args.k}", main_ens, OVEROPT + [f"train.reward_objective={o}"])
                    for o in args.objectives
                ]
            if "default" in args.parts:
                plan.append((f"def-single-s{s}", "default", "single", "default", []))
                plan += [
                    (f"def-{o}-s{s}", "default", f"{o} of {args.k}", main_ens, [f"train.reward_objective={o}"])
                    for o in args.default_objectives
                ]
            if "sweep" in args.parts:
                plan += [
                    (
                        f"sw-kl{kl:g}-s{s}",
                        f"sweep kl {kl:g}",
                        f"mean of {args.k}",
                        main_ens,
                        ["optim.lr=1e-4", "train.iterations=80", f"train.kl_coef={kl}"],
                    )
                    for kl in args.kl
                ]
        for name, setting, label, parent, extra in plan:
            s = int(name.rsplit("-s", 1)[1])
            w, peak = run_stage(
                "ppo", common + [f"run={name}", f"parent_run={parent}", f"seed={s}", *extra], root / f"{name}.log", env
            )
            row = ppo_row(root / name / "ppo")
            print(f"[world {ws}] {name}: {w / 60:.1f} min " + json.dumps(row), flush=True)
            report(row, where, args.preset, ws, s, name, setting, label, w, args.no_results)


def ppo_row(d: Path) -> dict:
    """The held-out curve's peak and end, the alarm's verdict and the final greedy evaluation of one PPO stage."""
    m = json.loads((d / "manifest.json").read_text())["metrics"]
    curve = sorted(json.loads((d / "periodic.json").read_text()), key=lambda r: r["iteration"])
    best = max(curve, key=lambda r: r["gold"])
    g = m.get
    return {
        "peak": best["gold"],
        "peak_it": best["iteration"],
        "final": curve[-1]["gold"],
        "fall": best["gold"] - curve[-1]["gold"],
        "alarm": g("alarm/fired_at"),
        "gold": g("eval/gold_score"),
        "sft": g("eval/sft_gold_score"),
        "win": g("eval/win_rate_vs_sft"),
        "lo": g("eval/win_rate_ci_low"),
        "hi": g("eval/win_rate_ci_high"),
        "lc": g("eval/lc_win_rate_vs_sft"),
        "lc_lo": g("eval/lc_win_rate_ci_low"),
        "lc_hi": g("eval/lc_win_rate_ci_high"),
        "kl": g("eval/kl"),
    }


def report(
    row: dict,
    where: str,
    preset: str,
    ws: int,
    seed: int,
    run: str,
    setting: str,
    label: str,
    wall: float,
    no_results: bool,
) -> None:
    if no_results:
        return
    f = lambda v, p=3: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    ci = lambda v, lo, hi: f"{f(v, 2)} [{f(lo, 2)}, {f(hi, 2)}]"  # noqa: E731
    cells = [
        time.strftime("%Y-%m-%d"),
        where,
        preset,
        str(ws),
        str(seed),
        run,
        setting,
        label,
        f"{f(row['peak'])} @ {row['peak_it']}",
        f(row["final"]),
        f(row["fall"]),
        "-" if row["alarm"] is None else str(int(row["alarm"])),
        f"{f(row['gold'])} / {f(row['sft'])}",
        ci(row["win"], row["lo"], row["hi"]),
        ci(row["lc"], row["lc_lo"], row["lc_hi"]),
        f(row["kl"], 2),
        f"{wall / 60:.1f}",
    ]
    update_results(SECTION, INTRO, HEADER, "| " + " | ".join(c.replace("|", "/") for c in cells) + " |")


def report_reward(root: Path, name: str, args, ws: int, where: str) -> None:
    single = json.loads((root / "default" / "reward" / "manifest.json").read_text())["metrics"]
    m = json.loads((root / name / "reward" / "manifest.json").read_text())["metrics"]
    members = [m.get("eval/gold_accuracy")] + [m.get(f"member{k}/eval/gold_accuracy") for k in range(1, args.k)]
    f = lambda v, p=3: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    row = {
        "minutes": m["time/stage_s"] / 60,
        "single_minutes": single["time/stage_s"] / 60,
        "gold_acc": m.get("ensemble/gold_accuracy"),
        "members": members,
        "single_acc": single.get("eval/gold_accuracy"),
        "pairs": m.get("ensemble/gold_pair_accuracy"),
        "single_pairs": single.get("reward/gold_pair_accuracy"),
        "disagreement": m.get("ensemble/disagreement"),
        "correlation": m.get("ensemble/member_correlation"),
    }
    print(f"[world {ws}] {name}: " + json.dumps(row), flush=True)
    if args.no_results:
        return
    cells = [
        time.strftime("%Y-%m-%d"),
        where,
        args.preset,
        str(ws),
        name,
        str(args.k),
        name.split("-", 1)[1],
        f"{row['minutes']:.1f} ({row['single_minutes']:.1f})",
        f"{f(row['gold_acc'])} ({', '.join(f(x) for x in members)}) / {f(row['single_acc'])}",
        f"{f(row['pairs'])} / {f(row['single_pairs'])}",
        f(row["disagreement"]),
        f(row["correlation"]),
    ]
    update_results(REWARD_SECTION, REWARD_INTRO, REWARD_HEADER, "| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
