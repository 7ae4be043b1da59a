"""What the bench scripts share: the machine they ran on, running a logged command, and their bench/results.md
section (each script owns one `## <heading>` section and leaves the others as they are)."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results.md"


def stage_env() -> dict:
    """The environment a bench runs stages in: the checkout importable, offline, W&B offline unless told."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    env.setdefault("WANDB_MODE", "offline")
    return env


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def n_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine() -> str:
    """One line for the results table: CPU model, cores, OS (and the GPU when there is one)."""
    line = f"{cpu_model()}, {n_cores()} cores, {platform.system()} {platform.release()}"
    try:
        import torch

        if torch.cuda.is_available():
            line += f", {torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return line


def run_logged(cmd: list, log: Path, env: dict) -> float:
    """Run `cmd` from the repository root with its output in `log`; the wall seconds it took. A failure stops the
    benchmark with the log's tail."""
    t = time.time()
    with open(log, "w") as f:
        r = subprocess.run([str(c) for c in cmd], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise SystemExit(f"command failed ({r.returncode}): {' '.join(map(str, cmd))}\n{tail}")
    return time.time() - t


def update_results(section: str, intro: str, header: str, row: str) -> None:
    """Append `row` to the table of `section` in bench/results.md (created with `intro` and `header` if new)."""
    text = (
        RESULTS.read_text()
        if RESULTS.exists()
        else "# Benchmark results\n\nFigures written by the scripts in bench/ (see bench/README.md).\n"
    )
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == section), None)
    if start is None:
        before, rows, after = lines, [], []
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        table = [line for line in lines[start + 1 : end] if line.startswith("|")]
        before, rows, after = lines[:start], table[2:], lines[end:]
    while before and not before[-1].strip():
        before.pop()
    body = [section, "", intro, "", header, "|" + "---|" * header.count(" | ") + "---|", *rows, row]
    RESULTS.write_text("\n".join(before + [""] + body + ([""] + after if after else [])) + "\n")
