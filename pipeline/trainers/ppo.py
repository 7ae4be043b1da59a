"""PPO's loop as a few named steps, which stages/ppo.py calls in order every iteration:

    exp = loop.make_experience(it, prompts)   # sample replies, score them, per-token rewards, GAE advantages
    stats = loop.update(exp, it)              # train.ppo_epochs of clipped updates of actor and critic
    metrics = loop.log(exp, stats, it)        # reduced across processes -> metrics.jsonl / W&B
    loop.periodic_eval(it)                    # every train.eval_every: held-out gold, reward and KL to SFT

and at the end `loop.final_eval(prompts)`: PPO against SFT on held-out prompts, greedy and sampled. The math is in
pipeline/rl/ (pure functions tested against hand-computed tensors); the models, optimizers and data are set up by
the stage, which hands them to `PPOLoop`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from pipeline.core.errors import UserError
from pipeline.data.packing import batch_indices
from pipeline.data.prompts import prompt_batch
from pipeline.eval.gold import gathered, rollout_eval, versus_previous, versus_sft
from pipeline.inference.sampler import Rollout, decode_responses, sample
from pipeline.rl.advantages import gae
from pipeline.rl.forward import check_packing, chunked, critic_forward, policy_forward, response_logits
from pipeline.rl.losses import policy_loss, value_loss
from pipeline.models.sharding import full_weights
from pipeline.models.tokens import logprobs_from_logits
from pipeline.rl.ops import ema_update, explained_variance, masked_mean, masked_whiten
from pipeline.rl.readout import score_rollout
from pipeline.rl.alarm import alarm_series
from pipeline.rl.shaping import ensemble_spread, penalise_unfinished, penalised_rewards, reward_objective


class LoopState:
    """What the loop needs besides models and optimizers to resume exactly (saved by accelerate.save_state)."""

    def __init__(self):
        self.kl_coef, self.history, self.ema, self.periodic = None, [], None, []
        self.tokens = 0  # prompt + reply tokens of every episode so far, all processes (the methods table's cost)

    def state_dict(self):
        return {
            "kl_coef": self.kl_coef,
            "history": self.history,
            "ema": self.ema,
            "periodic": self.periodic,
            "tokens": self.tokens,
        }

    def load_state_dict(self, sd):
        self.kl_coef, self.history, self.ema = sd["kl_coef"], sd["history"], sd["ema"]
        self.periodic, self.tokens = sd.get("periodic", []), sd.get("tokens", 0)


@dataclass
class Experience:
    """One iteration's episodes on this process: the rollout and everything computed from it before the update."""

    prompts: list  # the messages of each episode's prompt
    rollout: Rollout
    texts: list[str]
    gold: torch.Tensor  # [B] the oracle's score (logged, never trained on unless train.reward=gold)
    raw_score: torch.Tensor  # [B] the reward model's (or the oracle's, or the rule's) score
    score: torch.Tensor  # [B] what is trained on: normalised, unfinished replies below finished ones
    old_logp: torch.Tensor  # [B, R]
    old_values: torch.Tensor  # [B, R]
    rewards: torch.Tensor  # [B, R] -beta * KL per token, the score added at the last one
    kl: torch.Tensor  # [B, R] the per-token KL estimate
    advantages: torch.Tensor  # [B, R]
    returns: torch.Tensor  # [B, R]
    seconds_generating: float
    started: float
    spread: dict | None = None  # an ensemble's {mean, std, min} over members, [B] each (None: one reward model)
    seconds_gathering: float = 0.0  # under FSDP: gathering the actor's whole weights for the rollout (0 otherwise)


class PPOLoop:
    """The models, optimizers and settings of one PPO run, and the steps of its loop. `policy` and `critic` are
    TokenModels prepared by the Accelerator; `ref` the frozen SFT policy (None with LoRA: the adapter-disabled
    policy is the reference); `reward_model` a frozen TokenModel read by the one readout at `closing`."""

    def __init__(
        self,
        *,
        cfg,
        acc,
        run,
        tracker,
        tok,
        end_ids,
        policy,
        critic,
        ref,
        reward_model,
        closing,
        oracle,
        optimizers,
        kl_ctl,
        state: LoopState,
        rm_stats: dict,
        ptx_blocks=None,
        gen_logprobs: bool = True,
    ):
        self.cfg, self.t, self.acc, self.run, self.tracker = cfg, cfg.train, acc, run, tracker
        self.tok, self.end_ids, self.closing, self.oracle = tok, end_ids, closing, oracle
        self.policy, self.critic, self.ref, self.reward_model = policy, critic, ref, reward_model
        self.optimizers, self.kl_ctl, self.state = optimizers, kl_ctl, state  # optimizers: [(opt, sched), ...]
        self.ptx_blocks, self.gen_logprobs = ptx_blocks, gen_logprobs
        self.dev = acc.device
        self.sft = None  # the SFT policy the final evaluation compares with, when the reference is another model
        self.previous = None  # round r > 1: round r-1's final evaluation outputs, to compare with
        self.seed = cfg.seed + 1009 * (int(cfg.get("round", 1) or 1) - 1)  # each round its own prompts and samples
        self.packing = self.t.pack_sequences  # 0 once check_packing finds the model's attention ignores boundaries
        self.backend = getattr(cfg, "sampler", "hf")  # rollouts and evaluations: pipeline/inference/sampler.py
        normalise = self.t.normalize_reward and self.t.reward == "model"
        self.rm_mean = rm_stats.get("mean", 0.0) if normalise else 0.0
        self.rm_std = max(rm_stats.get("std", 1.0), 1e-6) if normalise else 1.0

    # ---- pieces the steps share --------------------------------------------------------------------------
    def training_score(self, raw: torch.Tensor, ended: torch.Tensor) -> torch.Tensor:
        """The score PPO trains on: normalised with the reward stage's statistics, unfinished replies below all
        finished ones (train.missing_eos_penalty)."""
        score = (raw - self.rm_mean) / self.rm_std
        pen = self.t.missing_eos_penalty
        return score if pen is None else penalise_unfinished(score, ended, pen)

    def ref_logits(self, ro: Rollout) -> torch.Tensor:
        if self.ref is not None:
            return response_logits(self.ref, ro, self.packing)
        with self.acc.unwrap_model(self.policy).model.disable_adapter():
            return response_logits(self.policy, ro, self.packing)

    def ref_logprobs(self, ro: Rollout) -> torch.Tensor:
        return logprobs_from_logits(self.ref_logits(ro), ro.response_ids, self.t.temperature)

    def diverged(self, it: int, what: str):
        self.run.fail(f"non-finite {what} at iteration {it + 1}")
        raise UserError(
            f"PPO diverged: non-finite {what} at iteration {it + 1}; the last good checkpoint is kept in "
            f"{self.run.ckpt_root} (lower optim.lr or raise train.kl_coef)"
        )

    # ---- 1. make experience ------------------------------------------------------------------------------
    def make_experience(self, it: int, prompts: list, first: bool = False) -> Experience:
        """Sample this process's share of the iteration's prompts, score the replies, and turn the scores into
        per-token rewards (-beta * KL everywhere, the score at the last token) and GAE advantages."""
        t, acc = self.t, self.acc
        t0 = time.time()
        idx = batch_indices(
            len(prompts), t.rollout_batch_size, it, 0, 1, acc.num_processes, acc.process_index, self.seed
        )
        batch_prompts = [prompts[i] for i in idx.tolist()]
        torch.manual_seed(self.seed * 1_000_003 + it * 7919 + acc.process_index)  # own sampling seed per rank
        self.policy.eval()
        p_ids, p_mask = prompt_batch(self.tok, batch_prompts, t.max_prompt_tokens, self.dev)
        with full_weights(acc.unwrap_model(self.policy)) as gather_s:  # under FSDP: gathered once, not per token
            ro = sample(
                acc.unwrap_model(self.policy),
                self.tok,
                p_ids,
                p_mask,
                self.end_ids,
                t.max_new_tokens,
                t.temperature,
                t.top_k,
                t.top_p,
                keep_logprobs=self.gen_logprobs,
                backend=self.backend,
            )
            t_gen = time.time() - t0
            if self.packing and first:  # packed and padded forwards must agree; if not, this model cannot be packed
                diff = check_packing(acc.unwrap_model(self.policy), ro, self.packing, t.temperature)
                if diff > (1e-3 if acc.mixed_precision == "no" else 5e-2):
                    self.packing = 0
                    acc.print(
                        f"[ppo] packed sequences change this model's log-probs by up to {diff:.3g}: its attention "
                        f"ignores position-id boundaries; using padded batches (train.pack_sequences=0)"
                    )

        texts = decode_responses(self.tok, ro)
        gold = torch.tensor(self.oracle.score_batch(batch_prompts, texts), device=self.dev)
        fwd = t.forward_batch_size
        old_logp = (
            ro.logprobs
            if self.gen_logprobs
            else chunked(lambda r: policy_forward(self.policy, r, t.temperature, self.packing), ro, fwd)
        )
        ref_logp = chunked(self.ref_logprobs, ro, fwd)
        old_values = chunked(lambda r: critic_forward(self.critic, r, self.packing), ro, fwd)
        spread = None  # an ensemble's members' mean, std and min (normalised): the alarm's inputs
        if t.reward == "model" and len(self.reward_model) > 1:
            z = chunked(lambda r: self.reward_model.normalised(r, self.closing, self.packing), ro, fwd)
            raw, spread = reward_objective(z, t.reward_objective, t.uwo_lambda), ensemble_spread(z)
        elif t.reward == "model":
            raw = chunked(lambda r: score_rollout(self.reward_model, r, self.closing, self.packing), ro, fwd)
        elif t.reward == "gold":
            raw = gold.clone()
        else:  # contains:<text> — a rule any working PPO learns in a few iterations
            needle = t.reward.partition(":")[2]
            raw = torch.tensor([float(needle in x) for x in texts], device=self.dev)
        score = self.training_score(raw, ro.ended)
        mask = ro.response_mask
        rewards, kl = penalised_rewards(score, old_logp, ref_logp, mask, self.kl_ctl.value, t.kl_estimator)
        advantages, returns = gae(rewards, old_values, mask, t.gamma, t.lam)
        if t.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        if not (torch.isfinite(rewards).all() and torch.isfinite(advantages).all()):
            self.diverged(it, "rewards")
        return Experience(
            batch_prompts,
            ro,
            texts,
            gold,
            raw,
            score,
            old_logp,
            old_values,
            rewards,
            kl,
            advantages,
            returns,
            t_gen,
            t0,
            spread,
            seconds_gathering=gather_s,
        )

    # ---- 2. update ---------------------------------------------------------------------------------------
    def update(self, exp: Experience, it: int) -> dict:
        """train.ppo_epochs passes over the episodes in shuffled minibatches, each split into micro-batches for
        gradient accumulation; actor and critic each clipped and stepped. Returns lists of per-minibatch figures."""
        t, acc, dev = self.t, self.acc, self.dev
        ro = exp.rollout
        self.policy.train()
        self.critic.train()
        B = len(ro.ended)
        micro = max(1, t.minibatch_size // t.grad_accum)
        log = {
            k: []
            for k in (
                "pg",
                "vf",
                "clipfrac",
                "approx_kl",
                "vf_clipfrac",
                "entropy",
                "ratio_mean",
                "ratio_max",
                "ptx",
                "grad_norm",
                "value_grad_norm",
            )
        }

        def backward(loss):
            if not torch.isfinite(loss):
                self.diverged(it, "loss")
            acc.backward(loss)

        for _ in range(t.ppo_epochs):
            perm = torch.randperm(B, device=dev)
            for s in range(0, B, t.minibatch_size):
                mb = perm[s : s + t.minibatch_size]
                st = minibatch_backward(
                    self.policy,
                    self.critic,
                    ro,
                    mb,
                    micro,
                    exp.old_logp,
                    exp.advantages,
                    exp.old_values,
                    exp.returns,
                    t,
                    self.packing,
                    backward,
                    self.ptx_loss if self.ptx_blocks is not None else None,
                )
                for k, v in st.items():
                    log[k].append(v)
                # each model clipped on its own, both norms logged (TRL 1.12 clips neither)
                log["grad_norm"].append(
                    float(acc.clip_grad_norm_(self.policy.parameters(), self.cfg.optim.max_grad_norm))
                )
                log["value_grad_norm"].append(
                    float(acc.clip_grad_norm_(self.critic.parameters(), self.cfg.optim.max_grad_norm))
                )
                for opt, sched in self.optimizers:
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                if self.state.ema is not None:
                    ema_update(self.state.ema, acc.unwrap_model(self.policy).parameters(), t.ema_decay)
        return log

    def ptx_loss(self) -> torch.Tensor:
        """PPO-ptx: the LM loss on a random draw of pretraining blocks (InstructGPT's fix for regressions)."""
        t, dev = self.t, self.dev
        j = torch.randint(len(self.ptx_blocks), (t.ptx_batch_size,))
        x = self.ptx_blocks[j].to(dev)
        n, L = x.shape
        logits = self.policy(
            x, torch.arange(L, device=dev).expand(n, L), None, torch.arange(n * L, device=dev).view(n, L)[:, :-1]
        )
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())

    # ---- 3. log ------------------------------------------------------------------------------------------
    def log(self, exp: Experience, log: dict, it: int) -> dict:
        """The iteration's figures, reduced across processes (the gold oracle scored the same replies the reward
        model scored); the KL controller updated; the loop state's history extended; logged at step it + 1."""
        acc, dev, t = self.acc, self.dev, self.t
        ro, mask = exp.rollout, exp.rollout.response_mask
        t_total = time.time() - exp.started
        B = len(ro.ended)
        seq_kl = (exp.kl * mask).sum(-1)
        n_tok = mask.sum()
        local = {
            "ppo/score": exp.raw_score.mean(),
            "ppo/score_std": exp.raw_score.std() if B > 1 else torch.zeros((), device=dev),
            "ppo/reward": exp.score.mean(),
            "ppo/gold_score": exp.gold.mean(),
            "ppo/kl": seq_kl.mean(),
            "ppo/nonscore_reward": (exp.rewards.sum(-1) - exp.score).mean(),
            "ppo/response_length": mask.sum(-1).float().mean(),
            "ppo/ended_fraction": ro.ended.float().mean(),
            "ppo/explained_variance": explained_variance(exp.old_values, exp.returns, mask).nan_to_num(0.0),
            # the critic's values and its targets over reply tokens: on one scale from the first iteration
            "ppo/value_mean": masked_mean(exp.old_values, mask),
            "ppo/return_mean": masked_mean(exp.returns, mask),
            **{f"ppo/{k}": torch.tensor(sum(v) / max(len(v), 1), device=dev) for k, v in log.items() if v},
            "ppo/gen_tokens_per_s": n_tok / exp.seconds_generating,
            "ppo/train_tokens_per_s": n_tok * t.ppo_epochs / (t_total - exp.seconds_generating),
        }
        if exp.spread is not None:  # the members' view of this batch: the proxy and their disagreement, normalised
            local.update({f"ensemble/{k}": v.mean() for k, v in exp.spread.items()})
        m = {k: acc.reduce(v.float().detach(), reduction="mean").item() for k, v in local.items()}
        m["ppo/kl_coef"] = self.kl_ctl.value
        m["ppo/episodes_per_s"] = B * acc.num_processes / t_total
        if acc.distributed_type == "FSDP":  # the one all-gather of the actor's weights per rollout, timed
            m["ppo/gather_seconds"] = exp.seconds_gathering
        # counted as TRL's trainers count train/num_tokens: each episode's prompt and reply once, not per epoch
        self.state.tokens += int(acc.reduce(ro.attention_mask.sum().float(), reduction="sum").item())
        m["train/tokens"] = self.state.tokens
        m["ppo/policy_loss"], m["ppo/value_loss"] = m.pop("ppo/pg"), m.pop("ppo/vf")
        self.kl_ctl.update(m["ppo/kl"], B * acc.num_processes)
        self.state.kl_coef = self.kl_ctl.value
        row = {
            "iteration": it + 1,
            "kl": m["ppo/kl"],
            "reward": m["ppo/reward"],
            "gold": m["ppo/gold_score"],
            "length": m["ppo/response_length"],
        }
        if exp.spread is not None:
            row.update(proxy=m["ensemble/mean"], disagreement=m["ensemble/std"])
        self.state.history.append(row)
        m.update(self.alarm(it + 1))
        self.tracker.log(m, step=it + 1)
        if t.sample_every and (it + 1) % t.sample_every == 0:
            rows = [
                [p[-1]["content"], r, float(g), float(s)]
                for p, r, g, s in zip(exp.prompts, exp.texts, exp.gold.tolist(), exp.raw_score.tolist())
            ][: t.log_samples]
            self.tracker.table("ppo/samples", ["prompt", "response", "gold", "reward_model"], rows, step=it + 1)
        return m

    def alarm(self, done: int) -> dict:
        """The reward-hacking alarm after `done` iterations (pipeline/rl/alarm.py), from the history alone: alarm/*
        metrics, and a console line the iteration it first fires. Empty without an ensemble or with alarm.enabled
        false: one reward model has no disagreement to watch."""
        last = self._alarm_state()
        if last is None:
            return {}
        a = self.cfg.alarm
        if last["fired_at"] == done:
            self.acc.print(
                f"\n[ppo] ALARM at iteration {done}: the proxy reward is rising (+{last['proxy_trend']:.3f} "
                f"over {a.window} iterations) while the reward models disagree {last['disagreement_ratio']:.1f}x "
                f"more than at their closest; KL {last['kl']:.2f}, replies {last['length_ratio']:.2f}x "
                f"their early length. Likely reward hacking: compare the checkpoints before it"
            )
        return {f"alarm/{k}": float(v) for k, v in last.items()}

    def alarm_fired_at(self) -> int:
        """The iteration the alarm first fired at (0: never, or no ensemble)."""
        last = self._alarm_state()
        return 0 if last is None else last["fired_at"]

    def _alarm_state(self) -> dict | None:
        """alarm_series' latest row over the history so far; None with the alarm off or without an ensemble."""
        a = self.cfg.get("alarm")
        h = self.state.history
        if a is None or not a.enabled or not h or "disagreement" not in h[-1]:
            return None
        return alarm_series(
            [r["proxy"] for r in h],
            [r["disagreement"] for r in h],
            a.window,
            a.rise,
            a.patience,
            kl=[r["kl"] for r in h],
            length=[r["length"] for r in h],
        )[-1]

    # ---- 4. evaluate -------------------------------------------------------------------------------------
    def _evaluate(self, model, prompts: list, greedy: bool) -> dict:
        """`rollout_eval` on this process's shard of `prompts`, gathered (padding repeats dropped), in prompt order."""
        return gathered(
            lambda mine: rollout_eval(
                model,
                mine,
                tok=self.tok,
                end_ids=self.end_ids,
                t=self.t,
                oracle=self.oracle,
                reward_model=self.reward_model,
                closing=self.closing,
                ref_logits=self.ref_logits,
                dev=self.dev,
                pack=self.packing,
                greedy=greedy,
                backend=self.backend,
            ),
            prompts,
        )

    def periodic_eval(self, done: int, prompts: list) -> None:
        """Held-out gold, reward (as trained on) and exact KL to SFT of the policy after `done` iterations, sampled
        at the training temperature: the lines of the over-optimisation plot."""
        t = self.t
        if not t.periodic_eval_prompts or any(r["iteration"] == done for r in self.state.periodic):
            return
        t1 = time.time()
        self.policy.eval()
        torch.manual_seed(self.cfg.seed * 1_000_003 + 4241 + self.acc.process_index)  # the same draw every time
        with full_weights(self.acc.unwrap_model(self.policy)):
            out = self._evaluate(self.acc.unwrap_model(self.policy), prompts, greedy=False)
        score = self.training_score(torch.tensor(out["reward"]), torch.tensor(out["ended"], dtype=torch.bool))
        mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
        row = {
            "iteration": done,
            "gold": mean(out["gold"]),
            "reward": float(score.mean()) if len(score) else 0.0,
            "kl": mean(out["kl"]),
            "rm_score": mean(out["reward"]),
            "ended_fraction": mean(out["ended"]),
            "n": len(out["gold"]),
        }
        self.state.periodic.append(row)
        self.tracker.log(
            {
                "periodic/gold_score": row["gold"],
                "periodic/reward": row["reward"],
                "periodic/kl": row["kl"],
                "periodic/rm_score": row["rm_score"],
                "periodic/ended_fraction": row["ended_fraction"],
                "periodic/seconds": time.time() - t1,
            },
            step=done,
        )

    def final_policy(self):
        """The trained policy (the EMA of the actor with train.ema_decay), unwrapped, in eval mode."""
        policy = self.acc.unwrap_model(self.policy)
        if self.state.ema is not None:
            with torch.no_grad():
                for p, e in zip(policy.parameters(), self.state.ema):
                    p.copy_(e)
        return policy.eval()

    def final_eval(self, prompts: list) -> tuple[dict, dict]:
        """PPO against SFT on held-out prompts, judged by the gold oracle: greedy (the headline, eval/...;
        deterministic) and sampled at the training temperature (eval/sampled/...: the policy PPO optimised, and the
        one whose KL the per-iteration figures and best-of-n's bound describe). Returns (metrics, outputs)."""
        policy = self.final_policy()

        def answer(who, greedy):
            torch.manual_seed(self.cfg.seed * 1_000_003 + 7717 + self.acc.process_index)  # same seed for both
            if who == "policy":
                return self._evaluate(policy, prompts, greedy)
            if self.sft is not None or self.ref is not None:
                return self._evaluate(self.sft if self.sft is not None else self.ref, prompts, greedy)
            with policy.model.disable_adapter():
                return self._evaluate(policy, prompts, greedy)

        with full_weights(policy):
            metrics, outputs = versus_sft(answer, sampled=self.t.eval_sampled)
        if self.previous is not None:  # round r > 1: the same prompts and seeds, against round r-1's answers
            metrics.update(versus_previous({k: v[0] for k, v in outputs.items()}, self.previous))
        return metrics, outputs


def minibatch_backward(
    policy, critic, ro, mb, micro: int, old_logp, advantages, old_values, returns, t, pack: int, backward, ptx_loss=None
) -> dict:
    """Backpropagate one minibatch's PPO loss (episodes `mb` of the rollout), `micro` episodes at a time.

    Policy and value losses are token sums over each micro-batch divided by the minibatch's response-token count
    (counted before the micro-batch loop), so the accumulated gradient is that of the minibatch's token mean,
    whatever train.grad_accum splits it into (weighting each micro-batch's token mean by its share of episodes would
    not be: micro-batches hold different numbers of tokens). The PPO-ptx term is a mean over its own blocks, drawn
    per micro-batch, weighted by the micro-batch's share of the episodes. Returns the minibatch's statistics
    (losses as the minibatch's, the rest token-weighted means, ratio_max the largest)."""
    mask = ro.response_mask
    n_tok = mask[mb].sum().clamp_min(1)
    out = {
        "pg": 0.0,
        "vf": 0.0,
        "clipfrac": 0.0,
        "approx_kl": 0.0,
        "vf_clipfrac": 0.0,
        "entropy": 0.0,
        "ratio_mean": 0.0,
        "ratio_max": float("-inf"),
    }
    ptx_total = 0.0
    for m in range(0, len(mb), micro):
        i = mb[m : m + micro]
        sub = ro[i]
        logp, ent = policy_forward(policy, sub, t.temperature, pack, with_entropy=True)
        pg, ps = policy_loss(logp, old_logp[i], advantages[i], mask[i], t.clip_range, n_tokens=n_tok)
        vf, vs = value_loss(
            critic_forward(critic, sub, pack), old_values[i], returns[i], mask[i], t.clip_range_value, n_tokens=n_tok
        )
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
