"""Every stage under `accelerate launch` with 2 CPU processes (gloo, conf/accelerate/cpu2.yaml), as a multi-GPU
launch runs it, compared with the single-process smoke chain (conftest's smoke_chain, run=default). Each
process takes half the per-device batch, so the global batch matches the single-process run; the data each
process sees differs from the single-process order (sharding), so the metrics agree within a tolerance, not
exactly. Exact agreement is tested where it holds: pretraining against gradient accumulation
(test_pretrain_e2e.py), the critic's gradient all-reduce (test_rollout.py)."""

import json

import pytest
from conftest import SMOKE, compose_stage, run_multiproc
from test_ppo_e2e import check_greedy_eval

PPO_OVERRIDES = ["train.rollout_batch_size=4", "train.minibatch_size=2"]  # half the per-process batch


def _manifest(root, run, stage):
    return json.loads((root / run / stage / "manifest.json").read_text())


@pytest.fixture(scope="module")
def two_proc_chain(smoke_chain):
    common = [*SMOKE, f"paths.root={smoke_chain}", "run=mp"]
    run_multiproc("tokenizer", *common)
    run_multiproc("pretrain", *common, "train.batch_size=4")
    run_multiproc("sft", *common, "train.batch_size=4")
    run_multiproc("reward", *common, "train.batch_size=8")
    p = run_multiproc("ppo", *common, *PPO_OVERRIDES)
    return smoke_chain, p


def test_every_stage_completes_once(two_proc_chain):
    root, ppo = two_proc_chain
    for stage in ("tokenizer", "pretrain", "sft", "reward", "ppo"):
        m = _manifest(root, "mp", stage)
        assert m["status"] == "complete", stage
        assert (root / "mp" / stage / "final").is_dir() and not (root / "mp" / stage / "final.tmp").exists()
    # one process reports (rank 0 prints), and it saw both processes' episodes
    assert ppo.stdout.count("[ppo] greedy: gold score") == 1, ppo.stdout[-2000:]
    rows = [json.loads(x) for x in (root / "mp" / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert sum("ppo/kl" in r for r in rows) == 4  # smoke: 4 iterations, logged once each (not once per process)


def test_results_agree_with_one_process(two_proc_chain):
    root, _ = two_proc_chain
    tok = lambda run: (root / run / "tokenizer" / "final" / "tokenizer.json").read_text()  # noqa: E731
    assert tok("mp") == tok("default")  # the main process trained it on the same documents
    one, two = (lambda s: _manifest(root, "default", s)["metrics"]), (lambda s: _manifest(root, "mp", s)["metrics"])
    assert two("pretrain")["train/tokens"] == one("pretrain")["train/tokens"]
    for stage, tol in (("pretrain", 0.05), ("sft", 0.1), ("reward", 0.1)):
        a, b = one(stage)["eval/loss"], two(stage)["eval/loss"]
        print(f"{stage} eval/loss: 1 process {a:.4f}, 2 processes {b:.4f}")
        assert abs(a - b) < tol, (stage, a, b)
    assert two("reward")["eval/pairs"] == one("reward")["eval/pairs"]  # evaluation sharded, then gathered whole
    assert two("reward")["onpolicy/prompts"] == one("reward")["onpolicy/prompts"]  # sampled sharded, gathered
    ids = [
        json.loads(x)["id"] for x in (root / "mp" / "reward" / "onpolicy_comparisons.jsonl").read_text().splitlines()
    ]
    assert len(ids) == len(set(ids)) == two("reward")["onpolicy/ranked_prompts"] > 0
    assert two("ppo")["eval/n_prompts"] == compose_stage("ppo", SMOKE).train.eval_prompts  # sharded, gathered
    # the gathered evaluation: every held-out prompt once, back in prompt order, each reply beside its own prompt
    # with that prompt's gold score, the replies those of each process's shard, win and tie rates from those rows,
    # and the KL recomputed from the 2-process run's PPO and SFT checkpoints; the policy moved, so that KL is positive
    assert check_greedy_eval(root, "mp", PPO_OVERRIDES, nproc=2) > 0


@pytest.mark.slow
@pytest.mark.parametrize("method", ["bon", "dpo", "expert_iteration", "rloo", "grpo"])
def test_method_stages_under_two_processes(two_proc_chain, method):
    """Each method stage under 2 processes on the 2-process chain: it completes once, one process reports, and its
    evaluation gathered every held-out prompt, as the single-process run of the same stage does."""
    root, _ = two_proc_chain
    p = run_multiproc(method, *SMOKE, f"paths.root={root}", "run=mp")
    m = _manifest(root, "mp", method)
    assert m["status"] == "complete" and (root / "mp" / method / "final").is_dir(), method
    assert p.stdout.count(f"[{method}] sampled: gold") == 1, p.stdout[-2000:]
    assert m["metrics"]["eval/sampled/n_prompts"] == compose_stage(method, SMOKE).eval.prompts
