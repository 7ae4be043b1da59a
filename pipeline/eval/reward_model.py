"""How good a reward model is: accuracy and calibration on held-out comparisons, and how well it orders the
policy's own answers (what PPO's advantages rest on).
"""

from __future__ import annotations

import itertools
import math
from typing import Optional, Sequence

from pipeline.core.dist import gather, shard
from pipeline.data.prompts import as_messages
from pipeline.inference.generation import generate
from pipeline.rl.readout import conversation_ids, score_ids, score_texts


def pair_accuracy(groups: Sequence[Sequence[tuple[float, float]]]) -> float:
    """Share of pairs within a group, (reward, gold) each, with different gold scores that the reward orders as gold
    does (a reward tie counts half); nan without such pairs. Groups are one prompt's answers: PPO's advantages
    compare answers to the same prompt, so this, not a correlation across prompts, says whether it can follow."""
    hits = [0.5 if ra == rb else float((ra > rb) == (ga > gb))
            for g in groups for (ra, ga), (rb, gb) in itertools.combinations(g, 2) if ga != gb]
    return sum(hits) / len(hits) if hits else float("nan")



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



def reward_stats(policy, rm, tok, prompts, cfg, oracle=None) -> dict:
    """The reward model's view of the SFT policy: mean and std of its reward on the policy's own answers (what
    PPO will see at its start, `train.stats_samples` per prompt), and with the oracle, how well that reward tracks
    the gold score there: the correlation, and `pair_accuracy`, the share of pairs of answers to the same prompt
    (with different gold scores) that it orders as gold does. That last one is what PPO's advantages rest on."""
    return answer_stats(rm, tok, policy_answers(policy, tok, prompts, cfg, oracle), cfg)


def policy_answers(policy, tok, prompts, cfg, oracle=None) -> dict:
    """This process's share of `prompts`, each answered `train.stats_samples` times by `policy` (the `generation`
    settings, seed cfg.seed + 1), with the oracle's gold scores: what `answer_stats` scores, drawn once so that two
    reward models (a round's before and after its update) are judged on the very same answers."""
    k = cfg.train.stats_samples
    mine = shard(len(prompts))
    msgs = [as_messages(prompts[i]) for i in mine for _ in range(k)]
    replies = [str(r) for r in generate(policy, tok, msgs, cfg.generation, cfg.train.gen_batch_size,
                                        seed=cfg.seed + 1)]
    golds = oracle.score_batch(msgs, replies) if oracle else None
    return {"mine": list(mine), "messages": msgs, "replies": replies, "gold": golds, "k": k}


def answer_stats(rm, tok, answers: dict, cfg) -> dict:
    """`reward_stats`'s figures of reward model `rm` on `policy_answers`' answers, gathered over processes."""
    t, k, mine, msgs, replies = cfg.train, answers["k"], answers["mine"], answers["messages"], answers["replies"]
    rewards = score_texts(rm, tok, msgs, replies, t.eval_batch_size or t.batch_size)
    golds = answers["gold"] if answers["gold"] is not None else [None] * len(msgs)
    per_prompt = {i: list(zip(rewards[j * k:(j + 1) * k], golds[j * k:(j + 1) * k])) for j, i in enumerate(mine)}
    groups = list(dict(gather(list(per_prompt.items()))).values())  # shards may repeat one prompt
    rows = [row for g in groups for row in g]
    r = [a for a, _ in rows]
    n = len(r)
    mean = sum(r) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in r) / max(n - 1, 1))
    out = {"mean": mean, "std": std, "n": n}
    if answers["gold"] is not None:
        g = [b for _, b in rows]
        gm = sum(g) / n
        sg = math.sqrt(sum((x - gm) ** 2 for x in g) / max(n - 1, 1))
        cov = sum((a - mean) * (b - gm) for a, b in rows) / max(n - 1, 1)
        out["gold_correlation"] = cov / (std * sg) if std > 0 and sg > 0 else float("nan")
        out["gold_mean"] = gm
        out["pair_accuracy"] = pair_accuracy(groups)
    return out
