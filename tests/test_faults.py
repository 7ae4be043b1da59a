"""Faults (slow): every stage killed right after a chosen step's checkpoint, then run again: the second run resumes
from that checkpoint, completes, and logs what the uninterrupted run logged; the same seed reproduces the same
metrics.

    make test-slow        # = pytest -m slow

The kill is PIPELINE_CRASH_AT_STEP=N (pipeline.core.runs.crash_point): right after step N's checkpoint the process
exits with os._exit(137), no cleanup, as a SIGKILL would leave it. The pretrain and PPO loops call crash_point
themselves; the SFT and reward stages train with the Hugging Face Trainer, which does not, so their run goes through
a small driver (CRASHING_TRAINER) that calls crash_point after the Trainer's checkpoint save. N is the stage's first
checkpoint (its smoke train.save_every), so the crash is certain to happen (exit code 137) before the stage ends and
there is a resume point to come back to.
"""

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO, SMOKE, compose_stage, run_stage

pytestmark = pytest.mark.slow

# Bookkeeping that differs between any two runs: wall-clock timings and rates.
TIMING = re.compile(r"time|runtime|per_s|seconds")

# How far the resumed run's logged values may be from the uninterrupted run's (absolute): the crash comes right
# after a checkpoint, so no step is lost or replayed, and every stage restores model, optimizer, scheduler, data
# order and RNG state. Measured on CPU: every value equal (difference 0.0) for every stage.
TOLERANCE = {"pretrain": 0.0, "sft": 0.0, "reward": 0.0, "ppo": 0.0}

# Counters the libraries keep in the process, not in their checkpoints, so a resumed run counts from its restart:
# the Trainer's end-of-training train_loss (our train/loss_total) averages the losses of the steps this process ran
# (every logged train/loss is compared instead), and TRL's SFTTrainer counts num_tokens from 0 in each process.
NOT_RESUMED = {"sft": {"train/loss_total", "train/num_tokens", "eval/num_tokens"}, "reward": {"train/loss_total"}}

# Logged at step 0 by every start of the stage, the resumed one included: the SFT stage scores the starting
# (pretrained) model before training. The same values each time; compared once.
EACH_START = {"sft": lambda step, key: step == 0}

# `python -c` driver for the Trainer stages: stages.<stage>.main() with the Trainer's checkpoint save followed by
# crash_point(global_step), so PIPELINE_CRASH_AT_STEP applies to them as to the pretrain and PPO loops.
CRASHING_TRAINER = """
import sys, importlib, transformers
from pipeline.core.runs import crash_point
save = transformers.Trainer._save_checkpoint
def save_then_crash(self, *args, **kwargs):
    save(self, *args, **kwargs)
    crash_point(self.state.global_step)
transformers.Trainer._save_checkpoint = save_then_crash
stage = sys.argv.pop(1)
importlib.import_module("stages." + stage).main()
"""


def _manifest(root, run, stage):
    return json.loads((root / run / stage / "manifest.json").read_text())


def _logged(root, run, stage):
    """{(step, key): [values in the order logged]} of every non-timing value in metrics.jsonl (the Trainer logs
    train/epoch with the loss and again with the evaluation; a step replayed after a resume would add to its list)."""
    out = {}
    for line in (root / run / stage / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for k, v in row.items():
            if k != "step" and not TIMING.search(k):
                out.setdefault((row["step"], k), []).append(v)
    return out


def _checkpoint_name(stage, step):
    return f"checkpoint-{step}" if stage in ("sft", "reward") else f"step_{step:08d}"


def _run_crashing(stage, root, run, step):
    """The stage with PIPELINE_CRASH_AT_STEP=step; returns the finished process."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PIPELINE_CRASH_AT_STEP": str(step)}
    args = [*SMOKE, f"paths.root={root}", f"run={run}", "parent_run=default"]
    cmd = (
        [sys.executable, "-c", CRASHING_TRAINER, stage]
        if stage in ("sft", "reward")
        else [sys.executable, "-m", f"stages.{stage}"]
    ) + args
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def resumed_against_straight(root, run, straight, stage, step) -> tuple[dict, dict, float]:
    """Every value the uninterrupted run `straight` logged, at every step (those after the resume included), and
    nothing else, in the resumed run `run`: (resumed, straight, largest difference). What the libraries do not carry
    across a restart (NOT_RESUMED) is left out; what every start logs (EACH_START) is compared once."""
    a, b = _logged(root, run, stage), _logged(root, straight, stage)
    skip, each_start = NOT_RESUMED.get(stage, set()), EACH_START.get(stage, lambda step, key: False)
    a, b = ({k: v for k, v in x.items() if k[1] not in skip} for x in (a, b))
    for k in [k for k in a if each_start(*k)]:
        assert len(a[k]) == 2 and a[k][0] == a[k][1], (k, a[k])  # once before the crash, once after
        a[k] = a[k][:1]
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:10]
    assert any(s > step for s, _ in a)
    return a, b, _max_difference(a, b)


def _max_difference(a: dict, b: dict) -> float:
    """Largest |a[k] - b[k]| over the keys of a (values, or lists of values of the same length)."""
    worst = 0.0
    for k in a:
        xs, ys = (a[k], b[k]) if isinstance(a[k], list) else ([a[k]], [b[k]])
        if len(xs) != len(ys):
            return float("inf")
        for x, y in zip(xs, ys):
            if isinstance(x, (int, float)) and isinstance(y, (int, float)):
                worst = max(worst, 0.0 if x == y else abs(x - y))  # inf == inf; nan never equals (inf)
            elif x != y:
                return float("inf")
    return worst


@pytest.mark.parametrize("stage", ["pretrain", "sft", "reward", "ppo"])
def test_crash_after_a_checkpoint_then_resume(smoke_chain, stage):
    root, run = smoke_chain, f"killed-{stage}"
    if stage == "ppo":
        run_stage("ppo", *SMOKE, f"paths.root={root}")  # the uninterrupted reference (the other stages: smoke_chain)
    t = compose_stage(stage, SMOKE).train
    step = t.save_every  # the first checkpoint, well before the end
    assert step < (t.iterations if stage == "ppo" else t.max_steps)

    p = _run_crashing(stage, root, run, step)
    assert p.returncode == 137, f"{stage} did not crash at step {step} ({p.returncode}):\n{p.stderr[-3000:]}"
    d = root / run / stage
    assert (d / "checkpoints" / _checkpoint_name(stage, step)).is_dir(), sorted((d / "checkpoints").iterdir())
    assert not (d / "final").exists() and _manifest(root, run, stage)["status"] == "running"
    assert max(s for s, _ in _logged(root, run, stage)) == step  # it got as far as the checkpoint, and no further

    run_stage(stage, *SMOKE, f"paths.root={root}", f"run={run}", "parent_run=default")
    resumed, straight = _manifest(root, run, stage), _manifest(root, "default", stage)
    assert resumed["status"] == "complete" and resumed["resumed_from"] == step

    a, b, worst = resumed_against_straight(root, run, "default", stage, step)
    skip = NOT_RESUMED.get(stage, set())
    print(
        f"\n{stage}: resumed at step {step}; {sum(map(len, a.values()))} logged values compared, largest "
        f"difference {worst:.3g}"
    )
    assert worst <= TOLERANCE[stage], {k: (a[k], b[k]) for k in a if a[k] != b[k]}
    ma, mb = (
        {k: v for k, v in m["metrics"].items() if not TIMING.search(k) and k not in skip} for m in (resumed, straight)
    )
    assert set(ma) == set(mb) and _max_difference(ma, mb) <= TOLERANCE[stage], {
        k: (ma[k], mb[k]) for k in ma if ma[k] != mb.get(k)
    }
    if stage == "ppo":  # the state PPO carries across the resume (LoopState), and the policy itself
        for f in ("history.json", "periodic.json", "eval_samples.jsonl", "ppo_samples.jsonl"):
            assert (d / f).read_text() == (root / "default" / stage / f).read_text(), f
        assert (d / "final" / "model.safetensors").read_bytes() == (
            root / "default" / stage / "final" / "model.safetensors"
        ).read_bytes()


def test_same_seed_same_metrics(smoke_chain):
    """Reproducibility on one machine: the SFT and reward stages, rerun from the same parents, give the same
    metrics (pretraining and PPO are covered by the resume test, which compares every logged value)."""
    for stage in ("sft", "reward"):
        run_stage(stage, *SMOKE, f"paths.root={smoke_chain}", "run=again", "parent_run=default")
        a, b = _manifest(smoke_chain, "again", stage)["metrics"], _manifest(smoke_chain, "default", stage)["metrics"]
        for k in ("eval/loss", "eval/accuracy", "eval/gold_score"):
            if k in b:
                assert a[k] == pytest.approx(b[k], abs=1e-6), (stage, k)


def test_kill_in_the_middle_of_a_round_then_resume(smoke_chain):
    """make iterate killed in round 2, after its reward update, right after PPO's first checkpoint; make iterate
    again resumes that round's PPO and logs what an uninterrupted make iterate logged, every value."""
    import shutil

    from test_iterate import make_iterate

    root = smoke_chain
    run_stage("ppo", *SMOKE, f"paths.root={root}")
    make_iterate(root)  # the uninterrupted reference: runs/default/{reward_r2,ppo_r2}
    for stage in ("tokenizer", "pretrain", "sft", "reward", "ppo"):  # round 1 as it is, in a run of its own
        shutil.rmtree(root / "killed-round" / stage, ignore_errors=True)
        shutil.copytree(root / "default" / stage, root / "killed-round" / stage)
    run_stage("reward", *SMOKE, f"paths.root={root}", "run=killed-round", "round=2")
    step = compose_stage("ppo", SMOKE).train.save_every
    env = {**os.environ, "PYTHONPATH": str(REPO), "PIPELINE_CRASH_AT_STEP": str(step)}
    p = subprocess.run(
        [sys.executable, "-m", "stages.ppo", *SMOKE, f"paths.root={root}", "run=killed-round", "round=2"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 137, p.stderr[-3000:]
    assert _manifest(root, "killed-round", "ppo_r2")["status"] == "running"
    make_iterate(root, run="killed-round")
    resumed = _manifest(root, "killed-round", "ppo_r2")
    assert resumed["status"] == "complete" and resumed["resumed_from"] == step and resumed["round"] == 2
    for folder in ("reward_r2", "ppo_r2"):
        a, b = _logged(root, "killed-round", folder), _logged(root, "default", folder)
        assert set(a) == set(b), sorted(set(a) ^ set(b))[:10]
        assert _max_difference(a, b) == 0.0, (folder, {k: (a[k], b[k]) for k in a if a[k] != b[k]})
    assert (root / "killed-round" / "ppo_r2" / "final" / "model.safetensors").read_bytes() == (
        root / "default" / "ppo_r2" / "final" / "model.safetensors"
    ).read_bytes()
