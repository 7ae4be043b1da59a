"""Stage 3 — a reward model from human comparisons (InstructGPT step 2).

    make reward                                                # = python -m stages.reward
    python -m stages.reward train.center_rewards_coefficient=0.01 run=rm-centred parent_run=default
    python -m stages.reward peft=lora                          # LoRA (merged into final/ unless peft.merge=false)
    python -m stages.reward onpolicy.prompts=0 run=rm-shipped parent_run=default  # the shipped comparisons alone
    accelerate launch --config_file conf/accelerate/cpu2.yaml -m stages.reward   # 2 CPU processes (conf/accelerate: GPUs)

The SFT checkpoint (the parent stage) gets a scalar head (AutoModelForSequenceClassification, num_labels=1) that
reads the conversation through the chat template, reply last, and scores it at its final token. TRL's
RewardTrainer fits it to the ranked comparisons with the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected).
`train.group_by_prompt=true` keeps all the pairs of one prompt's ranking in the same batch, as InstructGPT did: its
K-choose-2 pairs are strongly correlated, and seen in separate steps they make the model overfit (section 3.5); and
each completion is scored once per batch, so a ranking of K costs K forward passes instead of K(K-1).

On-policy comparisons (`onpolicy.prompts`, `onpolicy.samples`): InstructGPT's labellers ranked the SFT model's own
samples, not hand-written candidates. Before training, the SFT policy answers the first `onpolicy.prompts` prompts
of the world's comparisons `onpolicy.samples` times each (the `generation` settings, as PPO samples), the gold
oracle ranks the replies with the shipped data's label noise (pipeline/world/labellers.py), and those pairs join the
shipped ones; they are kept as onpolicy_comparisons.jsonl in the stage folder. Without them the reward model has
never seen the mistakes this policy makes, and PPO finds them (docs/ppo.md).

Reported on data.preference_test: eval/accuracy (against the noisy labels; ~75% of pairs agree with the truth, so
that is roughly the ceiling), eval/gold_accuracy (against the gold oracle's order), eval/ece (calibration of
sigmoid(margin), 10 bins) and eval/margin. At the end the SFT policy answers data.prompts (`train.stats_samples`
times each) and the model's reward on those answers gives reward_stats {mean, std} (manifest and
final/reward_stats.json), which PPO normalises with, and with the oracle reward/gold_correlation and
reward/gold_pair_accuracy: how often it orders two answers to the same prompt as gold does, the signal PPO uses.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import set_seed
from omegaconf import DictConfig
from transformers import ProgressCallback

from pipeline.core.entry import entry
from pipeline.core.errors import UserError
from pipeline.core.io import read_utf8, write_json_atomic
from pipeline.core.registry import stage_folder
from pipeline.core.runs import StageRun, failure_reason, latest_trainer_checkpoint
from pipeline.core.tracking import Tracker
from pipeline.data.tokenizer import load_tokenizer
from pipeline.eval.reward_model import answer_stats, policy_answers
from pipeline.models.build import n_params
from pipeline.models.loading import load_policy, load_sequence_classifier
from pipeline.trainers.hf import QuietProgress, TrackerCallback, final_model, lora_config, trainer_args
from pipeline.trainers.reward import EvalCallback, first_groups, make_trainer_class


def run_reward(cfg: DictConfig) -> None:
    import datasets
    from trl import RewardConfig as TRLRewardConfig

    from pipeline.core.io import write_jsonl
    from pipeline.data.formats import check_prompt_lengths, load_preferences, load_prompts
    from pipeline.data.pairs import expand_pairs
    from pipeline.world.labellers import distinct_prompts, onpolicy_comparisons, round_comparisons
    from pipeline.world.oracle import GoldOracle

    # ---- setup -------------------------------------------------------------------------------------------
    state = PartialState(cpu=not torch.cuda.is_available())  # CPU-only: several processes still form a group
    run = StageRun(cfg, is_main=state.is_main_process)
    parent = run.parent("sft")
    r, it = run.round, cfg.iterate
    if r > 1:  # a round of make iterate: the labellers see round r-1's policy; its reward model is the one updated
        prev_rm = run.parent(stage_folder("reward", r - 1))
        current = run.parent(stage_folder(it.policy, r - 1))
        if it.reward_steps:
            cfg.train.max_steps = it.reward_steps
    if not run.begin(barrier=state.wait_for_everyone):
        return
    t0 = time.time()
    set_seed(cfg.seed)
    tracker = Tracker(cfg, run, state.is_main_process)
    for p in (parent, prev_rm, current) if r > 1 else (parent,):
        tracker.use_parent(p)
    say = print if state.is_main_process else (lambda *a, **k: None)
    datasets.disable_progress_bars()
    t = cfg.train
    merged_dir = run.dir / ".sft_merged"

    try:
        # ---- model: the SFT checkpoint with a scalar head ------------------------------------------------
        tok = load_tokenizer(parent["final"], need_chat_template=True)
        src = parent["final"]
        if parent.get("adapter"):  # an SFT adapter: merge it once into a plain checkpoint to start from
            if cfg.peft.enabled and not cfg.peft.merge:
                raise UserError("peft.merge=false: the SFT stage kept only an adapter too, so this adapter would have "
                                "no lasting base model to refer to; set peft.merge=true (or merge the SFT stage)")
            if state.is_main_process:
                load_policy(src, "fp32", "cpu")[0].save_pretrained(merged_dir, safe_serialization=True)
            state.wait_for_everyone()
            src = str(merged_dir)
        if r > 1 and it.reward_init == "continue":
            src = prev_rm["final"]  # round r-1's reward model, head and all, updated on the comparisons so far
        model = load_sequence_classifier(src, torch.float32, cfg.model.trust_remote_code)  # SFT: a fresh scalar head
        model.config.pad_token_id = tok.pad_token_id  # the head reads the last non-pad token
        ctx = getattr(model.config, "max_position_embeddings", None) or cfg.model.max_seq_len
        max_len = min(t.max_length or cfg.model.max_seq_len, ctx)
        say(f"[{run.name}] from {src if src != str(merged_dir) else parent['final']}: {n_params(model) / 1e6:.2f}M "
            f"params, max_length {max_len}"
            + (", LoRA" if cfg.peft.enabled else "") + (", batches keep prompts together" if t.group_by_prompt else ""))

        # ---- data: ranked comparisons expanded to pairs; prompts alone must fit ---------------------------
        pairs, skipped = load_preferences(cfg.data.preference, cfg.data.world)
        test_pairs, skipped_test = load_preferences(cfg.data.preference_test, cfg.data.world)
        pairs, test_pairs = first_groups(pairs, t.max_prompts), first_groups(test_pairs, t.max_test_prompts)
        pairs, n = check_prompt_lengths(pairs, tok, max_len, cfg.data.preference.on_bad_record, "data.preference")
        test_pairs, n_test = check_prompt_lengths(test_pairs, tok, max_len, cfg.data.preference_test.on_bad_record,
                                                  "data.preference_test")
        skipped, skipped_test = skipped + n, skipped_test + n_test  # prompts too long (on_bad_record=skip)
        if not pairs:
            raise UserError(f"data.preference ({cfg.data.preference.path or cfg.data.preference.kind}): "
                            f"no usable preference pairs" + (f" ({skipped} bad records skipped)" if skipped else ""))

        # ---- on-policy comparisons: the SFT policy's own samples, ranked by simulated labellers --------------
        # (round r > 1: round r-1's policy on a fresh slice of data.prompts, and every earlier round's as well)
        o, extra = cfg.onpolicy, {}
        comparison_files = []  # every on-policy comparison file this reward model learnt from, under paths.root
        prompts, _ = load_prompts(cfg.data.prompts, cfg.data.world, cfg.paths.cache)
        oracle = GoldOracle.from_config(cfg.data.world) if cfg.data.prompts.kind == "world" else None
        if r > 1:
            if cfg.data.preference.kind != "world" or oracle is None:
                raise UserError(f"round={r}: iterated RLHF labels the policy's samples with the world's simulated "
                                f"labellers, so data.preference and data.prompts must be kind world")
            earlier = prev_rm.get("comparisons")
            if earlier is None:  # a reward stage made before rounds existed: its on-policy file, if it wrote one
                f = Path(prev_rm["dir"]) / "onpolicy_comparisons.jsonl"
                earlier = [str(f.relative_to(run.root))] if f.is_file() else []
            for f in earlier:
                recs = [json.loads(x) for x in read_utf8(run.root / f).splitlines() if x.strip()]
                pairs += expand_pairs(recs)
                comparison_files.append(f)
            extra["labels/earlier_pairs"] = len(pairs)
            policy = load_policy(current["final"], cfg.precision, state.device, cfg.model.trust_remote_code)[0]
            records, extra_r = round_comparisons(
                policy, tok, prompts, r, oracle, it.samples, it.prompts, cfg.generation, t.gen_batch_size,
                o.label_temperature or cfg.data.world.label_temperature, cfg.seed)
            del policy
            extra.update(extra_r)
            if state.is_main_process:
                write_jsonl(run.dir / "onpolicy_comparisons.jsonl", records)
            comparison_files.append(f"{run.run}/{run.name}/onpolicy_comparisons.jsonl")
            new_pairs = expand_pairs(records)
            pairs += new_pairs
            extra.update({"labels/round_rankings": len(records), "labels/round_pairs": len(new_pairs),
                          "data/onpolicy_pairs": len(new_pairs)})
            say(f"[{run.name}] round {r}: {it.samples} samples of {stage_folder(it.policy, r - 1)} for each of "
                f"{extra_r['onpolicy/prompts']} fresh prompts, {len(records)} ranked (mean gold {extra_r['onpolicy/gold_mean']:.3f}, "
                f"labels agree with gold on {extra_r['onpolicy/label_agreement']:.0%} of pairs): {len(new_pairs)} "
                f"new pairs, {len(pairs)} in all, in {extra_r['onpolicy/seconds']:.0f}s")
        elif o.prompts > 0 and cfg.data.preference.kind != "world":
            say(f"[reward] onpolicy.prompts={o.prompts} ignored: only the synthetic world has a gold oracle to rank "
                f"the samples, and data.preference is {cfg.data.preference.kind} data")
        elif o.prompts > 0:
            policy = load_policy(parent["final"], cfg.precision, state.device, cfg.model.trust_remote_code)[0]
            records, extra = onpolicy_comparisons(
                policy, tok, distinct_prompts(pairs, o.prompts), GoldOracle.from_config(cfg.data.world), o.samples,
                cfg.generation, t.gen_batch_size, o.label_temperature or cfg.data.world.label_temperature, cfg.seed + 2)
            del policy
            if state.is_main_process:  # the ranked format of reward_data/: reusable as data.preference.kind=local
                write_jsonl(run.dir / "onpolicy_comparisons.jsonl", records)
            comparison_files.append(f"{run.run}/{run.name}/onpolicy_comparisons.jsonl")
            extra.update({"labels/round_rankings": len(records), "labels/round_pairs": len(expand_pairs(records))})
            onpolicy_pairs = expand_pairs(records)
            pairs, extra["data/onpolicy_pairs"] = pairs + onpolicy_pairs, len(onpolicy_pairs)
            say(f"[reward] on-policy: {o.samples} SFT samples for each of {extra['onpolicy/prompts']} prompts, "
                f"{extra['onpolicy/ranked_prompts']} ranked (mean gold {extra['onpolicy/gold_mean']:.3f}, labels "
                f"agree with gold on {extra['onpolicy/label_agreement']:.0%} of pairs): {len(onpolicy_pairs)} "
                f"pairs in {extra['onpolicy/seconds']:.0f}s")
        cols = ["prompt", "chosen", "rejected", "group"]
        train_ds = datasets.Dataset.from_list([{k: p.get(k) if k != "group" else str(p.get(k, i))
                                                for k in cols} for i, p in enumerate(pairs)])
        extra["labels/total_pairs"] = len(pairs)  # every comparison labelled so far: the label budget spent
        prompts = prompts[: t.stats_prompts]

        # ---- training: TRL's RewardTrainer, Bradley-Terry loss --------------------------------------------
        args = trainer_args(TRLRewardConfig, cfg, run, t, evaluate=False, max_length=max_len,
                            center_rewards_coefficient=t.center_rewards_coefficient,
                            remove_unused_columns=True)
        log_cb = TrackerCallback(tracker, say)
        eval_cb = EvalCallback(tok, test_pairs, cfg, max_len, tracker, say)
        Trainer = make_trainer_class(t.group_by_prompt, cfg.seed)
        trainer = Trainer(model=model, args=args, train_dataset=train_ds, processing_class=tok,
                          peft_config=lora_config(cfg.peft, "SEQ_CLS"), callbacks=[log_cb, eval_cb])
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(QuietProgress())
        too_long = len(train_ds) - len(trainer.train_dataset)
        say(f"[reward] {len(trainer.train_dataset)} training pairs from {len(set(train_ds['group']))} prompts, "
            f"{len(test_pairs)} test pairs; {too_long} pairs longer than {max_len} tokens left out"
            + (f", {skipped + skipped_test} bad records skipped" if skipped + skipped_test else ""))
        if len(trainer.train_dataset) == 0:
            raise UserError(f"data.preference: no usable preference pairs: all {len(train_ds)} are longer than "
                            f"max_length={max_len} tokens (raise train.max_length, or shorten the data)")
        ckpt = latest_trainer_checkpoint(run.ckpt_root)
        if ckpt is not None:
            run.update(resumed_from=int(ckpt.name.split("-")[1]))
            say(f"[reward] resuming from {ckpt}")
        trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
        train_loss = log_cb.last.get("train/loss", float("nan"))  # absent when resumed after the last step
        if "train/loss" in log_cb.last and not math.isfinite(train_loss):
            raise UserError(f"training diverged: train/loss is {train_loss} (try a lower optim.lr)")

        # ---- evaluation on the test pairs, and the reward statistics PPO normalises with --------------------
        rm, adapter, weights = final_model(trainer, cfg.peft)
        metrics = dict(eval_cb.last) if eval_cb.step == trainer.state.global_step else \
            eval_cb.run(rm, trainer.state.global_step)
        if not test_pairs:
            say("[reward] no test pairs: eval/accuracy not measured")
        # the statistics are taken on the answers of the policy PPO will start from: SFT, or round r-1's policy
        stats = {"mean": 0.0, "std": 1.0, "n": 0}
        if prompts:
            who = current if r > 1 else parent
            policy = load_policy(who["final"], cfg.precision, state.device, cfg.model.trust_remote_code)[0]
            answers = policy_answers(policy, tok, prompts, cfg, oracle)
            del policy
            stats = answer_stats(rm, tok, answers, cfg)
            if r > 1 and oracle is not None:  # the distribution-shift figure: the old model on the new answers
                old_rm = load_sequence_classifier(prev_rm["final"]).to(state.device).eval()
                old_rm.config.pad_token_id = tok.pad_token_id
                before = answer_stats(old_rm, tok, answers, cfg)
                del old_rm
                metrics["reward/before_gold_correlation"] = before["gold_correlation"]
                metrics["reward/before_gold_pair_accuracy"] = before["pair_accuracy"]
                say(f"[{run.name}] before its update, round {r - 1}'s reward model on these answers: correlation "
                    f"with gold {before['gold_correlation']:.3f}, pairs in the gold order {before['pair_accuracy']:.3f}")
        say(f"[{run.name}] {'SFT policy' if r == 1 else stage_folder(it.policy, r - 1)}, {stats['n']} answers: reward "
            f"mean {stats['mean']:.3f}, std {stats['std']:.3f}"
            + (f", correlation with gold {stats['gold_correlation']:.3f}, pairs of answers to one prompt in the gold "
               f"order {stats['pair_accuracy']:.3f}" if "gold_correlation" in stats else ""))
        metrics.update({"train/loss": train_loss, "reward/mean": stats["mean"], "reward/std": stats["std"]})
        if "gold_correlation" in stats:
            metrics["reward/gold_correlation"] = stats["gold_correlation"]
            metrics["reward/gold_pair_accuracy"] = stats["pair_accuracy"]
        tracker.log({k: v for k, v in metrics.items() if k.startswith("reward/")}, step=trainer.state.global_step)

        # ---- save: a plain HF sequence-classification checkpoint + reward_stats.json ----------------------
        state.wait_for_everyone()
        stats_file = {**stats, "input": "the chat template over prompt + [assistant reply] "
                                        "(pipeline.rl.readout.rm_input_ids); the score is at the last token",
                      "prompts": cfg.data.prompts.kind if cfg.data.prompts.kind != "local" else cfg.data.prompts.path,
                      "generation": dict(cfg.generation)}

        def save(d):
            rm.save_pretrained(d, state_dict=weights, safe_serialization=True)
            tok.save_pretrained(d)
            write_json_atomic(d / "reward_stats.json", stats_file)

        metrics.update(extra)
        metrics.update({"model/params": n_params(rm), "data/skipped_records": skipped + skipped_test,
                        "data/train_pairs": len(trainer.train_dataset), "data/too_long_pairs": too_long,
                        "time/stage_s": time.time() - t0})
        run.finish(save, metrics, adapter=adapter, reward_stats={"mean": stats["mean"], "std": stats["std"]},
                   comparisons=comparison_files,
                   lineage={"reward_model_from": stage_folder("reward", r - 1) if r > 1 and it.reward_init ==
                            "continue" else "sft", "policy_sampled": stage_folder(it.policy, r - 1) if r > 1 else "sft"})
        tracker.finish(metrics, run.final_dir)
    except BaseException as e:
        run.fail(failure_reason(e))
        tracker.close()
        raise
    finally:
        if state.is_main_process:
            shutil.rmtree(merged_dir, ignore_errors=True)
    say(f"[{run.name}] eval/accuracy {metrics.get('eval/accuracy', float('nan')):.3f}, eval/gold_accuracy "
        f"{metrics.get('eval/gold_accuracy', float('nan')):.3f}, eval/ece {metrics.get('eval/ece', float('nan')):.3f}; "
        f"saved {run.final_dir} in {metrics['time/stage_s']:.0f}s")


@entry("reward")
def main(cfg: DictConfig) -> None:
    run_reward(cfg)


if __name__ == "__main__":
    main()
