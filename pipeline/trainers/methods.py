"""What the method stages share (stages/bon.py, dpo.py, expert_iteration.py, rloo.py, grpo.py): the SFT policy and
the reward model of one run, loaded once, and the one evaluation against SFT (pipeline.eval.gold.versus_sft, the
function PPO's final evaluation calls too), so that every method is scored on the same held-out prompts, with the
same decoding, seeds, oracle and reward readout.

    judge = Judge(cfg, sft_parent, rm_parent, device)
    metrics, outputs = judge.versus_sft(policy)           # greedy and sampled, eval/... and eval/sampled/...
    row = judge.periodic(policy, step)                     # sampled, on the first eval.periodic_prompts prompts
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import torch
from omegaconf import OmegaConf

from pipeline.core.errors import UserError
from pipeline.data.formats import check_prompt_lengths, load_prompts
from pipeline.data.tokenizer import end_of_turn_ids, load_tokenizer
from pipeline.eval.gold import best_of_n_eval, gathered, rollout_eval, versus_sft
from pipeline.models.sharding import full_weights
from pipeline.models.loading import load_causal_lm
from pipeline.models.token_model import TokenModel, disable_dropout
from pipeline.rl.forward import response_logits
from pipeline.rl.readout import RewardEnsemble, turn_closing
from pipeline.world.oracle import GoldOracle


def settings(e) -> SimpleNamespace:
    """A method's `eval` group under the names rollout_eval reads (PPO's train.* names)."""
    return SimpleNamespace(
        eval_batch_size=e.batch_size,
        max_prompt_tokens=e.max_prompt_tokens,
        max_new_tokens=e.max_new_tokens,
        temperature=e.temperature,
        top_k=e.top_k,
        top_p=e.top_p,
    )


def same_vocabulary(tok, rm_tok, rm_final, sft_final) -> None:
    if rm_tok.get_vocab() != tok.get_vocab():
        raise UserError(
            f"the reward model's tokenizer ({rm_final}) differs from the policy's ({sft_final}); train "
            f"both from the same SFT run"
        )


class Judge:
    """The frozen SFT policy (the reference of every method), the frozen reward model read by the one readout, the
    gold oracle and the held-out prompts: everything `versus_sft` needs, for any policy."""

    def __init__(self, cfg, sft_parent: dict, rm_parent: dict, device):
        self.cfg, self.e, self.dev = cfg, cfg.eval, device
        self.backend = getattr(cfg, "sampler", "hf")  # how every evaluation samples (pipeline/inference/sampler.py)
        self.t = settings(cfg.eval)
        self.tok = load_tokenizer(sft_parent["final"], need_chat_template=True)
        rm_tok = load_tokenizer(rm_parent["final"])
        same_vocabulary(self.tok, rm_tok, rm_parent["final"], sft_parent["final"])
        self.end_ids = end_of_turn_ids(self.tok)
        sft = load_causal_lm(sft_parent["final"]).to(device).eval().requires_grad_(False)
        disable_dropout(sft)
        self.sft = TokenModel(sft)
        # the reward model, or the ensemble of them (reward stage train.ensemble=K) combined by the method's
        # reward_objective (bon.reward_objective for best-of-n, train.reward_objective for the others; DPO: mean)
        self.objective = (
            OmegaConf.select(cfg, "train.reward_objective") or OmegaConf.select(cfg, "bon.reward_objective") or "mean"
        )
        lam = next(
            (
                v
                for v in (OmegaConf.select(cfg, "train.uwo_lambda"), OmegaConf.select(cfg, "bon.uwo_lambda"))
                if v is not None
            ),
            1.0,
        )
        self.reward_model = RewardEnsemble.load(
            rm_parent["final"], device, self.objective, lam, stats=rm_parent.get("reward_stats") or {}
        )
        self.closing = turn_closing(rm_tok if rm_tok.chat_template else self.tok)
        stats = self.reward_model.stats  # one member: the reward stage's; an ensemble's objective: mean 0, std 1
        self.rm_mean, self.rm_std = stats.get("mean", 0.0), max(stats.get("std", 1.0), 1e-6)
        self.oracle = GoldOracle.from_config(cfg.data.world)
        src = cfg.data.eval_prompts
        if src.kind != "world":
            raise UserError(
                f"data.eval_prompts.kind={src.kind}: a method is scored by the gold oracle, which knows "
                f"only the built-in world's prompts (data.eval_prompts.kind=world)"
            )
        recs, _ = load_prompts(src, cfg.data.world, cfg.paths.cache)
        recs, _ = check_prompt_lengths(
            recs,
            self.tok,
            self.e.max_prompt_tokens,
            src.on_bad_record,
            f"data.eval_prompts ({src.path or src.kind}; limit eval.max_prompt_tokens)",
        )
        self.prompts = [r["messages"] for r in recs][: self.e.prompts]

    def ref_logits(self, ro):
        return response_logits(self.sft, ro, 0)

    def _answer(self, model, prompts, greedy: bool) -> dict:
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
                pack=0,
                greedy=greedy,
                backend=self.backend,
            ),
            prompts,
        )

    def _seed(self) -> None:
        from pipeline.core.dist import rank_and_world

        torch.manual_seed(self.cfg.seed * 1_000_003 + 7717 + rank_and_world()[0])  # the method and SFT draw alike

    def versus_sft(self, policy=None, best_of: int = 0, also=()) -> tuple[dict, dict]:
        """`policy` (a causal LM) against SFT, greedy (eval.greedy) and sampled; or, with `best_of` = n, SFT's
        best of n samples by the reward model (sampled only), with the picks among the first m for m in `also`."""
        if best_of:
            # about eval.batch_size replies per generate call, as for SFT's own answers, whose batches (and so
            # draws) stay those of every other method's evaluation
            t = SimpleNamespace(**{**vars(self.t), "eval_batch_size": max(1, self.t.eval_batch_size // best_of)})

            def answer(who, greedy):
                self._seed()
                if who == "sft":
                    return self._answer(self.sft, self.prompts, greedy)
                return gathered(
                    lambda mine: best_of_n_eval(
                        self.sft,
                        mine,
                        tok=self.tok,
                        end_ids=self.end_ids,
                        t=t,
                        oracle=self.oracle,
                        reward_model=self.reward_model,
                        closing=self.closing,
                        dev=self.dev,
                        pack=0,
                        n=best_of,
                        also=also,
                        backend=self.backend,
                    ),
                    self.prompts,
                )

            return versus_sft(answer, greedy=False, resamples=self.e.bootstrap)
        model = policy if isinstance(policy, TokenModel) else TokenModel(policy)
        was = model.model.training
        model.model.eval()

        def answer(who, greedy):
            self._seed()
            return self._answer(model if who == "policy" else self.sft, self.prompts, greedy)

        try:
            with full_weights(model.model):  # under FSDP: gathered once for the whole evaluation, not per token
                return versus_sft(answer, greedy=self.e.greedy, resamples=self.e.bootstrap)
        finally:
            model.model.train(was)

    @torch.no_grad()
    def periodic(self, policy, step: int) -> dict:
        """The policy after `step` steps on the first eval.periodic_prompts held-out prompts, sampled, the same draw
        every time: gold, the reward model's score (raw and normalised as PPO's) and exact KL to SFT; a point of
        the method's curve on the gold-KL plot (PPO's periodic.json rows)."""
        t1 = time.time()
        model = policy if isinstance(policy, TokenModel) else TokenModel(policy)
        was = model.model.training
        model.model.eval()
        torch.manual_seed(self.cfg.seed * 1_000_003 + 4241)
        try:
            with full_weights(model.model):
                out = self._answer(model, self.prompts[: self.e.periodic_prompts], greedy=False)
        finally:
            model.model.train(was)
        mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
        return {
            "iteration": step,
            "gold": mean(out["gold"]),
            "kl": mean(out["kl"]),
            "rm_score": mean(out["reward"]),
            "reward": (mean(out["reward"]) - self.rm_mean) / self.rm_std,
            "ended_fraction": mean(out["ended"]),
            "n": len(out["gold"]),
            "seconds": time.time() - t1,
        }


def sample_rows(prompts, outputs: dict, limit: int = 32) -> list[list]:
    """[prompt, SFT's reply, its gold, the method's reply, its gold] rows of one decoding's outputs."""
    mine, sft = outputs
    return [
        [p[-1]["content"], s, float(sg), r, float(rg)]
        for p, s, sg, r, rg in zip(prompts, sft["text"], sft["gold"], mine["text"], mine["gold"])
    ][:limit]


def summary(name: str, metrics: dict) -> str:
    """One line for the terminal: the sampled figures every method has, the greedy ones where measured."""
    g = metrics.get
    line = (
        f"[{name}] sampled: gold {g('eval/sampled/gold_score'):.3f} (SFT {g('eval/sampled/sft_gold_score'):.3f}), "
        f"win rate vs SFT {g('eval/sampled/win_rate_vs_sft'):.2f} [{g('eval/sampled/win_rate_ci_low'):.2f}, "
        f"{g('eval/sampled/win_rate_ci_high'):.2f}], KL {g('eval/sampled/kl'):.2f}"
    )
    if "eval/gold_score" in metrics:
        line += (
            f"; greedy: gold {g('eval/gold_score'):.3f} (SFT {g('eval/sft_gold_score'):.3f}), win rate "
            f"{g('eval/win_rate_vs_sft'):.2f}, KL {g('eval/kl'):.2f}"
        )
    return line
