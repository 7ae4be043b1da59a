"""The model side of RLHF rollouts: batch prompts, sample responses, and the scoring forward passes.

Layout of a rollout batch (what every function here agrees on):

    [ pad pad p p p p | r r r <end> pad pad ]      prompt left-padded to P, response right-padded to R
                      ^ P

Response-token quantities are [B, R]: position t is predicted from the logits/hidden state at P + t - 1. Position
ids come from the attention mask, as in `generate`, so recomputed log-probs match the sampler's.

The forward passes can run on that padded batch, or *packed*: the real tokens only, several sequences per row,
each with its own position ids. With no attention mask, transformers reads the sequence boundaries from the
position ids and masks attention block-diagonally, so a packed forward computes the same numbers as the padded one
without the padding, which is most of a rollout batch (short prompts left-padded to the longest, short replies
right-padded to the longest). `check_packing` verifies that on the first batch of a run.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

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


class TokenModel(torch.nn.Module):
    """A Hugging Face causal LM (head: lm_head) or *ForSequenceClassification model (head: score) read only at the
    token positions asked for: logits or values where they are needed, none for the prompt. The stages hand this
    wrapper, not the inner model, to accelerate.prepare: under DDP/FSDP the forward that computes the loss must be
    the wrapped module's, or the gradients are never all-reduced."""

    def __init__(self, model, autocast=None):
        super().__init__()
        self.model = model  # generate / save_pretrained / disable_adapter go to this one
        # a model accelerate does not prepare (PPO's frozen reference and reward model) runs its forward under this
        # context, e.g. Accelerator.autocast: the same mixed precision as the prepared policy and critic, so the
        # reference's log-probs equal the policy's at the first iteration (KL 0) under bf16 too
        self.autocast = autocast
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT: the adapted model
        prefix = getattr(base, "base_model_prefix", "")
        if getattr(base, prefix, None) is None or _head(base) is None:
            raise UserError(f"{type(base).__name__}: cannot find its backbone (.{prefix or 'base_model_prefix'}) "
                            f"and output head (lm_head, score or classifier)")
        self._base = [base]  # in a list: not registered a second time as a submodule

    def forward(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Optional[Tensor],
                select: Tensor) -> Tensor:
        """Head outputs at `select` (indices into the flattened [rows * width] positions; any shape S): [*S, D]."""
        base = self._base[0]
        with self.autocast() if self.autocast is not None else nullcontext():
            h = getattr(base, base.base_model_prefix)(input_ids=input_ids, position_ids=position_ids,
                                                      attention_mask=attention_mask, use_cache=False).last_hidden_state
            return _head(base)(h.flatten(0, 1)[select])


def _head(base):
    """lm_head of a causal LM; the scalar head of a Llama/Qwen/Mistral/GPT-2 ... sequence classifier."""
    lm_head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    for head in (lm_head, getattr(base, "score", None), getattr(base, "classifier", None)):
        if head is not None:
            return head
    return None


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


# ---- forward-pass layouts ------------------------------------------------------------------------------------

@dataclass
class Layout:
    """One forward pass's input, and where each (row, column) of the rollout's padded layout landed in its
    flattened output (`index`, [B, T]; a padding column points at a real token of the same row: garbage that the
    response mask drops)."""
    input_ids: Tensor
    position_ids: Tensor
    attention_mask: Optional[Tensor]
    index: Tensor


def padded_layout(ro: Rollout) -> Layout:
    am = ro.attention_mask
    B, T = am.shape
    return Layout(ro.input_ids, position_ids(am), am, torch.arange(B * T, device=am.device).view(B, T))


def packed_layout(ro: Rollout, per_row: int) -> Layout:
    """The real tokens of the batch, `per_row` sequences to a row (longest first, each to the emptiest row), rows
    padded to the widest with a filler sequence of its own (positions restarting at 0). No attention mask: the
    position ids mark the sequence boundaries."""
    am = ro.attention_mask.bool()
    B, T = am.shape
    dev = am.device
    lengths = am.sum(-1).tolist()
    k = max(1, -(-B // max(per_row, 1)))
    rows, filled = [[] for _ in range(k)], [0] * k
    for b in sorted(range(B), key=lambda b: -lengths[b]):
        j = min(range(k), key=filled.__getitem__)
        rows[j].append(b)
        filled[j] += lengths[b]
    W = max(filled)
    start = [0] * B
    for j, members in enumerate(rows):
        offset = j * W
        for b in members:
            start[b], offset = offset, offset + lengths[b]
    index = torch.tensor(start, device=dev)[:, None] + position_ids(am)  # [B, T]
    ids = torch.zeros(k * W, dtype=torch.long, device=dev)
    pos = torch.zeros(k * W, dtype=torch.long, device=dev)
    for j, f in enumerate(filled):
        pos[j * W + f: (j + 1) * W] = torch.arange(W - f, device=dev)  # the filler: a sequence of its own
    ids[index[am]] = ro.input_ids[am]
    pos[index[am]] = position_ids(am)[am]
    return Layout(ids.view(k, W), pos.view(k, W), None, index)


def layout(ro: Rollout, pack: int) -> Layout:
    return packed_layout(ro, pack) if pack else padded_layout(ro)


def _run(model: TokenModel, lay: Layout, select: Tensor) -> Tensor:
    return model(lay.input_ids, lay.position_ids, lay.attention_mask, select)


def response_logits(model: TokenModel, ro: Rollout, pack: int = 0) -> Tensor:
    """Logits at the positions that predict each response token ([B, R, V])."""
    lay = layout(ro, pack)
    return _run(model, lay, lay.index[:, ro.prompt_ids.shape[1] - 1: -1])


def policy_forward(policy: TokenModel, ro: Rollout, temperature: float, pack: int = 0, with_entropy: bool = False):
    """Log-probs of the response tokens under `policy` at the sampling temperature ([B, R]), optionally with the
    entropy (for logging only: computed without a graph)."""
    logits = response_logits(policy, ro, pack)
    logp = logprobs_from_logits(logits, ro.response_ids, temperature)
    if not with_entropy:
        return logp
    with torch.no_grad():
        return logp, entropy_from_logits(logits, temperature)


def critic_forward(critic: TokenModel, ro: Rollout, pack: int = 0) -> Tensor:
    """V(s_t) for each response token t: the critic read at the position that predicts it ([B, R])."""
    lay = layout(ro, pack)
    return _run(critic, lay, lay.index[:, ro.prompt_ids.shape[1] - 1: -1]).squeeze(-1).float()


# ---- the reward readout: one function reads a reward model, for every caller ---------------------------------
#
# Canonical position: the LAST token of the chat-templated conversation, the reply being the final assistant turn,
# i.e. for our template the "\n" the template writes after the reply's <|end|>. That is where TRL's RewardTrainer
# trains the head (it tokenizes apply_chat_template(prompt + chosen) and the sequence classifier pools its last
# non-pad token), so every other reader comes to it rather than the other way round: changing what TRL is fed would
# mean re-implementing its tokenization, and a hub chat model's template may write several tokens after its
# end-of-turn. A PPO rollout stops at the end-of-turn token, so its reply is closed the way the template closes an
# assistant turn (`turn_closing`) before the head is read. An unfinished reply (no end-of-turn within
# max_new_tokens) is closed the same way: the reward model judges the text as written, exactly as the text-level
# callers score it (their reply strings go through the template, which closes every turn); that it never ended is
# train.missing_eos_penalty's business, not the reward model's.


def turn_closing(tok) -> list[int]:
    """The tokens the chat template writes after an assistant reply's content: its end-of-turn token and whatever
    follows it (for ours '<|end|>', '\n'). Derived by rendering a conversation, not hard-coded: the tokens from the
    last end-of-turn id on (or, if the template writes none, those after the reply's text)."""
    from pipeline.tokenizer import end_of_turn_ids

    reply = "Hello."
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": reply}]
    ids = list(tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"])
    ends = set(end_of_turn_ids(tok))
    last = max((i for i, x in enumerate(ids) if x in ends), default=None)
    if last is not None:
        return ids[last:]
    text = tok.apply_chat_template(msgs, tokenize=False)
    tail = text[text.rindex(reply) + len(reply):]
    return list(tok(tail, add_special_tokens=False)["input_ids"])


def close_replies(ro: Rollout, closing: list[int]) -> Rollout:
    """The rollout as a reward model reads it: each reply's tokens before its end-of-turn (all of them if it has
    none), then `closing`, the template's end of an assistant turn. Responses widen by len(closing)."""
    B, R = ro.response_ids.shape
    C = len(closing)
    dev = ro.response_ids.device
    keep = ro.response_mask.sum(-1) - (ro.ended & ro.response_mask.any(-1)).long()  # [B] tokens before the end
    ids = torch.cat([ro.response_ids, ro.response_ids.new_zeros(B, C)], 1)
    col = torch.arange(R + C, device=dev)
    ids = torch.where(col < keep[:, None], ids, 0)
    if C:
        ids = ids.scatter(1, keep[:, None] + torch.arange(C, device=dev),
                          torch.tensor(closing, dtype=ids.dtype, device=dev).expand(B, C))
    mask = col < (keep + C)[:, None]
    return Rollout(ro.prompt_ids, ro.prompt_mask, ids, mask, ro.ended)


@torch.no_grad()
def read_reward(reward_model, ro: Rollout, pack: int = 0) -> Tensor:
    """THE reward readout: the reward model's scalar at the last real token of each row (prompt + response; [B],
    fp32). Rows must already be whole conversations as the chat template writes them (`close_replies` for a PPO
    rollout, `pipeline.evaluation.rm_input_ids` for text).

    `reward_model`: a TokenModel (padded or packed layout), or a bare Hugging Face sequence classifier, run through
    its own forward (the reward stage's model inside the Trainer, which FSDP may own) with the padding set to its
    pad id: its pooling reads the rightmost non-pad token, the last real token, as in TRL's training."""
    if isinstance(reward_model, TokenModel):
        lay = layout(ro, pack)
        last = ro.prompt_ids.shape[1] + ro.response_mask.sum(-1) - 1
        return _run(reward_model, lay, lay.index.gather(1, last[:, None])).squeeze(-1).squeeze(-1).float()
    am = ro.attention_mask
    ids = torch.where(am.bool(), ro.input_ids, reward_model.config.pad_token_id)
    return reward_model(input_ids=ids, attention_mask=am, position_ids=position_ids(am)).logits[:, 0].float()


def reward_scores(reward_model, ro: Rollout, closing: list[int], pack: int = 0) -> Tensor:
    """What the reward model says about each (prompt, reply) of a rollout ([B]): `read_reward` of the replies closed
    as the chat template closes an assistant turn (`closing` = `turn_closing(tok)`)."""
    return read_reward(reward_model, close_replies(ro, closing), pack)


def check_packing(model: TokenModel, ro: Rollout, pack: int, temperature: float) -> float:
    """Largest |difference| of response log-probs between the packed and the padded forward. A model whose
    attention ignores position-id boundaries (cross-sequence attention) shows differences of order 1."""
    with torch.no_grad():
        a = policy_forward(model, ro, temperature, pack)
        b = policy_forward(model, ro, temperature, 0)
    m = ro.response_mask
    return float((a - b).abs()[m].max()) if bool(m.any()) else 0.0


def full_kl(logits: Tensor, ref_logits: Tensor, mask: Tensor, temperature: float = 1.0) -> Tensor:
    """Exact KL(pi || pi_ref) of the next-token distributions, summed over each response's tokens ([B]).
    Unlike the sampled k1 estimate it is >= 0 for any responses, greedy ones included (used for evaluation)."""
    logp, logq = (torch.log_softmax(x.float() / temperature, -1) for x in (logits, ref_logits))
    per_token = (logp.exp() * (logp - logq)).sum(-1)
    return torch.where(mask.bool(), per_token, 0.0).sum(-1)


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
