"""pipeline/rl (ops, advantages, losses, shaping) against hand-computed numbers (the arithmetic is written out in
comments)."""

import math

import pytest
import torch

from pipeline.rl.advantages import gae
from pipeline.rl.losses import policy_loss, value_loss
from pipeline.models.tokens import ended, first_true_index, logprobs_from_logits, response_mask
from pipeline.rl.ops import (
    ema_update,
    entropy_from_logits,
    explained_variance,
    kl_estimate,
    masked_mean,
    masked_var,
    masked_whiten,
)
from pipeline.rl.shaping import AdaptiveKLController, FixedKLController, penalised_rewards

NAN, INF = float("nan"), float("inf")


def close(actual, expected, atol=1e-6):
    actual, expected = torch.as_tensor(actual).double(), torch.tensor(expected).double()
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


# ---------------------------------------------------------------- log-probs and entropy


def test_logprobs_from_logits_with_temperature():
    logits = torch.log(torch.tensor([[[1.0, 2.0, 1.0], [1.0, 1.0, 2.0]]]))  # probs [.25 .5 .25], [.25 .25 .5]
    labels = torch.tensor([[1, 0]])
    close(logprobs_from_logits(logits, labels), [[math.log(0.5), math.log(0.25)]])
    # tau = 2: softmax(log(p) / 2) is proportional to sqrt(p): [1, sqrt2, 1] / (2 + sqrt2)
    s = math.sqrt(2)
    expected = [[math.log(s / (2 + s)), math.log(1 / (2 + s))]]
    close(logprobs_from_logits(logits, labels, temperature=2.0), expected)


def test_logprobs_upcast_bf16():
    logits = torch.log(torch.tensor([[[1.0, 2.0, 1.0]]])).bfloat16()
    out = logprobs_from_logits(logits, torch.tensor([[1]]))
    assert out.dtype == torch.float32


def test_entropy_from_logits():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [math.log(0.25), math.log(0.75), -1e4, -1e4]]])
    h2 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))  # 0.562335
    close(entropy_from_logits(logits), [[math.log(4), h2]])


# ---------------------------------------------------------------- masked statistics

X = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, NAN, INF]])
M = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])


def test_masked_mean_ignores_garbage_in_padding():
    close(masked_mean(X, M), 3.0)  # (1+2+3+4+5)/5
    close(masked_mean(X, M.float(), dim=1), [2.0, 4.5])
    close(masked_mean(X, torch.zeros_like(M)), 0.0)  # empty selection -> 0, not NaN


def test_masked_var():
    # squared deviations from 3: 4 1 0 1 4 -> 10
    close(masked_var(X, M), 2.5)
    close(masked_var(X, M, unbiased=False), 2.0)
    with pytest.raises(ValueError):
        masked_var(X, torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]]))


def test_masked_whiten():
    z = [(v - 3) / math.sqrt(2.5) for v in (1, 2, 3, 4, 5)]  # -1.2649, -0.6325, 0, 0.6325, 1.2649
    expected = [[z[0], z[1], z[2], 0.0], [z[3], z[4], 0.0, 0.0]]
    close(masked_whiten(X, M), expected, atol=1e-5)
    # different garbage in the padding changes nothing
    close(masked_whiten(X.nan_to_num(1e6, 1e6, 1e6), M), expected, atol=1e-5)
    scaled = [[z[0] + 3, z[1] + 3, z[2] + 3, 0.0], [z[3] + 3, z[4] + 3, 0.0, 0.0]]
    close(masked_whiten(X, M, shift_mean=False), scaled, atol=1e-5)


def test_explained_variance():
    R = torch.tensor([[1.0, 2.0, 3.0, 4.0, 50.0]])
    m = torch.tensor([[1, 1, 1, 1, 0]])
    close(explained_variance(R, R, m), 1.0)
    close(explained_variance(torch.zeros_like(R), R, m), 0.0)
    # residual [0,0,0,-1]: var 0.1875 ; var(R) = 1.25 -> 1 - 0.15
    close(explained_variance(torch.tensor([[1.0, 2.0, 3.0, 5.0, -9.0]]), R, m), 0.85)
    assert torch.isnan(explained_variance(R, torch.ones_like(R), m))


# ---------------------------------------------------------------- response masks


def test_first_true_index():
    b = torch.tensor([[False, True, False, True], [False] * 4, [True, False, False, False]])
    assert first_true_index(b).tolist() == [1, 4, 0]


def test_response_mask_and_ended():
    eos, pad = 2, 0
    ids = torch.tensor(
        [
            [5, 6, 2, 0],  # eos at 2, padding after
            [5, 2, 7, 2],  # tokens after the first eos are excluded, even a second eos
            [5, 6, 7, 8],  # truncated: no eos, all real
            [5, 0, 0, 0],  # truncated and padded (pad != eos): pad excluded
        ]
    )
    expected = [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert response_mask(ids, eos, pad).int().tolist() == expected
    assert ended(ids, eos).tolist() == [True, True, False, False]
    # pad == eos (common for base tokenizers): the first eos is real, the rest is padding
    assert response_mask(torch.tensor([[5, 2, 2, 2]]), 2, 2).int().tolist() == [[1, 1, 0, 0]]
    # several end-of-turn ids
    assert response_mask(torch.tensor([[5, 3, 9, 9]]), (2, 3), 9).int().tolist() == [[1, 1, 0, 0]]
    assert ended(torch.tensor([[5, 3, 9], [5, 6, 9]]), [2, 3]).tolist() == [True, False]


# ---------------------------------------------------------------- KL and rewards


def test_kl_estimators():
    logp = torch.log(torch.tensor([0.5, 0.25]))
    ref = torch.log(torch.tensor([0.25, 0.5]))
    ln2 = math.log(2)
    close(kl_estimate(logp, ref, "k1"), [ln2, -ln2])
    close(kl_estimate(logp, ref, "k2"), [0.5 * ln2**2, 0.5 * ln2**2])  # 0.240227
    # r = ref/pi = 0.5 -> (0.5 - 1) - ln 0.5 = 0.193147 ; r = 2 -> 1 - ln 2 = 0.306853
    close(kl_estimate(logp, ref, "k3"), [-0.5 + ln2, 1 - ln2])
    close(kl_estimate(logp, ref, "abs"), [ln2, ln2])
    with pytest.raises(ValueError):
        kl_estimate(logp, ref, "k4")


def test_penalised_rewards_score_at_last_real_token():
    score = torch.tensor([1.0, -2.0, 0.5])
    ref = torch.zeros(3, 4)
    logp = torch.tensor([[0.1, 0.2, 0.3, 9.0], [0.5, -0.5, 9.0, NAN], [0.1, 0.1, 0.1, 0.1]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    rewards, kl = penalised_rewards(score, logp, ref, mask, kl_coef=0.1)
    close(kl, [[0.1, 0.2, 0.3, 0.0], [0.5, -0.5, 0.0, 0.0], [0.1, 0.1, 0.1, 0.1]])
    close(
        rewards, [[-0.01, -0.02, -0.03 + 1.0, 0.0], [-0.05, 0.05 - 2.0, 0.0, 0.0], [-0.01, -0.01, -0.01, -0.01 + 0.5]]
    )
    # k3 penalty is >= 0 everywhere, so every non-final reward is <= 0
    rewards3, kl3 = penalised_rewards(score, logp, ref, mask, kl_coef=0.1, kind="k3")
    close(kl3[1, :2], [math.exp(-0.5) - 1 + 0.5, math.exp(0.5) - 1 - 0.5])
    assert (kl3 >= 0).all()


def test_penalised_rewards_empty_row_gets_nothing():
    zeros = torch.zeros(1, 3)
    rewards, _ = penalised_rewards(torch.tensor([3.0]), zeros, zeros, zeros, kl_coef=0.1)
    close(rewards, [[0.0, 0.0, 0.0]])


# ---------------------------------------------------------------- GAE


def test_gae_gamma1_lam1_is_reward_to_go_minus_value():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 100.0]])  # last entry is padding garbage
    values = torch.tensor([[0.5, 1.0, 1.5, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    close(ret, [[6.0, 5.0, 3.0, 0.0]])
    close(adv, [[5.5, 4.0, 1.5, 0.0]])


def test_gae_hand_worked_gamma09_lam095():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 1.0, 7.0]])
    values = torch.tensor([[0.1, 0.2, 0.3], [0.2, 0.4, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.95)  # gamma * lam = 0.855
    # row 0: d2 = 1 - .3 = .7             A2 = .7
    #        d1 = .9*.3 - .2 = .07        A1 = .07 + .855*.7 = .6685
    #        d0 = .9*.2 - .1 = .08        A0 = .08 + .855*.6685 = .6515675
    # row 1: value after the last real token is 0, not the 9.0 in the padding
    #        d1 = 1 - .4 = .6             A1 = .6
    #        d0 = .5 + .9*.4 - .2 = .66   A0 = .66 + .855*.6 = 1.173
    close(adv, [[0.6515675, 0.6685, 0.7], [1.173, 0.6, 0.0]])
    close(ret, [[0.7515675, 0.8685, 1.0], [1.373, 1.0, 0.0]])


# ---------------------------------------------------------------- policy and value losses


def test_policy_loss_clipping_and_stats():
    ratios = torch.tensor([[1.5, 0.9, 0.5, 1.1], [1.5, 0.5, 1.0, 1.0]])
    old = torch.zeros(2, 4)
    logp = ratios.log()
    logp[1, 2:] = torch.tensor([1000.0, NAN])  # padding garbage: exp would be inf / NaN
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0], [-1.0, 1.0, 5.0, NAN]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    loss, st = policy_loss(logp, old, adv, mask, clip_range=0.2)
    # per token max(-A rho, -A clip(rho, .8, 1.2)):
    #   (1.5, +) -> max(-1.5, -1.2) = -1.2 clipped   (0.9, +) -> -0.9
    #   (0.5, -) -> max( 0.5,  0.8) =  0.8 clipped   (1.1, -) ->  1.1
    #   (1.5, -) -> max( 1.5,  1.2) =  1.5 NOT clipped (pessimistic side)
    #   (0.5, +) -> max(-0.5, -0.8) = -0.5 NOT clipped
    close(loss, (-1.2 - 0.9 + 0.8 + 1.1 + 1.5 - 0.5) / 6)  # 0.133333
    close(st["clipfrac"], 2 / 6)
    close(st["ratio_mean"], 1.0)  # (1.5+.9+.5+1.1+1.5+.5)/6
    close(st["ratio_max"], 1.5)
    close(st["ratio_min"], 0.5)
    sq = [math.log(r) ** 2 for r in (1.5, 0.9, 0.5, 1.1, 1.5, 0.5)]
    close(st["approx_kl"], 0.5 * sum(sq) / 6, atol=1e-5)


def test_policy_loss_gradient_sign():
    logp = torch.tensor([[0.0, 0.0, 0.0, math.log(1.5)]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0, 2.0, 1.0]])
    mask = torch.ones(1, 4)
    loss, _ = policy_loss(logp, torch.zeros(1, 4), adv, mask, clip_range=0.2)
    loss.backward()
    # unclipped at rho = 1: d/dlogp (-A rho / N) = -A / 4; clipped token: no gradient
    close(logp.grad, [[-0.25, 0.25, -0.5, 0.0]])
    assert logp.grad[0, 0] < 0 and logp.grad[0, 2] < 0  # positive advantage -> raise logp


def test_value_loss_clipping():
    values = torch.tensor([[0.5, 0.1, -0.5, NAN]], requires_grad=True)
    old = torch.tensor([[0.0, 0.0, 0.0, NAN]])
    returns = torch.tensor([[1.0, 1.0, 0.0, 3.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, st = value_loss(values, old, returns, mask, clip_range_value=0.2)
    # v=.5 -> clipped .2, R=1: max(.25, .64) = .64 clipped
    # v=.1 -> .1, R=1: .81 both, not clipped
    # v=-.5 -> clipped -.2, R=0: max(.25, .04) = .25 not clipped
    close(loss, 0.5 * (0.64 + 0.81 + 0.25) / 3)  # 0.283333
    close(st["vf_clipfrac"], 1 / 3)
    loss.backward()
    # d/dv 0.5 * (v-R)^2 / 3 = (v-R)/3 where unclipped; 0 where the clipped branch wins or masked
    close(values.grad, [[0.0, -0.9 / 3, -0.5 / 3, 0.0]])


# ---------------------------------------------------------------- controllers, moments, EMA


def test_adaptive_kl_controller():
    c = AdaptiveKLController(init_coef=0.1, target=6.0, horizon=10000)
    c.update(6.6, n_steps=256)  # e = .1 -> x (1 + .1 * 256 / 1e4) = 1.00256
    assert c.value == pytest.approx(0.100256)
    c.update(100.0, n_steps=256)  # e clipped to .2 -> x 1.00512
    assert c.value == pytest.approx(0.100256 * 1.00512)
    c.update(0.0, n_steps=256)  # e = -1 clipped to -.2 -> x 0.99488
    assert c.value == pytest.approx(0.100256 * 1.00512 * 0.99488)
    f = FixedKLController(0.05)
    f.update(100.0, 256)
    assert f.value == 0.05


def test_ema_update():
    target = [torch.nn.Parameter(torch.tensor([1.0, 2.0])), torch.tensor([0.0])]
    online = [torch.tensor([3.0, 4.0]), torch.tensor([10.0], dtype=torch.bfloat16)]
    ema_update(target, online, decay=0.9)  # .9 * t + .1 * o
    close(target[0].detach(), [1.2, 2.2])
    close(target[1], [1.0])
    with pytest.raises(ValueError):
        ema_update(target, online[:1], decay=0.9)


def test_unfinished_replies_score_below_every_finished_one():
    from pipeline.rl.shaping import penalise_unfinished

    score = torch.tensor([0.5, -2.0, 1.5, -0.5, -3.0])
    ended = torch.tensor([True, True, False, True, False])
    # lowest finished: -2.0; unfinished: min(own, -2.0) - 1 -> -3.0 and -4.0
    out = penalise_unfinished(score, ended, 1.0)
    torch.testing.assert_close(out, torch.tensor([0.5, -2.0, -3.0, -0.5, -4.0]))
    assert out[~ended].max() < out[ended].min()
    # no finished reply in the batch: own score minus the penalty; all finished: unchanged
    torch.testing.assert_close(penalise_unfinished(score[[2, 4]], ended[[2, 4]], 0.5), torch.tensor([1.0, -3.5]))
    torch.testing.assert_close(penalise_unfinished(score, torch.ones(5, dtype=torch.bool), 1.0), score)


def test_token_sum_losses_add_up_to_the_batch_mean():
    """With n_tokens, the losses of the parts of a batch sum to the loss of the whole (a token mean)."""
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, 0.0]])
    old = torch.tensor([[-1.1, -1.8, -0.5], [-0.3, -0.9, 0.0]])
    adv = torch.tensor([[1.0, -0.5, 2.0], [0.3, 1.2, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    whole, _ = policy_loss(logp, old, adv, mask, 0.2)
    parts = sum(policy_loss(logp[[b]], old[[b]], adv[[b]], mask[[b]], 0.2, n_tokens=5)[0] for b in range(2))
    torch.testing.assert_close(parts, whole)
    v, r = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]]), torch.tensor([[1.0, 0.0, 0.5], [0.2, 0.1, 9.0]])
    whole, _ = value_loss(v, v * 0.5, r, mask, 0.2)
    parts = sum(value_loss(v[[b]], v[[b]] * 0.5, r[[b]], mask[[b]], 0.2, n_tokens=5)[0] for b in range(2))
    torch.testing.assert_close(parts, whole)
    # by hand: row 0 holds 3 of the 5 tokens, so its token-mean loss counts 3/5, not 1/2
    row0, _ = value_loss(v[[0]], v[[0]] * 0.5, r[[0]], mask[[0]], 0.2)
    torch.testing.assert_close(value_loss(v[[0]], v[[0]] * 0.5, r[[0]], mask[[0]], 0.2, n_tokens=5)[0], row0 * 3 / 5)
