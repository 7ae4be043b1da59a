"""Iterated RLHF (make iterate): two rounds on the smoke preset, through the Makefile target a user types.

Round 2 is reward_r2 (fresh comparisons of round 1's PPO policy, ranked by the simulated labellers, the reward model
updated on every comparison so far) and ppo_r2 (round 1's policy continued against it, its KL anchored to SFT).
Checked: each round's manifest names its round and lineage, the comparisons counted are the rows written, the
distribution-shift figures (the reward model on the current policy's answers, before and after its update), the
evaluation against SFT and against the round before, that round 2 really starts from round 1's policy, and
rounds.md. The kill in the middle of a round is in test_faults.py (slow)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, SMOKE, run_stage

from pipeline.data.pairs import expand_pairs


def _m(root, run, folder):
    return json.loads((root / run / folder / "manifest.json").read_text())


def make_iterate(
    root: Path, rounds: int = 2, run: str = "default", extra: str = "", method: str = "ppo"
) -> subprocess.CompletedProcess:
    """`make iterate` as a user runs it, with this interpreter's environment standing in for .venv."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    venv = Path(sys.executable).resolve().parents[1]
    cmd = [
        "make",
        "-s",
        "iterate",
        f"ROUNDS={rounds}",
        f"METHOD={method}",
        "PRESET=smoke",
        f"RUN={run}",
        f"PY={sys.executable}",
        f"VENV={Path(sys.executable).parents[1]}",
        f"ARGS=logger=none paths.root={root} {extra}".strip(),
    ]
    if not any(venv.glob(".stamp-*")) and not any(Path(sys.executable).parents[1].glob(".stamp-*")):
        pytest.fail(f"make iterate needs the project's virtual environment (make setup): no .stamp-* in {venv}")
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        raise AssertionError(f"make iterate failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-4000:]}")
    return p


@pytest.fixture(scope="module")
def iterated(smoke_chain):
    run_stage("ppo", *SMOKE, f"paths.root={smoke_chain}")  # round 1 (already complete if another test made it)
    p = make_iterate(smoke_chain)
    return smoke_chain, p


def test_round_two_manifests_name_their_round_and_lineage(iterated):
    root, _ = iterated
    rm, ppo, one = _m(root, "default", "reward_r2"), _m(root, "default", "ppo_r2"), _m(root, "default", "ppo")
    assert one["round"] == 1 and rm["round"] == 2 and ppo["round"] == 2
    assert rm["stage"] == "reward" and ppo["stage"] == "ppo" and rm["status"] == ppo["status"] == "complete"
    assert rm["lineage"]["reward_model_from"] == "reward" and rm["lineage"]["policy_sampled"] == "ppo"
    assert ppo["lineage"] == {"policy_from": "ppo", "reward_model": "reward_r2", "kl_anchor": "sft"}
    # the fingerprints of exactly what each started from: a redone round 1 makes round 2 stale
    reward, sft = _m(root, "default", "reward"), _m(root, "default", "sft")
    assert rm["parents"] == {"sft": sft["fingerprint"], "reward": reward["fingerprint"], "ppo": one["fingerprint"]}
    assert ppo["parents"] == {"reward_r2": rm["fingerprint"], "sft": sft["fingerprint"], "ppo": one["fingerprint"]}
    assert (root / "default" / "ppo_r2" / "final" / "config.json").is_file()


def test_comparisons_counted_are_the_rows_written(iterated):
    root, _ = iterated
    rm = _m(root, "default", "reward_r2")
    rows = [
        json.loads(x) for x in (root / "default" / "reward_r2" / "onpolicy_comparisons.jsonl").read_text().splitlines()
    ]
    g = rm["metrics"]
    assert g["labels/round_rankings"] == len(rows) > 0 and g["labels/round_pairs"] == len(expand_pairs(rows)) > 0
    assert all(r["id"].startswith("round2-") and len(r["responses"]) >= 2 for r in rows)
    first = _m(root, "default", "reward")
    # every comparison so far: round 1's (shipped and on-policy) and this round's fresh ones
    assert g["labels/total_pairs"] == first["metrics"]["labels/total_pairs"] + g["labels/round_pairs"]
    assert rm["comparisons"] == [
        "default/reward/onpolicy_comparisons.jsonl",
        "default/reward_r2/onpolicy_comparisons.jsonl",
    ]
    # the fresh prompts are the first slice of data.prompts, each answered by round 1's policy
    assert g["onpolicy/prompts"] == 16


def test_round_two_reports_the_distribution_shift_and_both_comparisons(iterated):
    root, p = iterated
    g = _m(root, "default", "reward_r2")["metrics"]
    for k in (
        "reward/before_gold_pair_accuracy",
        "reward/gold_pair_accuracy",
        "reward/before_gold_correlation",
        "reward/gold_correlation",
    ):
        assert k in g and (g[k] != g[k] or 0 <= abs(g[k]) <= 1), k  # nan when no pair differs in gold
    e = _m(root, "default", "ppo_r2")["metrics"]
    for prefix in ("eval", "eval/sampled"):
        lo, w, hi = (e[f"{prefix}/win_rate_vs_previous{s}"] for s in ("_ci_low", "", "_ci_high"))
        assert 0 <= lo <= w <= hi <= 1
        assert f"{prefix}/win_rate_vs_sft" in e
    # the previous round's gold as round 2 read it is round 1's own figure
    assert e["eval/previous_gold_score"] == pytest.approx(_m(root, "default", "ppo")["metrics"]["eval/gold_score"])
    md = (root / "default" / "rounds.md").read_text()
    assert "| 1 | ppo |" in md and "| 2 | ppo_r2 |" in md and (root / "default" / "rounds.png").is_file()
    assert "rounds:" in p.stdout


def test_round_two_starts_from_round_one_s_policy(iterated):
    """Round 1's last periodic evaluation and round 2's first are the same policy on the same prompts with the same
    draw (and the same KL anchor): the same gold and KL, to the last digit."""
    root, _ = iterated
    last = max(json.loads((root / "default" / "ppo" / "periodic.json").read_text()), key=lambda r: r["iteration"])
    first = min(json.loads((root / "default" / "ppo_r2" / "periodic.json").read_text()), key=lambda r: r["iteration"])
    assert first["iteration"] == 0 and last["iteration"] > 0
    assert first["gold"] == last["gold"] and first["kl"] == pytest.approx(last["kl"], abs=1e-5)
    assert first["kl"] > 0  # not SFT itself


def test_make_iterate_again_is_a_no_op_and_a_missing_round_names_the_command(iterated, tmp_path):
    root, _ = iterated
    p = make_iterate(root)
    assert "already complete" in p.stdout
    q = run_stage("ppo", *SMOKE, f"paths.root={root}", "round=3", check=False)
    assert q.returncode == 2 and "make iterate ROUNDS=3" in q.stderr and "reward_r3" in q.stderr


def test_online_dpo_rounds(iterated):
    """make iterate METHOD=dpo: round 2 of DPO labels its own samples (no reward model in the loop), trains from
    round 1's DPO policy, and is scored like every method, against SFT and against round 1; the methods table gains
    the iterated rows."""
    root, _ = iterated
    run_stage("dpo", *SMOKE, f"paths.root={root}")
    p = make_iterate(root, method="dpo")
    m = _m(root, "default", "dpo_r2")
    assert m["round"] == 2 and m["lineage"] == {"policy_from": "dpo", "kl_anchor": "sft"}
    rows = [
        json.loads(x) for x in (root / "default" / "dpo_r2" / "onpolicy_comparisons.jsonl").read_text().splitlines()
    ]
    g = m["metrics"]
    assert g["labels/round_rankings"] == len(rows) > 0 and g["labels/round_pairs"] == len(expand_pairs(rows))
    assert g["data/train_pairs"] == len(expand_pairs(rows))  # online: this round's fresh pairs only
    assert g["labels/total_pairs"] == _m(root, "default", "dpo")["metrics"]["labels/total_pairs"] + len(
        expand_pairs(rows)
    )
    assert 0 <= g["eval/sampled/win_rate_vs_previous_ci_low"] <= g["eval/sampled/win_rate_vs_previous"] <= 1
    assert "| 2 | dpo_r2 |" in (root / "default" / "rounds_dpo.md").read_text() and "rounds:" in p.stdout
    run_stage("methods", f"paths.root={root}")
    table = (root / "default" / "methods.md").read_text()
    assert "| dpo_r2 |" in table and "| ppo_r2 |" in table
