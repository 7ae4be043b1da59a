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
    hits = [
        0.5 if ra == rb else float((ra > rb) == (ga > gb))
        for g in groups
        for (ra, ga), (rb, gb) in itertools.combinations(g, 2)
        if ga != gb
    ]
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


def preference_eval(
    model,
    tokenizer,
    pairs: Sequence[dict],
    batch_size: int = 32,
    bins: int = 10,
    max_length: Optional[int] = None,
    prefix: str = "eval",
    device=None,
    with_gold: bool = False,
) -> tuple:
    """Score preference pairs ({"prompt", "chosen", "rejected", optional "gold_margin"}) with a reward model.

    Each distinct (prompt, response) is scored once (a ranked prompt's K responses appear in K-1 pairs each), shared
    across processes. Pairs longer than max_length are left out, as in training. Returns (metrics, margins) with
    `<prefix>/loss` (Bradley-Terry), accuracy, gold_accuracy, ece, margin (see preference_metrics); with_gold: also
    the gold margins of the pairs kept (None where a pair has none), in the margins' order."""
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
    scored = gather(
        list(zip(mine, score_ids(model, [ids[i] for i in mine], tokenizer.pad_token_id, batch_size, device)))
    )  # repeated indices just write the same score twice
    scores = [0.0] * len(ids)
    for i, v in scored:
        scores[i] = v
    rc, rr = [scores[c] for c, _ in which], [scores[r] for _, r in which]
    gm = [p.get("gold_margin") for p in kept]
    out = preference_metrics(rc, rr, gm if any(g is not None for g in gm) else None, bins, prefix)
    margins = [a - b for a, b in zip(rc, rr)]
    out[f"{prefix}/loss"] = sum(math.log1p(math.exp(-m)) if m > -30 else -m for m in margins) / max(len(margins), 1)
    out[f"{prefix}/too_long_pairs"] = len(pairs) - len(kept)
    return (out, margins, gm) if with_gold else (out, margins)


def preference_metrics(
    r_chosen: Sequence[float],
    r_rejected: Sequence[float],
    gold_margins: Optional[Sequence[Optional[float]]] = None,
    bins: int = 10,
    prefix: str = "eval",
) -> dict:
    """Accuracy against the labels, against the gold oracle (pairs it ranks equal are left out), ECE, mean margin."""
    margins = [c - r for c, r in zip(r_chosen, r_rejected)]
    n = max(len(margins), 1)
    out = {
        f"{prefix}/accuracy": sum((m > 0) + 0.5 * (m == 0) for m in margins) / n,
        f"{prefix}/margin": sum(margins) / n,
        f"{prefix}/ece": expected_calibration_error(
            [1 / (1 + math.exp(-max(min(m, 50), -50))) for m in margins], [1] * len(margins), bins
        ),
        f"{prefix}/pairs": len(margins),
    }
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
    replies = [
        str(r)
        for r in generate(
            policy,
            tok,
            msgs,
            cfg.generation,
            cfg.train.gen_batch_size,
            seed=cfg.seed + 1,
            backend=getattr(cfg, "sampler", "hf"),
        )
    ]
    golds = oracle.score_batch(msgs, replies) if oracle else None
    return {"mine": list(mine), "messages": msgs, "replies": replies, "gold": golds, "k": k}


def answer_stats(rm, tok, answers: dict, cfg) -> dict:
    """`reward_stats`'s figures of reward model `rm` on `policy_answers`' answers, gathered over processes."""
    t, k, mine, msgs, replies = cfg.train, answers["k"], answers["mine"], answers["messages"], answers["replies"]
    rewards = score_texts(rm, tok, msgs, replies, t.eval_batch_size or t.batch_size)
    golds = answers["gold"] if answers["gold"] is not None else [None] * len(msgs)
    per_prompt = {i: list(zip(rewards[j * k : (j + 1) * k], golds[j * k : (j + 1) * k])) for j, i in enumerate(mine)}
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


def ensemble_figures(
    models: Sequence, tok, answers: Optional[dict], test_pairs: Sequence[dict], cfg, max_length: Optional[int]
) -> dict:
    """What an ensemble of reward models (the reward stage's train.ensemble=K) is worth, and how diverse it is.

    On the starting policy's answers (`policy_answers`): each member's statistics {mean, std} ("member_stats", what
    each member is normalised with), and over the members' normalised scores: ensemble/disagreement (their standard
    deviation, averaged over the answers: the reward-hacking alarm's baseline), ensemble/member_correlation (the mean
    Pearson correlation of two members' scores: 1 is no diversity at all), and the gold figures of their mean and of
    their minimum (ensemble/gold_correlation, ensemble/gold_pair_accuracy, ensemble/worst_gold_pair_accuracy). On the
    test pairs: ensemble/accuracy and ensemble/gold_accuracy of the mean normalised margin, beside each member's
    (ensemble/member_gold_accuracies, a list)."""
    t = cfg.train
    bs = t.eval_batch_size or t.batch_size
    out: dict = {}
    K = len(models)
    stats = [{"mean": 0.0, "std": 1.0} for _ in models]
    if answers is not None:
        k, mine = answers["k"], answers["mine"]
        scores = [score_texts(m, tok, answers["messages"], answers["replies"], bs) for m in models]
        golds = answers["gold"] if answers["gold"] is not None else [None] * len(answers["messages"])
        rows = [(tuple(s[j] for s in scores), golds[j]) for j in range(len(golds))]
        per_prompt = {i: rows[j * k : (j + 1) * k] for j, i in enumerate(mine)}
        groups = list(dict(gather(list(per_prompt.items()))).values())
        flat = [r for g in groups for r in g]
        n = len(flat)
        for m in range(K):
            xs = [r[0][m] for r in flat]
            mu = sum(xs) / n
            stats[m] = {"mean": mu, "std": math.sqrt(sum((x - mu) ** 2 for x in xs) / max(n - 1, 1))}
        z = lambda r: [(r[0][m] - stats[m]["mean"]) / max(stats[m]["std"], 1e-6) for m in range(K)]  # noqa: E731
        zs = [z(r) for r in flat]
        out["ensemble/disagreement"] = sum(math.sqrt(sum((v - sum(q) / K) ** 2 for v in q) / K) for q in zs) / n
        cors = [_pearson([q[a] for q in zs], [q[b] for q in zs]) for a, b in itertools.combinations(range(K), 2)]
        out["ensemble/member_correlation"] = sum(cors) / len(cors)
        if answers["gold"] is not None:
            mean_groups = [[(sum(z(r)) / K, r[1]) for r in g] for g in groups]
            worst_groups = [[(min(z(r)), r[1]) for r in g] for g in groups]
            out["ensemble/gold_correlation"] = _pearson(
                [a for g in mean_groups for a, _ in g], [b for g in mean_groups for _, b in g]
            )
            out["ensemble/gold_pair_accuracy"] = pair_accuracy(mean_groups)
            out["ensemble/worst_gold_pair_accuracy"] = pair_accuracy(worst_groups)
    if test_pairs:
        margins, accs, gm = [], [], None
        for m in models:
            res, mg, gm = preference_eval(m, tok, test_pairs, bs, t.calibration_bins, max_length, with_gold=True)
            margins.append(mg)
            accs.append(res.get("eval/gold_accuracy", float("nan")))
        combined = [
            sum(mg[i] / max(stats[m]["std"], 1e-6) for m, mg in enumerate(margins)) / K for i in range(len(margins[0]))
        ]
        res = preference_metrics(
            combined,
            [0.0] * len(combined),
            gm if any(g is not None for g in gm) else None,
            t.calibration_bins,
            "ensemble",
        )
        out.update(
            {
                "ensemble/accuracy": res["ensemble/accuracy"],
                "ensemble/member_gold_accuracies": accs,
                "ensemble/member_gold_accuracy_mean": sum(accs) / K,
            }
        )
        if "ensemble/gold_accuracy" in res:
            out["ensemble/gold_accuracy"] = res["ensemble/gold_accuracy"]
    out["member_stats"] = stats
    return out


def _pearson(a: Sequence[float], b: Sequence[float]) -> float:
    n = len(a)
    if n < 2:
        return float("nan")
    ma, mb = sum(a) / n, sum(b) / n
    sa = math.sqrt(sum((x - ma) ** 2 for x in a))
    sb = math.sqrt(sum((y - mb) ** 2 for y in b))
    return sum((x - ma) * (y - mb) for x, y in zip(a, b)) / (sa * sb) if sa > 0 and sb > 0 else float("nan")
