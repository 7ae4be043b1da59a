"""The model side of RLHF rollouts: batch prompts, sample responses, and the scoring forward passes.

Layout of a rollout batch (what every function here agrees on):

    [ pad pad p p p p | r r r <end> pad pad ]      prompt left-padded to P, response right-padded to R
                      ^ P

Position ids come from the attention mask, as in `generate`, so the log-probs recomputed for training match the
ones the sampler used for left-padded rows. Response-token quantities are [B, R]: position t is predicted from
the logits/hidden state at P + t - 1.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.errors import UserError
from pipeline.ppo_math import ended, entropy_from_logits, logprobs_from_logits, response_mask


@dataclass
class Rollout:
    prompt_ids: Tensor  # [B, P] left-padded
    prompt_mask: Tensor  # [B, P]
    response_ids: Tensor  # [B, R] right-padded, cut after the first end-of-turn
    response_mask: Tensor  # [B, R] bool, includes the end-of-turn token
    ended: Tensor  # [B] bool

    @property
    def input_ids(self) -> Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], 1)

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.prompt_mask.bool(), self.response_mask], 1).long()

    def __getitem__(self, idx) -> "Rollout":
        return Rollout(self.prompt_ids[idx], self.prompt_mask[idx], self.response_ids[idx], self.response_mask[idx],
                       self.ended[idx])


def encode_prompts(tok, prompts: list[list[dict]], max_tokens: int, device) -> tuple[Tensor, Tensor]:
    """Chat-template the prompts and left-pad them (generation continues from the right edge)."""
    texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    side = tok.padding_side
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    tok.padding_side = side
    if enc["input_ids"].shape[1] > max_tokens:
        raise UserError(f"a prompt has {enc['input_ids'].shape[1]} tokens, more than train.max_prompt_tokens="
                        f"{max_tokens}; raise it or filter the prompts")
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def position_ids(attention_mask: Tensor) -> Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def sample(policy, tok, prompt_ids, prompt_mask, end_ids: list[int], max_new_tokens: int, temperature: float,
           top_k: int = 0, top_p: float = 1.0, greedy: bool = False) -> Rollout:
    """Sample responses with the KV cache (`generate`), then cut each after its first end-of-turn."""
    out = policy.generate(
        input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=max_new_tokens,
        do_sample=not greedy, temperature=temperature if not greedy else None, top_k=top_k or None,
        top_p=top_p if not greedy else None, eos_token_id=end_ids, pad_token_id=tok.pad_token_id,
        use_cache=True)
    resp = out[:, prompt_ids.shape[1]:]
    mask = response_mask(resp, end_ids, None)
    resp = torch.where(mask, resp, tok.pad_token_id)
    return Rollout(prompt_ids, prompt_mask, resp, mask, ended(resp, end_ids) & mask.any(-1))


def response_logits(policy, ro: Rollout) -> Tensor:
    """Logits at the positions that predict each response token ([B, R, V])."""
    am = ro.attention_mask
    logits = policy(input_ids=ro.input_ids, attention_mask=am, position_ids=position_ids(am)).logits
    return logits[:, ro.prompt_ids.shape[1] - 1: -1]


def full_kl(logits: Tensor, ref_logits: Tensor, mask: Tensor, temperature: float = 1.0) -> Tensor:
    """Exact KL(pi || pi_ref) of the next-token distributions, summed over each response's tokens ([B]).
    Unlike the sampled k1 estimate it is >= 0 for any responses, greedy ones included (used for evaluation)."""
    logp, logq = (torch.log_softmax(x.float() / temperature, -1) for x in (logits, ref_logits))
    per_token = (logp.exp() * (logp - logq)).sum(-1)
    return torch.where(mask.bool(), per_token, 0.0).sum(-1)


def policy_forward(policy, ro: Rollout, temperature: float, with_entropy: bool = False):
    """Log-probs of the response tokens under `policy` at the sampling temperature ([B, R]), optionally entropy."""
    logits = response_logits(policy, ro)
    logp = logprobs_from_logits(logits, ro.response_ids, temperature)
    if not with_entropy:
        return logp
    return logp, entropy_from_logits(logits, temperature)


def _trunk_and_head(model):
    """Backbone and scalar head of a *ForSequenceClassification model (`score` in Llama, Qwen, Mistral, GPT-2)."""
    head = getattr(model, "score", None) or getattr(model, "classifier", None)
    trunk = getattr(model, model.base_model_prefix, None)
    if head is None or trunk is None:
        raise UserError(f"{type(model).__name__}: cannot find the backbone and scalar head for per-token values")
    return trunk, head


def token_values(model, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The scalar head applied at every position: [B, T] (a critic, or a reward model read at any token)."""
    model = getattr(model, "module", model)  # DDP wrapper: the trunk/head live on the inner module
    trunk, head = _trunk_and_head(model)
    h = trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask))
    return head(h.last_hidden_state).squeeze(-1).float()


def critic_forward(critic, ro: Rollout) -> Tensor:
    """V(s_t) for each response token t: the critic read at the position that predicts it ([B, R])."""
    P = ro.prompt_ids.shape[1]
    return token_values(critic, ro.input_ids, ro.attention_mask)[:, P - 1: -1]


@torch.no_grad()
def reward_scores(reward_model, ro: Rollout) -> Tensor:
    """The reward model's scalar at the last real token of prompt + response ([B])."""
    v = token_values(reward_model, ro.input_ids, ro.attention_mask)
    last = ro.prompt_ids.shape[1] + ro.response_mask.sum(-1).clamp(min=1) - 1
    return v.gather(1, last.unsqueeze(1)).squeeze(1)


def decode_responses(tok, ro: Rollout) -> list[str]:
    return [tok.decode(r[m], skip_special_tokens=True).strip() for r, m in zip(ro.response_ids, ro.response_mask)]


def chunked(fn, ro: Rollout, size: int, no_grad: bool = True) -> Tensor:
    """Run `fn(sub_rollout)` over chunks of the batch and concatenate (bounded activation memory)."""
    with torch.no_grad() if no_grad else nullcontext():
        return torch.cat([fn(ro[i: i + size]) for i in range(0, len(ro.ended), size)])


def disable_dropout(model) -> None:
    """PPO's ratio and KL assume the same function computes old and new log-probs: no dropout anywhere."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    for k in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(model.config, k) and isinstance(getattr(model.config, k), float):
            setattr(model.config, k, 0.0)
