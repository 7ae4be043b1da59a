"""Stage 4 — RLHF with PPO against the reward model, scored by the gold oracle.

    make ppo                                         # = python -m stages.ppo
    python -m stages.ppo train.kl_coef=0.1 train.adaptive_kl=true run=akl parent_run=default
    python -m stages.ppo -m train.kl_coef=0.05,0.1,0.2 parent_run=default      # a sweep, one run per value
    accelerate launch --config_file conf/accelerate/cpu2.yaml -m stages.ppo   # 2 CPU processes (conf/accelerate: GPUs)

Each iteration: sample prompts -> generate -> score with the reward model -> per-token KL penalty against the
frozen SFT policy -> GAE advantages -> several epochs of clipped PPO updates of actor and critic. Every
`train.eval_every` iterations the policy answers a fixed held-out subset (`train.periodic_eval_prompts`, sampled
at the training temperature): periodic/gold_score, periodic/reward, periodic/kl, the over-optimisation plot's
lines. At the end, PPO and SFT answer the held-out prompts greedily (eval/..., the headline) and sampled
(eval/sampled/...). The loop's steps are pipeline/trainers/ppo.py (make experience -> update -> log ->
evaluate), the math pipeline/rl/ (pure functions, tested against hand-computed tensors), the sampler
pipeline/inference/sampler.py; this file sets them up and runs them. Every implementation detail is a config switch
(conf/preset/ppo/).
"""

import copy
import json
import math
from pathlib import Path

import torch
from accelerate import Accelerator
from omegaconf import DictConfig
from tqdm import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from pipeline.core.entry import entry
from pipeline.core.errors import UserError
from pipeline.core.io import write_json_atomic
from pipeline.core.registry import stage_folder
from pipeline.core.runs import StageRun, crash_point
from pipeline.core.stage import begin_stage
from pipeline.data.formats import check_prompt_lengths, load_corpus, load_prompts
from pipeline.data.packing import pack
from pipeline.data.tokenizer import end_of_turn_ids, load_tokenizer
from pipeline.eval.gold import eval_record
from pipeline.models.loading import load_causal_lm, load_sequence_classifier, mixed_precision
from pipeline.models.sharding import is_sharded, sharding_record, without_tied
from pipeline.models.token_model import TokenModel, disable_dropout, fold_normalisation
from pipeline.report.plots import overoptimization_plot
from pipeline.rl.readout import RewardEnsemble, turn_closing
from pipeline.rl.shaping import AdaptiveKLController, FixedKLController
from pipeline.trainers.hf import lora_config
from pipeline.trainers.ppo import LoopState, PPOLoop
from pipeline.world.oracle import GoldOracle


@entry("ppo")
def main(cfg: DictConfig) -> None:
    # ---- setup -------------------------------------------------------------------------------------------
    t = cfg.train
    acc = Accelerator(mixed_precision=mixed_precision(cfg.precision), cpu=not torch.cuda.is_available())
    run = StageRun(cfg, is_main=acc.is_main_process)
    r = run.round  # make iterate's round r > 1: continue round r-1's policy against round r's reward model
    rm_parent = run.parent(stage_folder("reward", r))
    sft_parent = run.parent("sft")
    start_parent = run.parent(stage_folder("ppo", r - 1)) if r > 1 else sft_parent  # the policy it starts from
    ref_parent = sft_parent if r == 1 or cfg.iterate.kl_anchor == "sft" else start_parent  # the KL's anchor
    begun = begin_stage(cfg, run, acc, parents=[rm_parent, sft_parent] + ([start_parent] if r > 1 else []))
    if begun is None:
        return
    tracker, say, _ = begun
    dev = acc.device

    # ---- models: actor and frozen reference from SFT; frozen reward model; critic from the RM (or the policy) -
    tok = load_tokenizer(sft_parent["final"], need_chat_template=True)
    rm_tok = load_tokenizer(rm_parent["final"])
    if rm_tok.get_vocab() != tok.get_vocab():
        raise UserError(
            f"the reward model's tokenizer ({rm_parent['final']}) differs from the policy's "
            f"({sft_parent['final']}); train both from the same SFT run"
        )
    policy = load_causal_lm(start_parent["final"])
    policy.generation_config.pad_token_id = tok.pad_token_id
    same = ref_parent is start_parent
    if cfg.peft.enabled:  # the adapter-disabled base is the reference when it is the start: no second copy
        from peft import get_peft_model

        policy = get_peft_model(policy, lora_config(cfg.peft, "CAUSAL_LM", dropout=0.0))
        ref = None if same else load_causal_lm(ref_parent["final"]).to(dev).eval().requires_grad_(False)
    else:
        ref = (
            (copy.deepcopy(policy) if same else load_causal_lm(ref_parent["final"]))
            .to(dev)
            .eval()
            .requires_grad_(False)
        )
    # the reward model, or an ensemble of them (reward stage train.ensemble=K) combined by train.reward_objective;
    # the frozen models are not prepared, so they get the Accelerator's autocast themselves (see below)
    reward_model = RewardEnsemble.load(
        rm_parent["final"],
        dev,
        t.reward_objective,
        t.uwo_lambda,
        acc.autocast,
        stats=rm_parent.get("reward_stats") or {},
    )
    critic = load_sequence_classifier(rm_parent["final"] if t.critic_init == "reward" else sft_parent["final"])
    rm_stats = reward_model.stats if rm_parent.get("reward_stats") or len(reward_model) > 1 else {}
    head = reward_model.member_stats[0]  # the critic starts from member 0 (final/ itself)
    run.update(reward=reward_model.describe())  # the methods table says what each method optimised
    if len(reward_model) > 1:
        say(
            f"[ppo] an ensemble of {len(reward_model)} reward models, optimised by their {t.reward_objective}"
            + (f" (lambda {t.uwo_lambda})" if t.reward_objective == "uwo" else "")
        )
    if t.critic_init == "reward" and t.normalize_reward and t.reward == "model" and rm_stats:
        # the critic learns returns built from the normalised score: its head starts on that scale, not the RM's
        fold_normalisation(critic, head["mean"], max(head["std"], 1e-6))
    for m in (policy, critic) + ((ref,) if ref is not None else ()):
        disable_dropout(m)
    # read at the tokens that matter only (no logits for the prompt); these wrappers are what DDP wraps. The frozen
    # models are not prepared, so they get the Accelerator's autocast themselves: under bf16 the reference then
    # computes exactly the policy's log-probs at the start (KL 0), and the reward model runs as the critic does
    policy, critic = TokenModel(policy), TokenModel(critic)
    ref = TokenModel(ref, autocast=acc.autocast) if ref is not None else None
    closing = turn_closing(rm_tok if rm_tok.chat_template else tok)  # where the reward model is read

    # ---- data: PPO prompts (training) and held-out evaluation prompts ---------------------------------------
    prompts, skipped = load_prompts(cfg.data.prompts, cfg.data.world, cfg.paths.cache)
    eval_prompts, _ = load_prompts(cfg.data.eval_prompts, cfg.data.world, cfg.paths.cache)
    if not prompts:
        raise UserError(f"no usable PPO prompts in data.prompts ({cfg.data.prompts.kind}:{cfg.data.prompts.path})")

    def fit(recs, name):  # a prompt over train.max_prompt_tokens names its source and record (or is skipped)
        src = cfg.data[name]
        return check_prompt_lengths(
            recs,
            tok,
            t.max_prompt_tokens,
            src.on_bad_record,
            f"data.{name} ({src.path or src.kind}; limit train.max_prompt_tokens)",
        )

    (prompts, n), (eval_prompts, _) = fit(prompts, "prompts"), fit(eval_prompts, "eval_prompts")
    skipped += n
    prompts = [p["messages"] for p in prompts]
    eval_prompts = [p["messages"] for p in eval_prompts]
    periodic_prompts, eval_prompts = eval_prompts[: t.periodic_eval_prompts], eval_prompts[: t.eval_prompts]
    say(
        f"[ppo] {len(prompts)} training prompts, {len(eval_prompts)} held-out prompts"
        + (f", {skipped} bad records skipped" if skipped else "")
    )
    ptx_blocks = None
    if t.ptx_coef > 0:  # PPO-ptx: keep the pretraining distribution in the gradient (InstructGPT's fix for regressions)
        docs, _ = load_corpus(cfg.data.corpus, cfg.data.world, cfg.paths.cache)
        ptx_blocks = pack(docs[: cfg.data.max_docs or None], tok, min(cfg.model.max_seq_len, 256), where="ptx corpus")

    # ---- optimizers: actor and critic, one backward for both ----------------------------------------------
    n_updates = t.iterations * t.ppo_epochs * math.ceil(t.rollout_batch_size / t.minibatch_size)

    def make_opt(model, lr):
        opt = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=lr,
            eps=cfg.optim.eps,
            betas=(cfg.optim.beta1, cfg.optim.beta2),
            weight_decay=cfg.optim.weight_decay,
            fused=dev.type in ("cpu", "cuda"),
        )  # one kernel for all parameters
        return opt, get_cosine_with_min_lr_schedule_with_warmup(
            opt, cfg.optim.warmup_steps, n_updates, min_lr_rate=cfg.optim.min_lr_ratio
        )

    opt_p, sched_p = make_opt(policy, cfg.optim.lr)
    opt_v, sched_v = make_opt(critic, t.critic_lr or cfg.optim.lr)
    policy, opt_p = acc.prepare(policy, opt_p)  # one model per call: FSDP2 shards each with its own optimizer
    critic, opt_v = acc.prepare(critic, opt_v)
    if shards := sharding_record(acc.unwrap_model(policy)):  # proof that it trains sharded: what each process holds
        say(f"[ppo] FSDP: the actor's parameter bytes per rank {shards['per_rank']} of {shards['full']} in all")
        run.update(sharded_param_bytes=shards)
    state = LoopState()
    for obj in (sched_p, sched_v, state):
        acc.register_for_checkpointing(obj)
    kl_ctl = (
        AdaptiveKLController(t.kl_coef, t.kl_target, t.kl_horizon) if t.adaptive_kl else FixedKLController(t.kl_coef)
    )
    start = 0
    ckpt = run.latest_checkpoint()
    if ckpt is not None:
        start = run.load_checkpoint(ckpt, lambda d: acc.load_state(str(d)))
        kl_ctl.value = state.kl_coef
        say(f"[ppo] resumed from {ckpt} (iteration {start})")
    # the sampler's own log-probs are the old log-probs only when training computes them at the same precision
    gen_logprobs = t.old_logprobs == "generate" or (t.old_logprobs == "auto" and acc.mixed_precision == "no")
    if t.ema_decay and state.ema is None:
        state.ema = [p.detach().clone() for p in acc.unwrap_model(policy).parameters()]
    loop = PPOLoop(
        cfg=cfg,
        acc=acc,
        run=run,
        tracker=tracker,
        tok=tok,
        end_ids=end_of_turn_ids(tok),
        policy=policy,
        critic=critic,
        ref=ref,
        reward_model=reward_model,
        closing=closing,
        oracle=GoldOracle.from_config(cfg.data.world),
        optimizers=[(opt_p, sched_p), (opt_v, sched_v)],
        kl_ctl=kl_ctl,
        state=state,
        rm_stats=rm_stats,
        ptx_blocks=ptx_blocks,
        gen_logprobs=gen_logprobs,
    )
    if ref_parent is not sft_parent:  # KL anchored to round r-1's policy: SFT is still what the evaluation beats
        loop.sft = TokenModel(
            load_causal_lm(sft_parent["final"]).to(dev).eval().requires_grad_(False), autocast=acc.autocast
        )
    if r > 1:  # round r-1's held-out answers: this round is also judged against them
        prev = Path(start_parent["dir"]) / "eval_outputs.json"
        loop.previous = json.loads(prev.read_text()) if prev.exists() else None

    # ---- the loop: make experience -> update -> log (-> evaluate every train.eval_every) -------------------
    bar = tqdm(
        range(start, t.iterations),
        initial=start,
        total=t.iterations,
        desc="ppo",
        disable=not acc.is_main_process,
        dynamic_ncols=True,
    )
    for it in bar:
        if it % t.eval_every == 0:
            loop.periodic_eval(it, periodic_prompts)
        exp = loop.make_experience(it, prompts, first=it == start)
        stats = loop.update(exp, it)
        m = loop.log(exp, stats, it)
        bar.set_postfix(rm=f"{m['ppo/score']:.2f}", gold=f"{m['ppo/gold_score']:.3f}", kl=f"{m['ppo/kl']:.2f}")
        if (it + 1) % t.save_every == 0 and it + 1 < t.iterations:
            run.save_checkpoint(
                it + 1, lambda d: acc.save_state(str(d)), keep=t.keep_checkpoints, barrier=acc.wait_for_everyone
            )
            crash_point(it + 1)
    loop.periodic_eval(t.iterations, periodic_prompts)  # the last point of the over-optimisation curve

    # ---- final evaluation on held-out prompts: PPO against SFT, judged by the gold oracle ------------------
    metrics, evals = loop.final_eval(eval_prompts)
    metrics["data/skipped_records"] = skipped
    if len(reward_model) > 1 and t.reward == "model":  # which objective of which ensemble, and the alarm's verdict
        metrics.update({"train/ensemble": len(reward_model), "alarm/fired_at": loop.alarm_fired_at()})
    metrics["train/tokens"] = state.tokens  # prompt + reply tokens of every training episode (the methods table)
    tracker.log(metrics, step=t.iterations)
    if acc.is_main_process:
        ppo_eval, sft_eval = evals["eval"]
        rows = [
            [p[-1]["content"], s, float(sg), r, float(rg)]
            for p, s, sg, r, rg in zip(
                eval_prompts, sft_eval["text"], sft_eval["gold"], ppo_eval["text"], ppo_eval["gold"]
            )
        ][:32]
        tracker.table("eval/samples", ["prompt", "sft", "sft_gold", "ppo", "ppo_gold"], rows, step=t.iterations)
        png = overoptimization_plot(
            state.history,
            run.dir / "overoptimization.png",
            title=f"{run.run}: reward model vs gold oracle",
            periodic=state.periodic,
            alarm_at=loop.alarm_fired_at(),
        )
        tracker.image("ppo/overoptimization", png, step=t.iterations)
        (run.dir / "history.json").write_text(json.dumps(state.history, indent=1))
        (run.dir / "periodic.json").write_text(json.dumps(state.periodic, indent=1))
        write_json_atomic(run.dir / "eval_outputs.json", eval_record(evals))  # the next round compares with it

    # ---- save: the aligned policy as a plain Hugging Face checkpoint ---------------------------------------
    acc.wait_for_everyone()
    final_policy = loop.final_policy()
    out_model = final_policy.model.merge_and_unload() if cfg.peft.enabled and cfg.peft.merge else final_policy.model

    whole = None  # under FSDP: the whole state dict, gathered on every process for the main one to write
    if is_sharded(final_policy):
        if cfg.peft.enabled:
            raise UserError("peft.enabled with FSDP: LoRA under sharded training is not supported yet; use DDP")
        whole = {k.removeprefix("model."): v for k, v in acc.get_state_dict(policy).items()}
        whole = without_tied(out_model, whole)

    def save(d):
        out_model.save_pretrained(d, state_dict=whole, safe_serialization=True)
        tok.save_pretrained(d)

    folder = lambda m: stage_folder(m["stage"], m.get("round", 1))  # noqa: E731
    run.finish(
        save,
        metrics,
        adapter=bool(cfg.peft.enabled and not cfg.peft.merge),
        lineage={
            "policy_from": folder(start_parent),
            "reward_model": folder(rm_parent),
            "kl_anchor": folder(ref_parent),
        },
    )
    tracker.finish(metrics, run.final_dir)
    for prefix, how in (("eval", "greedy"), ("eval/sampled", f"sampled at T={t.temperature}")):
        if f"{prefix}/gold_score" in metrics:
            say(
                f"[ppo] {how}: gold score {metrics[f'{prefix}/gold_score']:.3f} (SFT "
                f"{metrics[f'{prefix}/sft_gold_score']:.3f}), win rate vs SFT "
                f"{metrics[f'{prefix}/win_rate_vs_sft']:.2f}"
                f" (ties {metrics[f'{prefix}/tie_rate_vs_sft']:.2f}), KL {metrics[f'{prefix}/kl']:.2f}"
            )
    if "eval/win_rate_vs_previous" in metrics:
        say(
            f"[{run.name}] greedy win rate vs round {r - 1}: {metrics['eval/win_rate_vs_previous']:.2f} "
            f"[{metrics['eval/win_rate_vs_previous_ci_low']:.2f}, {metrics['eval/win_rate_vs_previous_ci_high']:.2f}] "
            f"(its gold {metrics['eval/previous_gold_score']:.3f})"
        )
    say(
        "[ppo] greedy gold by component, SFT -> PPO: "
        + ", ".join(
            f"{k[len('eval/gold/') :]} {metrics['eval/sft_gold/' + k[len('eval/gold/') :]]:.2f} -> {v:.2f}"
            for k, v in metrics.items()
            if k.startswith("eval/gold/")
        )
        + f"; saved {run.final_dir}"
    )


if __name__ == "__main__":
    main()
