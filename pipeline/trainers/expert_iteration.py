"""Expert iteration's sampling step (rejection-sampling fine-tuning, as in AlpacaFarm and Llama 2): n replies per
prompt from the current policy, the reward model's best kept as a demonstration. The fine-tuning is SFT's own
(TRL's SFTTrainer, assistant tokens only), set up by stages/expert_iteration.py."""

from __future__ import annotations

import torch

from pipeline.data.prompts import prompt_batch
from pipeline.inference.sampler import decode_responses, sample
from pipeline.rl.readout import score_rollout


@torch.no_grad()
def best_replies(
    policy,
    tok,
    prompts: list,
    end_ids,
    n: int,
    reward_model,
    closing,
    oracle,
    t,
    dev,
    batch_size: int,
    max_prompt_tokens: int,
    seed: int,
    backend: str = "hf",
) -> tuple[list[dict], dict]:
    """Dialogues {"messages": prompt + [the best of n replies]} for `prompts`, and what the choice did: the kept
    replies' and all samples' mean reward-model score and gold score, the tokens generated, and how many prompts
    had only empty replies (nothing to imitate: left out). `policy` is a TokenModel; the reward model is read by the
    one readout, at the last token of the templated conversation."""
    kept, stats = (
        [],
        {"rm_kept": 0.0, "rm_all": 0.0, "gold_kept": 0.0, "gold_all": 0.0, "generated_tokens": 0, "empty_prompts": 0},
    )
    was = policy.model.training
    policy.model.eval()
    try:
        for s in range(0, len(prompts), batch_size):
            batch = prompts[s : s + batch_size]
            many = [p for p in batch for _ in range(n)]  # prompt-major
            torch.manual_seed(seed * 1_000_003 + s)
            ids, am = prompt_batch(tok, many, max_prompt_tokens, dev)
            ro = sample(policy, tok, ids, am, end_ids, t.max_new_tokens, t.temperature, backend=backend)
            texts = decode_responses(tok, ro)
            rm = score_rollout(reward_model, ro, closing).cpu().view(len(batch), n)
            gold = torch.tensor(oracle.score_batch(many, texts)).view(len(batch), n)
            empty = torch.tensor([not x.strip() for x in texts]).view(len(batch), n)
            best = rm.masked_fill(empty, float("-inf")).argmax(-1)  # an empty reply is no demonstration
            for i, p in enumerate(batch):
                if empty[i].all():
                    stats["empty_prompts"] += 1
                    continue
                kept.append({"messages": list(p) + [{"role": "assistant", "content": texts[i * n + int(best[i])]}]})
            rows = torch.arange(len(batch))
            stats["rm_kept"] += float(rm[rows, best].sum())
            stats["rm_all"] += float(rm.mean(-1).sum())
            stats["gold_kept"] += float(gold[rows, best].sum())
            stats["gold_all"] += float(gold.mean(-1).sum())
            stats["generated_tokens"] += int(ro.response_mask.sum())
    finally:
        policy.model.train(was)
    for k in ("rm_kept", "rm_all", "gold_kept", "gold_all"):
        stats[k] /= max(len(prompts), 1)
    return kept, stats
