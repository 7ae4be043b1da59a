"""RLOO and GRPO through TRL's trainers (stages/rloo.py, stages/grpo.py): the reward they optimise, read exactly as
PPO reads it, and the periodic held-out evaluation that draws their curve on the gold-KL plot.

TRL accepts a sequence-classification model in `reward_funcs` and would then tokenize prompt + completion its own
way and pool the head wherever that lands. We hand it a callable instead (`PipelineReward`), which rebuilds PPO's
rollout from TRL's own completion token ids (the prompts chat-templated exactly as PPO's sampler sees them) and
reads the reward model through pipeline.rl.readout.score_rollout: the head at the last token of the templated
conversation, the reply closed as the template closes a turn, then normalised with the reward stage's statistics
and unfinished replies put below finished ones, as PPO's training score is (PPOLoop.training_score).
"""

from __future__ import annotations

import json
import time

import torch
from accelerate import PartialState
from omegaconf import DictConfig
from transformers import TrainerCallback

from pipeline.core.errors import UserError
from pipeline.core.runs import StageRun
from pipeline.core.stage import begin_stage
from pipeline.data.formats import check_prompt_lengths, load_prompts
from pipeline.data.prompts import prompt_batch
from pipeline.inference.sampler import Rollout
from pipeline.models.loading import fit_special_ids, load_causal_lm
from pipeline.rl.readout import score_rollout
from pipeline.rl.shaping import penalise_unfinished
from pipeline.trainers.hf import TrackerCallback, final_model, check_finite_loss, train_resumable
from pipeline.trainers.methods import Judge, sample_rows, summary


class PipelineReward:
    """`reward(prompts, completions, completion_ids, **kw) -> list[float]`, TRL's reward-function signature.

    mode "model": the reward model (a TokenModel) by the one readout, normalised with `stats` {mean, std} when
    `normalise`; "gold": the gold oracle's score (the perfect-reward-model ceiling, as PPO's train.reward=gold);
    "contains:<text>": 1 if the reply contains the text (a sanity check any working learner learns)."""

    def __init__(
        self,
        mode: str,
        tok,
        end_ids,
        max_prompt_tokens: int,
        reward_model=None,
        closing=None,
        oracle=None,
        stats: dict | None = None,
        normalise: bool = True,
        missing_eos_penalty=None,
    ):
        self.__name__ = "reward_model" if mode == "model" else mode.partition(":")[0]  # TRL logs rewards/<name>
        self.mode, self.tok, self.end_ids, self.max_prompt_tokens = mode, tok, list(end_ids), max_prompt_tokens
        self.reward_model, self.closing, self.oracle = reward_model, closing, oracle
        stats = stats or {}
        on = normalise and mode == "model"
        self.mean = stats.get("mean", 0.0) if on else 0.0
        self.std = max(stats.get("std", 1.0), 1e-6) if on else 1.0
        self.penalty = missing_eos_penalty

    def rollout(self, prompts, completion_ids, device) -> Rollout:
        """PPO's Rollout of these prompts and TRL's completion tokens (each cut after its first end of turn)."""
        ids, am = prompt_batch(self.tok, prompts, self.max_prompt_tokens, device)
        width = max([len(c) for c in completion_ids] + [1])
        resp = torch.full((len(completion_ids), width), self.tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(completion_ids), width), dtype=torch.bool)
        ended = torch.zeros(len(completion_ids), dtype=torch.bool)
        for i, c in enumerate(completion_ids):
            c = list(c)
            cut = next((j + 1 for j, x in enumerate(c) if x in self.end_ids), len(c))
            resp[i, :cut] = torch.tensor(c[:cut], dtype=torch.long)
            mask[i, :cut] = True
            ended[i] = cut < len(c) or (bool(c) and c[cut - 1] in self.end_ids)
        return Rollout(ids, am, resp.to(device), mask.to(device), ended.to(device))

    @torch.no_grad()
    def __call__(self, prompts, completions, completion_ids=None, **_) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        if self.mode == "gold":
            return [float(x) for x in self.oracle.score_batch(prompts, texts)]
        if self.mode.startswith("contains:"):
            needle = self.mode.partition(":")[2]
            return [float(needle in x) for x in texts]
        dev = next(self.reward_model.parameters()).device
        ro = self.rollout(prompts, completion_ids, dev)
        score = (score_rollout(self.reward_model, ro, self.closing) - self.mean) / self.std
        if self.penalty is not None:
            score = penalise_unfinished(score, ro.ended, self.penalty)
        return score.cpu().tolist()


class PeriodicEval(TrainerCallback):
    """Every `every` steps (and before the first and after the last): the policy on the first held-out prompts,
    sampled, by `judge.periodic` (gold, reward-model score, exact KL to SFT), logged as periodic/... and kept in
    `path` (periodic.json, PPO's format: the method's curve on the gold-KL plot). Rows already in the file are kept,
    so a resumed run extends its curve."""

    def __init__(self, judge, tracker, path, every: int, enabled: bool = True):
        self.judge, self.tracker, self.path, self.every, self.enabled = judge, tracker, path, every, enabled
        self.rows = json.loads(path.read_text()) if path.is_file() else []
        self.seconds = 0.0  # spent evaluating in this process (the rest of train/runtime is training)

    def _eval(self, model, step: int) -> None:
        if not self.enabled or model is None or any(r["iteration"] == step for r in self.rows):
            return
        row = self.judge.periodic(model, step)
        self.seconds += row["seconds"]
        self.rows.append(row)
        self.tracker.log(
            {
                "periodic/gold_score": row["gold"],
                "periodic/reward": row["reward"],
                "periodic/kl": row["kl"],
                "periodic/rm_score": row["rm_score"],
                "periodic/ended_fraction": row["ended_fraction"],
                "periodic/seconds": row["seconds"],
            },
            step=step,
        )
        if self.tracker.is_main:
            self.path.write_text(json.dumps(self.rows, indent=1))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._eval(model, state.global_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self._eval(model, state.global_step)


def engine_completions(trainer, prompt_ids: list[list[int]]) -> list[list[int]] | None:
    """TRL's completions for `prompt_ids` (one reply per row; TRL has already repeated each prompt
    num_generations times) sampled by pipeline.inference.sampler's engine back end, as TRL's own generate path
    returns them: each reply's tokens up to and including its first end-of-turn, unpadded. None where the engine
    cannot stand in for TRL's generate: a policy it does not run (LoRA, another architecture), sharded weights (FSDP,
    DeepSpeed: the engine reads parameter tensors as they are), or sampling options it lacks (min_p, a repetition
    penalty, extra generation_kwargs). TRL 1.16's `_generate_single_turn` is where this plugs in (a private method:
    TRL is pinned)."""
    from accelerate.utils import DistributedType

    from pipeline.inference.sampler import engine_applies, sample

    a, acc = trainer.args, trainer.accelerator
    if (
        acc.distributed_type not in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
        or getattr(a, "min_p", None)
        or (getattr(a, "repetition_penalty", 1.0) or 1.0) != 1.0
        or getattr(a, "generation_kwargs", None)
    ):
        return None
    model = acc.unwrap_model(trainer.model_wrapped)
    if not engine_applies(model):
        return None
    tok = trainer.processing_class
    dev = acc.device
    rows = [torch.tensor(x, dtype=torch.long) for x in prompt_ids]
    width = max(len(x) for x in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, x in enumerate(rows):  # left-padded, as TRL pads them
        ids[i, width - len(x) :], mask[i, width - len(x) :] = x, 1
    ro = sample(
        model,
        tok,
        ids.to(dev),
        mask.to(dev),
        list(trainer.eos_token_ids),
        trainer.max_completion_length,
        trainer.temperature,
        int(trainer.top_k or 0),
        float(trainer.top_p or 1.0),
        backend="engine",
    )
    return [r[m].tolist() for r, m in zip(ro.response_ids.cpu(), ro.response_mask.cpu())]


def trl_trainer(algorithm: str, cfg, run, model, tok, reward, train_ds, callbacks):
    """TRL's RLOOTrainer or GRPOTrainer with our config: train.batch_size replies per device per step, in groups of
    train.num_generations per prompt, KL to the SFT policy with coefficient train.beta (the reference is the model
    TRL loads from SFT's folder, or with LoRA the adapter-disabled base). With sampler=engine the completions come
    from the engine back end where it applies (`engine_completions`), else from TRL's generate."""
    from pipeline.trainers.hf import lora_config, trainer_args

    t = cfg.train
    if algorithm == "grpo":
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer

        extra = {"loss_type": t.loss_type, "scale_rewards": t.scale_rewards}

        class Ours(Trainer):
            def _generate_single_turn(
                self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False
            ):
                done = None if images is not None or self.use_vllm else engine_completions(self, prompt_ids)
                if done is None:
                    return super()._generate_single_turn(
                        prompt_ids, images, multimodal_fields, num_generations, has_tool_images
                    )
                return done, None  # no sampler log-probs: TRL computes its own
    else:
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Trainer

        extra = {}

        class Ours(Trainer):
            def _generate_single_turn(self, prompt_ids, images, multimodal_fields):
                done = None if images is not None or self.use_vllm else engine_completions(self, prompt_ids)
                return super()._generate_single_turn(prompt_ids, images, multimodal_fields) if done is None else done

    args = trainer_args(
        Config,
        cfg,
        run,
        t,
        evaluate=False,
        num_generations=t.num_generations,
        max_completion_length=t.max_new_tokens,
        temperature=t.temperature,
        beta=t.beta,
        epsilon=t.epsilon,
        num_iterations=t.num_iterations,
        log_completions=False,
        disable_dropout=True,
        **extra,
    )
    cls = Ours if getattr(cfg, "sampler", "hf") == "engine" else Trainer
    return cls(
        model=model,
        reward_funcs=[reward],
        args=args,
        train_dataset=train_ds,
        processing_class=tok,
        peft_config=lora_config(cfg.peft, "CAUSAL_LM", dropout=0.0),
        callbacks=callbacks,
    )


def run_group_rl(cfg: DictConfig, algorithm: str) -> None:
    """The whole stage for either of TRL's group trainers ("grpo" or "rloo": stages/grpo.py and stages/rloo.py call
    it): setup -> the policy, the judge and the reward -> the PPO prompts -> TRL's trainer with the periodic
    held-out evaluation -> the evaluation against SFT -> save. They differ only in the trainer `trl_trainer` builds
    and in their config's fields."""
    import datasets

    # ---- setup -------------------------------------------------------------------------------------------
    state = PartialState(cpu=not torch.cuda.is_available())
    run = StageRun(cfg, is_main=state.is_main_process)
    sft_parent = run.parent("sft")
    rm_parent = run.parent("reward")
    begun = begin_stage(cfg, run, state, parents=[sft_parent, rm_parent])
    if begun is None:
        return
    tracker, say, t0 = begun
    t = cfg.train

    # ---- models: the policy from SFT; the judge (frozen SFT, reward model, oracle); the reward ---------
    judge = Judge(cfg, sft_parent, rm_parent, state.device)
    run.update(reward=judge.reward_model.describe())  # the methods table says what each method optimised
    tok = judge.tok
    policy = fit_special_ids(load_causal_lm(sft_parent["final"]), tok).to(state.device)
    reward = PipelineReward(
        t.reward,
        tok,
        judge.end_ids,
        t.max_prompt_tokens,
        judge.reward_model,
        judge.closing,
        judge.oracle,
        judge.reward_model.stats,
        t.normalize_reward,
        t.missing_eos_penalty,
    )

    # ---- data: the PPO prompts -----------------------------------------------------------------------
    src = cfg.data.prompts
    recs, skipped = load_prompts(src, cfg.data.world, cfg.paths.cache)
    recs, n = check_prompt_lengths(
        recs,
        tok,
        t.max_prompt_tokens,
        src.on_bad_record,
        f"data.prompts ({src.path or src.kind}; limit train.max_prompt_tokens)",
    )
    if not recs:
        raise UserError(f"no usable prompts in data.prompts ({src.kind}:{src.path})")
    train_ds = datasets.Dataset.from_list([{"prompt": r["messages"]} for r in recs])
    say(
        f"[{algorithm}] {len(recs)} prompts, {t.num_generations} replies each, {t.batch_size} replies per step, "
        f"{t.max_steps} steps, beta {t.beta}, reward: {t.reward}" + (", LoRA" if cfg.peft.enabled else "")
    )

    # ---- the loop: TRL's trainer, a held-out evaluation every train.eval_every steps -------------------
    log_cb = TrackerCallback(tracker, say)
    periodic = PeriodicEval(judge, tracker, run.dir / "periodic.json", t.eval_every, cfg.eval.periodic_prompts > 0)
    trainer = trl_trainer(algorithm, cfg, run, policy, tok, reward, train_ds, [log_cb, periodic])
    train_resumable(trainer, run, run.ckpt_root, say, f"[{algorithm}] resuming")
    check_finite_loss(log_cb.last, f"{algorithm} diverged", "lower optim.lr or raise train.beta")

    # ---- evaluation: the one every method gets ---------------------------------------------------------
    state.wait_for_everyone()
    out_model, adapter, weights = final_model(trainer, cfg.peft)
    metrics, outputs = judge.versus_sft(out_model)
    metrics.update({k: v for k, v in log_cb.last.items() if k in ("train/reward", "train/kl", "train/loss")})
    metrics.update(
        {
            "train/tokens": log_cb.last.get("train/num_tokens", 0),
            "data/skipped_records": skipped + n,
            "train/episodes": t.max_steps * t.batch_size * t.grad_accum * state.num_processes,
            "time/stage_s": time.time() - t0,
        }
    )
    # throughput of the training alone: the periodic evaluations' seconds are not the algorithm's
    busy = log_cb.last.get("train/runtime", float("nan")) - periodic.seconds
    metrics["train/episodes_per_s"] = metrics["train/episodes"] / busy if busy > 0 else float("nan")
    tracker.log(metrics, step=trainer.state.global_step)
    tracker.table(
        "eval/samples",
        ["prompt", "sft", "sft_gold", algorithm, f"{algorithm}_gold"],
        sample_rows(judge.prompts, outputs["eval/sampled"]),
        step=trainer.state.global_step,
    )

    # ---- save: a plain Hugging Face checkpoint ---------------------------------------------------------
    def save(d):
        out_model.save_pretrained(d, state_dict=weights, safe_serialization=True)
        tok.save_pretrained(d)

    run.finish(save, metrics, adapter=adapter)
    tracker.finish(metrics, run.final_dir)
    say(summary(algorithm, metrics) + f"; saved {run.final_dir} in {metrics['time/stage_s']:.0f}s")
