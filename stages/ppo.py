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
(eval/sampled/...). The math is in
pipeline/ppo_math.py (pure functions, tested against hand-computed tensors); the model plumbing in
pipeline/rollout.py; this file is the loop. Every implementation detail is a config switch (conf/preset/ppo/).
"""

import copy
import json
import math
import time

import hydra
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from omegaconf import DictConfig
from tqdm import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

import pipeline.core.config  # noqa: F401  (registers the structured configs)
from pipeline.core.errors import UserError, friendly
from pipeline.core.runs import StageRun, crash_point
from pipeline.core.tracking import Tracker
from pipeline.data.formats import load_corpus, load_prompts
from pipeline.data.packing import batch_indices, pack
from pipeline.data.prompts import prompt_batch
from pipeline.data.tokenizer import end_of_turn_ids, load_tokenizer
from pipeline.eval.gold import eval_metrics, evaluate
from pipeline.inference.sampler import decode_responses, sample
from pipeline.models.loading import load_causal_lm, load_critic, mixed_precision
from pipeline.models.token_model import TokenModel, disable_dropout
from pipeline.report.plots import overoptimization_plot
from pipeline.rl.advantages import gae
from pipeline.rl.forward import check_packing, chunked, critic_forward, policy_forward, response_logits
from pipeline.rl.ops import ema_update, explained_variance, logprobs_from_logits, masked_whiten
from pipeline.rl.readout import score_rollout, turn_closing
from pipeline.rl.shaping import AdaptiveKLController, FixedKLController, penalise_unfinished, penalised_rewards
from pipeline.trainers.hf import lora_config
from pipeline.trainers.ppo import LoopState, _diverged, minibatch_backward
from pipeline.world.oracle import GoldOracle


@hydra.main(config_path="../conf", config_name="ppo", version_base="1.3")
@friendly
def main(cfg: DictConfig) -> None:
    # ---- setup -------------------------------------------------------------------------------------------
    t = cfg.train
    acc = Accelerator(mixed_precision=mixed_precision(cfg.precision), cpu=not torch.cuda.is_available())
    run = StageRun(cfg, is_main=acc.is_main_process)
    rm_parent = run.parent("reward")
    sft_parent = run.parent("sft")
    if not run.begin(barrier=acc.wait_for_everyone):
        return
    set_seed(cfg.seed)
    tracker = Tracker(cfg, run, acc.is_main_process)
    tracker.use_parent(rm_parent)
    tracker.use_parent(sft_parent)
    say, dev = acc.print, acc.device

    # ---- models: actor and frozen reference from SFT; frozen reward model; critic from the RM (or the policy) -
    tok = load_tokenizer(sft_parent["final"], need_chat_template=True)
    rm_tok = load_tokenizer(rm_parent["final"])
    if rm_tok.get_vocab() != tok.get_vocab():
        raise UserError(f"the reward model's tokenizer ({rm_parent['final']}) differs from the policy's "
                        f"({sft_parent['final']}); train both from the same SFT run")
    end_ids = end_of_turn_ids(tok)
    policy = load_causal_lm(sft_parent["final"])
    policy.generation_config.pad_token_id = tok.pad_token_id
    if cfg.peft.enabled:  # the adapter-disabled base is the reference: no second copy in memory
        from peft import get_peft_model

        policy = get_peft_model(policy, lora_config(cfg.peft, "CAUSAL_LM", dropout=0.0))
        ref = None
    else:
        ref = copy.deepcopy(policy).to(dev).eval().requires_grad_(False)
    reward_model = load_critic(rm_parent["final"], torch.float32).to(dev).eval().requires_grad_(False)
    critic = load_critic(rm_parent["final"] if t.critic_init == "reward" else sft_parent["final"], torch.float32)
    for m in (policy, critic, reward_model) + ((ref,) if ref is not None else ()):
        disable_dropout(m)
    # read at the tokens that matter only (no logits for the prompt); these wrappers are what DDP wraps. The frozen
    # models are not prepared, so they get the Accelerator's autocast themselves: under bf16 the reference then
    # computes exactly the policy's log-probs at the start (KL 0), and the reward model runs as the critic does
    policy, critic = TokenModel(policy), TokenModel(critic)
    reward_model = TokenModel(reward_model, autocast=acc.autocast)
    ref = TokenModel(ref, autocast=acc.autocast) if ref is not None else None
    closing = turn_closing(rm_tok if rm_tok.chat_template else tok)  # where the reward model is read
    if t.reward not in ("model", "gold") and not t.reward.startswith("contains:"):
        raise UserError(f"train.reward={t.reward!r}: use model, gold or contains:<text>")
    needle = t.reward.partition(":")[2]
    stats = rm_parent.get("reward_stats") or {}
    normalise = t.normalize_reward and t.reward == "model"
    rm_mean, rm_std = (stats.get("mean", 0.0), max(stats.get("std", 1.0), 1e-6)) if normalise else (0.0, 1.0)
    oracle = GoldOracle.from_config(cfg.data.world)

    def training_score(raw, ended):
        """The score PPO trains on: normalised with the reward stage's statistics, unfinished replies below all
        finished ones (train.missing_eos_penalty)."""
        score = (raw - rm_mean) / rm_std
        return score if t.missing_eos_penalty is None else penalise_unfinished(score, ended, t.missing_eos_penalty)

    packing = t.pack_sequences  # 0 once check_packing finds this model's attention ignores the boundaries

    def ref_logits(ro):
        if ref is not None:
            return response_logits(ref, ro, packing)
        with acc.unwrap_model(policy).model.disable_adapter():
            return response_logits(policy, ro, packing)

    def ref_logprobs(ro):
        return logprobs_from_logits(ref_logits(ro), ro.response_ids, t.temperature)

    # ---- data: PPO prompts (training) and held-out evaluation prompts ---------------------------------------
    prompts, skipped = load_prompts(cfg.data.prompts, cfg.data.world, cfg.paths.cache)
    eval_prompts, _ = load_prompts(cfg.data.eval_prompts, cfg.data.world, cfg.paths.cache)
    if not prompts:
        raise UserError(f"no usable PPO prompts in data.prompts ({cfg.data.prompts.kind}:{cfg.data.prompts.path})")
    prompts = [p["messages"] for p in prompts]
    eval_prompts = [p["messages"] for p in eval_prompts]
    periodic_prompts = eval_prompts[: t.periodic_eval_prompts][acc.process_index:: acc.num_processes]
    eval_prompts = eval_prompts[: t.eval_prompts]
    say(f"[ppo] {len(prompts)} training prompts, {len(eval_prompts)} held-out prompts"
        + (f", {skipped} bad records skipped" if skipped else ""))

    ptx_blocks = None
    if t.ptx_coef > 0:  # PPO-ptx: keep the pretraining distribution in the gradient (InstructGPT's fix for regressions)
        docs, _ = load_corpus(cfg.data.corpus, cfg.data.world, cfg.paths.cache)
        ptx_blocks = pack(docs[: cfg.data.max_docs or None], tok, min(cfg.model.max_seq_len, 256), where="ptx corpus")

    # ---- optimizers: actor and critic, one backward for both ----------------------------------------------
    n_updates = t.iterations * t.ppo_epochs * math.ceil(t.rollout_batch_size / t.minibatch_size)

    def make_opt(model, lr):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, eps=cfg.optim.eps,
                                betas=(cfg.optim.beta1, cfg.optim.beta2), weight_decay=cfg.optim.weight_decay,
                                fused=dev.type in ("cpu", "cuda"))  # one kernel for all parameters
        return opt, get_cosine_with_min_lr_schedule_with_warmup(opt, cfg.optim.warmup_steps, n_updates,
                                                                min_lr_rate=cfg.optim.min_lr_ratio)

    opt_p, sched_p = make_opt(policy, cfg.optim.lr)
    opt_v, sched_v = make_opt(critic, t.critic_lr or cfg.optim.lr)
    policy, critic, opt_p, opt_v = acc.prepare(policy, critic, opt_p, opt_v)
    state = LoopState()
    for obj in (sched_p, sched_v, state):
        acc.register_for_checkpointing(obj)
    kl_ctl = (AdaptiveKLController(t.kl_coef, t.kl_target, t.kl_horizon) if t.adaptive_kl
              else FixedKLController(t.kl_coef))
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

    # ---- the loop: generate -> score -> KL penalty -> advantages -> update -----------------------------------
    bar = tqdm(range(start, t.iterations), initial=start, total=t.iterations, desc="ppo",
               disable=not acc.is_main_process, dynamic_ncols=True)
    def periodic_eval(done: int) -> None:
        """Held-out gold, reward (as trained on) and exact KL to SFT of the policy after `done` iterations."""
        if not t.periodic_eval_prompts or any(r["iteration"] == done for r in state.periodic):
            return
        t1 = time.time()
        policy.eval()
        torch.manual_seed(cfg.seed * 1_000_003 + 4241 + acc.process_index)  # the same draw at every evaluation
        out = evaluate(acc.unwrap_model(policy), periodic_prompts, tok, end_ids, t, oracle, reward_model, closing,
                       ref_logits, dev, packing, greedy=False)
        out = {k: gather_object(out[k]) for k in ("gold", "reward", "kl", "ended")}
        score = training_score(torch.tensor(out["reward"]), torch.tensor(out["ended"], dtype=torch.bool))
        mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
        row = {"iteration": done, "gold": mean(out["gold"]), "reward": float(score.mean()) if len(score) else 0.0,
               "kl": mean(out["kl"]), "rm_score": mean(out["reward"]), "ended_fraction": mean(out["ended"]),
               "n": len(out["gold"])}
        state.periodic.append(row)
        tracker.log({"periodic/gold_score": row["gold"], "periodic/reward": row["reward"], "periodic/kl": row["kl"],
                     "periodic/rm_score": row["rm_score"], "periodic/ended_fraction": row["ended_fraction"],
                     "periodic/seconds": time.time() - t1}, step=done)

    for it in bar:
        if it % t.eval_every == 0:
            periodic_eval(it)
        t0 = time.time()
        idx = batch_indices(len(prompts), t.rollout_batch_size, it, 0, 1, acc.num_processes, acc.process_index, cfg.seed)
        batch_prompts = [prompts[i] for i in idx.tolist()]
        torch.manual_seed(cfg.seed * 1_000_003 + it * 7919 + acc.process_index)  # own sampling seed per rank
        policy.eval()
        p_ids, p_mask = prompt_batch(tok, batch_prompts, t.max_prompt_tokens, dev)
        ro = sample(acc.unwrap_model(policy), tok, p_ids, p_mask, end_ids, t.max_new_tokens, t.temperature,
                    t.top_k, t.top_p, keep_logprobs=gen_logprobs)
        t_gen = time.time() - t0
        mask = ro.response_mask
        if packing and it == start:  # packed and padded forwards must agree; if not, this model cannot be packed
            diff = check_packing(acc.unwrap_model(policy), ro, packing, t.temperature)
            if diff > (1e-3 if acc.mixed_precision == "no" else 5e-2):
                packing = 0
                say(f"[ppo] packed sequences change this model's log-probs by up to {diff:.3g}: "
                    f"its attention ignores position-id boundaries; using padded batches (train.pack_sequences=0)")

        # score, and the per-token rewards: -beta * KL everywhere, plus the (normalised) score at the last token
        texts = decode_responses(tok, ro)
        gold = torch.tensor(oracle.score_batch(batch_prompts, texts), device=dev)
        old_logp = ro.logprobs if gen_logprobs else chunked(lambda r: policy_forward(policy, r, t.temperature, packing),
                                                             ro, t.forward_batch_size)
        ref_logp = chunked(ref_logprobs, ro, t.forward_batch_size)
        old_values = chunked(lambda r: critic_forward(critic, r, packing), ro, t.forward_batch_size)
        if t.reward == "model":
            raw_score = chunked(lambda r: score_rollout(reward_model, r, closing, packing), ro, t.forward_batch_size)
        elif t.reward == "gold":
            raw_score = gold.clone()
        else:  # contains:<text> — a rule any working PPO learns in a few iterations
            raw_score = torch.tensor([float(needle in x) for x in texts], device=dev)
        score = training_score(raw_score, ro.ended)
        rewards, kl = penalised_rewards(score, old_logp, ref_logp, mask, kl_ctl.value, t.kl_estimator)
        advantages, returns = gae(rewards, old_values, mask, t.gamma, t.lam)
        if t.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        if not (torch.isfinite(rewards).all() and torch.isfinite(advantages).all()):
            _diverged(run, it, "rewards")

        # PPO epochs over shuffled minibatches, each split into micro-batches for gradient accumulation
        policy.train()
        critic.train()
        B = len(ro.ended)
        micro = max(1, t.minibatch_size // t.grad_accum)
        log = {k: [] for k in ("pg", "vf", "clipfrac", "approx_kl", "vf_clipfrac", "entropy", "ratio_mean", "ratio_max",
                                "ptx", "grad_norm", "value_grad_norm")}

        def ptx_loss():
            j = torch.randint(len(ptx_blocks), (t.ptx_batch_size,))
            x = ptx_blocks[j].to(dev)
            n, L = x.shape
            logits = policy(x, torch.arange(L, device=dev).expand(n, L), None,
                            torch.arange(n * L, device=dev).view(n, L)[:, :-1])
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())

        def backward(loss):
            if not torch.isfinite(loss):
                _diverged(run, it, "loss")
            acc.backward(loss)

        for _ in range(t.ppo_epochs):
            perm = torch.randperm(B, device=dev)
            for s in range(0, B, t.minibatch_size):
                mb = perm[s: s + t.minibatch_size]
                st = minibatch_backward(policy, critic, ro, mb, micro, old_logp, advantages, old_values, returns, t,
                                        packing, backward, ptx_loss if ptx_blocks is not None else None)
                for k, v in st.items():
                    log[k].append(v)
                # each model clipped on its own, both norms logged (TRL 1.12 clips neither)
                log["grad_norm"].append(float(acc.clip_grad_norm_(policy.parameters(), cfg.optim.max_grad_norm)))
                log["value_grad_norm"].append(float(acc.clip_grad_norm_(critic.parameters(), cfg.optim.max_grad_norm)))
                for opt, sched in ((opt_p, sched_p), (opt_v, sched_v)):
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                if state.ema is not None:
                    ema_update(state.ema, acc.unwrap_model(policy).parameters(), t.ema_decay)
        t_total = time.time() - t0

        # statistics, reduced across processes; the gold oracle scored the same responses the RM scored
        seq_kl = (kl * mask).sum(-1)
        n_tok = mask.sum()
        local = {
            "ppo/score": raw_score.mean(), "ppo/score_std": raw_score.std() if B > 1 else torch.zeros((), device=dev),
            "ppo/reward": score.mean(), "ppo/gold_score": gold.mean(), "ppo/kl": seq_kl.mean(),
            "ppo/nonscore_reward": (rewards.sum(-1) - score).mean(), "ppo/response_length": mask.sum(-1).float().mean(),
            "ppo/ended_fraction": ro.ended.float().mean(),
            "ppo/explained_variance": explained_variance(old_values, returns, mask).nan_to_num(0.0),
            **{f"ppo/{k}": torch.tensor(sum(v) / max(len(v), 1), device=dev) for k, v in log.items() if v},
            "ppo/gen_tokens_per_s": n_tok / t_gen, "ppo/train_tokens_per_s": n_tok * t.ppo_epochs / (t_total - t_gen),
        }
        m = {k: acc.reduce(v.float().detach(), reduction="mean").item() for k, v in local.items()}
        m["ppo/kl_coef"] = kl_ctl.value
        m["ppo/episodes_per_s"] = B * acc.num_processes / t_total
        m["ppo/policy_loss"], m["ppo/value_loss"] = m.pop("ppo/pg"), m.pop("ppo/vf")
        kl_ctl.update(m["ppo/kl"], B * acc.num_processes)
        state.kl_coef = kl_ctl.value
        state.history.append({"iteration": it + 1, "kl": m["ppo/kl"], "reward": m["ppo/reward"],
                              "gold": m["ppo/gold_score"]})
        tracker.log(m, step=it + 1)
        bar.set_postfix(rm=f"{m['ppo/score']:.2f}", gold=f"{m['ppo/gold_score']:.3f}", kl=f"{m['ppo/kl']:.2f}")
        if t.sample_every and (it + 1) % t.sample_every == 0:
            rows = [[p[-1]["content"], r, float(g), float(s)] for p, r, g, s in
                    zip(batch_prompts, texts, gold.tolist(), raw_score.tolist())][: t.log_samples]
            tracker.table("ppo/samples", ["prompt", "response", "gold", "reward_model"], rows, step=it + 1)
        if (it + 1) % t.save_every == 0 and it + 1 < t.iterations:
            run.save_checkpoint(it + 1, lambda d: acc.save_state(str(d)), keep=t.keep_checkpoints,
                                barrier=acc.wait_for_everyone)
            crash_point(it + 1)

    periodic_eval(t.iterations)  # the last point of the over-optimisation curve: the trained policy

    # ---- final evaluation on held-out prompts: PPO against SFT, judged by the gold oracle ------------------
    # greedy (the headline, eval/...; deterministic) and sampled at the training temperature (eval/sampled/...: the
    # policy PPO optimised, and the one whose KL the per-iteration figures and best-of-n's bound describe)
    final_policy = acc.unwrap_model(policy)
    if state.ema is not None:
        with torch.no_grad():
            for p, e in zip(final_policy.parameters(), state.ema):
                p.copy_(e)
    final_policy.eval()
    mine = eval_prompts[acc.process_index:: acc.num_processes]
    asked = gather_object([p[-1]["content"] for p in mine])  # in the gathered order, not eval_prompts' own
    metrics, evals = {"data/skipped_records": skipped}, {}
    for prefix, greedy in (("eval", True), ("eval/sampled", False)) if t.eval_sampled else (("eval", True),):
        both = []
        for who in ("ppo", "sft"):
            torch.manual_seed(cfg.seed * 1_000_003 + 7717 + acc.process_index)  # the same seed for PPO and SFT
            args = (mine, tok, end_ids, t, oracle, reward_model, closing, ref_logits, dev, packing, greedy)
            if who == "ppo":
                e = evaluate(final_policy, *args)
            elif ref is not None:
                e = evaluate(ref, *args)
            else:
                with final_policy.model.disable_adapter():
                    e = evaluate(final_policy, *args)
            both.append({k: gather_object(v) for k, v in e.items()})
        evals[prefix] = both
        metrics.update(eval_metrics(*both, prefix))
    tracker.log(metrics, step=t.iterations)
    if acc.is_main_process:
        ppo_eval, sft_eval = evals["eval"]
        rows = [[p, s, float(sg), r, float(rg)] for p, s, sg, r, rg in zip(
            asked, sft_eval["text"], sft_eval["gold"], ppo_eval["text"], ppo_eval["gold"])][:32]
        tracker.table("eval/samples", ["prompt", "sft", "sft_gold", "ppo", "ppo_gold"], rows, step=t.iterations)
        png = overoptimization_plot(state.history, run.dir / "overoptimization.png",
                                    title=f"{run.run}: reward model vs gold oracle", periodic=state.periodic)
        tracker.image("ppo/overoptimization", png, step=t.iterations)
        (run.dir / "history.json").write_text(json.dumps(state.history, indent=1))
        (run.dir / "periodic.json").write_text(json.dumps(state.periodic, indent=1))

    # ---- save: the aligned policy as a plain Hugging Face checkpoint ---------------------------------------
    acc.wait_for_everyone()
    out_model = final_policy.model.merge_and_unload() if cfg.peft.enabled and cfg.peft.merge else final_policy.model

    def save(d):
        out_model.save_pretrained(d, safe_serialization=True)
        tok.save_pretrained(d)

    run.finish(save, metrics, adapter=bool(cfg.peft.enabled and not cfg.peft.merge))
    tracker.finish(metrics, run.final_dir)
    for prefix, how in (("eval", "greedy"), ("eval/sampled", f"sampled at T={t.temperature}")):
        if f"{prefix}/gold_score" in metrics:
            say(f"[ppo] {how}: gold score {metrics[f'{prefix}/gold_score']:.3f} (SFT "
                f"{metrics[f'{prefix}/sft_gold_score']:.3f}), win rate vs SFT {metrics[f'{prefix}/win_rate_vs_sft']:.2f}"
                f" (ties {metrics[f'{prefix}/tie_rate_vs_sft']:.2f}), KL {metrics[f'{prefix}/kl']:.2f}")
    say("[ppo] greedy gold by component, SFT -> PPO: " + ", ".join(
        f"{k[len('eval/gold/'):]} {metrics['eval/sft_gold/' + k[len('eval/gold/'):]]:.2f} -> {v:.2f}"
        for k, v in metrics.items() if k.startswith("eval/gold/")) + f"; saved {run.final_dir}")


if __name__ == "__main__":
    main()
