"""Method — DPO: the SFT policy fitted directly to the comparisons, no reward model in the loop (Rafailov et al.).

    make dpo                                                  # = python -m stages.dpo
    python -m stages.dpo train.beta=0.3 run=dpo-b03 parent_run=default
    python -m stages.dpo train.loss_type=ipo peft=lora         # IPO; LoRA (merged into final/ unless peft.merge=false)

TRL's DPOTrainer on the comparisons the reward model learnt from: data.preference (the shipped ranked comparisons,
expanded to pairs) and, with train.onpolicy, the on-policy comparisons the reward stage recorded
(runs/<run>/reward/onpolicy_comparisons.jsonl). The SFT policy is the reference (with LoRA, the adapter-disabled
base); beta and the loss type come from config. The reward model is only a judge here: the evaluation every method
gets (pipeline.eval.gold.versus_sft) reads it for eval/.../reward. Interrupted? Run the same command again: the
Trainer resumes from its last checkpoint.
"""

import json
import math
import time
from pathlib import Path

import torch
from accelerate import PartialState
from omegaconf import DictConfig

from pipeline.core.entry import entry
from pipeline.core.errors import UserError
from pipeline.core.io import read_utf8, write_json_atomic, write_jsonl
from pipeline.core.registry import stage_folder
from pipeline.core.runs import StageRun
from pipeline.core.stage import begin_stage
from pipeline.data.formats import check_prompt_lengths, load_preferences
from pipeline.data.pairs import expand_pairs
from pipeline.data.tokenizer import load_tokenizer
from pipeline.eval.gold import eval_record, versus_previous
from pipeline.models.loading import fit_special_ids, load_causal_lm
from pipeline.trainers.hf import (
    TrackerCallback,
    final_model,
    lora_config,
    trainer_args,
    check_finite_loss,
    train_resumable,
)
from pipeline.trainers.methods import Judge, sample_rows, summary
from pipeline.trainers.reward import first_groups


@entry("dpo")
def main(cfg: DictConfig) -> None:
    import datasets
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    # ---- setup -------------------------------------------------------------------------------------------
    state = PartialState(cpu=not torch.cuda.is_available())
    run = StageRun(cfg, is_main=state.is_main_process)
    sft_parent = run.parent("sft")
    rm_parent = run.parent("reward")  # round 1's comparisons; every round's judge for eval/.../reward
    r, it = run.round, cfg.iterate
    start_parent = run.parent(stage_folder("dpo", r - 1)) if r > 1 else sft_parent  # online DPO: the last round's
    ref_parent = sft_parent if r == 1 or it.kl_anchor == "sft" else start_parent
    begun = begin_stage(cfg, run, state, parents=[sft_parent, rm_parent] + ([start_parent] if r > 1 else []))
    if begun is None:
        return
    tracker, say, t0 = begun
    t = cfg.train

    # ---- model: the SFT policy (and, without LoRA, a frozen copy of it as the reference) ----------------
    tok = load_tokenizer(sft_parent["final"], need_chat_template=True)
    model = fit_special_ids(load_causal_lm(start_parent["final"]), tok).to(state.device)
    ref_model = (
        None
        if ref_parent is start_parent
        else fit_special_ids(load_causal_lm(ref_parent["final"]), tok).to(state.device).eval()
    )
    ctx = getattr(model.config, "max_position_embeddings", None) or cfg.model.max_seq_len
    max_len = min(t.max_length or cfg.model.max_seq_len, ctx)

    # ---- data: the reward stage's comparisons, shipped and on-policy (round r > 1: fresh ones) ------------
    labels = {}
    if r == 1:
        pairs, skipped = load_preferences(cfg.data.preference, cfg.data.world)
        pairs = first_groups(pairs, t.max_prompts)
        onpolicy = Path(rm_parent["dir"]) / "onpolicy_comparisons.jsonl"
        n_onpolicy = 0
        if t.onpolicy and onpolicy.is_file():  # expanded as the reward stage expanded them: the same pairs
            more = expand_pairs([json.loads(line) for line in read_utf8(onpolicy).splitlines() if line.strip()])
            pairs, n_onpolicy = pairs + more, len(more)
        labels["labels/total_pairs"] = len(pairs)
    else:  # online DPO: round r-1's policy answers a fresh slice of data.prompts, the labellers rank them
        pairs, records, labels = fresh_comparisons(cfg, run, model, tok, start_parent, state.device)
        skipped, n_onpolicy = 0, len(pairs)
        if state.is_main_process:
            write_jsonl(run.dir / "onpolicy_comparisons.jsonl", records)
        # one pass over the round's fresh pairs (train.max_steps at most): a round adds labels, not epochs
        t.max_steps = min(t.max_steps, max(1, math.ceil(len(pairs) / (t.batch_size * t.grad_accum))))
    pairs, n = check_prompt_lengths(pairs, tok, max_len, cfg.data.preference.on_bad_record, "data.preference")
    skipped += n
    if not pairs:
        raise UserError(
            f"data.preference ({cfg.data.preference.path or cfg.data.preference.kind}): no usable "
            f"preference pairs" + (f" ({skipped} bad records skipped)" if skipped else "")
        )
    train_ds = datasets.Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])
    say(
        f"[{run.name}] {len(pairs)} pairs ({n_onpolicy} on-policy"
        + (" from the reward stage" if r == 1 else f", fresh labels of {stage_folder('dpo', r - 1)}")
        + f"), beta {t.beta}, "
        f"loss {t.loss_type}, max_length {max_len}"
        + (", LoRA" if cfg.peft.enabled else "")
        + (f", {skipped} bad records skipped" if skipped else "")
    )

    # ---- training: TRL's DPOTrainer, the SFT policy as the reference -----------------------------------
    args = trainer_args(
        TRLDPOConfig, cfg, run, t, evaluate=False, max_length=max_len, beta=t.beta, loss_type=[t.loss_type]
    )
    log_cb = TrackerCallback(tracker, say)
    trainer = DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=train_ds,
        processing_class=tok,
        peft_config=lora_config(cfg.peft, "CAUSAL_LM"),
        callbacks=[log_cb],
    )
    train_resumable(trainer, run, run.ckpt_root, say, "[dpo] resuming")
    loss = check_finite_loss(log_cb.last, "DPO diverged", "try a lower optim.lr or a smaller train.beta")

    # ---- evaluation: the one every method gets ---------------------------------------------------------
    state.wait_for_everyone()
    out_model, adapter, weights = final_model(trainer, cfg.peft)
    judge = Judge(cfg, sft_parent, rm_parent, state.device)
    metrics, outputs = judge.versus_sft(out_model)
    if r > 1:  # the same prompts and seeds, against round r-1's answers
        prev = Path(start_parent["dir"]) / "eval_outputs.json"
        if prev.exists():
            metrics.update(
                versus_previous({k: v[0] for k, v in outputs.items()}, json.loads(prev.read_text()), cfg.eval.bootstrap)
            )
    metrics.update(labels)
    metrics.update({k: v for k, v in log_cb.last.items() if k.startswith("train/rewards/")})
    metrics.update(
        {
            "train/loss": loss,
            "train/tokens": log_cb.last.get("train/num_tokens", 0),
            "data/train_pairs": len(pairs),
            "data/onpolicy_pairs": n_onpolicy,
            "data/skipped_records": skipped,
            "time/stage_s": time.time() - t0,
        }
    )
    tracker.log(metrics, step=trainer.state.global_step)
    tracker.table(
        "eval/samples",
        ["prompt", "sft", "sft_gold", "dpo", "dpo_gold"],
        sample_rows(judge.prompts, outputs["eval/sampled"]),
        step=trainer.state.global_step,
    )

    # ---- save: a plain Hugging Face checkpoint (SFT's generation config) -------------------------------
    def save(d):
        out_model.save_pretrained(d, state_dict=weights, safe_serialization=True)
        tok.save_pretrained(d)

    if state.is_main_process:
        write_json_atomic(run.dir / "eval_outputs.json", eval_record(outputs))  # the next round compares with it
    run.finish(
        save,
        metrics,
        adapter=adapter,
        lineage={
            "policy_from": stage_folder("dpo", r - 1) if r > 1 else "sft",
            "kl_anchor": "sft" if ref_parent is sft_parent else stage_folder("dpo", r - 1),
        },
    )
    tracker.finish(metrics, run.final_dir)
    say(summary("dpo", metrics) + f"; saved {run.final_dir} in {metrics['time/stage_s']:.0f}s")


def fresh_comparisons(cfg, run, policy, tok, start_parent: dict, device) -> tuple[list, list, dict]:
    """Online DPO's labels for round r: `iterate.samples` replies of round r-1's policy to each prompt of the round's
    slice of data.prompts (the slices the reward rounds take), sampled as the evaluation samples, ranked by the
    world's simulated labellers. Returns (pairs, ranked records, label counts)."""
    from omegaconf import OmegaConf

    from pipeline.core.config import GenerationSettings
    from pipeline.data.formats import load_prompts
    from pipeline.trainers.onpolicy import round_comparisons
    from pipeline.world.oracle import GoldOracle

    r, it, e = run.round, cfg.iterate, cfg.eval
    if cfg.data.prompts.kind != "world":
        raise UserError(
            f"round={r}: online DPO labels the policy's samples with the world's simulated labellers, so "
            f"data.prompts must be kind world"
        )
    prompts, _ = load_prompts(cfg.data.prompts, cfg.data.world, cfg.paths.cache)
    settings = OmegaConf.structured(
        GenerationSettings(
            max_new_tokens=e.max_new_tokens, do_sample=True, temperature=e.temperature, top_k=e.top_k, top_p=e.top_p
        )
    )
    records, stats = round_comparisons(
        policy,
        tok,
        prompts,
        r,
        GoldOracle.from_config(cfg.data.world),
        it.samples,
        it.prompts,
        settings,
        e.batch_size,
        cfg.data.world.label_temperature,
        cfg.seed,
        backend=cfg.sampler,
    )
    pairs = expand_pairs(records)
    total = (start_parent.get("metrics", {}).get("labels/total_pairs") or 0) + len(pairs)
    return (
        pairs,
        records,
        {**stats, "labels/round_rankings": len(records), "labels/round_pairs": len(pairs), "labels/total_pairs": total},
    )


if __name__ == "__main__":
    main()
