"""Method — expert iteration (rejection-sampling fine-tuning): SFT on the reward model's best of its own samples.

    make expert-iteration                                      # = python -m stages.expert_iteration
    python -m stages.expert_iteration train.samples=16 train.rounds=2 run=ei16 parent_run=default

Each round: the current policy (round 1: SFT) answers train.prompts PPO prompts train.samples times each, the
reward model (read as PPO reads it) keeps its best reply to each, and TRL's SFTTrainer fine-tunes the policy on
those dialogues, assistant tokens only, as the SFT stage trains (AlpacaFarm's expert iteration, Llama 2's
rejection sampling). The kept dialogues are saved as round_<r>.jsonl in the stage folder. Then the evaluation every
method gets (pipeline.eval.gold.versus_sft). Interrupted? Run the same command again: finished rounds are kept, the
current one resumes from its last Trainer checkpoint.
"""

import os
import time
from types import SimpleNamespace

import torch
from accelerate import PartialState
from omegaconf import DictConfig

from pipeline.core.entry import entry
from pipeline.core.errors import UserError
from pipeline.core.io import write_jsonl
from pipeline.core.runs import StageRun
from pipeline.core.stage import begin_stage
from pipeline.data.formats import check_prompt_lengths, load_prompts, load_sft
from pipeline.models.loading import fit_special_ids, load_causal_lm
from pipeline.models.sharding import without_tied
from pipeline.models.token_model import TokenModel
from pipeline.trainers.expert_iteration import best_replies
from pipeline.trainers.hf import (
    TrackerCallback,
    final_model,
    lora_config,
    trainer_args,
    check_finite_loss,
    train_resumable,
)
from pipeline.trainers.methods import Judge, sample_rows, summary


@entry("expert_iteration")
def main(cfg: DictConfig) -> None:
    import datasets
    from omegaconf import OmegaConf
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

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

    # ---- models: the judge (frozen SFT, the reward model, the oracle); the policy, round by round -------
    judge = Judge(cfg, sft_parent, rm_parent, state.device)
    run.update(reward=judge.reward_model.describe())  # the methods table says what each method optimised
    tok = judge.tok
    ctx = cfg.model.max_seq_len
    max_len = min(t.max_length or ctx, ctx)

    # ---- data: the PPO prompts, a slice per round -----------------------------------------------------
    recs, skipped = load_prompts(cfg.data.prompts, cfg.data.world, cfg.paths.cache)
    src = cfg.data.prompts
    recs, n = check_prompt_lengths(
        recs,
        tok,
        cfg.eval.max_prompt_tokens,
        src.on_bad_record,
        f"data.prompts ({src.path or src.kind}; limit eval.max_prompt_tokens)",
    )
    prompts = [r["messages"] for r in recs]
    if not prompts:
        raise UserError(f"no usable prompts in data.prompts ({src.kind}:{src.path})")
    say(
        f"[expert_iteration] {t.rounds} round(s): best of {t.samples} replies to {t.prompts} of {len(prompts)} "
        f"prompts by the reward model, then {t.max_steps} SFT steps" + (", LoRA" if cfg.peft.enabled else "")
    )

    # ---- the rounds: sample -> keep the best -> fine-tune ---------------------------------------------
    source, tokens, generated, step, log = sft_parent["final"], 0, 0, 0, {}
    for r in range(1, t.rounds + 1):
        rdir = run.ckpt_root / f"round_{r}"
        done = rdir / "model"
        if (done / "config.json").is_file():  # a finished round: its policy is the next one's start
            source = str(done)
            say(f"[expert_iteration] round {r} already done ({done})")
            continue
        policy = fit_special_ids(load_causal_lm(source), tok).to(state.device)
        kept_file = run.dir / f"round_{r}.jsonl"
        fresh = not kept_file.is_file()
        # every process decides from the file as it is before the main one writes it: a process that looked
        # after it was written would skip the sampling and its barrier, and the two would wait forever in
        # different collectives (SFTTrainer's dataset barrier on one, the model's first all-reduce on the other)
        state.wait_for_everyone()
        if fresh:
            start = (r - 1) * t.prompts
            chosen = [prompts[(start + i) % len(prompts)] for i in range(t.prompts)]
            kept, st = best_replies(
                TokenModel(policy),
                tok,
                chosen,
                judge.end_ids,
                t.samples,
                judge.reward_model,
                judge.closing,
                judge.oracle,
                t,
                state.device,
                t.gen_batch_size,
                cfg.eval.max_prompt_tokens,
                cfg.seed + r,
                cfg.sampler,
            )
            generated += st["generated_tokens"]
            log = {f"round/{k}": v for k, v in st.items()}
            tracker.log({**log, "round": r}, step=step)
            say(
                f"[expert_iteration] round {r}: kept replies' reward {st['rm_kept']:.3f} (all samples "
                f"{st['rm_all']:.3f}), gold {st['gold_kept']:.3f} (all {st['gold_all']:.3f})"
            )
            if state.is_main_process:
                write_jsonl(kept_file, kept)
            state.wait_for_everyone()
        demos, _ = load_sft(
            OmegaConf.create(
                {
                    "kind": "local",
                    "path": str(kept_file),
                    "format": "messages",
                    "split": "train",
                    "on_bad_record": "error",
                }
            ),
            None,
            None,
        )
        train_ds = datasets.Dataset.from_list([{"messages": d["messages"]} for d in demos])
        args = trainer_args(
            TRLSFTConfig,
            cfg,
            SimpleNamespace(ckpt_root=rdir),
            t,
            evaluate=False,
            max_length=max_len,
            assistant_only_loss=True,
        )
        log_cb = TrackerCallback(tracker, say)
        trainer = SFTTrainer(
            model=policy,
            args=args,
            train_dataset=train_ds,
            processing_class=tok,
            peft_config=lora_config(cfg.peft, "CAUSAL_LM"),
            callbacks=[log_cb],
        )
        train_resumable(trainer, run, rdir, say, f"[expert_iteration] resuming round {r}", resumed_round=r)
        check_finite_loss(log_cb.last, f"expert iteration diverged in round {r}", "lower optim.lr")
        tokens += int(log_cb.last.get("train/num_tokens", 0))
        step += t.max_steps
        if r < t.rounds:  # the next round samples from this one's policy, merged
            model = trainer.accelerator.unwrap_model(trainer.model)
            if cfg.peft.enabled:
                model, weights = model.merge_and_unload(), None
            else:  # gathered on every process: under FSDP each holds a shard
                weights = without_tied(model, trainer.accelerator.get_state_dict(trainer.model_wrapped))
            if state.is_main_process:
                tmp = rdir / ".model_tmp"
                model.save_pretrained(tmp, state_dict=weights, safe_serialization=True)
                tok.save_pretrained(tmp)
                os.replace(tmp, done)
            state.wait_for_everyone()
            source = str(done)
    state.wait_for_everyone()
    out_model, adapter, weights = final_model(trainer, cfg.peft)  # the last round always trains (no "model" kept)

    # ---- evaluation: the one every method gets ---------------------------------------------------------
    metrics, outputs = judge.versus_sft(out_model)
    metrics.update(log)
    metrics.update(
        {
            "train/tokens": tokens,
            "train/generated_tokens": generated,
            "train/rounds": t.rounds,
            "data/skipped_records": skipped + n,
            "time/stage_s": time.time() - t0,
        }
    )
    tracker.log(metrics, step=step)
    tracker.table(
        "eval/samples",
        ["prompt", "sft", "sft_gold", "expert_iteration", "expert_iteration_gold"],
        sample_rows(judge.prompts, outputs["eval/sampled"]),
        step=step,
    )

    # ---- save: a plain Hugging Face checkpoint ---------------------------------------------------------
    def save(d):
        out_model.save_pretrained(d, state_dict=weights, safe_serialization=True)
        tok.save_pretrained(d)

    run.finish(save, metrics, adapter=adapter)
    tracker.finish(metrics, run.final_dir)
    say(summary("expert_iteration", metrics) + f"; saved {run.final_dir} in {metrics['time/stage_s']:.0f}s")


if __name__ == "__main__":
    main()
