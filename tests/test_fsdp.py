"""FSDP2 on two CPU processes (conf/accelerate/fsdp_cpu2.yaml, gloo), as an FSDP launch on GPUs runs it.

accelerate alone would run such a launch as plain DDP on CPU (pipeline.core.dist.allow_fsdp_on_cpu says why), so
every test here first checks that the run really was sharded: the manifest's launch record, and the per-rank
parameter bytes the stage measured on its prepared model. The fast case (make test) is the reward stage, whose
sequence classifier is loaded on the meta device under cpu_ram_efficient_loading (it failed before with "Cannot
copy out of meta tensor"); the slow matrix runs every stage and method. Also here: a hung launch fails the test
with every rank's stack (conftest.run_multiproc)."""

import json

import pytest
from conftest import REPO, SMOKE, run_multiproc
from safetensors import safe_open

FSDP = "fsdp_cpu2.yaml"


def _manifest(root, run, stage):
    return json.loads((root / run / stage / "manifest.json").read_text())


def _tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def check_sharded_and_whole(root, run, stage, reference="default"):
    """The stage ran under FSDP on two processes, its parameters were split between them, and its final/ is the
    same Hugging Face checkpoint (file names, tensor names and shapes) as the one-process run's."""
    m = _manifest(root, run, stage)
    assert m["status"] == "complete"
    assert m["launch"]["parallelism"] == "fsdp" and m["launch"]["world_size"] == 2, m["launch"]
    assert m["launch"]["sharding"]["version"] == "2", m["launch"]
    local, full = m["sharded_param_bytes"]["per_rank"], m["sharded_param_bytes"]["full"]
    assert len(local) == 2 and all(0 < b < full for b in local) and sum(local) <= full * 1.01, m["sharded_param_bytes"]
    a, b = root / run / stage / "final", root / reference / stage / "final"
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    assert _tensors(a / "model.safetensors") == _tensors(b / "model.safetensors")


def test_a_hung_launch_fails_with_every_ranks_stack():
    with pytest.raises(AssertionError) as e:
        run_multiproc("hang", script=REPO / "tests" / "fixtures" / "hang.py", timeout=20)
    text = str(e.value)
    assert "still running after 20 s" in text
    assert "in rank_0_sleeps" in text and "in rank_1_waits_in_a_barrier" in text, text[-3000:]


def test_reward_stage_sharded(smoke_chain):
    root = smoke_chain
    run_multiproc(
        "reward", *SMOKE, f"paths.root={root}", "run=fsdp", "parent_run=default", "train.batch_size=8", config=FSDP
    )
    check_sharded_and_whole(root, "fsdp", "reward")
    one, two = (_manifest(root, r, "reward")["metrics"] for r in ("default", "fsdp"))
    print(f"reward eval/loss: 1 process {one['eval/loss']:.4f}, FSDP on 2 processes {two['eval/loss']:.4f}")
    assert abs(one["eval/loss"] - two["eval/loss"]) < 0.1
    assert two["eval/pairs"] == one["eval/pairs"]


def test_gathered_generation_costs_one_all_gather_per_group(tmp_path):
    # PPO's rollout phase: inside full_weights every FSDP group is gathered once, however many tokens follow; the
    # same generation without it gathers every block again at each token (the counts show the test can tell)
    out = tmp_path / "gathers.json"
    run_multiproc("count_gathers", str(out), script=REPO / "tests" / "fixtures" / "count_gathers.py", timeout=300)
    n = json.loads(out.read_text())
    print(n)
    assert n["full_weights"] == {"4": n["groups"], "12": n["groups"]}
    assert n["per_forward"]["12"] > n["per_forward"]["4"] > n["groups"]


# The slow matrix (make test-slow): every stage and method under FSDP2, each from the one-process smoke chain's
# parents (parent_run=default), each checked as sharded (where it trains) and as whole as one process's final/.
# The batch overrides halve the per-process batch, so the global batch is the one-process run's.
MATRIX = {
    "pretrain": ["train.batch_size=4"],
    "sft": ["train.batch_size=4"],
    "ppo": ["train.rollout_batch_size=4", "train.minibatch_size=2"],
    "dpo": [],
    "rloo": [],
    "grpo": [],
    "bon": [],
    "expert_iteration": [],
}
TRAINS = {"pretrain", "sft", "ppo", "dpo", "rloo", "grpo"}  # the stages that prepare a model to train


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(MATRIX))
def test_every_stage_and_method_under_fsdp(smoke_chain, stage):
    root = smoke_chain
    if stage not in ("pretrain", "sft"):  # smoke_chain ran those (and reward)
        from conftest import run_stage

        if not (root / "default" / stage / "final").exists():
            run_stage(stage, *SMOKE, f"paths.root={root}")  # the one-process reference
    run_multiproc(stage, *SMOKE, f"paths.root={root}", "run=fsdp", "parent_run=default", *MATRIX[stage], config=FSDP)
    m = _manifest(root, "fsdp", stage)
    assert m["status"] == "complete" and m["launch"]["parallelism"] == "fsdp", m.get("launch")
    if stage in TRAINS:
        check_sharded_and_whole(root, "fsdp", stage)


# Each training stage killed right after its first checkpoint (every rank exits at once, as a SIGKILL of the job
# leaves it), then run again: it resumes from the sharded checkpoint and logs what an uninterrupted FSDP run logged.
# The Trainer stages go through test_faults' driver, which crashes after the Trainer's own checkpoint save.
RESUMED = {"pretrain": MATRIX["pretrain"], "sft": MATRIX["sft"], "reward": ["train.batch_size=8"], "ppo": MATRIX["ppo"]}


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(RESUMED))
def test_a_stage_resumes_from_a_sharded_checkpoint(smoke_chain, stage, tmp_path):
    from conftest import compose_stage
    from test_faults import CRASHING_TRAINER, resumed_against_straight

    root, common = smoke_chain, [*SMOKE, f"paths.root={smoke_chain}", "parent_run=default", *RESUMED[stage]]
    if stage == "ppo" and not (root / "default" / "ppo" / "final").exists():
        from conftest import run_stage

        run_stage("ppo", *SMOKE, f"paths.root={root}")  # PPO's parents are the chain's; this is only its reference
    trainer = stage in ("sft", "reward")
    driver = tmp_path / "crashing_trainer.py"
    driver.write_text(CRASHING_TRAINER)
    launch = dict(script=driver) if trainer else {}
    head = [stage] if trainer else []  # the driver's first argument: the stage it runs
    run_multiproc(stage, *head, *common, "run=fsdp-straight", config=FSDP, **launch)
    step = compose_stage(stage, SMOKE).train.save_every
    p = run_multiproc(
        stage,
        *head,
        *common,
        "run=fsdp-killed",
        config=FSDP,
        env={"PIPELINE_CRASH_AT_STEP": str(step)},
        check=False,
        **launch,
    )
    assert p.returncode != 0 and _manifest(root, "fsdp-killed", stage)["status"] == "running", p.stderr[-3000:]
    run_multiproc(stage, *head, *common, "run=fsdp-killed", config=FSDP, **launch)
    m = _manifest(root, "fsdp-killed", stage)
    assert m["status"] == "complete" and m["resumed_from"] == step and m["launch"]["parallelism"] == "fsdp", m
    _, _, worst = resumed_against_straight(root, "fsdp-killed", "fsdp-straight", stage, step)
    print(f"\n{stage} under FSDP: killed after step {step}; largest difference from the uninterrupted run {worst:.3g}")
    assert worst <= 1e-6
