"""bench/ scripts whose logic can be checked: best-of-n picks (bench/bon_frontier.py); the speed scripts run on a
small world and count what they time (bench/oracle_speed.py, bench/synthetic_speed.py: their figures are printed,
never asserted)."""

import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _script(name):
    sys.path.insert(0, str(BENCH))  # the scripts import bench/_common.py as a sibling
    try:
        return runpy.run_path(str(BENCH / name))
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def bon():
    return _script("bon_frontier.py")


def test_speed_scripts_time_what_they_say():
    from pipeline.core.config import WorldConfig

    rates = _script("oracle_speed.py")["measure"](n_prompts=20, repeats=1)
    assert set(rates) == {"cold", "warm"} and all(r > 0 for r in rates.values())
    synthetic = _script("synthetic_speed.py")
    small = WorldConfig(
        n_entities=30,
        corpus_docs=50,
        sft_dialogues=20,
        sft_eval_dialogues=5,
        reward_prompts=10,
        reward_test_prompts=5,
        eval_prompts=7,
        ppo_prompts=9,
    )
    seconds, sizes = synthetic["measure"](small, repeats=1)
    assert list(seconds) == list(synthetic["SETS"])
    assert sizes == {
        "corpus": 50,
        "corpus_docs": 50,
        "corpus_chars": sizes["corpus_chars"],
        "sft": 20,
        "sft_eval": 5,
        "eval_prompts": 7,
        "ppo_prompts": 9,
        "reward_train": 10,
        "reward_test": 5,
    }
    assert sizes["corpus_chars"] > 50 * 20


def test_best_of_n_picks_by_hand(bon):
    # two prompts, k=3 samples each (prompt-major)
    gold = [0.2, 0.9, 0.5, 0.0, 0.3, 0.1]
    reward = [1.0, -1.0, 2.0, 5.0, 5.0, 0.0]
    greedy = [0.6, 0.2]
    one = bon["best_of_n"](gold, reward, greedy, 3, 1)
    assert one == {"oracle": [0.2, 0.0], "greedy+oracle": [0.6, 0.2], "rm": [0.2, 0.0]}
    two = bon["best_of_n"](gold, reward, greedy, 3, 2)
    assert two == {"oracle": [0.9, 0.3], "greedy+oracle": [0.9, 0.3], "rm": [0.2, 0.0]}  # equal rewards: the first
    three = bon["best_of_n"](gold, reward, greedy, 3, 3)
    assert three["rm"] == [0.5, 0.0] and three["oracle"] == [0.9, 0.3]
    with pytest.raises(ValueError):
        bon["best_of_n"](gold, reward, greedy, 3, 4)
    assert bon["kl_bound"](1) == 0 and bon["kl_bound"](4) == pytest.approx(1.3863 - 0.75, abs=1e-4)


def test_bon_frontier_runs_on_a_pipeline_run(smoke_chain):
    e = {**os.environ, "PYTHONPATH": str(BENCH.parent)}
    p = subprocess.run(
        [
            sys.executable,
            str(BENCH / "bon_frontier.py"),
            "--runs-root",
            str(smoke_chain),
            "--n",
            "1,2,4",
            "--no-results",
        ],
        cwd=BENCH.parent,
        env=e,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    rows = {
        int(m.group(1)): [float(x) for x in m.group(2, 3, 4, 5, 6, 7)]
        for m in re.finditer(
            r"^\s+(\d+)\s+[\d.]+ \|\s+([\d.]+) ([\d.]+) \|\s+([\d.]+) ([\d.]+) \|\s+([\d.]+) ([\d.]+)$", p.stdout, re.M
        )
    }
    assert sorted(rows) == [1, 2, 4], p.stdout
    # the first n samples are nested, so the oracle's pick can only get better with n; with greedy among the
    # candidates it never loses to greedy (win >= 0.5)
    assert rows[1][0] <= rows[2][0] <= rows[4][0]
    assert all(r[3] >= 0.5 for r in rows.values())
    assert rows[1][0] == rows[1][4]  # one sample: nothing to choose
    missing = subprocess.run(
        [
            sys.executable,
            str(BENCH / "bon_frontier.py"),
            "--runs-root",
            str(smoke_chain),
            "--run",
            "nope",
            "--no-results",
        ],
        cwd=BENCH.parent,
        env=e,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode != 0 and "make sft RUN=nope" in missing.stderr
