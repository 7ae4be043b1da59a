"""Glue between our configs and the Hugging Face / TRL Trainer, shared by stages/sft.py and stages/reward.py:
TrainingArguments from optim + train, the Trainer's logs into our Tracker, a quiet progress bar, LoRA settings and
the model to save at the end."""

from __future__ import annotations

import math

import torch
from transformers import ProgressCallback, TrainerCallback

from pipeline.models.sharding import sharding_record, without_tied
from pipeline.models.loading import mixed_precision


class TrackerCallback(TrainerCallback):
    """The Trainer's logs -> our Tracker (metrics.jsonl + W&B), renamed to the pipeline's keys: loss -> train/loss,
    learning_rate -> train/lr, eval_loss -> eval/loss, ... The Trainer's own W&B integration stays off
    (report_to="none"): it would open a second W&B run."""

    RENAME = {"loss": "train/loss", "learning_rate": "train/lr", "grad_norm": "train/grad_norm", "epoch": "train/epoch"}

    def __init__(self, tracker, say=print, prefix: str = "", step_offset: int = 0):
        self.tracker, self.say = tracker, say
        self.prefix, self.offset = (
            prefix,
            step_offset,
        )  # an ensemble's member k: member<k>/..., after member k-1's steps
        self.last: dict = {}  # latest value of every key (the manifest's metrics come from here)
        self.last_eval_step = -1

    def on_log(self, args, state, control, logs=None, **kwargs):
        out = {}
        for k, v in (logs or {}).items():
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            if k.startswith("eval_"):
                out[f"eval/{k[5:]}"] = v
            elif k.startswith("train_"):  # the end-of-training summary (train_runtime, train_loss, ...)
                out[f"train/{k[6:]}_total" if k == "train_loss" else f"train/{k[6:]}"] = v
            else:
                out[self.RENAME.get(k, f"train/{k}")] = v
        if "eval/loss" in out:
            out["eval/perplexity"] = math.exp(min(out["eval/loss"], 50))
            self.last_eval_step = state.global_step
        if out:
            out = {f"{self.prefix}{k}": v for k, v in out.items()}
            self.last.update(out)
            self.tracker.log(out, step=state.global_step + self.offset)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # under FSDP, proof that the model trains sharded: the parameter bytes each process holds, in the manifest
        if model is None or self.prefix or not (shards := sharding_record(model)):
            return
        name = self.tracker.stage_run.name
        self.say(f"[{name}] FSDP: parameter bytes per rank {shards['per_rank']} of {shards['full']} in all")
        if self.tracker.is_main:
            self.tracker.stage_run.update(sharded_param_bytes=shards)


class QuietProgress(ProgressCallback):
    """The Trainer's progress bar without a printed dict per log: the loss goes in the bar."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.3f}")


def train_resumable(trainer, run, ckpt_dir, say, resuming: str, record: bool = True, **manifest) -> None:
    """Train a Hugging Face Trainer as every Trainer stage does: the quiet progress bar, and from the newest complete
    checkpoint in `ckpt_dir` when there is one. Then the manifest records `resumed_from` (and `manifest`'s keys)
    unless `record` is false (an ensemble's later members), and `say` prints "<resuming> from <checkpoint>"."""
    from pipeline.core.runs import latest_trainer_checkpoint

    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(QuietProgress())
    ckpt = latest_trainer_checkpoint(ckpt_dir)
    if ckpt is not None:
        if record:
            run.update(resumed_from=int(ckpt.name.split("-")[1]), **manifest)
        say(f"{resuming} from {ckpt}")
    trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)


def check_finite_loss(logged: dict, what: str, hint: str, key: str = "train/loss") -> float:
    """The last logged training loss (nan when none was logged: resumed after the last step); a non-finite one is
    the user's one-line error "<what>: train/loss is <loss> (<hint>)"."""
    from pipeline.core.errors import UserError

    loss = logged.get(key, float("nan"))
    if key in logged and not math.isfinite(loss):
        raise UserError(f"{what}: train/loss is {loss} ({hint})")
    return loss


def bookkeeping(key: str) -> bool:
    """Trainer bookkeeping that would only clutter the manifest (it stays in metrics.jsonl)."""
    return any(w in key for w in ("runtime", "per_second", "num_tokens", "flos", "samples"))


def precision_flags(precision: str) -> dict:
    mp = mixed_precision(precision)
    return {"bf16": mp == "bf16", "fp16": mp == "fp16"}


def trainer_args(cls, cfg, run, t, evaluate: bool = True, **extra):
    """TrainingArguments (TRL's SFTConfig / RewardConfig) from our optim + train config. Checkpoints go to
    run.ckpt_root as checkpoint-<step>; StageRun removes them when the stage completes."""
    return cls(
        output_dir=extra.pop("output_dir", str(run.ckpt_root)),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size or t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        max_steps=t.max_steps,
        learning_rate=cfg.optim.lr,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": cfg.optim.min_lr_ratio},
        warmup_steps=cfg.optim.warmup_steps,
        weight_decay=cfg.optim.weight_decay,
        adam_beta1=cfg.optim.beta1,
        adam_beta2=cfg.optim.beta2,
        adam_epsilon=cfg.optim.eps,
        max_grad_norm=cfg.optim.max_grad_norm,
        logging_steps=t.log_every,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=t.eval_every,
        save_strategy="steps",
        save_steps=t.save_every,
        save_total_limit=t.keep_checkpoints,
        report_to="none",
        seed=extra.pop("seed", cfg.seed),
        activation_checkpointing=t.gradient_checkpointing,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),  # also what makes several CPU processes train as DDP (gloo)
        **precision_flags(cfg.precision),
        **extra,
    )


def lora_config(p, task_type: str, dropout: float | None = None):
    """A peft LoraConfig from conf/peft/lora.yaml, or None when LoRA is off. dropout overrides p.dropout (PPO keeps
    it at 0: dropout would make the sampler and the learner different policies)."""
    if not p.enabled:
        return None
    from peft import LoraConfig

    targets = (
        p.target_modules
        if p.target_modules == "all-linear"
        else [m.strip() for m in p.target_modules.split(",") if m.strip()]
    )
    return LoraConfig(
        r=p.r,
        lora_alpha=p.alpha,
        lora_dropout=p.dropout if dropout is None else dropout,
        target_modules=targets,
        task_type=task_type,
    )


def final_model(trainer, p):
    """(model, adapter, state_dict) to save: LoRA merged into the base weights unless peft.merge=false (then the
    adapter alone). Call on every process: gathering full weights is collective under FSDP / ZeRO-3."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if p.enabled:
        return (model.merge_and_unload(), False, None) if p.merge else (model, True, None)
    # gathered from the wrapped model: the DeepSpeed engine under ZeRO-3 (the same module under FSDP2 and DDP)
    return model, False, without_tied(model, trainer.accelerator.get_state_dict(trainer.model_wrapped))
