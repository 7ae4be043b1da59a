"""Does RLHF make the model better? `make all` on a preset for each world seed, then PPO again with other seeds on
the same SFT policy and reward model, all scored by the gold oracle.

    python bench/rlhf_gain.py --runs-root /tmp/gain                           # cpu preset, worlds 1234 and 7, PPO 0 1 2
    python bench/rlhf_gain.py --runs-root /tmp/gain --world-seeds 1234 --ppo-seeds 0

For each world seed: tokenizer, pretrain, sft, reward and ppo (seed 0 is the run `make all` gives), timed and
measured for peak memory as in bench/pipeline_time.py; then `python -m stages.ppo run=ppo-seed<k> parent_run=...`
for the other PPO seeds. Reported per PPO run: SFT's and PPO's greedy gold on the held-out prompts, PPO's win rate
over SFT (ties count half) and its tie rate, the exact KL to SFT along PPO's replies, the correctness component of
both (the alignment tax is its fall), and the same from replies sampled at the training temperature. Per world: the
reward model's gold accuracy on the test split beside the label-noise ceiling (the gold oracle's own accuracy
against the noisy test labels: what a reward model that learned the labellers' preference exactly would score on
them), SFT's greedy correctness and the pretrained model's gold score.

Targets of the cpu preset (issue: the built-in world must tell a working RLHF loop from a no-op): PPO's greedy gold
at least 0.05 above SFT's, win rate at least 0.70 on average over three PPO seeds and none below 0.65, on each of
two world seeds; correctness falls by at most 0.02; SFT's greedy correctness at least 0.8; the reward model's gold
accuracy within 5 points of the ceiling; the whole pipeline under 15 minutes and 4 GB on 2 cores.

Adds one row per PPO run to the "## RLHF gain" section of bench/results.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from _common import machine, stage_env, update_results  # (bench/ is on sys.path)
from pipeline_time import STAGES, run_stage

SECTION = "## RLHF gain"
HEADER = (
    "| date | machine | preset | world seed | PPO seed | pipeline min | peak GB | pretrained / SFT gold | "
    "SFT correctness | RM gold acc / ceiling | greedy PPO / SFT gold | win | ties | KL | correctness SFT -> PPO "
    "| sampled PPO / SFT gold | sampled win | sampled KL |"
)
INTRO = (
    "`python bench/rlhf_gain.py`: `make all` on the preset for each world seed (`data.world.seed`), then PPO "
    "with more seeds on the same SFT policy and reward model. Gold: the gold oracle on the held-out prompts "
    "(greedy: the headline; sampled: at PPO's training temperature). Win: PPO over SFT per prompt, ties count "
    "half. KL: exact KL to SFT along PPO's replies. Ceiling: the gold oracle's own accuracy against the noisy "
    "test labels. Pipeline minutes and peak memory are the world's `make all` (the first PPO seed's row). One "
    "row per PPO run, newest last."
)


def ceiling(world_seed: int) -> float:
    """Accuracy of the gold oracle against the labellers' noisy order on the world's reward test split."""
    from omegaconf import OmegaConf

    from pipeline.core.config import WorldConfig
    from pipeline.data.formats import world_preferences

    src = OmegaConf.create({"kind": "world", "format": "ranked", "split": "test", "path": None})
    pairs, _ = world_preferences(src, WorldConfig(seed=world_seed), "test")
    return sum(1.0 if p["gold_margin"] > 0 else 0.5 if p["gold_margin"] == 0 else 0.0 for p in pairs) / len(pairs)


def metrics(root: Path, run: str, stage: str) -> dict:
    return json.loads((root / run / stage / "manifest.json").read_text()).get("metrics", {})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs-root", required=True, help="one folder per world seed goes here (emptied first)")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--world-seeds", type=int, nargs="+", default=[1234, 7])
    ap.add_argument("--ppo-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument(
        "--keep",
        action="store_true",
        help="keep what is already under --runs-root: finished stages say "
        "they are done and are not redone (the pipeline minutes are then left out)",
    )
    ap.add_argument("--no-results", action="store_true", help="print only; leave bench/results.md alone")
    args = ap.parse_args()

    env = stage_env()
    where = machine()
    for ws in args.world_seeds:
        root = Path(args.runs_root) / f"world{ws}"
        reused = args.keep and (root / "default" / "ppo" / "manifest.json").is_file()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
        common = [f"preset={args.preset}", f"paths.root={root}", f"data.world.seed={ws}", "logger=none"]
        walls, peaks = {}, {}
        for stage in STAGES:
            extra = [f"seed={args.ppo_seeds[0]}"] if stage == "ppo" else []
            walls[stage], peaks[stage] = run_stage(stage, common + extra, root / f"{stage}.log", env)
            print(f"[world {ws}] {stage:<10} {walls[stage]:7.1f} s   peak {peaks[stage]:.2f} GB", flush=True)
        runs = {args.ppo_seeds[0]: "default"}
        for s in args.ppo_seeds[1:]:
            runs[s] = f"ppo-seed{s}"
            w, _ = run_stage(
                "ppo", common + [f"run=ppo-seed{s}", "parent_run=default", f"seed={s}"], root / f"ppo-seed{s}.log", env
            )
            print(f"[world {ws}] ppo seed {s} {w:7.1f} s", flush=True)
        sft, rm = metrics(root, "default", "sft"), metrics(root, "default", "reward")
        ceil = ceiling(ws)
        for s, run in runs.items():
            p = metrics(root, run, "ppo")
            row = {
                "world": ws,
                "ppo_seed": s,
                "minutes": sum(walls.values()) / 60,
                "peak": max(peaks.values()),
                "pretrained": sft.get("eval/pretrain_gold_score"),
                "sft": sft.get("eval/gold_score"),
                "sft_correct": sft.get("eval/gold/correctness"),
                "rm_gold_acc": rm.get("eval/gold_accuracy"),
                "ceiling": ceil,
                "ppo": p.get("eval/gold_score"),
                "ppo_sft": p.get("eval/sft_gold_score"),
                "win": p.get("eval/win_rate_vs_sft"),
                "ties": p.get("eval/tie_rate_vs_sft"),
                "kl": p.get("eval/kl"),
                "c_sft": p.get("eval/sft_gold/correctness"),
                "c_ppo": p.get("eval/gold/correctness"),
                "s_ppo": p.get("eval/sampled/gold_score"),
                "s_sft": p.get("eval/sampled/sft_gold_score"),
                "s_win": p.get("eval/sampled/win_rate_vs_sft"),
                "s_kl": p.get("eval/sampled/kl"),
            }
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
            if not args.no_results:
                f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
                first = s == args.ppo_seeds[0]
                cells = [
                    time.strftime("%Y-%m-%d"),
                    where,
                    args.preset,
                    str(ws),
                    str(s),
                    f"{row['minutes']:.1f}" if first and not reused else "",
                    f"{row['peak']:.2f}" if first and not reused else "",
                    f"{f(row['pretrained'])} / {f(row['sft'])}",
                    f(row["sft_correct"]),
                    f"{f(row['rm_gold_acc'])} / {f(row['ceiling'])}",
                    f"{f(row['ppo'])} / {f(row['ppo_sft'])}",
                    f(row["win"]),
                    f(row["ties"]),
                    f(row["kl"]),
                    f"{f(row['c_sft'])} -> {f(row['c_ppo'])}",
                    f"{f(row['s_ppo'])} / {f(row['s_sft'])}",
                    f(row["s_win"]),
                    f(row["s_kl"]),
                ]
                update_results(SECTION, INTRO, HEADER, "| " + " | ".join(c.replace("|", "/") for c in cells) + " |")


if __name__ == "__main__":
    main()
