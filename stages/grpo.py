"""Method — GRPO: policy gradient with no critic, each reply judged against the other replies to its prompt.

    make grpo                                                  # = python -m stages.grpo
    python -m stages.grpo train.num_generations=8 train.beta=0.1 run=grpo-k8 parent_run=default
    python -m stages.grpo train.reward=gold                    # the gold oracle as the reward: the ceiling

TRL's GRPOTrainer on the PPO prompts: train.num_generations replies per prompt, advantages from the group's mean
(and spread, train.scale_rewards), the clipped ratio, and beta * KL to the SFT policy in the loss. The reward is
our reward model read exactly as PPO reads it (pipeline/trainers/group_rl.py: PPO's rollout rebuilt from TRL's
tokens, pipeline.rl.readout, normalised with the reward stage's statistics), or with `train.reward=gold` the gold
oracle. Every train.eval_every steps the policy answers held-out prompts (periodic.json: its curve on the gold-KL
plot); at the end the evaluation every method gets (pipeline.eval.gold.versus_sft). Interrupted? Run the same
command again: the Trainer resumes from its last checkpoint. `make rloo` runs this same story with RLOOTrainer.
"""

import math
import time

import torch
from accelerate import PartialState
from accelerate.utils import set_seed
from omegaconf import DictConfig
from transformers import ProgressCallback

from pipeline.core.entry import entry
from pipeline.core.errors import UserError
from pipeline.core.runs import StageRun, failure_reason, latest_trainer_checkpoint
from pipeline.core.tracking import Tracker
from pipeline.data.formats import check_prompt_lengths, load_prompts
from pipeline.models.loading import fit_special_ids, load_causal_lm
from pipeline.trainers.group_rl import PeriodicEval, PipelineReward, trl_trainer
from pipeline.trainers.hf import QuietProgress, TrackerCallback, final_model
from pipeline.trainers.methods import Judge, sample_rows, summary


@entry("grpo")
def main(cfg: DictConfig) -> None:
    group_rl(cfg, "grpo")


def group_rl(cfg: DictConfig, algorithm: str) -> None:
    """The whole stage for either of TRL's group trainers ("grpo" or "rloo", see stages/rloo.py): they differ only
    in the trainer `trl_trainer` builds and in their config's fields."""
    import datasets

    # ---- setup -------------------------------------------------------------------------------------------
    state = PartialState(cpu=not torch.cuda.is_available())
    run = StageRun(cfg, is_main=state.is_main_process)
    sft_parent = run.parent("sft")
    rm_parent = run.parent("reward")
    if not run.begin(barrier=state.wait_for_everyone):
        return
    t0 = time.time()
    set_seed(cfg.seed)
    tracker = Tracker(cfg, run, state.is_main_process)
    tracker.use_parent(sft_parent)
    tracker.use_parent(rm_parent)
    say = print if state.is_main_process else (lambda *a, **k: None)
    datasets.disable_progress_bars()
    t = cfg.train

    try:
        # ---- models: the policy from SFT; the judge (frozen SFT, reward model, oracle); the reward ---------
        judge = Judge(cfg, sft_parent, rm_parent, state.device)
        run.update(reward=judge.reward_info())  # the methods table says what each method optimised
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
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(QuietProgress())
        ckpt = latest_trainer_checkpoint(run.ckpt_root)
        if ckpt is not None:
            run.update(resumed_from=int(ckpt.name.split("-")[1]))
            say(f"[{algorithm}] resuming from {ckpt}")
        trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
        loss = log_cb.last.get("train/loss", float("nan"))
        if "train/loss" in log_cb.last and not math.isfinite(loss):
            raise UserError(f"{algorithm} diverged: train/loss is {loss} (lower optim.lr or raise train.beta)")

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
    except BaseException as e:
        run.fail(failure_reason(e))
        tracker.close()
        raise
    say(summary(algorithm, metrics) + f"; saved {run.final_dir} in {metrics['time/stage_s']:.0f}s")


if __name__ == "__main__":
    main()
