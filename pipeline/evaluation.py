"""Evaluation shared by the stages: the gold score of a policy, and the accuracy and calibration of a reward model.

    metrics, samples = gold_eval(model, tok, prompts, GoldOracle.from_config(cfg.data.world), settings, batch_size=32)
    metrics["eval/gold_score"]       # mean gold score of the replies, in [0, 1]
    rewards = reward_scores(rm, tok, prompts, responses, batch_size=32)   # what the RM says about (prompt, reply)

Under accelerate with several processes every process answers its share of the prompts and the results are gathered,
so each process returns the same metrics; call these on every process.
"""

from __future__ import annotations

import itertools
import math
from typing import Optional, Sequence

import torch

from pipeline.generation import _messages, _model_device, generate


def _dist():
    """(rank, world size) of this process; (0, 1) outside accelerate."""
    from accelerate import PartialState

    s = PartialState()
    return s.process_index, s.num_processes


def shard(n: int) -> list[int]:
    """The indices of n items this process handles (every world-size-th, from its rank). Every process gets the
    same count: a short shard repeats its first index (drop repeats with `seen`), because under FSDP / ZeRO-3 all
    processes must run the same number of forward passes or they wait for each other forever."""
    rank, world = _dist()
    mine = list(range(rank, n, world))
    per = -(-n // world)
    return mine + [mine[0] if mine else 0] * (per - len(mine)) if n else []


def gather(items: list) -> list:
    """Concatenate every process's `items` (a plain list outside accelerate)."""
    if _dist()[1] == 1:
        return items
    from accelerate.utils import gather_object

    return gather_object(items)


def _prompt_text(messages: list[dict]) -> str:
    """A prompt for a table cell: the last user turn, with earlier turns marked as such."""
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n".join(f"[{m['role']}] {m['content']}" for m in messages)


def gold_eval(model, tokenizer, prompts: Sequence, oracle, settings, batch_size: int = 32, device=None,
              seed: int = 0, prefix: str = "eval", max_samples: Optional[int] = None) -> tuple[dict, list[list]]:
    """Answer `prompts` (lists of messages, or {"messages": ...} records) and score the replies with the oracle.

    Returns (metrics, samples): `<prefix>/gold_score` (mean), `<prefix>/gold/<component>` (means),
    `<prefix>/response_tokens` (mean generated tokens), `<prefix>/ended_fraction` (share that closed their turn
    before max_new_tokens); samples are [prompt, response, gold score] rows in prompt order (`max_samples` first).
    """
    msgs = [_messages(p) for p in prompts]
    mine = shard(len(msgs))
    replies = generate(model, tokenizer, [msgs[i] for i in mine], settings, batch_size, device,
                       seed=seed + 7919 * _dist()[0])
    rows = {}
    for i, r in zip(mine, replies):
        if i not in rows:
            rows[i] = (i, str(r), oracle.components(msgs[i], str(r)), r.n_tokens, r.ended)
    rows = sorted({r[0]: r for r in gather(list(rows.values()))}.values(), key=lambda x: x[0])
    n = max(len(rows), 1)
    metrics = {f"{prefix}/gold_score": sum(c["total"] for _, _, c, _, _ in rows) / n,
               f"{prefix}/response_tokens": sum(t for *_, t, _ in rows) / n,
               f"{prefix}/ended_fraction": sum(e for *_, e in rows) / n}
    for k in (rows[0][2] if rows else {}):
        if k != "total":
            metrics[f"{prefix}/gold/{k}"] = sum(c[k] for _, _, c, _, _ in rows) / n
    samples = [[_prompt_text(msgs[i]), text, round(c["total"], 4)] for i, text, c, _, _ in rows[:max_samples]]
    return metrics, samples


def win_rate(scores_a: Sequence[float], scores_b: Sequence[float]) -> float:
    """Share of prompts where a beats b (paired by position); a tie counts half."""
    if len(scores_a) != len(scores_b):
        raise ValueError(f"win_rate: {len(scores_a)} scores against {len(scores_b)}")
    if not scores_a:
        return float("nan")
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores_a, scores_b)) / len(scores_a)


# ---- reward models -------------------------------------------------------------------------------------------

def pair_accuracy(groups: Sequence[Sequence[tuple[float, float]]]) -> float:
    """Share of pairs within a group, (reward, gold) each, with different gold scores that the reward orders as gold
    does (a reward tie counts half); nan without such pairs. Groups are one prompt's answers: PPO's advantages
    compare answers to the same prompt, so this, not a correlation across prompts, says whether it can follow."""
    hits = [0.5 if ra == rb else float((ra > rb) == (ga > gb))
            for g in groups for (ra, ga), (rb, gb) in itertools.combinations(g, 2) if ga != gb]
    return sum(hits) / len(hits) if hits else float("nan")


def conversation_ids(tokenizer, messages: list[dict]) -> list[int]:
    """A whole conversation through the chat template (no generation prompt): what a reward model reads. This is
    exactly how TRL's RewardTrainer tokenizes prompt + chosen, and the head is read at its last token (the
    canonical readout, see pipeline.rollout.read_reward)."""
    return list(tokenizer.apply_chat_template(list(messages), tokenize=True, return_dict=True)["input_ids"])


def rm_input_ids(tokenizer, prompt: list[dict], response: str) -> list[int]:
    """The token ids a reward model scores for (prompt, reply): the reply is the final assistant turn, closed by the
    template (so an unfinished reply is read as the text it is, like PPO's, pipeline.rollout.close_replies)."""
    return conversation_ids(tokenizer, list(prompt) + [{"role": "assistant", "content": response}])


@torch.no_grad()
def score_ids(model, ids: list[list[int]], pad_id: int, batch_size: int = 32, device=None) -> list[float]:
    """Scalar rewards of tokenized conversations, through the one readout (pipeline.rollout.read_reward: the head
    at each sequence's last token), in right-padded batches, longest first. `model`: a bare sequence classifier or
    a pipeline.rollout.TokenModel."""
    from pipeline.rollout import Rollout, TokenModel, read_reward

    inner = model.model if isinstance(model, TokenModel) else model
    device = device or _model_device(inner)
    out = [0.0] * len(ids)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    was_training = inner.training
    inner.eval()
    try:
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            width = max(len(ids[i]) for i in idx)
            x = torch.full((len(idx), width), pad_id, dtype=torch.long)
            m = torch.zeros((len(idx), width), dtype=torch.bool)
            for j, i in enumerate(idx):
                x[j, :len(ids[i])] = torch.tensor(ids[i])
                m[j, :len(ids[i])] = True
            n = len(idx)  # no prompt part: the whole conversation is the "response", right-padded
            ro = Rollout(x.new_zeros(n, 0).to(device), x.new_zeros(n, 0).to(device), x.to(device), m.to(device),
                         torch.ones(n, dtype=torch.bool, device=device))
            r = read_reward(model, ro).cpu().tolist()
            for j, i in enumerate(idx):
                out[i] = r[j]
    finally:
        inner.train(was_training)
    return out


def reward_scores(model, tokenizer, prompts: Sequence, responses: Sequence[str], batch_size: int = 32,
                  device=None) -> list[float]:
    """The reward model's score of each (prompt, response) (text; PPO's rollouts: pipeline.rollout.reward_scores,
    which reads the same position)."""
    ids = [rm_input_ids(tokenizer, _messages(p), r) for p, r in zip(prompts, responses)]
    return score_ids(model, ids, tokenizer.pad_token_id, batch_size, device)


def expected_calibration_error(probs: Sequence[float], labels: Sequence[int], bins: int = 10) -> float:
    """ECE of binary predictions: confidence max(p, 1-p) against whether the predicted side matches the label,
    |accuracy - confidence| averaged over `bins` equal-width confidence bins, weighted by their counts."""
    if not probs:
        return float("nan")
    conf = [max(p, 1 - p) for p in probs]
    right = [float((p > 0.5) == bool(y)) for p, y in zip(probs, labels)]
    total = 0.0
    for b in range(bins):
        lo, hi = 0.5 + 0.5 * b / bins, 0.5 + 0.5 * (b + 1) / bins
        idx = [i for i, c in enumerate(conf) if lo <= c < hi or (b == bins - 1 and c == hi)]
        if idx:
            acc = sum(right[i] for i in idx) / len(idx)
            mean_conf = sum(conf[i] for i in idx) / len(idx)
            total += abs(acc - mean_conf) * len(idx) / len(probs)
    return total


def load_reward_model(path, precision: str = "auto", device=None):
    """(reward model, tokenizer) from a reward stage's final/ (a merged model, or a LoRA adapter with its score
    head when peft.merge=false), in eval mode."""
    from pathlib import Path

    from transformers import AutoModelForSequenceClassification

    from pipeline.models import dtype_for
    from pipeline.tokenizer import load_tokenizer

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype_for(precision, device)
    tok = load_tokenizer(path, need_chat_template=True)
    if (Path(path) / "adapter_config.json").exists():
        from peft import AutoPeftModelForSequenceClassification

        try:  # the base loads with a fresh score head (restored from the adapter): hide that warning
            from trl.trainer.reward_trainer import suppress_seqcls_warning
        except ImportError:  # pragma: no cover
            from contextlib import nullcontext as suppress_seqcls_warning
        with suppress_seqcls_warning():
            model = AutoPeftModelForSequenceClassification.from_pretrained(str(path), num_labels=1, dtype=dtype)
        model = model.merge_and_unload()
    else:
        model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1, dtype=dtype)
    model.config.pad_token_id = tok.pad_token_id
    return model.to(device).eval(), tok


def preference_eval(model, tokenizer, pairs: Sequence[dict], batch_size: int = 32, bins: int = 10,
                    max_length: Optional[int] = None, prefix: str = "eval", device=None) -> tuple[dict, list[float]]:
    """Score preference pairs ({"prompt", "chosen", "rejected", optional "gold_margin"}) with a reward model.

    Each distinct (prompt, response) is scored once (a ranked prompt's K responses appear in K-1 pairs each), shared
    across processes. Pairs longer than max_length are left out, as in training. Returns (metrics, margins) with
    `<prefix>/loss` (Bradley-Terry), accuracy, gold_accuracy, ece, margin (see preference_metrics)."""
    import json

    index: dict[str, int] = {}
    ids: list[list[int]] = []

    def seq(msgs) -> int:
        key = json.dumps(msgs, sort_keys=True)
        if key not in index:
            index[key] = len(ids)
            ids.append(conversation_ids(tokenizer, msgs))
        return index[key]

    kept, which = [], []
    for p in pairs:
        c, r = seq(list(p["prompt"]) + list(p["chosen"])), seq(list(p["prompt"]) + list(p["rejected"]))
        if max_length is None or max(len(ids[c]), len(ids[r])) <= max_length:
            kept.append(p)
            which.append((c, r))
    mine = shard(len(ids))
    scored = gather(list(zip(mine, score_ids(model, [ids[i] for i in mine], tokenizer.pad_token_id, batch_size,
                                             device))))  # repeated indices just write the same score twice
    scores = [0.0] * len(ids)
    for i, v in scored:
        scores[i] = v
    rc, rr = [scores[c] for c, _ in which], [scores[r] for _, r in which]
    gm = [p.get("gold_margin") for p in kept]
    out = preference_metrics(rc, rr, gm if any(g is not None for g in gm) else None, bins, prefix)
    margins = [a - b for a, b in zip(rc, rr)]
    out[f"{prefix}/loss"] = sum(math.log1p(math.exp(-m)) if m > -30 else -m for m in margins) / max(len(margins), 1)
    out[f"{prefix}/too_long_pairs"] = len(pairs) - len(kept)
    return out, margins


def preference_metrics(r_chosen: Sequence[float], r_rejected: Sequence[float],
                       gold_margins: Optional[Sequence[Optional[float]]] = None, bins: int = 10,
                       prefix: str = "eval") -> dict:
    """Accuracy against the labels, against the gold oracle (pairs it ranks equal are left out), ECE, mean margin."""
    margins = [c - r for c, r in zip(r_chosen, r_rejected)]
    n = max(len(margins), 1)
    out = {f"{prefix}/accuracy": sum((m > 0) + 0.5 * (m == 0) for m in margins) / n,
           f"{prefix}/margin": sum(margins) / n,
           f"{prefix}/ece": expected_calibration_error([1 / (1 + math.exp(-max(min(m, 50), -50))) for m in margins],
                                                       [1] * len(margins), bins),
           f"{prefix}/pairs": len(margins)}
    if gold_margins is not None:
        g = [(m, gm) for m, gm in zip(margins, gold_margins) if gm is not None and gm != 0]
        if g:
            out[f"{prefix}/gold_accuracy"] = sum(0.5 if m == 0 else float((m > 0) == (gm > 0)) for m, gm in g) / len(g)
            out[f"{prefix}/gold_pairs"] = len(g)
    return out
