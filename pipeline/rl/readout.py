"""The reward readout: one way to read a reward model, for every caller (reward stage, PPO, evaluation, benches).

Canonical position: the LAST token of the chat-templated conversation, the reply being the final assistant turn,
i.e. for our template the "\n" the template writes after the reply's <|end|>. That is where TRL's RewardTrainer
trains the head (it tokenizes apply_chat_template(prompt + chosen) and the sequence classifier pools its last
non-pad token), so every other reader comes to it rather than the other way round: changing what TRL is fed would
mean re-implementing its tokenization, and a hub chat model's template may write several tokens after its
end-of-turn. A PPO rollout stops at the end-of-turn token, so its reply is closed the way the template closes an
assistant turn (`turn_closing`) before the head is read. An unfinished reply (no end-of-turn within
max_new_tokens) is closed the same way: the reward model judges the text as written, exactly as the text-level
callers score it (their reply strings go through the template, which closes every turn); that it never ended is
train.missing_eos_penalty's business, not the reward model's.

    score_texts(rm, tok, prompts, replies)        # text: (prompt, reply) pairs
    score_rollout(rm, rollout, turn_closing(tok))  # a PPO rollout's token ids

An ensemble of reward models (the reward stage's train.ensemble=K, `RewardEnsemble.load`) is read the same way,
member by member, each member's score normalised with its own statistics; `RewardEnsemble.read` gives their mean,
standard deviation and minimum, and `score_rollout` of an ensemble gives the objective a method optimises
(train.reward_objective: mean | worst | uwo). With one member the ensemble is exactly the single reward model: its
raw score, normalised by the caller with `ensemble.stats` as before.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from pipeline.data.prompts import as_messages
from pipeline.inference.generation import model_device
from pipeline.inference.sampler import Rollout, position_ids
from pipeline.models.token_model import TokenModel
from pipeline.rl.forward import run_layout, layout
from pipeline.rl.shaping import ensemble_spread, reward_objective


def turn_closing(tok) -> list[int]:
    """The tokens the chat template writes after an assistant reply's content: its end-of-turn token and whatever
    follows it (for ours '<|end|>', '\n'). Derived by rendering a conversation, not hard-coded: the tokens from the
    last end-of-turn id on (or, if the template writes none, those after the reply's text)."""
    from pipeline.data.tokenizer import end_of_turn_ids

    reply = "Hello."
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": reply}]
    ids = list(tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"])
    ends = set(end_of_turn_ids(tok))
    last = max((i for i, x in enumerate(ids) if x in ends), default=None)
    if last is not None:
        return ids[last:]
    text = tok.apply_chat_template(msgs, tokenize=False)
    tail = text[text.rindex(reply) + len(reply) :]
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
        ids = ids.scatter(
            1,
            keep[:, None] + torch.arange(C, device=dev),
            torch.tensor(closing, dtype=ids.dtype, device=dev).expand(B, C),
        )
    mask = col < (keep + C)[:, None]
    return Rollout(ro.prompt_ids, ro.prompt_mask, ids, mask, ro.ended)


@torch.no_grad()
def read_reward(reward_model, ro: Rollout, pack: int = 0) -> Tensor:
    """THE reward readout: the reward model's scalar at the last real token of each row (prompt + response; [B],
    fp32). Rows must already be whole conversations as the chat template writes them (`close_replies` for a PPO
    rollout, `pipeline.rl.readout.rm_input_ids` for text).

    `reward_model`: a TokenModel (padded or packed layout), or a bare Hugging Face sequence classifier, run through
    its own forward (the reward stage's model inside the Trainer, which FSDP may own) with the padding set to its
    pad id: its pooling reads the rightmost non-pad token, the last real token, as in TRL's training."""
    if isinstance(reward_model, TokenModel):
        lay = layout(ro, pack)
        last = ro.prompt_ids.shape[1] + ro.response_mask.sum(-1) - 1
        return run_layout(reward_model, lay, lay.index.gather(1, last[:, None])).squeeze(-1).squeeze(-1).float()
    am = ro.attention_mask
    ids = torch.where(am.bool(), ro.input_ids, reward_model.config.pad_token_id)
    return reward_model(input_ids=ids, attention_mask=am, position_ids=position_ids(am)).logits[:, 0].float()


def score_rollout(reward_model, ro: Rollout, closing: list[int], pack: int = 0) -> Tensor:
    """What the reward model says about each (prompt, reply) of a rollout ([B]): `read_reward` of the replies closed
    as the chat template closes an assistant turn (`closing` = `turn_closing(tok)`). Of a `RewardEnsemble`: its
    `score`, the objective it is optimised by."""
    if isinstance(reward_model, RewardEnsemble):
        return reward_model.score(ro, closing, pack)
    return read_reward(reward_model, close_replies(ro, closing), pack)


class RewardEnsemble:
    """K frozen reward models (TokenModels), each with the statistics {mean, std} of its scores on the starting
    policy's answers, read by the one readout and combined by `objective` (pipeline.rl.shaping.reward_objective).

    `score(ro, closing)` is what every caller of `score_rollout` gets, on the scale `stats` describes: with one
    member its raw score and that member's statistics (so K = 1 is the single reward model, number for number); with
    several, the objective of the normalised members, which is already on the normalised scale (`stats` is then
    mean 0, std 1). `read` gives the members' mean, std and minimum (normalised), the disagreement included."""

    def __init__(self, members: list, stats: list[dict], objective: str = "mean", uwo_lambda: float = 1.0):
        if not members or len(members) != len(stats):
            raise ValueError(f"RewardEnsemble: {len(members)} members with {len(stats)} statistics")
        reward_objective(torch.zeros(1, 1), objective, uwo_lambda)  # an unknown objective fails here, not mid-run
        self.members, self.member_stats = list(members), [dict(s) for s in stats]
        self.objective, self.uwo_lambda = objective, uwo_lambda

    def __len__(self) -> int:
        return len(self.members)

    @property
    def stats(self) -> dict:
        """The statistics a caller normalises `score` with (PPO's, RLOO's and GRPO's training score)."""
        return self.member_stats[0] if len(self) == 1 else {"mean": 0.0, "std": 1.0}

    def describe(self) -> dict:
        """What a method optimised, for its manifest (`reward`) and the methods table: the ensemble's size and the
        objective over its members (one member: its score, whatever the objective says)."""
        many = len(self) > 1
        return {
            "ensemble": len(self),
            "objective": self.objective if many else "single",
            **({"uwo_lambda": self.uwo_lambda} if many and self.objective == "uwo" else {}),
        }

    def parameters(self):  # the device of the readout: where callers put the rollouts they score
        return self.members[0].parameters()

    def normalised(self, ro: Rollout, closing: list[int], pack: int = 0) -> Tensor:
        """[B, K]: member k's score of each reply, (raw - mean_k) / std_k."""
        closed = close_replies(ro, closing)
        cols = [
            (read_reward(m, closed, pack) - s.get("mean", 0.0)) / max(s.get("std", 1.0), 1e-6)
            for m, s in zip(self.members, self.member_stats)
        ]
        return torch.stack(cols, -1)

    def read(self, ro: Rollout, closing: list[int], pack: int = 0) -> dict[str, Tensor]:
        """{mean, std, min, objective}, each [B], over the members' normalised scores."""
        z = self.normalised(ro, closing, pack)
        return {**ensemble_spread(z), "objective": reward_objective(z, self.objective, self.uwo_lambda)}

    def score(self, ro: Rollout, closing: list[int], pack: int = 0) -> Tensor:
        if len(self) == 1:
            return read_reward(self.members[0], close_replies(ro, closing), pack)
        return reward_objective(self.normalised(ro, closing, pack), self.objective, self.uwo_lambda)

    @classmethod
    def load(
        cls, final, device, objective: str = "mean", uwo_lambda: float = 1.0, autocast=None, stats: dict | None = None
    ) -> "RewardEnsemble":
        """The reward stage's final/ as an ensemble: the members its ensemble.json lists (train.ensemble=K), or the
        one model of final/ itself with `stats` (the manifest's reward_stats) or its reward_stats.json."""
        import json
        from pathlib import Path

        from pipeline.models.loading import load_sequence_classifier
        from pipeline.models.token_model import disable_dropout

        final = Path(final)
        index = final / "ensemble.json"
        if index.is_file():
            entries = json.loads(index.read_text())["members"]
        else:
            own = final / "reward_stats.json"
            s = stats if stats is not None else json.loads(own.read_text()) if own.is_file() else {}
            entries = [{"path": ".", "mean": s.get("mean", 0.0), "std": s.get("std", 1.0)}]
        models = []
        for e in entries:
            m = load_sequence_classifier(final / e["path"]).to(device).eval().requires_grad_(False)
            disable_dropout(m)
            models.append(TokenModel(m, autocast=autocast))
        return cls(models, [{"mean": e["mean"], "std": e["std"]} for e in entries], objective, uwo_lambda)


def conversation_ids(tokenizer, messages: list[dict]) -> list[int]:
    """A whole conversation through the chat template (no generation prompt): what a reward model reads. This is
    exactly how TRL's RewardTrainer tokenizes prompt + chosen, and the head is read at its last token (the
    canonical readout, see pipeline.rl.readout.read_reward)."""
    return list(tokenizer.apply_chat_template(list(messages), tokenize=True, return_dict=True)["input_ids"])


def rm_input_ids(tokenizer, prompt: list[dict], response: str) -> list[int]:
    """The token ids a reward model scores for (prompt, reply): the reply is the final assistant turn, closed by the
    template (so an unfinished reply is read as the text it is, like PPO's, close_replies)."""
    return conversation_ids(tokenizer, list(prompt) + [{"role": "assistant", "content": response}])


@torch.no_grad()
def score_ids(model, ids: list[list[int]], pad_id: int, batch_size: int = 32, device=None) -> list[float]:
    """Scalar rewards of tokenized conversations, through the one readout (pipeline.rl.readout.read_reward: the head
    at each sequence's last token), in right-padded batches, longest first. `model`: a bare sequence classifier or
    a pipeline.models.token_model.TokenModel."""
    from pipeline.inference.sampler import Rollout
    from pipeline.models.token_model import TokenModel

    inner = model.model if isinstance(model, TokenModel) else model
    device = device or model_device(inner)
    out = [0.0] * len(ids)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    was_training = inner.training
    inner.eval()
    try:
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            width = max(len(ids[i]) for i in idx)
            x = torch.full((len(idx), width), pad_id, dtype=torch.long)
            m = torch.zeros((len(idx), width), dtype=torch.bool)
            for j, i in enumerate(idx):
                x[j, : len(ids[i])] = torch.tensor(ids[i])
                m[j, : len(ids[i])] = True
            n = len(idx)  # no prompt part: the whole conversation is the "response", right-padded
            ro = Rollout(
                x.new_zeros(n, 0).to(device),
                x.new_zeros(n, 0).to(device),
                x.to(device),
                m.to(device),
                torch.ones(n, dtype=torch.bool, device=device),
            )
            r = read_reward(model, ro).cpu().tolist()
            for j, i in enumerate(idx):
                out[i] = r[j]
    finally:
        inner.train(was_training)
    return out


def score_texts(
    model, tokenizer, prompts: Sequence, responses: Sequence[str], batch_size: int = 32, device=None
) -> list[float]:
    """The reward model's score of each (prompt, response) (text; PPO's rollouts: score_rollout,
    which reads the same position)."""
    ids = [rm_input_ids(tokenizer, as_messages(p), r) for p, r in zip(prompts, responses)]
    return score_ids(model, ids, tokenizer.pad_token_id, batch_size, device)
