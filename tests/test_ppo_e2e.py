"""PPO end to end on the smoke chain: the stage's contract, and that it really learns."""

import json
import shutil

import pytest
from conftest import SMOKE, run_stage

from pipeline.core.io import inventory


def _metrics(root, run, stage):
    return json.loads((root / run / stage / "manifest.json").read_text())["metrics"]


def _curve(root, run, key):
    rows = [json.loads(x) for x in (root / run / "ppo" / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


def test_ppo_stage_contract(smoke_chain):
    run_stage("ppo", *SMOKE, f"paths.root={smoke_chain}")
    m = _metrics(smoke_chain, "default", "ppo")
    for k in ("eval/gold_score", "eval/sft_gold_score", "eval/win_rate_vs_sft", "eval/kl", "eval/reward"):
        assert k in m, k
    assert 0.0 <= m["eval/win_rate_vs_sft"] <= 1.0 and m["eval/kl"] >= 0.0
    # the components are the oracle's: their weighted sum is the gold score, for PPO and for SFT alike
    from pipeline.world.oracle import WEIGHTS
    for who, total in (("gold", "eval/gold_score"), ("sft_gold", "eval/sft_gold_score")):
        parts = sum(w * m[f"eval/{who}/{k}"] for k, w in WEIGHTS.items())
        assert parts == pytest.approx(m[total], abs=1e-6)  # each total is rounded to 6 places
    assert 0.0 <= m["eval/tie_rate_vs_sft"] <= 1.0
    for k in ("eval/sampled/gold_score", "eval/sampled/sft_gold_score", "eval/sampled/win_rate_vs_sft",
              "eval/sampled/tie_rate_vs_sft", "eval/sampled/kl"):
        assert k in m, k
    # held-out evaluations before the first iteration, every train.eval_every (2) and after the last (4)
    assert len(_curve(smoke_chain, "default", "periodic/gold_score")) == 3
    assert _curve(smoke_chain, "default", "periodic/kl")[0] == pytest.approx(0.0, abs=1e-4)  # SFT itself
    d = smoke_chain / "default" / "ppo"
    assert len(json.loads((d / "periodic.json").read_text())) == 3
    assert (d / "overoptimization.png").stat().st_size > 1000
    for key in ("ppo/score", "ppo/gold_score", "ppo/kl", "ppo/kl_coef", "ppo/entropy", "ppo/clipfrac",
                "ppo/approx_kl", "ppo/value_loss", "ppo/explained_variance", "ppo/response_length",
                "ppo/ratio_mean", "ppo/gen_tokens_per_s", "ppo/episodes_per_s", "ppo/grad_norm", "ppo/value_grad_norm"):
        assert len(_curve(smoke_chain, "default", key)) == 4, key
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(d / "final")


def test_ppo_learns_a_trivially_learnable_reward(smoke_chain):
    """Reward 1 when the reply contains 'is': a wrong gradient sign, mask or advantage fails this."""
    run_stage("ppo", *SMOKE, f"paths.root={smoke_chain}", "run=rule", "parent_run=default",
              "train.reward=contains:is", "train.iterations=6", "train.rollout_batch_size=16",
              "train.minibatch_size=8", "optim.lr=1e-3", "train.kl_coef=0", "train.missing_eos_penalty=null",
              "train.save_every=100", "train.eval_prompts=4")
    r = _curve(smoke_chain, "rule", "ppo/reward")
    assert len(r) == 6
    assert sum(r[-2:]) / 2 > sum(r[:2]) / 2 + 0.2, r
    assert _curve(smoke_chain, "rule", "ppo/kl")[-1] > 0.1  # it moved away from the SFT policy to get there


def test_ppo_with_lora_learns_through_the_adapter_against_the_base(smoke_chain):
    """LoRA on the actor: the adapter learns the rule, and the reference is the adapter-disabled base (were it the
    adapted policy itself, the KL would stay 0); final/ is the merged model, a plain checkpoint."""
    run_stage("ppo", *SMOKE, f"paths.root={smoke_chain}", "run=lora", "parent_run=default", "peft=lora",
              "train.reward=contains:is", "train.iterations=6", "train.rollout_batch_size=16",
              "train.minibatch_size=8", "optim.lr=3e-3", "train.kl_coef=0", "train.missing_eos_penalty=null",
              "train.save_every=100", "train.eval_prompts=4")
    r = _curve(smoke_chain, "lora", "ppo/reward")
    assert sum(r[-2:]) / 2 > sum(r[:2]) / 2 + 0.2, r
    assert _curve(smoke_chain, "lora", "ppo/kl")[-1] > 0.1
    final = smoke_chain / "lora" / "ppo" / "final"
    assert (final / "config.json").exists() and not (final / "adapter_config.json").exists()


def test_reward_model_with_another_vocabulary_is_refused(smoke_chain, tmp_path):
    from pipeline.data.tokenizer import train_bpe

    root = tmp_path / "runs"
    for stage in ("sft", "reward"):
        shutil.copytree(smoke_chain / "default" / stage, root / "other" / stage)
    final = root / "other" / "reward" / "final"
    train_bpe([f"zebra {i} quux" for i in range(300)], 300, 1).save_pretrained(final)
    manifest = root / "other" / "reward" / "manifest.json"  # a whole, finished stage: just another vocabulary
    m = json.loads(manifest.read_text())
    m["final_files"] = inventory(final)
    manifest.write_text(json.dumps(m))
    p = run_stage("ppo", *SMOKE, f"paths.root={root}", "run=other", check=False)
    assert p.returncode == 2 and "differs from the policy's" in p.stderr and "Traceback" not in p.stderr
    assert not (root / "other" / "ppo" / "final").exists()


def test_missing_reward_stage_names_the_command(tmp_path):
    p = run_stage("ppo", *SMOKE, f"paths.root={tmp_path}", check=False)
    assert p.returncode == 2 and "make reward" in p.stderr


def test_report_card_and_compare(smoke_chain):
    """The report card and the comparison read the finished stages back: headline metrics, where the gold score
    comes from (each component for pretrained, SFT and PPO), answers side by side; compare lists the runs."""
    from pipeline.world.oracle import WEIGHTS

    common = [*SMOKE, f"paths.root={smoke_chain}"]
    run_stage("ppo", *common)  # already complete when the contract test ran first
    p = run_stage("report", *common, "samples=2")
    assert "PPO gold" in p.stdout
    text = (smoke_chain / "default" / "report.md").read_text()
    assert "| ppo | `eval/win_rate_vs_sft` |" in text and "**Prompt 2.**" in text and "- *ppo* [" in text
    rows = [line for line in text.splitlines() if line.split("|")[1:2] and line.split("|")[1].strip() in WEIGHTS]
    assert len(rows) == len(WEIGHTS)
    m = _metrics(smoke_chain, "default", "ppo")
    for line in rows:
        k, w, pre, sft, sft_ppo, ppo = [c.strip() for c in line.strip("|").split("|")]
        assert float(w) == WEIGHTS[k] and pre != "–" and sft != "–"
        assert float(sft_ppo) == pytest.approx(m[f"eval/sft_gold/{k}"], abs=1e-3)
        assert float(ppo) == pytest.approx(m[f"eval/gold/{k}"], abs=1e-3)
    c = run_stage("compare", f"paths.root={smoke_chain}")
    compared = (smoke_chain / "compare.md").read_text()
    assert "compare:" in c.stdout and "| default |" in compared
    # the PPO stage's periodic held-out evaluations make the over-optimisation figure across runs
    assert (smoke_chain / "default" / "ppo" / "periodic.json").is_file() and "ppo_overoptimization.png" in compared
    assert (smoke_chain / "compare_figs" / "ppo_overoptimization.png").stat().st_size > 1000
    bad = run_stage("compare", f"paths.root={smoke_chain}", "runs=[nope]", check=False)
    assert bad.returncode == 2 and "no such run" in bad.stderr and "Traceback" not in bad.stderr
