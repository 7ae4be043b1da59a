"""Iterated RLHF against one-shot: for each world seed, `make all`'s chain, then for each seed the one-shot PPO
(round 1) and `make iterate`'s rounds on it, all scored by the gold oracle; optionally the same label budget spent
all at once in the reward stage against spread over the rounds.

    python bench/iterate.py --runs-root /tmp/iter              # cpu preset, worlds 1234 7 99, seeds 0 1 2
    python bench/iterate.py --runs-root /tmp/iter --world-seeds 1234 --seeds 0 --rounds 3 --equal-labels
    python bench/iterate.py --runs-root /tmp/iter --world-seeds 2718 --seeds 0 --variant share50 iterate.fresh_share=0.5

Per world seed (`data.world.seed`): tokenizer, pretrain, sft and reward in the run `default`. Per seed s: run
`seed<s>` (parent_run=default) with the one-shot PPO (seed=s), then rounds 2..R of reward and PPO (round=r, seed=s),
as `make iterate` runs them; the rounds' wall time and peak memory are timed as bench/pipeline_time.py times stages.
Reported per seed and round (stages/tools/rounds.py's table): greedy gold, win rate over SFT and over the round
before with their 95% intervals, ties, correctness, KL to SFT, and the reward model's pairs of the current policy's
answers in the gold order, before and after its update.

--equal-labels: the same on-policy label budget two ways, from the same SFT policy and shipped comparisons: one-shot
with onpolicy.prompts = B in the reward stage (run eq-oneshot-s<s>), against iterated with B - (R-1) * P in the
reward stage and P fresh prompts in each later round (run eq-iter-s<s>; P = iterate.prompts of the preset); every
prompt is answered `samples` times and ranked, so the labels spent are equal up to replies that came out the same.

Targets (issue 25, cpu preset): after three rounds, on each of three world seeds over three seeds, greedy win rate over
SFT at least 0.70 on average and none below 0.65; gold at least SFT + 0.10; each round beats the one before (win rate
above 0.5, with its interval); correctness falls by at most 0.02; at equal labels iterated beats one-shot; make iterate
with three rounds under 30 minutes and 4 GB on 2 cores. Rows go to the "## Iterated RLHF" section of bench/results.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import REPO, machine, stage_env, update_results  # (bench/ is on sys.path)
from pipeline_time import run_stage

sys.path.insert(0, str(REPO))
from pipeline.core.registry import ORDER
from pipeline.report.card import round_rows

SECTION = "## Iterated RLHF"
HEADER = (
    "| date | machine | preset | world seed | seed | run | round | greedy gold / SFT | win vs SFT [95% CI] | ties | "
    "win vs previous [95% CI] | correctness SFT -> policy | KL | RM pairs in gold order before -> after | "
    "pairs labelled (all) | round min | peak GB |"
)
INTRO = (
    "`python bench/iterate.py`: per world seed `make all`'s chain, then per seed the one-shot PPO (round 1) and "
    "`make iterate`'s later rounds on it (fresh comparisons of the current policy, the reward model updated on "
    "all comparisons so far, PPO continued with its KL anchored to SFT). Greedy held-out answers scored by the "
    "gold oracle; win rates count ties half, 95% bootstrap intervals over prompts. RM pairs: the share of pairs "
    "of the current policy's own answers (to one prompt) that the reward model orders as gold does, before "
    "(the previous round's model) and after the round's update. `eq-oneshot` / `eq-iter`: the same on-policy "
    "label budget spent at once or over the rounds. One row per round, newest last."
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs-root", required=True, help="one folder per world seed goes here")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--world-seeds", type=int, nargs="+", default=[1234, 7, 99])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--equal-labels", action="store_true", help="also the equal-budget comparison (two more runs per seed)"
    )
    ap.add_argument("--budget", type=int, default=2400, help="--equal-labels: on-policy prompts in all, B")
    ap.add_argument(
        "--per-round", type=int, default=None, help="--equal-labels: P (default: the preset's iterate.prompts)"
    )
    ap.add_argument(
        "--args", nargs="*", default=[], help="extra overrides for every stage (e.g. iterate.reward_init=sft)"
    )
    ap.add_argument(
        "--fresh",
        action="store_true",
        help="empty --runs-root first (default: finished stages are kept and say they are done)",
    )
    ap.add_argument(
        "--variant",
        nargs="+",
        metavar="NAME OVERRIDE",
        help="also rounds 2..R of a variant from the same round 1 (run seed<s>-NAME), run beside the default rounds "
        "on one thread each: e.g. --variant share50 iterate.fresh_share=0.5",
    )
    ap.add_argument("--no-results", action="store_true", help="print only; leave bench/results.md alone")
    args = ap.parse_args()

    env = stage_env()
    where = machine()
    for ws in args.world_seeds:
        root = Path(args.runs_root) / f"world{ws}"
        if args.fresh:
            shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
        common = [f"preset={args.preset}", f"paths.root={root}", f"data.world.seed={ws}", "logger=none", *args.args]
        for stage in ORDER[: ORDER.index("ppo")]:  # make all's chain up to the one-shot PPO
            w, peak = run_stage(stage, common, root / f"{stage}.log", env)
            print(f"[world {ws}] {stage:<10} {w:7.1f} s   peak {peak:.2f} GB", flush=True)
        runs = {}  # run -> (seed, {round: (seconds, peak GB)})
        for s in args.seeds:
            base = common + ["parent_run=default"]
            if not args.variant:
                runs[f"seed{s}"] = (s, chain(root, f"seed{s}", s, base, args.rounds, env, ws))
            else:  # round 1 once, then the default rounds and the variant's side by side, one thread each
                times = chain(root, f"seed{s}", s, base, 1, env, ws)
                name, extra = f"seed{s}-{args.variant[0]}", args.variant[1:]
                d = root / name / "ppo"
                if not d.exists():  # the same round-1 policy: the rounds start from one place
                    shutil.copytree(root / f"seed{s}" / "ppo", d)
                one = {**env, "OMP_NUM_THREADS": "1"}
                with ThreadPoolExecutor(2) as pool:
                    a = pool.submit(chain, root, f"seed{s}", s, base, args.rounds, one, ws, 2)
                    b = pool.submit(chain, root, name, s, base + extra, args.rounds, one, ws, 2)
                    runs[f"seed{s}"], runs[name] = (s, {**times, **a.result()}), (s, {1: times[1], **b.result()})
            if args.equal_labels:
                per = args.per_round or _preset_prompts(args.preset)
                for name, first in (
                    (f"eq-oneshot-s{s}", args.budget),
                    (f"eq-iter-s{s}", args.budget - (args.rounds - 1) * per),
                ):
                    d = root / name
                    if not (d / "sft").exists():  # its own reward stage, so its own run beside the SFT it reads
                        shutil.copytree(root / "default" / "sft", d / "sft")
                    base = common + [f"run={name}", f"seed={s}", f"onpolicy.prompts={first}", f"iterate.prompts={per}"]
                    w, peak = run_stage("reward", base, root / f"{name}-reward.log", env)
                    print(f"[world {ws}] {name} reward {w:7.1f} s", flush=True)
                    runs[name] = (s, chain(root, name, s, base, args.rounds if "iter" in name else 1, env, ws))
        for name, (s, times) in runs.items():
            for row in round_rows(root, name):
                report(row, where, args.preset, ws, s, name, times.get(row["round"]), args.no_results)


def chain(root: Path, run: str, seed: int, common: list, rounds: int, env: dict, ws: int, first: int = 1) -> dict:
    """The one-shot PPO and rounds 2..rounds of run `run` (from round `first`): {round: (seconds, peak GB)}."""
    times = {}
    for r in range(first, rounds + 1):
        w = peak = 0.0
        for stage in ("ppo",) if r == 1 else ("reward", "ppo"):
            a, b = run_stage(
                stage, common + [f"run={run}", f"seed={seed}", f"round={r}"], root / f"{run}-{stage}-r{r}.log", env
            )
            w, peak = w + a, max(peak, b)
        times[r] = (w, peak)
        print(f"[world {ws}] {run} round {r}: {w:7.1f} s, peak {peak:.2f} GB", flush=True)
    return times


def _preset_prompts(preset: str) -> int:
    import yaml

    return int(
        yaml.safe_load((REPO / "conf" / "preset" / "reward" / f"{preset}.yaml").read_text())["iterate"]["prompts"]
    )


def report(row: dict, where: str, preset: str, ws: int, seed: int, run: str, time_peak, no_results: bool) -> None:
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
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
        str(row["round"]),
        f"{f(row['gold'])} / {f(row['sft_gold'])}",
        ci(row["win"], row["lo"], row["hi"]),
        f(row["tie"], 2),
        ci(row["win_prev"], row["prev_lo"], row["prev_hi"]) if row["round"] > 1 else "-",
        f"{f(row['sft_correct'])} -> {f(row['correct'])}",
        f(row["kl"], 2),
        f"{f(row['pair_before'])} -> {f(row['pair_after'])}",
        "-" if row["total_labels"] is None else str(int(row["total_labels"])),
        "-" if time_peak is None else f"{time_peak[0] / 60:.1f}",
        "-" if time_peak is None else f"{time_peak[1]:.2f}",
    ]
    update_results(SECTION, INTRO, HEADER, "| " + " | ".join(c.replace("|", "/") for c in cells) + " |")


if __name__ == "__main__":
    main()
