"""The sampler the RL stages call: prompts in, a `Rollout` out (the prompt and response tokens, which responses
ended, and optionally the sampler's own log-probs). Two back ends, one contract (`sample(..., backend=)`):

- "hf": Hugging Face `generate` on a padded batch, for any architecture: the reference. Every row runs until the
  batch's longest reply ends.
- "engine": the continuous-batching engine's runner (pipeline/inference/runners.py, the one serving uses): Llama
  checkpoints through the lean forward over a slot cache, rows leaving the batch the step they end, so the batch
  shrinks as replies finish. It reads the policy's parameter tensors themselves (no fused copy), so after a PPO
  update it samples from the new weights with nothing reloaded. Where it does not apply (another architecture, a
  LoRA-wrapped policy) the hf path runs. "auto" is the engine where it applies.

Both give the same greedy tokens, and sampled log-probs under softmax(logits / temperature) of the full
distribution (top-k and top-p only filter what is drawn); they draw from the same distribution, not the same
samples (tests/test_generation.py). A faster engine (vLLM) would plug in here the same way.

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
from pipeline.models.tokens import ended, logprobs_from_logits, response_mask


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
        return Rollout(
            self.prompt_ids[idx],
            self.prompt_mask[idx],
            self.response_ids[idx],
            self.response_mask[idx],
            self.ended[idx],
            None if self.logprobs is None else self.logprobs[idx],
        )


def position_ids(attention_mask: Tensor) -> Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


BACKENDS = ("auto", "engine", "hf")


def engine_applies(model) -> bool:
    """Whether the engine back end can run this model: a plain Llama checkpoint (LlamaRunner.supports) whose weights
    are all here, whole (under FSDP or ZeRO-3 a parameter is a shard or empty, and the engine reads parameter tensors
    as they are)."""
    from pipeline.inference.runners import LlamaRunner

    m = model.model if isinstance(model, TokenModel) else model
    return LlamaRunner.supports(m) and all(type(p.data) is torch.Tensor and p.numel() > 0 for p in m.parameters())


@torch.no_grad()
def sample(
    policy,
    tok,
    prompt_ids,
    prompt_mask,
    end_ids: list[int],
    max_new_tokens: int,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    keep_logprobs: bool = False,
    backend: str = "hf",
) -> Rollout:
    """Sample responses with the KV cache, then cut each after its first end-of-turn. keep_logprobs: also the
    log-probs of the sampled tokens under softmax(logits / temperature) (top-k/top-p only filter what is sampled;
    PPO's ratio is taken under the full tempered distribution). backend: see the module docstring."""
    if backend not in BACKENDS:
        raise ValueError(f"sampler backend {backend!r}: one of {', '.join(BACKENDS)}")
    hf = policy.model if isinstance(policy, TokenModel) else policy
    if backend != "hf" and engine_applies(hf):
        return engine_sample(
            hf, tok, prompt_ids, prompt_mask, end_ids, max_new_tokens, temperature, top_k, top_p, greedy, keep_logprobs
        )
    out = hf.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        max_new_tokens=max_new_tokens,
        do_sample=not greedy,
        temperature=temperature if not greedy else None,
        top_k=top_k or None,
        top_p=top_p if not greedy else None,
        eos_token_id=end_ids,
        pad_token_id=tok.pad_token_id,
        use_cache=True,
        return_dict_in_generate=True,
        output_logits=keep_logprobs,
    )
    resp = out.sequences[:, prompt_ids.shape[1] :]
    mask = response_mask(resp, end_ids, None)
    resp = torch.where(mask, resp, tok.pad_token_id)
    logp = logprobs_from_logits(torch.stack(out.logits, 1), resp, temperature) if keep_logprobs else None
    return Rollout(prompt_ids, prompt_mask, resp, mask, ended(resp, end_ids) & mask.any(-1), logp)


def _draw(logits: Tensor, temperature: float, top_k: int, top_p: float, greedy: bool) -> Tensor:
    """One token per row of `logits` [B, V] as `generate` draws it: argmax when greedy; else the logits divided by
    the temperature, then top-k, then top-p (the smallest set of tokens whose probability reaches it), then one
    multinomial draw from the torch generator (so torch.manual_seed makes a rollout reproducible)."""
    if greedy:
        return logits.argmax(-1)
    x = logits / temperature
    if top_k and top_k < x.shape[-1]:
        kth = x.topk(top_k, -1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, order = x.sort(-1, descending=False)
        drop = sorted_x.softmax(-1).cumsum(-1) <= 1 - top_p  # generate's TopPLogitsWarper: ascending order
        drop[:, -1] = False
        x = x.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(x.softmax(-1), 1)[:, 0]


def engine_sample(
    model,
    tok,
    prompt_ids,
    prompt_mask,
    end_ids: list[int],
    max_new_tokens: int,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    keep_logprobs: bool = False,
    max_rows: Optional[int] = None,
) -> Rollout:
    """The engine back end of `sample`: every prompt joins the runner's batch (up to `max_rows` at a time, the rest
    joining as rows end), each step samples one token per running row, and a row leaves the step it writes an
    end-of-turn token or reaches max_new_tokens. The result is laid out as `sample`'s: the prompts as given,
    responses right-padded to the longest."""
    from pipeline.inference.runners import LlamaRunner

    B = prompt_ids.shape[0]
    dev = prompt_ids.device
    prompts = [row[m.bool()].tolist() for row, m in zip(prompt_ids.cpu(), prompt_mask.cpu())]
    rows = min(B, max_rows or B)
    runner = LlamaRunner(model, rows, max(map(len, prompts), default=0) + max_new_tokens + 1, fuse=False)
    ends = set(end_ids)
    out = [[] for _ in range(B)]
    logps = [[] for _ in range(B)]
    finished = [False] * B
    running: list[int] = []  # the prompt index of each runner row, in the runner's order
    waiting = list(range(B))
    last: list[int] = []
    while running or waiting:
        join = waiting[: rows - len(running)]
        waiting = waiting[len(join) :]
        logits = runner.step(last, [prompts[i] for i in join])  # [len(running) + len(join), V], fp32
        running = running + join
        drawn = _draw(logits, temperature, top_k, top_p, greedy)
        toks = drawn.tolist()
        if keep_logprobs:
            lp = torch.log_softmax(logits / temperature, -1).gather(-1, drawn[:, None])[:, 0].tolist()
        done = []
        for j, i in enumerate(running):
            out[i].append(toks[j])
            if keep_logprobs:
                logps[i].append(lp[j])
            if toks[j] in ends or len(out[i]) >= max_new_tokens:
                finished[i] = toks[j] in ends
                done.append(j)
        order = runner.remove(done) if done else list(range(len(running)))  # the rows left, as their old indices
        running, last = [running[j] for j in order], [toks[j] for j in order]
    R = max((len(o) for o in out), default=0)
    resp = torch.full((B, R), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((B, R), dtype=torch.bool)
    for i, o in enumerate(out):
        resp[i, : len(o)] = torch.tensor(o, dtype=torch.long)
        mask[i, : len(o)] = True
    logp = None
    if keep_logprobs:
        logp = torch.zeros((B, R))
        for i, v in enumerate(logps):
            logp[i, : len(v)] = torch.tensor(v)
        logp = logp.to(dev)
    return Rollout(prompt_ids, prompt_mask, resp.to(dev), mask.to(dev), torch.tensor(finished, device=dev), logp)


def decode_responses(tok, ro: Rollout) -> list[str]:
    return [tok.decode(r[m], skip_special_tokens=True).strip() for r, m in zip(ro.response_ids, ro.response_mask)]
