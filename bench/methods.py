"""Every method over several seeds on one run's SFT policy and reward model: which beat SFT, by how much, at what
KL and cost; and the episodes per second of RLOO and GRPO (TRL) beside our PPO on the same workload.

    python bench/methods.py --runs-root bench/out/runs/cpu --run default --preset cpu --seeds 0,1,2
    python bench/methods.py --preset smoke --seeds 0 --runs-root bench/out/runs/smoke  # builds the chain if missing
    python bench/methods.py ... --out bench/out/methods.md                      # the tables as markdown too

What it does:

1. Takes the finished chain of <runs-root>/<run> (tokenizer, pretrain, sft, reward; ppo too unless --no-ppo), or
   makes the missing stages first with `python -m stages.<stage> preset=<preset>`.
2. For each seed s runs every method stage (and PPO) as `python -m stages.<name> preset=<preset> seed=<s>
   run=<run>__seed<s> parent_run=<run> logger=none`, each timed, and `stages.tools.methods` on that run: one
   methods.md per seed. Seed 0 can reuse <run>'s own PPO (--reuse-ppo) when it was made with seed 0.
3. Prints, per method over the seeds: the gold score (sampled, mean and spread), the win rate over SFT, in how many
   seeds its 95% interval lay above 0.5 (beat SFT) or below (lost), KL to SFT, reply tokens and wall minutes; the
   total minutes of one seed's `make methods` (the 30-minute target on the cpu preset); and the training
   episodes per second of PPO (ours: the mean of ppo/episodes_per_s, rollout + update), RLOO and GRPO (TRL:
   episodes over the Trainer's runtime less the periodic evaluations), the same 1,280 episodes on the cpu preset.

Nothing is asserted: the figures are for bench/results.md, which this script does not write.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from _common import REPO, run_logged
from _common import machine as machine_name

from pipeline.core.registry import METHODS, ORDER
from pipeline.report.card import method_rows, stage_manifests


def complete(d: Path) -> bool:
    try:
        return json.loads((d / "manifest.json").read_text()).get("status") == "complete"
    except (OSError, json.JSONDecodeError):
        return False


def stage_cmd(stage: str, preset: str, root: Path, *extra: str) -> list:
    return [sys.executable, "-m", f"stages.{stage}", f"preset={preset}", "logger=none", f"paths.root={root}", *extra]


def mean_metric(root: Path, run: str, stage: str, key: str) -> float:
    rows = [json.loads(x) for x in (root / run / stage / "metrics.jsonl").read_text().splitlines() if x.strip()]
    vals = [r[key] for r in rows if key in r]
    return sum(vals) / len(vals) if vals else float("nan")


def summarise(per_seed: dict[int, list[dict]]) -> list[dict]:
    """Per method over the seeds: mean and spread of gold, mean win rate, seeds above / below SFT by the interval,
    mean KL, reply tokens and minutes."""
    by: dict[str, list[dict]] = {}
    for rows in per_seed.values():
        for r in rows:
            by.setdefault(r["method"], []).append(r)
    out = []
    for name, rs in by.items():
        sd = statistics.stdev([r["gold"] for r in rs]) if len(rs) > 1 else 0.0
        out.append(
            {
                "method": name,
                "seeds": len(rs),
                "gold": statistics.mean(r["gold"] for r in rs),
                "sd": sd,
                "win": statistics.mean(r["win"] for r in rs),
                "above": sum(r["beats"] == "above" for r in rs),
                "below": sum(r["beats"] == "below" for r in rs),
                "kl": statistics.mean(r["kl"] for r in rs),
                "length": statistics.mean(r["length"] for r in rs),
                "minutes": statistics.mean(r["minutes"] for r in rs if r["minutes"] is not None)
                if any(r["minutes"] is not None for r in rs)
                else float("nan"),
            }
        )
    return out


def table(summary: list[dict]) -> list[str]:
    lines = [
        "| method | seeds | gold (sampled, mean ± sd) | win rate vs SFT | above / below SFT (95% CI) | KL | "
        "reply tokens | minutes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['method']} | {s['seeds']} | {s['gold']:.3f} ± {s['sd']:.3f} | {s['win']:.2f} | "
            f"{s['above']} / {s['below']} | {s['kl']:.2f} | {s['length']:.1f} | {s['minutes']:.1f} |"
        )
    return lines


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs-root", type=Path, default=REPO / "bench" / "out" / "runs" / "cpu")
    ap.add_argument("--run", default="default")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated method stages")
    ap.add_argument("--no-ppo", action="store_true", help="leave PPO out (its figures then come from nowhere)")
    ap.add_argument("--args", default="", help="extra overrides for every method stage (not PPO), space-separated")
    ap.add_argument("--out", type=Path, default=None, help="also write the tables to this markdown file")
    a = ap.parse_args(argv)
    root, seeds = a.runs_root.resolve(), [int(s) for s in a.seeds.split(",")]
    methods = [m for m in a.methods.split(",") if m]
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "WANDB_MODE": "offline",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for stage in ORDER[: ORDER.index("ppo")]:  # the stages every method's parents need
        if not complete(root / a.run / stage):
            print(f"[methods bench] making {stage} of {a.run}", flush=True)
            run_logged(stage_cmd(stage, a.preset, root, f"run={a.run}"), logs / f"{a.run}_{stage}.log", env)

    per_seed, walls, speed = {}, {}, {}
    for s in seeds:
        run = f"{a.run}__seed{s}"
        common = [f"run={run}", f"parent_run={a.run}", f"seed={s}"]
        todo = (["ppo"] if not a.no_ppo else []) + methods
        for stage in todo:
            print(f"[methods bench] seed {s}: {stage}", flush=True)
            extra = a.args.split() if stage != "ppo" else []  # the methods' keys (eval.*, train.*) are not PPO's
            was_done = complete(root / run / stage)  # made earlier (another invocation): run only to check, untimed
            wall = run_logged(stage_cmd(stage, a.preset, root, *common, *extra), logs / f"{run}_{stage}.log", env)
            walls[(s, stage)] = None if was_done else wall
        run_logged(
            [sys.executable, "-m", "stages.tools.methods", f"run={run}", f"paths.root={root}"],
            logs / f"{run}_table.log",
            env,
        )
        # the seed's own methods (and PPO), with its parents (sft, reward) from the base run
        base = {k: m for k, m in stage_manifests(root, a.run).items() if k in ORDER[: ORDER.index("ppo")]}
        manifests = {**base, **stage_manifests(root, run)}
        per_seed[s] = method_rows(manifests)
        if not a.no_ppo:
            speed.setdefault("ppo (ours)", []).append(mean_metric(root, run, "ppo", "ppo/episodes_per_s"))
        for m in ("rloo", "grpo"):
            if m in methods:
                speed.setdefault(f"{m} (TRL)", []).append(
                    json.loads((root / run / m / "manifest.json").read_text())["metrics"]["train/episodes_per_s"]
                )

    summary = summarise(per_seed)
    timed = {s: [walls[(s, st)] for st in methods] for s in seeds}
    minutes = {s: sum(w) / 60 if None not in w else None for s, w in timed.items()}
    lines = [
        f"machine: {machine_name()}; preset {a.preset}; run {a.run}; seeds {a.seeds}",
        "",
        *table(summary),
        "",
        "make methods wall minutes per seed (the method stages, PPO not counted): "
        + ", ".join(
            f"seed {s}: " + (f"{m:.1f}" if m is not None else "not timed (made by an earlier run)")
            for s, m in minutes.items()
        ),
        "",
        "training episodes per second, mean over seeds: "
        + ", ".join(f"{k} {statistics.mean(v):.2f}" for k, v in speed.items()),
    ]
    beat = [s["method"] for s in summary if s["above"] == s["seeds"] and s["method"] != "sft"]
    lines += ["", "beat SFT beyond the interval in every seed: " + (", ".join(beat) or "none")]
    print("\n".join(lines))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text("\n".join(lines) + "\n")
    return {"summary": summary, "minutes": minutes, "speed": speed, "per_seed": per_seed}


if __name__ == "__main__":
    main()
