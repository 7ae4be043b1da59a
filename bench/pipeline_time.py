"""Whole-pipeline wall time and peak memory: every stage of `make all`, one after the other, on a preset.

    python bench/pipeline_time.py                      # smoke, then cpu (the default preset): ~20 min on 2 cores
    python bench/pipeline_time.py --presets cpu --runs-root /tmp/cpu-runs    # keep the runs to look at them

Each stage runs as `python -m stages.<stage> preset=<preset> paths.root=<fresh root>` (W&B offline, as `make all`
with no API key), in its own process: the wall seconds of each, and its peak resident memory from the kernel's
accounting of that process (os.wait4's ru_maxrss, children it waited for included). The pipeline's peak is the
largest stage's (stages run one at a time). The headline metrics of the run come from the manifests. Targets for
the default (cpu) preset: under 15 minutes end to end and under 4 GB peak memory on 2 CPU cores.

Adds a row to the "## Whole pipeline" section of bench/results.md (other sections kept as they are).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, machine, update_results  # (bench/ is on sys.path)

from pipeline.core.registry import ORDER

STAGES = (*ORDER, "report")
SECTION = "## Whole pipeline"
HEADER = (
    "| date | machine | load avg | preset | "
    + " | ".join(f"{s} s" for s in STAGES)
    + " | total min | peak GB (stage) | pretrain eval loss | SFT / pretrained gold | RM gold acc / acc "
    "| PPO / SFT gold | win rate | PPO KL |"
)
INTRO = (
    "`python bench/pipeline_time.py` (`make bench`): the stages of `make all`, one process each, on a fresh runs "
    "root; wall seconds per stage and the peak resident memory of the largest stage process (os.wait4 "
    "ru_maxrss). Targets for the cpu preset on 2 CPU cores: total under 15 minutes, peak under 4 GB. Load avg: "
    "the 1-minute load at the start (above ~0.5: something else shared the cores). One row per run, newest "
    "last."
)


def run_stage(stage: str, overrides: list[str], log: Path, env: dict) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of one stage process."""
    t = time.time()
    with open(log, "w") as f:
        p = subprocess.Popen(
            [sys.executable, "-m", f"stages.{stage}" if stage in ORDER else f"stages.tools.{stage}", *overrides],
            cwd=REPO,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
        )
        _, status, usage = os.wait4(p.pid, 0)
    wall = time.time() - t
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise SystemExit(f"stages.{stage} failed ({code}); log {log}:\n{tail}")
    return wall, usage.ru_maxrss / 2**20  # KiB on Linux


def headline(root: Path) -> dict:
    def m(stage):
        f = root / "default" / stage / "manifest.json"
        return json.loads(f.read_text()).get("metrics", {}) if f.exists() else {}

    pre, sft, rm, ppo = m("pretrain"), m("sft"), m("reward"), m("ppo")
    return {
        "pretrain eval/loss": pre.get("eval/loss"),
        "sft eval/gold_score": sft.get("eval/gold_score"),
        "pretrained gold": sft.get("eval/pretrain_gold_score"),
        "rm eval/gold_accuracy": rm.get("eval/gold_accuracy"),
        "rm eval/accuracy": rm.get("eval/accuracy"),
        "ppo eval/gold_score": ppo.get("eval/gold_score"),
        "ppo eval/sft_gold_score": ppo.get("eval/sft_gold_score"),
        "ppo eval/win_rate_vs_sft": ppo.get("eval/win_rate_vs_sft"),
        "ppo eval/kl": ppo.get("eval/kl"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["smoke", "cpu"])
    ap.add_argument(
        "--runs-root",
        help="where the runs go (one folder per preset, emptied first); default: a "
        "temporary folder, removed afterwards",
    )
    ap.add_argument("--no-results", action="store_true", help="print only; leave bench/results.md alone")
    args = ap.parse_args()

    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    env.setdefault("WANDB_MODE", "offline")
    base = Path(args.runs_root) if args.runs_root else Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    where = machine()
    print(f"[bench] {where}")
    try:
        for preset in args.presets:
            root = base / preset
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            load = os.getloadavg()[0]
            print(f"[bench] preset={preset} in {root} (load avg {load:.2f})")
            walls, peaks = {}, {}
            for stage in STAGES:
                walls[stage], peaks[stage] = run_stage(
                    stage, [f"preset={preset}", f"paths.root={root}"], root / f"{stage}.log", env
                )
                print(f"  {stage:<10} {walls[stage]:7.1f} s   peak {peaks[stage]:.2f} GB")
            total = sum(walls.values())
            top = max(peaks, key=peaks.get)
            h = headline(root)
            print(f"  {'total':<10} {total:7.1f} s = {total / 60:.1f} min; peak {peaks[top]:.2f} GB ({top})")
            for k, v in h.items():
                print(f"  {k:<28} {'-' if v is None else round(v, 3)}")
            if not args.no_results:
                f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
                cells = [
                    time.strftime("%Y-%m-%d"),
                    where,
                    f"{load:.2f}",
                    preset,
                    *[f"{walls[s]:.0f}" for s in STAGES],
                    f"{total / 60:.1f}",
                    f"{peaks[top]:.2f} ({top})",
                    f(h["pretrain eval/loss"]),
                    f"{f(h['sft eval/gold_score'])} / {f(h['pretrained gold'])}",
                    f"{f(h['rm eval/gold_accuracy'])} / {f(h['rm eval/accuracy'])}",
                    f"{f(h['ppo eval/gold_score'])} / {f(h['ppo eval/sft_gold_score'])}",
                    f(h["ppo eval/win_rate_vs_sft"]),
                    f(h["ppo eval/kl"]),
                ]
                update_results(SECTION, INTRO, HEADER, "| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    finally:
        if not args.runs_root:
            shutil.rmtree(base, ignore_errors=True)
    if not args.no_results:
        print("[bench] rows added to bench/results.md (Whole pipeline)")


if __name__ == "__main__":
    main()
