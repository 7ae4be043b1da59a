"""TRL 1.12's side of bench/ppo_vs_trl.py: one PPO run with `trl.experimental.ppo.PPOTrainer`, timed.

    bench/.venv-trl112/bin/python bench/_trl_ppo_driver.py SPEC.json OUT.json

Runs in its own virtualenv (bench/.venv-trl112: trl==1.12.0 and what it resolves to), so it imports nothing from
this repository. SPEC.json (written by bench/ppo_vs_trl.py) names the SFT policy and reward model folders, the
tokenised prompts and every hyperparameter; OUT.json gets the timings and TRL's own per-iteration logs, and the
trained policy is saved with `trainer.save_model(spec["save_dir"])`.

What is set so that TRL runs the workload our stage runs (each is a setting, not a change to TRL's algorithm):

* fp32, no gradient checkpointing (TRL's PPOConfig defaults to bf16 and checkpointing; ours uses neither), our
  optimizer passed in (torch AdamW with our betas/eps/weight decay, the policy at lr and the value model at
  critic_lr, as two parameter groups), and our learning-rate curve: constant, or cosine from lr to
  lr * min_lr_ratio without warmup over the run (TRL steps its scheduler once per iteration, ours once per
  optimizer step: the same curve, sampled per iteration).
* Batching: per_device_train_batch_size = num_mini_batches' size = our minibatch, gradient_accumulation_steps =
  rollout / minibatch (which makes TRL's rollout batch ours). TRL steps the optimizer once every
  gradient_accumulation_steps micro-batches, i.e. once per rollout batch per epoch, where ours steps once per
  minibatch; setting the accelerator's gradient_accumulation_steps to 1 after construction gives TRL our optimizer
  steps (one per minibatch, loss averaged over the minibatch), and is what its loop would do with
  num_mini_batches=1 and a rollout batch the size of our minibatch.
* The score: ours is the reward model's scalar read at the last token of the conversation as the chat template
  writes it (the reply closed by spec["closing"], the template's end of an assistant turn, in place of the stop
  token; an unfinished reply closed the same way), normalised with the reward stage's mean/std, and for a reply
  with no end-of-turn token min(its score, the batch's lowest finished one) - `missing_eos_penalty`. TRL reads the
  reward at the stop token and subtracts its penalty, so TRL's is set to None and its `get_reward` is wrapped to
  do ours for the reward model (not the value model).

Timing: the clock starts when TRL draws a rollout batch (its iteration's first act) and stops when it logs that
iteration's metrics (after the PPO epochs): rollout + scoring + advantages + update, the phases our stage's
`ppo/episodes_per_s` times; on wall time, or with spec["clock"] == "cpu" on this process's CPU time
(time.process_time), the clock bench/ppo_vs_trl.py gives our stage then. The wall time between consecutive
iteration ends (TRL's `on_step_end`) is recorded too.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    t_import = time.time()
    import torch
    import trl
    import trl.experimental.ppo.ppo_trainer as trl_ppo
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    w = spec["workload"]
    t_load = time.time()
    tok = AutoTokenizer.from_pretrained(spec["sft"])
    tok.padding_side = "left"  # prompts are left-padded: generation continues from the right edge
    policy = AutoModelForCausalLM.from_pretrained(spec["sft"], dtype=torch.float32)
    policy.generation_config.pad_token_id = tok.pad_token_id
    ref = AutoModelForCausalLM.from_pretrained(spec["sft"], dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(spec["reward"], num_labels=1, dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(spec["reward"], num_labels=1, dtype=torch.float32)

    # Our score, on TRL's reward-model path only (see the docstring): closed replies, (raw - mean) / std, and the
    # penalty that puts an unfinished reply below the batch's finished ones (pipeline.rl.shaping.penalise_unfinished;
    # written out here because this side imports nothing from the repository).
    end_id, mean, std, penalty = spec["end_id"], spec["rm_mean"], spec["rm_std"], w["missing_eos_penalty"]
    closing = list(spec["closing"])
    original_get_reward = trl_ppo.get_reward
    lengths_seen: list[float] = []

    def closed(query_responses, pad_token_id, context_length):
        rows = []
        for r in query_responses[:, context_length:].tolist():
            r = r[: r.index(end_id)] if end_id in r else [x for x in r if x != pad_token_id]
            rows.append(r + closing)
        width = max(map(len, rows))
        resp = torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows], device=query_responses.device)
        return torch.cat([query_responses[:, :context_length], resp], 1)

    def get_reward(model, query_responses, pad_token_id, context_length):
        if model is not reward:
            return original_get_reward(model, query_responses, pad_token_id, context_length)
        ended = (query_responses[:, context_length:] == end_id).any(-1)
        resp = query_responses[:, context_length:]
        lengths_seen.append(float(((resp != pad_token_id) | (resp == end_id)).sum(-1).float().mean()))
        logits, final, lengths = original_get_reward(
            model, closed(query_responses, pad_token_id, context_length), pad_token_id, context_length
        )
        final = (final - mean) / std
        if penalty is not None:
            if ended.any():
                lowest = torch.where(ended, final, torch.inf).min()
                final = torch.where(ended, final, torch.minimum(final, lowest) - penalty)
            else:
                final = final - penalty
        return logits, final, lengths

    trl_ppo.get_reward = get_reward

    prompts = Dataset.from_dict({"input_ids": spec["prompt_ids"]})
    B, M = w["rollout_batch_size"], w["minibatch_size"]
    if B % M:
        raise SystemExit(f"rollout batch {B} is not a multiple of the minibatch {M}")
    out_dir = spec["output_dir"]
    args = PPOConfig(
        output_dir=out_dir,
        report_to="none",
        seed=w["seed"],
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        optim="adamw_torch",
        learning_rate=w["lr"],
        adam_beta1=w["beta1"],
        adam_beta2=w["beta2"],
        adam_epsilon=w["eps"],
        weight_decay=w["weight_decay"],
        warmup_steps=0,
        **(
            {"lr_scheduler_type": "constant"}
            if w["min_lr_ratio"] == 1.0
            else {"lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr_rate": w["min_lr_ratio"]}}
        ),
        per_device_train_batch_size=M,
        gradient_accumulation_steps=B // M,
        num_mini_batches=B // M,
        num_ppo_epochs=w["ppo_epochs"],
        total_episodes=w["iterations"] * B,
        local_rollout_forward_batch_size=w["forward_batch_size"],
        response_length=w["max_new_tokens"],
        stop_token_id=end_id,
        temperature=w["temperature"],
        missing_eos_penalty=None,
        kl_coef=w["kl_coef"],
        kl_estimator=w["kl_estimator"],
        cliprange=w["clip_range"],
        cliprange_value=w["clip_range_value"],
        vf_coef=w["vf_coef"],
        gamma=w["gamma"],
        lam=w["lam"],
        whiten_rewards=False,
        num_sample_generations=0,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        per_device_eval_batch_size=1,
        dataloader_num_workers=0,
    )

    clock = time.process_time if spec.get("clock") == "cpu" else time.time
    marks = {"start": [], "end": [], "step_end": [], "train_begin": None, "gc": []}
    collect = gc.collect

    def timed_collect(*a, **kw):  # TRL calls gc.collect() twice an iteration: report what it costs
        t = clock()
        try:
            return collect(*a, **kw)
        finally:
            marks["gc"].append((t, clock()))

    gc.collect = timed_collect
    logs: list[dict] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            marks["train_begin"] = time.time()

        def on_step_end(self, args, state, control, **kw):
            marks["step_end"].append(time.time())

    # Our optimizer settings: AdamW, the policy at lr and the value model at critic_lr (TRL would build one AdamW
    # over both at one lr); TRL's own scheduler is built on top of it.
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in policy.parameters() if p.requires_grad], "lr": w["lr"]},
            {"params": [p for p in value.parameters() if p.requires_grad], "lr": w["critic_lr"]},
        ],
        lr=w["lr"],
        betas=(w["beta1"], w["beta2"]),
        eps=w["eps"],
        weight_decay=w["weight_decay"],
    )
    trainer = PPOTrainer(
        args=args,
        processing_class=tok,
        model=policy,
        ref_model=ref,
        reward_model=reward,
        train_dataset=prompts,
        value_model=value,
        eval_dataset=prompts.select(range(1)),
        optimizers=(optimizer, None),
        callbacks=[Clock()],
    )
    trainer.accelerator.gradient_accumulation_steps = 1  # one optimizer step per minibatch, as ours (see above)

    class TimedLoader:  # the iteration's clock starts when its rollout batch is drawn
        def __init__(self, inner):
            self.inner = inner

        def __iter__(self):
            for batch in self.inner:
                marks["start"].append(clock())
                yield batch

        def __len__(self):
            return len(self.inner)

    trainer.dataloader = TimedLoader(trainer.dataloader)
    log = trainer.log

    def timed_log(metrics, *a, **kw):  # called once per iteration, right after the PPO epochs
        marks["end"].append(clock())
        logs.append(
            {
                **{k: float(v) for k, v in metrics.items()},
                "response_length": sum(lengths_seen) / max(len(lengths_seen), 1),
            }
        )
        lengths_seen.clear()
        return log(metrics, *a, **kw)

    trainer.log = timed_log
    load_s = time.time() - t_load

    t_train = time.time()
    trainer.train()
    train_s = time.time() - t_train
    trainer.save_model(spec["save_dir"])
    tok.save_pretrained(spec["save_dir"])

    n = min(len(marks["start"]), len(marks["end"]))
    result = {
        "versions": {
            "trl": trl.__version__,
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "accelerate": __import__("accelerate").__version__,
        },
        "threads": torch.get_num_threads(),
        "episodes_per_iteration": B,
        "iteration_s": [marks["end"][i] - marks["start"][i] for i in range(n)],  # rollout + update
        "gc_s": [sum(b - a for a, b in marks["gc"] if marks["start"][i] <= a <= marks["end"][i]) for i in range(n)],
        "wall_s": [b - a for a, b in zip([marks["train_begin"]] + marks["step_end"][:-1], marks["step_end"])],
        "train_s": train_s,
        "load_s": load_s,
        "import_s": t_load - t_import,
        "logs": logs,
        "optimizer_steps": int(trainer.optimizer.state[next(iter(trainer.optimizer.state))]["step"])
        if trainer.optimizer.state
        else 0,
    }
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__.split("\n\n")[1])
    main(sys.argv[1], sys.argv[2])
