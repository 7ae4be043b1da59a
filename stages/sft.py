"""Stage 2 — supervised fine-tuning on demonstration dialogues (InstructGPT step 1).

    make sft                                                   # = python -m stages.sft
    python -m stages.sft optim.lr=3e-4 train.max_steps=800 run=lr3e-4 parent_run=default
    python -m stages.sft peft=lora                             # LoRA, merged into final/ (peft.merge=false: adapter)
    python -m stages.sft model=hf model.name_or_path=<hub name or folder>   # start from any chat-templated HF model
    accelerate launch --config_file conf/accelerate/cpu2.yaml -m stages.sft   # 2 CPU processes (conf/accelerate: GPUs)

Starts from the pretrained checkpoint (the parent stage) and trains with TRL's SFTTrainer on the assistant turns only:
the chat template wraps them in {% generation %}, so user and system tokens are context, never targets. Held-out
loss on data.sft_eval and a table of sample replies at every evaluation; at the end both the pretrained and the
fine-tuned model answer data.eval_prompts and the gold oracle scores them (eval/pretrain_gold_score,
eval/gold_score). Interrupted? Run the same command again: the Trainer resumes from its last checkpoint.
"""

from __future__ import annotations

import time

import torch
from accelerate import PartialState
from omegaconf import DictConfig

from pipeline.core.entry import entry
from pipeline.core.errors import UserError
from pipeline.core.runs import StageRun, read_manifest
from pipeline.core.stage import begin_stage
from pipeline.data.tokenizer import load_tokenizer
from pipeline.inference.generation import saved_generation_config
from pipeline.eval.gold import gold_eval, win_rate
from pipeline.models.build import n_params
from pipeline.models.loading import fit_special_ids, load_causal_lm
from pipeline.trainers.hf import (
    TrackerCallback,
    bookkeeping,
    check_finite_loss,
    final_model,
    lora_config,
    train_resumable,
    trainer_args,
)
from pipeline.trainers.sft import SamplesCallback, count_long

# ---- the stage -------------------------------------------------------------------------------------------------


def run_sft(cfg: DictConfig, callbacks: tuple = ()) -> None:
    """The stage; `callbacks` are extra TrainerCallbacks (tests use one to interrupt a run)."""
    import datasets
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    from pipeline.data.formats import load_prompts, load_sft
    from pipeline.world.oracle import GoldOracle

    # ---- setup -------------------------------------------------------------------------------------------
    state = PartialState(cpu=not torch.cuda.is_available())  # CPU-only: several processes still form a group
    run = StageRun(cfg, is_main=state.is_main_process)
    # model.name_or_path with a finished pretrain stage in this run: continue from that (continued pretraining
    # happened there), unless model.start_over; without one, start from name_or_path itself
    named = cfg.model.name_or_path
    pretrained = read_manifest(run.root / run.parent_run / "pretrain")
    own_parent = not named or (not cfg.model.start_over and pretrained is not None)
    parent = run.parent("pretrain") if own_parent else None
    begun = begin_stage(cfg, run, state, parents=[parent])
    if begun is None:
        return
    tracker, say, t0 = begun
    t = cfg.train

    # ---- model: the parent's final/ (or any HF causal LM); its tokenizer must carry a chat template ------
    src = parent["final"] if parent else named
    if named:
        say(
            f"[sft] model.name_or_path={named}: "
            + (
                f"continuing from this run's pretrain stage ({src}; model.start_over=true starts from {named} itself)"
                if parent
                else f"starting from {named} itself"
                + (" (model.start_over=true)" if cfg.model.start_over else " (this run has no finished pretrain stage)")
            )
        )
    tok = load_tokenizer(src, need_chat_template=True)
    model = fit_special_ids(load_causal_lm(src, trust_remote_code=cfg.model.trust_remote_code), tok).to(state.device)
    ctx = getattr(model.config, "max_position_embeddings", None) or cfg.model.max_seq_len
    max_len = min(t.max_length or cfg.model.max_seq_len, ctx)
    say(
        f"[sft] from {src}: {n_params(model) / 1e6:.2f}M params, max_length {max_len}"
        + (", LoRA" if cfg.peft.enabled else "")
    )

    # ---- data ----------------------------------------------------------------------------------------
    train_recs, skipped = load_sft(cfg.data.sft, cfg.data.world, cfg.paths.cache)
    eval_recs, skipped_eval = load_sft(cfg.data.sft_eval, cfg.data.world, cfg.paths.cache)
    if not train_recs:
        raise UserError(f"data.sft ({cfg.data.sft.path or cfg.data.sft.kind}): no usable dialogues")
    prompts, _ = load_prompts(cfg.data.eval_prompts, cfg.data.world, cfg.paths.cache)
    if t.gold_eval_prompts:
        prompts = prompts[: t.gold_eval_prompts]
    # Gold scores exist only for the built-in world's prompts.
    oracle = GoldOracle.from_config(cfg.data.world) if cfg.data.eval_prompts.kind == "world" else None
    n_long = count_long(tok, [r["messages"] for r in train_recs], max_len)
    say(
        f"[sft] {len(train_recs)} dialogues ({len(eval_recs)} held out), {n_long} longer than {max_len} tokens "
        f"(truncated), {len(prompts)} eval prompts"
        + (f", {skipped + skipped_eval} bad records skipped" if skipped + skipped_eval else "")
    )
    train_ds = datasets.Dataset.from_list([{"messages": r["messages"]} for r in train_recs])
    eval_ds = datasets.Dataset.from_list([{"messages": r["messages"]} for r in eval_recs]) if eval_recs else None

    # ---- the starting model's gold score: what SFT has to beat ----------------------------------------
    metrics: dict = {}
    pretrain_rows = None
    if oracle and prompts and t.eval_pretrained:
        m0, pretrain_rows = gold_eval(
            model, tok, prompts, oracle, cfg.generation, t.gen_batch_size, seed=cfg.seed, prefix="eval/pretrain"
        )
        metrics["eval/pretrain_gold_score"] = m0.pop("eval/pretrain/gold_score")
        metrics.update(m0)
        tracker.log(metrics, step=0)
        say(f"[sft] starting model: gold score {metrics['eval/pretrain_gold_score']:.3f}")

    # ---- training: TRL's SFTTrainer, loss on assistant tokens only ------------------------------------
    args = trainer_args(
        TRLSFTConfig,
        cfg,
        run,
        t,
        evaluate=eval_ds is not None,
        max_length=max_len,
        packing=t.packing,
        assistant_only_loss=True,
        eval_packing=False if t.packing else None,
    )
    log_cb = TrackerCallback(tracker, say)
    sample_prompts = prompts[: t.sample_prompts] if oracle else []
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tok,
        peft_config=lora_config(cfg.peft, "CAUSAL_LM"),
        callbacks=[log_cb, SamplesCallback(tok, sample_prompts, oracle, cfg, tracker, say), *callbacks],
    )
    dropped = len(train_ds) - len(trainer.train_dataset) if not t.packing else 0
    if dropped:
        say(f"[sft] {dropped} dialogues dropped: truncation to {max_len} tokens left no assistant token in them")
    train_resumable(trainer, run, run.ckpt_root, say, "[sft] resuming")
    if eval_ds is not None and log_cb.last_eval_step != trainer.state.global_step:
        trainer.evaluate()
    metrics.update({k: v for k, v in log_cb.last.items() if k.startswith("eval/") and not bookkeeping(k)})
    metrics["train/loss"] = check_finite_loss(log_cb.last, "training diverged", "try a lower optim.lr")

    # ---- the fine-tuned model's gold score ------------------------------------------------------------
    model = trainer.accelerator.unwrap_model(trainer.model)
    if oracle and prompts:
        m1, rows = gold_eval(model, tok, prompts, oracle, cfg.generation, t.gen_batch_size, seed=cfg.seed)
        metrics.update(m1)
        if pretrain_rows:
            metrics["eval/win_rate_vs_pretrain"] = win_rate([r[2] for r in rows], [r[2] for r in pretrain_rows])
        tracker.table("gold_samples", ["prompt", "response", "gold_score"], rows, step=trainer.state.global_step)
        tracker.log({k: v for k, v in metrics.items() if k.startswith("eval/")}, step=trainer.state.global_step)

    # ---- save: a plain HF checkpoint whose generation_config stops at the end of the turn --------------
    state.wait_for_everyone()
    out_model, adapter, weights = final_model(trainer, cfg.peft)
    gen_cfg = saved_generation_config(tok, cfg.generation.max_new_tokens)
    if not adapter:
        out_model.generation_config = gen_cfg

    def save(d):
        out_model.save_pretrained(d, state_dict=weights, safe_serialization=True)
        tok.save_pretrained(d)
        if adapter:
            gen_cfg.save_pretrained(d)

    metrics.update(
        {
            "model/params": n_params(out_model),
            "data/skipped_records": skipped + skipped_eval,
            "data/train_dialogues": len(train_ds),
            "data/truncated": n_long,
            "data/dropped": dropped,
            "time/stage_s": time.time() - t0,
        }
    )
    run.finish(save, metrics, adapter=adapter, start_model=str(src))
    tracker.finish(metrics, run.final_dir)
    say(
        f"[sft] eval/loss {metrics.get('eval/loss', float('nan')):.4f}; gold score "
        f"{metrics.get('eval/pretrain_gold_score', float('nan')):.3f} (pretrained) -> "
        f"{metrics.get('eval/gold_score', float('nan')):.3f} (sft); saved {run.final_dir} "
        f"in {metrics['time/stage_s']:.0f}s"
    )


@entry("sft")
def main(cfg: DictConfig) -> None:
    run_sft(cfg)


if __name__ == "__main__":
    main()
