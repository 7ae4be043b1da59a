"""Stage 3 — a reward model from human comparisons (InstructGPT step 2).

    make reward                                                # = python -m stages.reward
    python -m stages.reward train.center_rewards_coefficient=0.01 run=rm-centred parent_run=default
    python -m stages.reward peft=lora                          # LoRA (merged into final/ unless peft.merge=false)
    python -m stages.reward onpolicy.prompts=0 run=rm-shipped parent_run=default  # the shipped comparisons alone
    accelerate launch --config_file conf/accelerate/cpu2.yaml -m stages.reward  # 2 CPU processes

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
import shutil
import time
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import set_seed
from omegaconf import DictConfig

from pipeline.core.entry import entry
from pipeline.core.errors import UserError
from pipeline.core.io import read_utf8, write_json_atomic
from pipeline.core.registry import stage_folder
from pipeline.core.runs import StageRun
from pipeline.core.stage import begin_stage
from pipeline.data.tokenizer import load_tokenizer
from pipeline.eval.reward_model import answer_stats, ensemble_figures, policy_answers
from pipeline.models.build import n_params
from pipeline.models.loading import load_policy, load_sequence_classifier, whole_weights
from pipeline.trainers.hf import (
    TrackerCallback,
    final_model,
    lora_config,
    trainer_args,
    check_finite_loss,
    train_resumable,
)
from pipeline.trainers.reward import EvalCallback, first_groups, make_trainer_class


def run_reward(cfg: DictConfig) -> None:
    import datasets
    from trl import RewardConfig as TRLRewardConfig

    from pipeline.core.io import write_jsonl
    from pipeline.data.formats import check_prompt_lengths, load_preferences, load_prompts
    from pipeline.data.pairs import expand_pairs, fresh_copies, repeat_pairs
    from pipeline.trainers.onpolicy import onpolicy_comparisons, round_comparisons
    from pipeline.world.labellers import distinct_prompts
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
    begun = begin_stage(cfg, run, state, parents=[parent, prev_rm, current] if r > 1 else [parent])
    if begun is None:
        return
    tracker, say, t0 = begun
    t = cfg.train
    merged_dir = run.dir / ".sft_merged"

    try:
        # ---- model: the SFT checkpoint with a scalar head ------------------------------------------------
        tok = load_tokenizer(parent["final"], need_chat_template=True)
        src = parent["final"]
        if parent.get("adapter"):  # an SFT adapter: merge it once into a plain checkpoint to start from
            if cfg.peft.enabled and not cfg.peft.merge:
                raise UserError(
                    "peft.merge=false: the SFT stage kept only an adapter too, so this adapter would have "
                    "no lasting base model to refer to; set peft.merge=true (or merge the SFT stage)"
                )
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
        say(
            f"[{run.name}] from {src if src != str(merged_dir) else parent['final']}: {n_params(model) / 1e6:.2f}M "
            f"params, max_length {max_len}"
            + (", LoRA" if cfg.peft.enabled else "")
            + (", batches keep prompts together" if t.group_by_prompt else "")
        )

        # ---- data: ranked comparisons expanded to pairs; prompts alone must fit ---------------------------
        pairs, skipped = load_preferences(cfg.data.preference, cfg.data.world)
        test_pairs, skipped_test = load_preferences(cfg.data.preference_test, cfg.data.world)
        pairs, test_pairs = first_groups(pairs, t.max_prompts), first_groups(test_pairs, t.max_test_prompts)
        pairs, n = check_prompt_lengths(pairs, tok, max_len, cfg.data.preference.on_bad_record, "data.preference")
        test_pairs, n_test = check_prompt_lengths(
            test_pairs, tok, max_len, cfg.data.preference_test.on_bad_record, "data.preference_test"
        )
        skipped, skipped_test = skipped + n, skipped_test + n_test  # prompts too long (on_bad_record=skip)
        if not pairs:
            raise UserError(
                f"data.preference ({cfg.data.preference.path or cfg.data.preference.kind}): "
                f"no usable preference pairs" + (f" ({skipped} bad records skipped)" if skipped else "")
            )

        # ---- on-policy comparisons: the SFT policy's own samples, ranked by simulated labellers --------------
        # (round r > 1: round r-1's policy on a fresh slice of data.prompts, and every earlier round's as well)
        o, extra, repeats = cfg.onpolicy, {}, 0  # repeats: copies of fresh pairs beyond the first (iterate.fresh_share)
        comparison_files = []  # every on-policy comparison file this reward model learnt from, under paths.root
        prompts, _ = load_prompts(cfg.data.prompts, cfg.data.world, cfg.paths.cache)
        oracle = GoldOracle.from_config(cfg.data.world) if cfg.data.prompts.kind == "world" else None
        if r > 1:
            if cfg.data.preference.kind != "world" or oracle is None:
                raise UserError(
                    f"round={r}: iterated RLHF labels the policy's samples with the world's simulated "
                    f"labellers, so data.preference and data.prompts must be kind world"
                )
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
                policy,
                tok,
                prompts,
                r,
                oracle,
                it.samples,
                it.prompts,
                cfg.generation,
                t.gen_batch_size,
                o.label_temperature or cfg.data.world.label_temperature,
                cfg.seed,
                backend=cfg.sampler,
            )
            del policy
            extra.update(extra_r)
            if state.is_main_process:
                write_jsonl(run.dir / "onpolicy_comparisons.jsonl", records)
            comparison_files.append(f"{run.run}/{run.name}/onpolicy_comparisons.jsonl")
            new_pairs = expand_pairs(records)
            # iterate.fresh_share: the fresh pairs repeated until they are that share of the update's data, so a
            # short update on ~30,000 older pairs learns the current policy's answers (the labels are counted once)
            copies = fresh_copies(len(pairs), len(new_pairs), it.fresh_share)
            pairs += repeat_pairs(new_pairs, copies)
            extra["data/fresh_copies"], repeats = copies, (copies - 1) * len(new_pairs)
            extra.update(
                {
                    "labels/round_rankings": len(records),
                    "labels/round_pairs": len(new_pairs),
                    "data/onpolicy_pairs": len(new_pairs),
                }
            )
            say(
                f"[{run.name}] round {r}: {it.samples} samples of {stage_folder(it.policy, r - 1)} for each of "
                f"{extra_r['onpolicy/prompts']} fresh prompts, {len(records)} ranked (mean gold "
                f"{extra_r['onpolicy/gold_mean']:.3f}, "
                f"labels agree with gold on {extra_r['onpolicy/label_agreement']:.0%} of pairs): {len(new_pairs)} "
                f"new pairs, {len(pairs) - repeats} in all"
                + (
                    f" (the new ones {copies} times over: about {it.fresh_share:.0%} of the update)"
                    if copies > 1
                    else ""
                )
                + f", in {extra_r['onpolicy/seconds']:.0f}s"
            )
        elif o.prompts > 0 and cfg.data.preference.kind != "world":
            say(
                f"[reward] onpolicy.prompts={o.prompts} ignored: only the synthetic world has a gold oracle to rank "
                f"the samples, and data.preference is {cfg.data.preference.kind} data"
            )
        elif o.prompts > 0:
            policy = load_policy(parent["final"], cfg.precision, state.device, cfg.model.trust_remote_code)[0]
            records, extra = onpolicy_comparisons(
                policy,
                tok,
                distinct_prompts(pairs, o.prompts),
                GoldOracle.from_config(cfg.data.world),
                o.samples,
                cfg.generation,
                t.gen_batch_size,
                o.label_temperature or cfg.data.world.label_temperature,
                cfg.seed + 2,
                backend=cfg.sampler,
            )
            del policy
            if state.is_main_process:  # the ranked format of reward_data/: reusable as data.preference.kind=local
                write_jsonl(run.dir / "onpolicy_comparisons.jsonl", records)
            comparison_files.append(f"{run.run}/{run.name}/onpolicy_comparisons.jsonl")
            extra.update({"labels/round_rankings": len(records), "labels/round_pairs": len(expand_pairs(records))})
            onpolicy_pairs = expand_pairs(records)
            pairs, extra["data/onpolicy_pairs"] = pairs + onpolicy_pairs, len(onpolicy_pairs)
            say(
                f"[reward] on-policy: {o.samples} SFT samples for each of {extra['onpolicy/prompts']} prompts, "
                f"{extra['onpolicy/ranked_prompts']} ranked (mean gold {extra['onpolicy/gold_mean']:.3f}, labels "
                f"agree with gold on {extra['onpolicy/label_agreement']:.0%} of pairs): {len(onpolicy_pairs)} "
                f"pairs in {extra['onpolicy/seconds']:.0f}s"
            )
        cols = ["prompt", "chosen", "rejected", "group"]
        train_ds = datasets.Dataset.from_list(
            [{k: p.get(k) if k != "group" else str(p.get(k, i)) for k in cols} for i, p in enumerate(pairs)]
        )
        # every comparison labelled so far: the label budget spent (the fresh pairs' repeats are not labels)
        extra["labels/total_pairs"] = len(pairs) - repeats
        prompts = prompts[: t.stats_prompts]

        # ---- training: TRL's RewardTrainer, Bradley-Terry loss; train.ensemble=K trains K members ---------
        K = t.ensemble
        if K > 1 and cfg.peft.enabled and not cfg.peft.merge:
            raise UserError(
                f"train.ensemble={K} with peft.merge=false: an ensemble's members are full checkpoints; "
                f"set peft.merge=true (or train.ensemble=1)"
            )
        members = []  # (model, adapter, state_dict, test metrics, train loss, steps), member 0 first
        for k in range(K):
            src_k = src if k == 0 or r == 1 or it.reward_init != "continue" else _member_path(prev_rm["final"], k)
            members.append(
                train_member(
                    k,
                    cfg,
                    run,
                    state,
                    model if k == 0 else src_k,
                    tok,
                    train_ds,
                    test_pairs,
                    max_len,
                    tracker,
                    say,
                    skipped + skipped_test,
                    TRLRewardConfig,
                )
            )
        rm, adapter, weights, metrics, train_loss, steps = members[0]
        metrics = dict(metrics)
        if not test_pairs:
            say("[reward] no test pairs: eval/accuracy not measured")

        # ---- evaluation on the test pairs, and the reward statistics PPO normalises with --------------------
        # the statistics are taken on the answers of the policy PPO will start from: SFT, or round r-1's policy
        stats = {"mean": 0.0, "std": 1.0, "n": 0}
        if prompts:
            who = current if r > 1 else parent
            policy = load_policy(who["final"], cfg.precision, state.device, cfg.model.trust_remote_code)[0]
            answers = policy_answers(policy, tok, prompts, cfg, oracle)
            del policy
            stats = answer_stats(rm, tok, answers, cfg)
            if r > 1 and oracle is not None:  # the distribution-shift figure: the old model on the new answers
                with whole_weights():
                    old_rm = load_sequence_classifier(prev_rm["final"]).to(state.device).eval()
                old_rm.config.pad_token_id = tok.pad_token_id
                before = answer_stats(old_rm, tok, answers, cfg)
                del old_rm
                metrics["reward/before_gold_correlation"] = before["gold_correlation"]
                metrics["reward/before_gold_pair_accuracy"] = before["pair_accuracy"]
                say(
                    f"[{run.name}] before its update, round {r - 1}'s reward model on these answers: correlation "
                    f"with gold {before['gold_correlation']:.3f}, pairs in the gold order {before['pair_accuracy']:.3f}"
                )
        say(
            f"[{run.name}] {'SFT policy' if r == 1 else stage_folder(it.policy, r - 1)}, {stats['n']} answers: reward "
            f"mean {stats['mean']:.3f}, std {stats['std']:.3f}"
            + (
                f", correlation with gold {stats['gold_correlation']:.3f}, pairs of answers to one prompt in the gold "
                f"order {stats['pair_accuracy']:.3f}"
                if "gold_correlation" in stats
                else ""
            )
        )
        metrics.update({"train/loss": train_loss, "reward/mean": stats["mean"], "reward/std": stats["std"]})
        metrics["train/ensemble"] = K
        if "gold_correlation" in stats:
            metrics["reward/gold_correlation"] = stats["gold_correlation"]
            metrics["reward/gold_pair_accuracy"] = stats["pair_accuracy"]
        member_stats = [{"mean": stats["mean"], "std": stats["std"]}]
        if K > 1:  # each member's statistics on the same answers, and what the ensemble makes of them
            ens = ensemble_figures([m[0] for m in members], tok, answers if prompts else None, test_pairs, cfg, max_len)
            member_stats = ens.pop("member_stats")
            member_stats[0] = {"mean": stats["mean"], "std": stats["std"]}  # member 0's, as measured above
            metrics.update(ens)
            for k, m in enumerate(members[1:], 1):
                metrics.update({f"member{k}/{key}": v for key, v in m[3].items()})
            say(
                f"[{run.name}] ensemble of {K} ({t.ensemble_diversity}): test pairs in the gold order "
                f"{metrics.get('ensemble/gold_accuracy', float('nan')):.3f} (members "
                + ", ".join(f"{x:.3f}" for x in metrics["ensemble/member_gold_accuracies"])
                + "); on the policy's "
                f"answers the members disagree by {metrics.get('ensemble/disagreement', float('nan')):.3f} (std of "
                f"normalised scores), correlate {metrics.get('ensemble/member_correlation', float('nan')):.3f}"
            )
            metrics.pop("ensemble/member_gold_accuracies")
        tracker.log({k: v for k, v in metrics.items() if k.startswith(("reward/", "ensemble/"))}, step=steps)

        # ---- save: a plain HF sequence-classification checkpoint + reward_stats.json ----------------------
        state.wait_for_everyone()
        stats_file = {
            **stats,
            "input": "the chat template over prompt + [assistant reply] "
            "(pipeline.rl.readout.rm_input_ids); the score is at the last token",
            "prompts": cfg.data.prompts.kind if cfg.data.prompts.kind != "local" else cfg.data.prompts.path,
            "generation": dict(cfg.generation),
        }

        def save(d):
            rm.save_pretrained(d, state_dict=weights, safe_serialization=True)
            tok.save_pretrained(d)
            write_json_atomic(d / "reward_stats.json", stats_file)
            if K > 1:  # the other members beside member 0, each a whole sequence-classification folder
                for k, (m, _, w, *_rest) in enumerate(members[1:], 1):
                    m.save_pretrained(d / _member_path(".", k), state_dict=w, safe_serialization=True)
                    tok.save_pretrained(d / _member_path(".", k))
                    write_json_atomic(d / _member_path(".", k) / "reward_stats.json", {**stats_file, **member_stats[k]})
                write_json_atomic(
                    d / "ensemble.json",
                    {
                        "k": K,
                        "diversity": t.ensemble_diversity,
                        "members": [
                            {
                                "path": _member_path(".", k),
                                "seed": cfg.seed + k,
                                **member_stats[k],
                                "gold_accuracy": (members[k][3].get("eval/gold_accuracy")),
                            }
                            for k in range(K)
                        ],
                        "read": "pipeline.rl.readout.RewardEnsemble.load: each member normalised with its own mean and "
                        "std, combined by the method's train.reward_objective",
                    },
                )

        metrics.update(extra)
        metrics.update(
            {
                "model/params": n_params(rm),
                "data/skipped_records": skipped + skipped_test,
                "time/stage_s": time.time() - t0,
            }
        )
        run.finish(
            save,
            metrics,
            adapter=adapter,
            reward_stats={"mean": stats["mean"], "std": stats["std"]},
            ensemble={"k": K, "diversity": t.ensemble_diversity, "members": member_stats} if K > 1 else None,
            comparisons=comparison_files,
            lineage={
                "reward_model_from": stage_folder("reward", r - 1) if r > 1 and it.reward_init == "continue" else "sft",
                "policy_sampled": stage_folder(it.policy, r - 1) if r > 1 else "sft",
            },
        )
        tracker.finish(metrics, run.final_dir)
    finally:
        if state.is_main_process:
            shutil.rmtree(merged_dir, ignore_errors=True)
            if run.final_dir.is_dir() and run.manifest.get("status") == "complete":
                shutil.rmtree(run.dir / ".members", ignore_errors=True)
    say(
        f"[{run.name}] eval/accuracy {metrics.get('eval/accuracy', float('nan')):.3f}, eval/gold_accuracy "
        f"{metrics.get('eval/gold_accuracy', float('nan')):.3f}, eval/ece {metrics.get('eval/ece', float('nan')):.3f}; "
        f"saved {run.final_dir} in {metrics['time/stage_s']:.0f}s"
    )


def _member_path(final, k: int):
    """Member k's folder: final/ itself for member 0, final/members/<k> for the others."""
    return Path(final) if k == 0 else Path(final) / "members" / str(k)


def train_member(
    k: int, cfg, run, state, start, tok, train_ds, test_pairs, max_len, tracker, say, skipped: int, config_cls
):
    """Member k of the reward model (k = 0 alone with train.ensemble=1: the reward model as it always was): TRL's
    RewardTrainer on the pairs (train.ensemble_diversity=bootstrap: on a resample of the prompts, with
    replacement), its head initialised and its batches ordered by seed cfg.seed + k, its checkpoints in
    checkpoints/member<k> (k > 0). `start` is a loaded model (member 0) or the folder to load one from. An ensemble's
    finished members wait in .members/<k> for final/, so a resumed stage does not train them again. Returns (model,
    adapter, state_dict, test metrics, train loss, steps)."""
    t = cfg.train
    K, seed = t.ensemble, cfg.seed + k
    staged = run.dir / ".members" / str(k)
    prefix, offset = ("", 0) if k == 0 else (f"member{k}/", k * t.max_steps)  # one step axis for the tracker
    if K > 1 and (staged / "done.json").is_file():
        done = json.loads((staged / "done.json").read_text())
        m = load_sequence_classifier(staged).to(state.device)
        m.config.pad_token_id = tok.pad_token_id
        say(f"[{run.name}] member {k} of {K}: trained before this resume ({staged})")
        return m, False, None, done["metrics"], done["train_loss"], done["steps"]
    if k:
        set_seed(seed)  # member k's head; member 0's was drawn at cfg.seed when the stage loaded it
    model = (
        start
        if not isinstance(start, (str, Path))
        else load_sequence_classifier(start, torch.float32, cfg.model.trust_remote_code)
    )
    model.config.pad_token_id = tok.pad_token_id
    ds = train_ds
    if K > 1 and t.ensemble_diversity == "bootstrap":  # the prompts drawn with replacement: whole rankings kept
        groups = sorted(set(train_ds["group"]))
        g = torch.Generator().manual_seed(seed * 7_919 + 13)
        draw = [groups[i] for i in torch.randint(len(groups), (len(groups),), generator=g).tolist()]
        rows: dict = {}
        for i, grp in enumerate(train_ds["group"]):
            rows.setdefault(grp, []).append(i)
        ds = train_ds.select([i for grp in draw for i in rows[grp]])
    ckpt_dir = run.ckpt_root if k == 0 else run.ckpt_root / f"member{k}"
    args = trainer_args(
        config_cls,
        cfg,
        run,
        t,
        evaluate=False,
        max_length=max_len,
        center_rewards_coefficient=t.center_rewards_coefficient,
        remove_unused_columns=True,
        seed=seed,
        output_dir=str(ckpt_dir),
    )
    log_cb = TrackerCallback(tracker, say, prefix=prefix, step_offset=offset)
    eval_cb = EvalCallback(tok, test_pairs, cfg, max_len, tracker, say, prefix=prefix, step_offset=offset)
    Trainer = make_trainer_class(t.group_by_prompt, seed)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=ds,
        processing_class=tok,
        peft_config=lora_config(cfg.peft, "SEQ_CLS"),
        callbacks=[log_cb, eval_cb],
    )
    too_long = len(ds) - len(trainer.train_dataset)
    say(
        f"[{run.name}] "
        + (f"member {k} of {K}: " if K > 1 else "")
        + f"{len(trainer.train_dataset)} training pairs from {len(set(ds['group']))} prompts, "
        f"{len(test_pairs)} test pairs; {too_long} pairs longer than {max_len} tokens left out"
        + (f", {skipped} bad records skipped" if skipped and k == 0 else "")
    )
    if len(trainer.train_dataset) == 0:
        raise UserError(
            f"data.preference: no usable preference pairs: all {len(ds)} are longer than "
            f"max_length={max_len} tokens (raise train.max_length, or shorten the data)"
        )
    train_resumable(trainer, run, ckpt_dir, say, "[reward] resuming", record=k == 0)
    train_loss = check_finite_loss(log_cb.last, "training diverged", "try a lower optim.lr", key=f"{prefix}train/loss")
    rm, adapter, weights = final_model(trainer, cfg.peft)
    steps = trainer.state.global_step
    metrics = dict(eval_cb.last) if eval_cb.step == steps else eval_cb.run(rm, steps)
    metrics = {key[len(prefix) :]: v for key, v in metrics.items()}
    metrics.update({"data/train_pairs": len(trainer.train_dataset), "data/too_long_pairs": too_long})
    if K > 1 and state.is_main_process:
        shutil.rmtree(staged, ignore_errors=True)
        rm.save_pretrained(staged, state_dict=weights, safe_serialization=True)
        write_json_atomic(staged / "done.json", {"metrics": metrics, "train_loss": train_loss, "steps": steps})
    state.wait_for_everyone()
    return rm, adapter, weights, metrics, train_loss, steps


@entry("reward")
def main(cfg: DictConfig) -> None:
    run_reward(cfg)


if __name__ == "__main__":
    main()
