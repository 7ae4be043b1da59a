"""PPO's training loop, as a few named steps the stage calls in order (make experience -> update -> log ->
evaluate), and what it keeps to resume exactly. The math is in pipeline/rl/ (pure functions).
"""

from __future__ import annotations

from pipeline.core.errors import UserError
from pipeline.rl.forward import critic_forward, policy_forward
from pipeline.rl.losses import policy_loss, value_loss
from pipeline.rl.ops import masked_mean


class LoopState:
    """What the loop needs besides models and optimizers to resume exactly (saved by accelerate.save_state)."""

    def __init__(self):
        self.kl_coef, self.history, self.ema, self.periodic = None, [], None, []

    def state_dict(self):
        return {"kl_coef": self.kl_coef, "history": self.history, "ema": self.ema, "periodic": self.periodic}

    def load_state_dict(self, sd):
        self.kl_coef, self.history, self.ema = sd["kl_coef"], sd["history"], sd["ema"]
        self.periodic = sd.get("periodic", [])



def _diverged(run, it: int, what: str):
    run.fail(f"non-finite {what} at iteration {it + 1}")
    raise UserError(f"PPO diverged: non-finite {what} at iteration {it + 1}; the last good checkpoint is kept in "
                    f"{run.ckpt_root} (lower optim.lr or raise train.kl_coef)")


def minibatch_backward(policy, critic, ro, mb, micro: int, old_logp, advantages, old_values, returns, t, pack: int,
                       backward, ptx_loss=None) -> dict:
    """Backpropagate one minibatch's PPO loss (episodes `mb` of the rollout), `micro` episodes at a time.

    Policy and value losses are token sums over each micro-batch divided by the minibatch's response-token count
    (counted before the micro-batch loop), so the accumulated gradient is that of the minibatch's token mean,
    whatever train.grad_accum splits it into (weighting each micro-batch's token mean by its share of episodes would
    not be: micro-batches hold different numbers of tokens). The PPO-ptx term is a mean over its own blocks, drawn
    per micro-batch, weighted by the micro-batch's share of the episodes. Returns the minibatch's statistics
    (losses as the minibatch's, the rest token-weighted means, ratio_max the largest)."""
    mask = ro.response_mask
    n_tok = mask[mb].sum().clamp_min(1)
    out = {"pg": 0.0, "vf": 0.0, "clipfrac": 0.0, "approx_kl": 0.0, "vf_clipfrac": 0.0, "entropy": 0.0,
           "ratio_mean": 0.0, "ratio_max": float("-inf")}
    ptx_total = 0.0
    for m in range(0, len(mb), micro):
        i = mb[m: m + micro]
        sub = ro[i]
        logp, ent = policy_forward(policy, sub, t.temperature, pack, with_entropy=True)
        pg, ps = policy_loss(logp, old_logp[i], advantages[i], mask[i], t.clip_range, n_tokens=n_tok)
        vf, vs = value_loss(critic_forward(critic, sub, pack), old_values[i], returns[i], mask[i],
                               t.clip_range_value, n_tokens=n_tok)
        loss = pg + t.vf_coef * vf
        if ptx_loss is not None:
            ptx = ptx_loss()
            loss = loss + t.ptx_coef * ptx * len(i) / len(mb)
            ptx_total += float(ptx.detach()) * len(i) / len(mb)
        backward(loss)
        w = float(mask[i].sum() / n_tok)  # this micro-batch's share of the minibatch's tokens
        out["pg"] += float(pg.detach())
        out["vf"] += float(vf.detach())
        out["entropy"] += w * float(masked_mean(ent, mask[i]))
        out["vf_clipfrac"] += w * float(vs["vf_clipfrac"])
        for k in ("clipfrac", "approx_kl", "ratio_mean"):
            out[k] += w * float(ps[k])
        out["ratio_max"] = max(out["ratio_max"], float(ps["ratio_max"]))
    if ptx_loss is not None:
        out["ptx"] = ptx_total
    return out
