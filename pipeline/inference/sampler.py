"""The sampler the RL stages call: prompts in, a `Rollout` out (the prompt and response tokens, which responses
ended, and optionally the sampler's own log-probs). This is the seam where a faster engine (vLLM) plugs in later:
anything with `sample(prompt_ids, prompt_mask, ...) -> Rollout` will do.

Layout of a rollout batch (what every function that reads one agrees on):

    [ pad pad p p p p | r r r <end> pad pad ]      prompt left-padded to P, response right-padded to R
                      ^ P

Response-token quantities are [B, R]: position t is predicted from the logits/hidden state at P + t - 1. Position
ids come from the attention mask, as in `generate`, so recomputed log-probs match the sampler's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from pipeline.models.token_model import TokenModel
from pipeline.rl.ops import ended, logprobs_from_logits, response_mask


@dataclass
class Rollout:
    prompt_ids: Tensor  # [B, P] left-padded
    prompt_mask: Tensor  # [B, P]
    response_ids: Tensor  # [B, R] right-padded, cut after the first end-of-turn
    response_mask: Tensor  # [B, R] bool, includes the end-of-turn token
    ended: Tensor  # [B] bool
    logprobs: Optional[Tensor] = None  # [B, R] log-probs of the sampled tokens under the sampler, when it kept them

    @property
    def input_ids(self) -> Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], 1)

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.prompt_mask.bool(), self.response_mask], 1).long()

    def __getitem__(self, idx) -> "Rollout":
        return Rollout(self.prompt_ids[idx], self.prompt_mask[idx], self.response_ids[idx], self.response_mask[idx],
                       self.ended[idx], None if self.logprobs is None else self.logprobs[idx])





def position_ids(attention_mask: Tensor) -> Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def sample(policy, tok, prompt_ids, prompt_mask, end_ids: list[int], max_new_tokens: int, temperature: float,
           top_k: int = 0, top_p: float = 1.0, greedy: bool = False, keep_logprobs: bool = False) -> Rollout:
    """Sample responses with the KV cache (`generate`), then cut each after its first end-of-turn. keep_logprobs:
    also the log-probs of the sampled tokens under softmax(logits / temperature), from generate's own raw logits
    (top-k/top-p only filter what is sampled; PPO's ratio is taken under the full tempered distribution)."""
    hf = policy.model if isinstance(policy, TokenModel) else policy
    out = hf.generate(
        input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=max_new_tokens,
        do_sample=not greedy, temperature=temperature if not greedy else None, top_k=top_k or None,
        top_p=top_p if not greedy else None, eos_token_id=end_ids, pad_token_id=tok.pad_token_id,
        use_cache=True, return_dict_in_generate=True, output_logits=keep_logprobs)
    resp = out.sequences[:, prompt_ids.shape[1]:]
    mask = response_mask(resp, end_ids, None)
    resp = torch.where(mask, resp, tok.pad_token_id)
    logp = logprobs_from_logits(torch.stack(out.logits, 1), resp, temperature) if keep_logprobs else None
    return Rollout(prompt_ids, prompt_mask, resp, mask, ended(resp, end_ids) & mask.any(-1), logp)



def decode_responses(tok, ro: Rollout) -> list[str]:
    return [tok.decode(r[m], skip_special_tokens=True).strip() for r, m in zip(ro.response_ids, ro.response_mask)]
