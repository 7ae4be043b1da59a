"""Stage 1 — pretrain a causal LM from scratch, or continue pretraining any Hugging Face causal LM.

    make pretrain                                          # = python -m stages.pretrain
    python -m stages.pretrain optim.lr=3e-4 train.max_steps=2000 run=lr3e-4 parent_run=default
    python -m stages.pretrain model=hf model.name_or_path=<hub name or folder>   # continued pretraining
    accelerate launch --config_file conf/accelerate/cpu2.yaml -m stages.pretrain  # 2 CPU processes

Documents are packed into fixed blocks separated by the end token; a held-out share of documents gives
eval/loss and eval/perplexity. Interrupted? Run the same command again: it resumes from the last checkpoint.
"""

import math
import time
from contextlib import nullcontext

import torch
from accelerate import Accelerator
from omegaconf import DictConfig
from tqdm import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from pipeline.core.dist import shard
from pipeline.core.entry import entry
from pipeline.core.errors import UserError
from pipeline.core.runs import StageRun, crash_point
from pipeline.core.stage import begin_stage
from pipeline.data.formats import load_corpus
from pipeline.data.packing import batch_indices, pack, split_documents
from pipeline.data.tokenizer import load_tokenizer
from pipeline.inference.generation import saved_generation_config
from pipeline.models.build import build_from_config, n_params
from pipeline.models.sharding import sharding_record, without_tied
from pipeline.models.loading import fit_special_ids, load_causal_lm, mixed_precision


@torch.no_grad()
def heldout_loss(model, blocks: torch.Tensor, n_blocks: int, batch_size: int, acc: Accelerator) -> float:
    """Mean token loss over the first n_blocks held-out blocks, sharded across processes (`shard`: every process runs
    the same number of forward passes, as FSDP needs; a repeated block pads a short shard and counts nothing), exact
    for any world size."""
    model.eval()
    n = min(n_blocks, len(blocks))
    mine, real = shard(n), len(range(acc.process_index, n, acc.num_processes))
    total = torch.zeros(2, device=acc.device)  # [sum of token losses, number of tokens]
    for i in range(0, len(mine), batch_size):
        x = blocks[mine[i : i + batch_size]].to(acc.device)
        labels = x.clone()
        labels[max(0, real - i) :] = -100  # the padding repeats, if any: ignored by the loss
        n_tok = (labels[:, 1:] != -100).sum()
        loss = model(input_ids=x, labels=labels).loss.float()
        total += torch.stack([torch.where(n_tok > 0, loss * n_tok, 0.0), n_tok.to(total.dtype)])
    model.train()
    total = acc.reduce(total, reduction="sum")
    return (total[0] / total[1].clamp(min=1)).item()


@entry("pretrain")
def main(cfg: DictConfig) -> None:
    # ---- setup -------------------------------------------------------------------------------------------
    acc = Accelerator(mixed_precision=mixed_precision(cfg.precision), cpu=not torch.cuda.is_available())
    run = StageRun(cfg, is_main=acc.is_main_process)
    from_scratch = not cfg.model.name_or_path
    tok_parent = run.parent("tokenizer") if from_scratch else None
    begun = begin_stage(cfg, run, acc, parents=[tok_parent])
    if begun is None:
        return
    tracker, say, _ = begun

    # ---- model -------------------------------------------------------------------------------------------
    tok = load_tokenizer(tok_parent["final"] if from_scratch else cfg.model.name_or_path)
    if from_scratch:
        model = build_from_config(cfg.model, tok)
    else:
        model = fit_special_ids(
            load_causal_lm(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code), tok
        )
    block = cfg.train.block_size or cfg.model.max_seq_len
    if block > model.config.max_position_embeddings:
        raise UserError(
            f"train.block_size={block} exceeds the model's context ({model.config.max_position_embeddings})"
        )
    say(f"[pretrain] {'new' if from_scratch else cfg.model.name_or_path} model, {n_params(model) / 1e6:.2f}M params")

    # ---- data --------------------------------------------------------------------------------------------
    docs, skipped = load_corpus(cfg.data.corpus, cfg.data.world, cfg.paths.cache)
    docs = docs[: cfg.data.max_docs] if cfg.data.max_docs else docs
    train_docs, val_docs = split_documents(docs, cfg.data.val_fraction, cfg.seed)
    train_blocks = pack(train_docs, tok, block, where="training corpus")
    val_blocks = pack(val_docs, tok, block, where="held-out corpus (raise data.val_fraction)")
    say(
        f"[pretrain] {len(train_blocks)} training blocks x {block} tokens, {len(val_blocks)} held out"
        + (f", {skipped} bad records skipped" if skipped else "")
    )

    # ---- optimizer: weight decay on matrices only; the scheduler is stepped by us, once per optimizer step --
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.optim.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
    sched = get_cosine_with_min_lr_schedule_with_warmup(
        opt, cfg.optim.warmup_steps, t.max_steps, min_lr_rate=cfg.optim.min_lr_ratio
    )
    model, opt = acc.prepare(model, opt)
    if shards := sharding_record(acc.unwrap_model(model)):  # proof that it trains sharded: what each process holds
        say(f"[pretrain] FSDP: parameter bytes per rank {shards['per_rank']} of {shards['full']} in all")
        run.update(sharded_param_bytes=shards)
    acc.register_for_checkpointing(sched)

    start = 0
    ckpt = run.latest_checkpoint()
    if ckpt is not None:
        start = run.load_checkpoint(ckpt, lambda d: acc.load_state(str(d)))
        say(f"[pretrain] resumed from {ckpt} (step {start})")

    # ---- loop --------------------------------------------------------------------------------------------
    tokens_per_step = t.batch_size * t.grad_accum * acc.num_processes * block
    eval_blocks = t.eval_batches * t.batch_size
    metrics: dict = {}
    model.train()
    bar = tqdm(
        range(start, t.max_steps),
        initial=start,
        total=t.max_steps,
        disable=not acc.is_main_process,
        desc="pretrain",
        dynamic_ncols=True,
    )
    t_log, tokens_since = time.time(), 0
    for step in bar:
        loss_sum = torch.zeros((), device=acc.device)
        for micro in range(t.grad_accum):
            idx = batch_indices(
                len(train_blocks),
                t.batch_size,
                step,
                micro,
                t.grad_accum,
                acc.num_processes,
                acc.process_index,
                cfg.seed,
            )
            x = train_blocks[idx].to(acc.device)
            with acc.no_sync(model) if micro < t.grad_accum - 1 else nullcontext():
                loss = model(input_ids=x, labels=x).loss
                acc.backward(loss / t.grad_accum)
            loss_sum += loss.detach()
        grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        tokens_since += tokens_per_step
        done = step + 1

        if done % t.log_every == 0 or done == t.max_steps:
            train_loss = acc.reduce(loss_sum / t.grad_accum, reduction="mean").item()
            if not math.isfinite(train_loss):
                run.fail(f"non-finite loss at step {done}")
                raise UserError(
                    f"training diverged: loss is {train_loss} at step {done}; the last good checkpoint "
                    f"is kept in {run.ckpt_root} (try a lower optim.lr)"
                )
            now = time.time()
            logged = {
                "train/loss": train_loss,
                "train/lr": sched.get_last_lr()[0],
                "train/grad_norm": float(grad_norm),
                "train/tokens_per_s": tokens_since / (now - t_log),
                "train/tokens": done * tokens_per_step,
            }
            metrics.update(logged)
            t_log, tokens_since = now, 0
            tracker.log(logged, step=done)
            bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{metrics['train/tokens_per_s']:.0f}")
        if done % t.eval_every == 0 or done == t.max_steps:
            eval_loss = heldout_loss(model, val_blocks, eval_blocks, t.batch_size, acc)
            metrics.update({"eval/loss": eval_loss, "eval/perplexity": math.exp(min(eval_loss, 50))})
            tracker.log({k: metrics[k] for k in ("eval/loss", "eval/perplexity")}, step=done)
            say(f"[pretrain] step {done}: eval/loss {eval_loss:.4f}, perplexity {metrics['eval/perplexity']:.2f}")
        if done % t.save_every == 0 and done < t.max_steps:
            run.save_checkpoint(
                done, lambda d: acc.save_state(str(d)), keep=t.keep_checkpoints, barrier=acc.wait_for_everyone
            )
            crash_point(done)

    # ---- save: a plain Hugging Face checkpoint that the next stage (or anyone) loads with from_pretrained --
    if "eval/loss" not in metrics:  # resumed after the last step: evaluate so the manifest is complete
        eval_loss = heldout_loss(model, val_blocks, eval_blocks, t.batch_size, acc)
        metrics.update({"eval/loss": eval_loss, "eval/perplexity": math.exp(min(eval_loss, 50))})
    acc.wait_for_everyone()
    final_model = acc.unwrap_model(model)
    state = without_tied(final_model, acc.get_state_dict(model))  # whole on the main process, sharded or not
    final_model.generation_config = saved_generation_config(tok, 128)

    def save(d):
        final_model.save_pretrained(d, state_dict=state, safe_serialization=True)
        tok.save_pretrained(d)

    metrics.update(
        {"model/params": n_params(final_model), "data/skipped_records": skipped, "data/train_blocks": len(train_blocks)}
    )
    run.finish(save, metrics)
    tracker.finish(metrics, run.final_dir)
    say(
        f"[pretrain] eval/loss {metrics['eval/loss']:.4f}, eval/perplexity {metrics['eval/perplexity']:.2f}; "
        f"saved {run.final_dir}"
    )


if __name__ == "__main__":
    main()
