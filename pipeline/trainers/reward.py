"""Reward-model training on top of TRL's RewardTrainer: batches that keep one prompt's ranking together
(InstructGPT, section 3.5), each completion scored once per batch, and the periodic held-out evaluation.
"""

from __future__ import annotations

import math

import torch
from transformers import TrainerCallback

from pipeline.eval.reward_model import preference_eval


class GroupBatchSampler:
    """Batches of whole groups: every pair of one prompt's ranking lands in the same batch.

    Groups are shuffled each epoch (seeded by seed + epoch; the Trainer calls set_epoch, so a resumed run replays
    the same order), and each batch takes `groups_per_batch` groups, so the number of batches is the same every
    epoch. The batch size in pairs varies with the group sizes (a ranking of K gives up to K(K-1)/2 pairs)."""

    drop_last = False

    def __init__(self, groups: list, groups_per_batch: int, seed: int):
        members: dict = {}
        for i, g in enumerate(groups):
            members.setdefault(g, []).append(i)
        self.groups = list(members.values())
        self.groups_per_batch = max(1, groups_per_batch)
        self.batch_size = None  # tells accelerate's BatchSamplerShard (several processes) that batch sizes vary
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.groups), generator=g).tolist()
        for s in range(0, len(order), self.groups_per_batch):
            yield [i for gi in order[s : s + self.groups_per_batch] for i in self.groups[gi]]

    def __len__(self) -> int:
        return math.ceil(len(self.groups) / self.groups_per_batch)


def collate_groups(examples: list[dict], pad_id: int) -> dict:
    """A batch of pairs as its distinct sequences, each once (right-padded), plus which two make each pair: with a
    prompt's whole ranking in the batch, K completions make K(K-1)/2 pairs but need only K forward passes."""
    index: dict[tuple, int] = {}
    seqs: list[list[int]] = []
    pairs = []
    for ex in examples:
        ij = []
        for ids in (ex["chosen_ids"], ex["rejected_ids"]):
            key = tuple(ids)
            if key not in index:
                index[key] = len(seqs)
                seqs.append(list(ids))
            ij.append(index[key])
        pairs.append(ij)
    width = max(map(len, seqs))
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for k, ids in enumerate(seqs):
        input_ids[k, : len(ids)] = torch.tensor(ids)
        mask[k, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "pair_index": torch.tensor(pairs, dtype=torch.long)}


def make_trainer_class(group_by_prompt: bool, seed: int):
    """TRL's RewardTrainer; with group_by_prompt, batches of whole groups, each completion scored once."""
    from functools import partial

    from torch.utils.data import DataLoader
    from trl import RewardTrainer

    class GroupedRewardTrainer(RewardTrainer):
        def get_train_dataloader(self):
            if not group_by_prompt:
                return super().get_train_dataloader()
            groups = self.train_dataset["group"]  # read before the unused columns go
            per_group = len(groups) / max(len(set(groups)), 1)
            sampler = GroupBatchSampler(groups, round(self._train_batch_size / per_group), seed)
            ds = self._remove_unused_columns(self.train_dataset, description="Training")
            collate = partial(collate_groups, pad_id=self.processing_class.pad_token_id)
            return self.accelerator.prepare(
                DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=self.args.dataloader_num_workers)
            )

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            """The Bradley-Terry loss of TRL's RewardTrainer (centring included), over pair_index batches."""
            if "pair_index" not in inputs:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            pi = inputs.pop("pair_index")
            outputs = model(**inputs, use_cache=False)
            r = outputs.logits.squeeze(-1)
            rc, rr = r[pi[:, 0]], r[pi[:, 1]]
            loss = -torch.nn.functional.logsigmoid(rc - rr).mean()
            if self.args.center_rewards_coefficient is not None:
                loss = loss + self.args.center_rewards_coefficient * torch.mean((rc + rr) ** 2)
            m = self._metrics["train" if model.training else "eval"]
            with torch.no_grad():  # the same training metrics TRL logs; fixed-size tensors, as batch sizes vary
                rd = r.detach().float()
                g = self.accelerator.gather(torch.stack([rd.min(), rd.max(), rd.sum(), rd.new_tensor(len(rd))])[None])
                m["min_reward"].append(g[:, 0].min().item())
                m["mean_reward"].append((g[:, 2].sum() / g[:, 3].sum()).item())
                m["max_reward"].append(g[:, 1].max().item())
                m["accuracy"].append(self.accelerator.gather_for_metrics((rc > rr).float().mean()).mean().item())
                m["margin"].append(self.accelerator.gather_for_metrics((rc - rr).mean()).mean().item())
            return (loss, outputs) if return_outputs else loss

    return GroupedRewardTrainer


class EvalCallback(TrainerCallback):
    """Every eval_every steps: accuracy, gold accuracy, calibration and margin on the test pairs."""

    def __init__(self, tok, pairs, cfg, max_len, tracker, say, prefix: str = "", step_offset: int = 0):
        self.tok, self.pairs, self.cfg, self.max_len, self.tracker, self.say = tok, pairs, cfg, max_len, tracker, say
        self.prefix, self.offset = prefix, step_offset  # an ensemble's member k: member<k>/eval/...
        self.last: dict = {}
        self.step = -1

    def run(self, model, step: int) -> dict:
        t = self.cfg.train
        last, _ = preference_eval(
            model, self.tok, self.pairs, t.eval_batch_size or t.batch_size, t.calibration_bins, self.max_len
        )
        self.step = step
        self.last = {f"{self.prefix}{k}": v for k, v in last.items()}
        self.tracker.log(self.last, step=step + self.offset)
        self.say(
            f"[reward] {self.prefix}step {step}: eval/accuracy {last['eval/accuracy']:.3f}, "
            f"eval/gold_accuracy {last.get('eval/gold_accuracy', float('nan')):.3f}, "
            f"eval/ece {last['eval/ece']:.3f}, eval/loss {last['eval/loss']:.4f}"
        )
        return self.last

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.pairs and model is not None and state.global_step % self.cfg.train.eval_every == 0:
            self.run(model, state.global_step)


def first_groups(pairs: list[dict], n) -> list[dict]:
    """The pairs of the first n prompts (groups), in order; all of them when n is None."""
    if n is None:
        return pairs
    keep: set = set()
    out = []
    for p in pairs:
        if p["group"] not in keep and len(keep) < n:
            keep.add(p["group"])
        if p["group"] in keep:
            out.append(p)
    return out
