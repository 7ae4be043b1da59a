"""stages/ppo.py's pieces: the minibatch objective does not depend on train.grad_accum; the frozen reference runs
under the policy's mixed precision (KL 0 at the start under bf16); the final evaluation's figures, greedy and
sampled, and how the report card and the over-optimisation plot show them."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_rollout import _config, _rollout
from transformers import LlamaForCausalLM, LlamaForSequenceClassification

from pipeline.eval.gold import eval_metrics
from pipeline.models.token_model import TokenModel
from pipeline.trainers.ppo import minibatch_backward

REPO = Path(__file__).resolve().parents[1]


def _grads(micro: int, ptx: bool = False):
    torch.manual_seed(0)
    policy = TokenModel(LlamaForCausalLM(_config()))
    critic = TokenModel(LlamaForSequenceClassification(_config()))
    ro = _rollout([6, 2, 4, 1, 3, 5], [5, 1, 3, 2, 5, 4])  # replies of very different lengths
    g = torch.Generator().manual_seed(1)
    B, R = ro.response_ids.shape
    old_logp = -torch.rand(B, R, generator=g) - 1
    adv, old_v, ret = (torch.randn(B, R, generator=g) for _ in range(3))
    t = SimpleNamespace(temperature=0.7, clip_range=0.2, clip_range_value=0.2, vf_coef=0.1, ptx_coef=0.5)
    blocks = torch.randint(2, 40, (8, 6), generator=g)
    draws = iter([[0, 1], [2, 3], [4, 5], [6, 7], [0, 1], [2, 3]])

    def ptx_loss():  # the same blocks whatever the split: one block pair per micro-batch of 2 episodes
        x = blocks[next(draws)] if micro == 2 else blocks[[0, 1, 2, 3, 4, 5]]
        n, L = x.shape
        logits = policy(x, torch.arange(L).expand(n, L), None, torch.arange(n * L).view(n, L)[:, :-1])
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())

    mb = torch.tensor([0, 1, 2, 3, 4, 5])
    stats = minibatch_backward(
        policy,
        critic,
        ro,
        mb,
        micro,
        old_logp,
        adv,
        old_v,
        ret,
        t,
        0,
        lambda loss: loss.backward(),
        ptx_loss if ptx else None,
    )
    return [p.grad.clone() for m in (policy, critic) for p in m.parameters()], stats


@pytest.mark.parametrize("micro", [1, 4])
def test_gradients_do_not_depend_on_grad_accum(micro):
    whole, s1 = _grads(6)
    split, s2 = _grads(micro)
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    for k in ("pg", "vf", "entropy", "clipfrac", "approx_kl", "ratio_mean", "ratio_max"):
        assert s1[k] == pytest.approx(s2[k], abs=1e-6), k


def test_ptx_term_counts_by_episode_share():
    """Three micro-batches of two, each its own two ptx blocks, weigh 1/3 each: the mean over the six blocks."""
    whole, _ = _grads(6, ptx=True)
    split, _ = _grads(2, ptx=True)
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


AUTOCAST_SCRIPT = """
import copy, torch
from accelerate import Accelerator
from transformers import LlamaForCausalLM
from tests.test_rollout import _config, _rollout
from pipeline.models.token_model import TokenModel
from pipeline.rl.forward import policy_forward
acc = Accelerator(mixed_precision="bf16", cpu=True)
torch.manual_seed(0)
lm = LlamaForCausalLM(_config())
ref_model = copy.deepcopy(lm).eval().requires_grad_(False)
policy = acc.prepare(TokenModel(lm))
ro = _rollout([6, 2, 4, 1], [5, 1, 3, 2])
m = ro.response_mask
with torch.no_grad():
    pol = policy_forward(policy, ro, 0.7)
    ref = policy_forward(TokenModel(ref_model, autocast=acc.autocast), ro, 0.7)  # as stages/ppo.py builds it
    plain = policy_forward(TokenModel(ref_model), ro, 0.7)  # the old reference: fp32
same, old = float((pol - ref).abs()[m].max()), float((pol - plain).abs()[m].max())
print("kl0", same, old, flush=True)
assert same == 0.0, same
assert old > 1e-5, old  # bf16 autocast really changes the numbers here, so the check above means something
"""


def test_the_reference_runs_under_the_policys_autocast(tmp_path):
    """Under bf16 (accelerate's CPU autocast) the frozen reference computes exactly the prepared policy's
    log-probs at the start, so the per-token KL is 0; without the autocast it would not be."""
    script = tmp_path / "autocast.py"
    script.write_text(AUTOCAST_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "kl0 0.0" in p.stdout, p.stdout[-2000:] + p.stderr[-3000:]


def test_eval_metrics_by_hand():
    ppo = {
        "gold": [0.5, 0.8, 0.2, 0.6],
        "kl": [1.0, 2.0, 3.0, 2.0],
        "reward": [1.0, 0.0, 2.0, 1.0],
        "length": [10, 20, 30, 20],
        "components": [
            {"total": 0.5, "a": 1.0},
            {"total": 0.8, "a": 0.0},
            {"total": 0.2, "a": 1.0},
            {"total": 0.6, "a": 0.0},
        ],
    }
    sft = {
        "gold": [0.5, 0.4, 0.3, 0.9],
        "kl": [0.0] * 4,
        "reward": [0.0, 0.0, 1.0, 1.0],
        "length": [5] * 4,
        "components": [{"total": g, "a": 0.5} for g in (0.5, 0.4, 0.3, 0.9)],
    }
    m = eval_metrics(ppo, sft, "eval/sampled")
    assert m["eval/sampled/gold_score"] == pytest.approx(0.525) and m["eval/sampled/sft_gold_score"] == 0.525
    # wins: 0.8 > 0.4; tie 0.5 = 0.5 counts half; losses 0.2 < 0.3, 0.6 < 0.9
    assert m["eval/sampled/win_rate_vs_sft"] == pytest.approx(1.5 / 4)
    assert m["eval/sampled/tie_rate_vs_sft"] == pytest.approx(0.25)
    assert m["eval/sampled/kl"] == 2.0 and m["eval/sampled/reward"] == 1.0 and m["eval/sampled/sft_reward"] == 0.5
    assert m["eval/sampled/gold/a"] == 0.5 and m["eval/sampled/sft_gold/a"] == 0.5
    assert m["eval/sampled/response_tokens"] == 20 and m["eval/sampled/n_prompts"] == 4
    assert "eval/gold_score" in eval_metrics(ppo, sft)  # the greedy headline keeps its names


def test_report_rows_show_greedy_and_sampled():
    from pipeline.report.card import decoding_rows

    m = {
        "eval/gold_score": 0.6,
        "eval/sft_gold_score": 0.5,
        "eval/sampled/gold_score": 0.55,
        "eval/sampled/sft_gold_score": 0.45,
        "eval/win_rate_vs_sft": 0.6,
        "eval/sampled/win_rate_vs_sft": 0.58,
        "eval/gold/a": 0.7,
        "eval/sampled/sft_gold/a": 0.2,
    }
    rows = decoding_rows(m, {"a": 1.0})
    assert rows[0] == ("gold score", 0.5, 0.6, 0.45, 0.55)
    assert rows[1] == ("win rate vs SFT (ties half)", None, 0.6, None, 0.58)
    assert rows[-1] == ("gold: a", None, 0.7, 0.2, None)
    assert decoding_rows({}, {"a": 1.0}) == []


def test_overoptimization_plot_with_periodic_evaluations(tmp_path):
    from pipeline.report.plots import overoptimization_plot

    history = [
        {"iteration": i + 1, "kl": 0.1 * i + (0.3 if i % 2 else 0.0), "reward": 0.1 * i, "gold": 0.5} for i in range(10)
    ]
    periodic = [{"iteration": i, "kl": 0.1 * i, "reward": 0.1 * i, "gold": 0.5 - 0.01 * i} for i in (0, 5, 10)]
    for p in (periodic, None):
        out = overoptimization_plot(history, tmp_path / f"o{p is None}.png", "t", periodic=p)
        assert out.stat().st_size > 1000


# ---- the two defects of issue 25: dropout left on in Llama's attention, the critic on the reward model's scale ----
def test_disable_dropout_makes_two_train_mode_forwards_equal():
    """model.dropout > 0 builds Llama attention with its own copy of the rate: zeroing the config alone left it on,
    so PPO's training forward (train mode) did not compute the rollout's log-probs."""
    from pipeline.models.token_model import disable_dropout

    cfg = _config()
    cfg.attention_dropout = 0.5
    torch.manual_seed(0)
    for model in (LlamaForCausalLM(cfg), LlamaForSequenceClassification(cfg)):
        x = torch.randint(2, cfg.vocab_size, (3, 9))
        model.train()
        with torch.no_grad():  # the rate really is applied before: the check below can fail
            assert not torch.equal(model(x).logits, model(x).logits)
        disable_dropout(model)
        assert all(m.attention_dropout == 0.0 for m in model.modules() if hasattr(m, "attention_dropout"))
        with torch.no_grad():
            torch.testing.assert_close(model(x).logits, model(x).logits, rtol=0, atol=0)


def test_critic_from_the_reward_model_starts_on_the_normalised_scale():
    """fold_normalisation: the critic's head outputs (raw - mean) / std at every position, what the returns are
    built from. Reward stats as measured on the default run's reward model: mean -0.66, std 0.76."""
    from pipeline.models.token_model import fold_normalisation
    from pipeline.rl.readout import read_reward

    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(_config()).eval()
    critic = LlamaForSequenceClassification(_config()).eval()
    critic.load_state_dict(rm.state_dict())
    fold_normalisation(critic, -0.66, 0.76)
    assert critic.score.bias is not None and critic.score.bias.requires_grad
    ro = _rollout([6, 2, 4, 1, 3], [5, 1, 3, 2, 5])
    raw = read_reward(TokenModel(rm), ro)
    torch.testing.assert_close(read_reward(TokenModel(critic), ro), (raw + 0.66) / 0.76, rtol=1e-5, atol=1e-5)
    # and with a head that already has a bias b: (W h + b - mean) / std
    fold_normalisation(critic, 1.0, 2.0)
    torch.testing.assert_close(
        read_reward(TokenModel(critic), ro), ((raw + 0.66) / 0.76 - 1.0) / 2.0, rtol=1e-5, atol=1e-5
    )


def test_the_stages_critic_has_the_normalised_score_s_statistics(smoke_chain):
    """On the smoke run: the reward model folded with its own reward_stats (as stages/ppo.py builds the critic)
    scores the very answers those statistics were measured on with mean 0 and standard deviation 1."""
    import json

    from conftest import compose_stage

    from pipeline.eval.reward_model import reward_stats
    from pipeline.data.formats import load_prompts
    from pipeline.models.loading import load_policy, load_sequence_classifier
    from pipeline.models.token_model import fold_normalisation

    m = json.loads((smoke_chain / "default" / "reward" / "manifest.json").read_text())
    cfg = compose_stage("reward", ["preset=smoke", "logger=none", f"paths.root={smoke_chain}"])
    policy, tok = load_policy(smoke_chain / "default" / "sft" / "final", "fp32", "cpu")
    critic = load_sequence_classifier(smoke_chain / "default" / "reward" / "final").eval()
    critic.config.pad_token_id = tok.pad_token_id
    fold_normalisation(critic, m["reward_stats"]["mean"], m["reward_stats"]["std"])
    prompts, _ = load_prompts(cfg.data.prompts, cfg.data.world, cfg.paths.cache)
    got = reward_stats(policy, critic, tok, prompts[: cfg.train.stats_prompts], cfg)
    assert abs(m["reward_stats"]["mean"]) > 1e-3 or abs(m["reward_stats"]["std"] - 1) > 1e-3  # a real change
    assert got["mean"] == pytest.approx(0.0, abs=1e-4) and got["std"] == pytest.approx(1.0, abs=1e-4)
