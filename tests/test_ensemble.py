"""Reward-model ensembles, their objectives, the reward-hacking alarm and the length-controlled win rate: the math
against hand-computed numbers, the readout against the single-model readout it is built from, and the reward stage
with train.ensemble=K end to end on the smoke chain (layout, resume, what PPO and the methods make of it)."""

import json
import math
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

from pipeline.data.prompts import prompt_batch
from pipeline.data.tokenizer import train_bpe
from pipeline.eval.gold import length_controlled_win_rate, win_rate, win_rate_interval
from pipeline.inference.sampler import Rollout
from pipeline.models.loading import load_sequence_classifier
from pipeline.models.token_model import TokenModel
from pipeline.rl.alarm import alarm_series, trailing_mean
from pipeline.rl.readout import RewardEnsemble, close_replies, read_reward, score_rollout, turn_closing
from pipeline.rl.shaping import ensemble_spread, reward_objective
from tests.conftest import REPO, SMOKE, run_stage

# ---- the objectives on a 3x3 example -------------------------------------------------------------------------

Z = torch.tensor(
    [
        [1.0, 2.0, 3.0],  # episode 0: members agree on the order, spread 1 apart
        [0.5, 0.5, 0.5],  # episode 1: members agree exactly
        [-1.0, 1.0, 4.0],
    ]
)  # episode 2: members disagree a lot


def test_spread_and_objectives_by_hand():
    s = ensemble_spread(Z)
    assert s["mean"].tolist() == pytest.approx([2.0, 0.5, 4 / 3])
    # population std: sqrt(((1-2)^2 + 0 + (3-2)^2) / 3) = sqrt(2/3); row 2: deviations -7/3, -1/3, 8/3
    assert s["std"].tolist() == pytest.approx([math.sqrt(2 / 3), 0.0, math.sqrt((49 + 1 + 64) / 27)])
    assert s["min"].tolist() == [1.0, 0.5, -1.0]
    assert reward_objective(Z, "mean").tolist() == pytest.approx([2.0, 0.5, 4 / 3])
    assert reward_objective(Z, "worst").tolist() == [1.0, 0.5, -1.0]  # WCO: the minimum
    # UWO: mean - lambda * variance, lambda 0.5: 2 - 0.5 * 2/3, 0.5 - 0, 4/3 - 0.5 * 114/27
    assert reward_objective(Z, "uwo", 0.5).tolist() == pytest.approx([2 - 1 / 3, 0.5, 4 / 3 - 57 / 27])
    # the order of episodes changes with the objective: the disputed episode 2 beats episode 1 by the mean only
    assert reward_objective(Z, "mean")[2] > reward_objective(Z, "mean")[1]
    assert reward_objective(Z, "worst")[2] < reward_objective(Z, "worst")[1]
    assert reward_objective(Z, "uwo", 0.5)[2] < reward_objective(Z, "uwo", 0.5)[1]
    one = Z[:, :1]  # one member: every objective is its score
    for obj in ("mean", "worst", "uwo"):
        assert torch.equal(reward_objective(one, obj, 3.0), one[:, 0])
    with pytest.raises(ValueError, match="one of mean, worst, uwo"):
        reward_objective(Z, "median")


# ---- the readout of an ensemble of three real (tiny) reward models --------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return train_bpe(
        [f"Bera is {i} years old. Tovi works as a baker. What is {i} plus {i + 1}? Hello." for i in range(300)], 400
    )


def _rm(tok, seed):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        num_labels=1,
    )
    return LlamaForSequenceClassification(cfg).eval()


def _rollout(tok):
    prompts = [[{"role": "user", "content": "How old is Bera?"}], [{"role": "user", "content": "What is 3 plus 4?"}]]
    ids, am = prompt_batch(tok, prompts, 64, torch.device("cpu"))
    resp = [
        tok("Bera is 7 years old.", add_special_tokens=False)["input_ids"],
        tok("7", add_special_tokens=False)["input_ids"],
    ]
    w = max(map(len, resp))
    r = torch.full((2, w), tok.pad_token_id)
    m = torch.zeros((2, w), dtype=torch.bool)
    for i, x in enumerate(resp):
        r[i, : len(x)], m[i, : len(x)] = torch.tensor(x), True
    return Rollout(ids, am, r, m, torch.tensor([False, False]))


def test_readout_of_three_against_hand_computed_normalisation(tok):
    models = [TokenModel(_rm(tok, s)) for s in (1, 2, 3)]
    stats = [{"mean": 0.1, "std": 0.5}, {"mean": -0.2, "std": 2.0}, {"mean": 0.0, "std": 1.0}]
    ro, closing = _rollout(tok), turn_closing(tok)
    raw = [read_reward(m, close_replies(ro, closing)).tolist() for m in models]  # the single-model readout
    ens = RewardEnsemble(models, stats, "worst")
    got = ens.read(ro, closing)
    for b in range(2):
        z = [(raw[k][b] - stats[k]["mean"]) / stats[k]["std"] for k in range(3)]
        mean = sum(z) / 3
        assert got["mean"][b].item() == pytest.approx(mean, abs=1e-6)
        assert got["std"][b].item() == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in z) / 3), abs=1e-6)
        assert got["min"][b].item() == pytest.approx(min(z), abs=1e-6)
        assert got["objective"][b].item() == pytest.approx(min(z), abs=1e-6)
    assert torch.allclose(score_rollout(ens, ro, closing), got["min"])  # what every caller of the readout gets
    assert ens.stats == {"mean": 0.0, "std": 1.0}  # already normalised: callers' normalisation is then a no-op


def test_one_member_is_the_single_reward_model_exactly(tok, tmp_path):
    """K = 1 changes nothing: the raw score bit for bit, and the reward stage's statistics for the caller."""
    rm = _rm(tok, 4)
    rm.save_pretrained(tmp_path / "final")
    stats = {"mean": 0.123456789, "std": 0.987654321}
    ens = RewardEnsemble.load(tmp_path / "final", "cpu", "uwo", 5.0, stats=stats)
    ro, closing = _rollout(tok), turn_closing(tok)
    assert len(ens) == 1 and ens.stats == stats
    before = TokenModel(load_sequence_classifier(tmp_path / "final").eval())  # as PPO and the methods loaded it
    assert torch.equal(score_rollout(ens, ro, closing), score_rollout(before, ro, closing))
    assert torch.allclose(score_rollout(ens, ro, closing), score_rollout(TokenModel(rm), ro, closing), atol=1e-5)


# ---- the alarm on hand-made series ------------------------------------------------------------------------------


def test_trailing_mean_by_hand():
    assert trailing_mean([1, 2, 3, 4, 5], 2) == [1.0, 1.5, 2.5, 3.5, 4.5]


def test_alarm_fires_when_the_proxy_rises_while_the_members_disagree_more():
    n = 30
    proxy = [0.05 * t for t in range(n)]  # rising all along
    dis = [0.2] * 12 + [0.2 + 0.1 * (t - 11) for t in range(12, n)]  # flat, then climbing from iteration 13
    rows = alarm_series(proxy, dis, window=5, rise=1.0, patience=3)
    # trailing mean of 5 reaches 0.4 = 2 x 0.2 when the window holds 0.3..0.7 (t = 16, 0-based): mean 0.5 > 0.4
    # already at t = 15 (0.2, 0.3, 0.4, 0.5, 0.6 -> 0.4): the condition holds from t = 15, fires 3 in a row later
    first = next(t for t, r in enumerate(rows) if r["condition"])
    assert first == 15 and rows[first]["disagreement"] == pytest.approx(0.4)
    assert rows[-1]["fired_at"] == first + 3  # 1-based iteration of the third in a row
    assert all(r["fired"] == 0 for r in rows[: first + 2]) and all(r["fired"] == 1 for r in rows[first + 2 :])


def test_alarm_stays_quiet_without_both_signs():
    n = 30
    rising, falling = [0.05 * t for t in range(n)], [1.5 - 0.05 * t for t in range(n)]
    flat = [0.3 + 0.01 * ((-1) ** t) for t in range(n)]  # noise around a constant disagreement
    growing = [0.2 + 0.1 * t for t in range(n)]
    assert alarm_series(rising, flat)[-1]["fired_at"] == 0  # the proxy rises, the members keep agreeing
    assert alarm_series(falling, growing)[-1]["fired_at"] == 0  # they disagree, but the proxy is not rising
    # disagreement up by 90%, not 100%: below the documented rise
    mild = [0.2] * 10 + [0.38] * 20
    assert alarm_series(rising, mild, rise=1.0)[-1]["fired_at"] == 0
    # the condition held twice only, then broke: patience 3 is not met
    blip = [0.2] * 10 + [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0] + [0.0] * 13
    rows = alarm_series(rising, blip, window=1, rise=1.0, patience=8)
    assert rows[-1]["fired_at"] == 0 and max(r["condition"] for r in rows) == 1
    with pytest.raises(ValueError):
        alarm_series([1.0, 2.0], [1.0])


# ---- the length-controlled win rate -------------------------------------------------------------------------------


def test_length_controlled_win_rate_when_length_explains_every_win():
    """The policy is longer on most prompts and wins exactly as often as length makes it: the raw win rate is far
    above 0.5, the length-controlled one is 0.5 within its interval."""
    rng = random.Random(3)
    n = 600
    la = [rng.randint(10, 48) for _ in range(n)]
    lb = [max(1, x - rng.randint(-4, 16)) for x in la]  # mostly shorter
    d = [a - b for a, b in zip(la, lb)]
    sd = (sum(x * x for x in d) / n - (sum(d) / n) ** 2) ** 0.5
    a, b = [], []
    for x in d:  # P(win) = sigmoid(3 tanh(d / sd)): 0.5 at equal length, whatever the policy
        w = rng.random() < 1 / (1 + math.exp(-3 * math.tanh(x / sd)))
        a.append(1.0 if w else 0.0)
        b.append(1.0 - a[-1])
    raw, lo = win_rate(a, b), win_rate_interval(a, b)[0]
    assert raw > 0.65 and lo > 0.55
    lc, lc_lo, lc_hi = length_controlled_win_rate(a, b, la, lb)
    assert lc_lo < 0.5 < lc_hi and abs(lc - 0.5) < 0.08


def test_length_controlled_win_rate_without_a_length_effect_is_the_win_rate():
    rng = random.Random(5)
    n = 400
    la = [rng.randint(10, 48) for _ in range(n)]
    lb = [rng.randint(10, 48) for _ in range(n)]  # unrelated to who wins
    a = [rng.random() for _ in range(n)]
    b = [x + (0.1 if rng.random() < 0.35 else -0.1) for x in a]  # a wins 65%, at any length
    lc, lo, hi = length_controlled_win_rate(a, b, la, lb)
    assert lc == pytest.approx(win_rate(a, b), abs=0.03) and lo < lc < hi and lo > 0.55
    # ties count half, as in the win rate: all tied at equal lengths gives exactly 0.5
    assert length_controlled_win_rate([1.0] * 10, [1.0] * 10, [5] * 10, [5] * 10, resamples=0)[0] == pytest.approx(0.5)


# ---- end to end: the reward stage with train.ensemble=3, PPO and best-of-n on it ------------------------------


def _m(root, run, stage):
    return json.loads((root / run / stage / "manifest.json").read_text())


def test_ensemble_reward_stage_then_ppo_and_bon(smoke_chain):
    run = ["run=ens", "parent_run=default"]
    common = [*SMOKE, f"paths.root={smoke_chain}"]
    p = run_stage("reward", *common, *run, "train.ensemble=3", "train.ensemble_diversity=bootstrap")
    assert "ensemble of 3 (bootstrap)" in p.stdout
    m = _m(smoke_chain, "ens", "reward")
    final = smoke_chain / "ens" / "reward" / "final"
    index = json.loads((final / "ensemble.json").read_text())
    assert index["k"] == 3 and [e["path"] for e in index["members"]] == [".", "members/1", "members/2"]
    assert index["members"][0]["mean"] == m["reward_stats"]["mean"]  # member 0 is the stage's reward model
    for e in index["members"]:  # each member a plain Hugging Face sequence classifier with its own statistics
        AutoModelForSequenceClassification.from_pretrained(final / e["path"])
        assert e["std"] > 0
    assert len({e["mean"] for e in index["members"]}) == 3  # three different models
    g = m["metrics"]
    for k in (
        "ensemble/gold_accuracy",
        "ensemble/disagreement",
        "ensemble/member_correlation",
        "member1/eval/gold_accuracy",
        "member2/eval/gold_accuracy",
    ):
        assert k in g, k
    assert g["ensemble/disagreement"] > 0 and not (smoke_chain / "ens" / "reward" / ".members").exists()

    shutil.copytree(smoke_chain / "default" / "sft", smoke_chain / "ens" / "sft")  # PPO reads both from its own run
    p = run_stage("ppo", *common, "run=ens", "train.reward_objective=worst", "train.iterations=6", "alarm.window=2")
    assert "an ensemble of 3 reward models, optimised by their worst" in p.stdout
    rows = [json.loads(x) for x in (smoke_chain / "ens" / "ppo" / "metrics.jsonl").read_text().splitlines()]
    it = [r for r in rows if "ensemble/std" in r]
    assert len(it) == 6 and all(r["ensemble/min"] <= r["ensemble/mean"] for r in it)
    assert all("alarm/disagreement_ratio" in r and "alarm/fired_at" in r for r in it)
    # with objective worst the training score is the members' minimum: the logged score is its batch mean
    assert all(r["ppo/score"] == pytest.approx(r["ensemble/min"], abs=1e-5) for r in it)
    pm = _m(smoke_chain, "ens", "ppo")
    assert pm["reward"] == {"ensemble": 3, "objective": "worst"} and "alarm/fired_at" in pm["metrics"]
    assert "eval/lc_win_rate_vs_sft" in pm["metrics"]

    run_stage("bon", *common, "run=ens", "bon.reward_objective=uwo", "bon.uwo_lambda=0.5")
    assert _m(smoke_chain, "ens", "bon")["reward"] == {"ensemble": 3, "objective": "uwo", "uwo_lambda": 0.5}
    run_stage("methods", "logger=none", f"paths.root={smoke_chain}", "run=ens")
    text = (smoke_chain / "ens" / "methods.md").read_text()
    assert "| ppo | worst of 3 |" in text and "| bon | uwo of 3 |" in text


CRASH_IN_MEMBER = """
import os, sys, runpy, transformers
orig = transformers.Trainer._save_checkpoint
def save_then_crash(self, *a, **k):
    orig(self, *a, **k)
    if self.args.output_dir.endswith("member1"):
        os._exit(137)
transformers.Trainer._save_checkpoint = save_then_crash
sys.argv = ["stages.reward"] + sys.argv[1:]
runpy.run_module("stages.reward", run_name="__main__")
"""


@pytest.mark.slow  # three reward stages: kept out of make test's time (make test-slow runs it)
def test_ensemble_resumes_after_a_kill_in_a_later_member(smoke_chain):
    """Killed at member 1's first checkpoint: the rerun does not train member 0 again (it waits, finished, in
    .members/0), resumes member 1 from its checkpoint, and ends with the figures of an uninterrupted run."""
    common = [*SMOKE, f"paths.root={smoke_chain}", "parent_run=default", "train.ensemble=2"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run(
        [sys.executable, "-c", CRASH_IN_MEMBER, *common, "run=ens-kill"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 137, p.stderr[-2000:]
    assert (smoke_chain / "ens-kill" / "reward" / ".members" / "0" / "done.json").is_file()
    p = run_stage("reward", *common, "run=ens-kill")
    assert "member 0 of 2: trained before this resume" in p.stdout and "resuming from" in p.stdout
    run_stage("reward", *common, "run=ens-whole")
    a, b = _m(smoke_chain, "ens-kill", "reward")["metrics"], _m(smoke_chain, "ens-whole", "reward")["metrics"]
    for k in ("eval/gold_accuracy", "member1/eval/gold_accuracy", "ensemble/gold_accuracy", "reward/mean"):
        assert a[k] == pytest.approx(b[k], abs=1e-4), k
