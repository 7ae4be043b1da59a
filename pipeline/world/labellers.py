"""Simulated labellers ranking the policy's own samples: InstructGPT's comparisons, made on the fly.

InstructGPT trained its reward model on rankings of the SFT model's own outputs: labellers saw K samples for a
prompt and ordered them (Ouyang et al. 2022, section 3.5). The shipped reward_data/ ranks hand-written candidates
in the styles of pipeline/world/responses.py instead. Those teach what a good answer looks like, but never the mistakes
this particular policy makes, and a small reward model trained on them alone orders pairs of the policy's samples
no better than chance (measured on the cpu preset: 52% of the pairs of four SFT samples per prompt put in the
gold order; 62% with 3000 prompts of on-policy comparisons added, 65% on those alone). Here the gold oracle plays
the labellers with the shipped data's noise: each reply gets its gold score and the ranking is drawn through
Plackett-Luce at `label_temperature`, exactly as for reward_data/ (`pipeline.world.labellers.labelled`).

Only the synthetic world has an oracle, so only world preference data can be extended this way.
"""

from __future__ import annotations

import itertools
import math
import random
import time

from pipeline.core.dist import gather, shard
from pipeline.inference.generation import generate


# ---- ranked comparisons --------------------------------------------------------------------------------------
def plackett_luce(scores: list[float], temperature: float, rng: random.Random) -> list[int]:
    """Ranks (0 = best) drawn by picking the best, then the next, each with probability ~ exp(score / T)."""
    left, ranks = list(range(len(scores))), [0] * len(scores)
    for r in range(len(scores)):
        top = max(scores[i] for i in left)  # subtract the max: no overflow at small T
        weights = [math.exp((scores[i] - top) / temperature) for i in left]
        i = rng.choices(left, weights)[0]
        ranks[i] = r
        left.remove(i)
    return ranks


def labelled(
    rec_id: str, prompt: list[dict], responses: list[str], oracle, temperature: float, rng: random.Random
) -> dict:
    """A ranked record as a simulated labeller gives it: the gold scores, ranked through Plackett-Luce noise."""
    gold = [round(oracle.score(prompt, r), 4) for r in responses]
    return {
        "id": rec_id,
        "prompt": prompt,
        "responses": responses,
        "ranks": plackett_luce(gold, temperature, rng),
        "gold_scores": gold,
    }


def label_agreement(ranked_records: list[dict]) -> float:
    """Share of pairs with distinct gold scores whose noisy label agrees with the gold order."""
    agree = total = 0
    for rec in ranked_records:
        g, rk = rec["gold_scores"], rec["ranks"]
        for i, j in itertools.combinations(range(len(g)), 2):
            if g[i] != g[j]:
                total += 1
                agree += (g[i] > g[j]) == (rk[i] < rk[j])
    return agree / max(total, 1)


def distinct_prompts(pairs: list[dict], n: int) -> list[list[dict]]:
    """The prompts of the first n groups of preference pairs, in order."""
    seen: dict = {}
    for p in pairs:
        if len(seen) == n:
            break
        seen.setdefault(p["group"], p["prompt"])
    return list(seen.values())


def onpolicy_comparisons(
    policy,
    tok,
    prompts: list[list[dict]],
    oracle,
    samples: int,
    settings,
    batch_size: int,
    label_temperature: float,
    seed: int,
    id_prefix: str = "onpolicy",
    backend: str = "hf",
) -> tuple[list[dict], dict]:
    """`samples` replies from `policy` to each prompt, ranked by simulated labellers: ranked records in the
    format of reward_data/ (`expand_pairs` makes them pairs), and what they were like: how many prompts gave two
    or more distinct replies, the replies' mean gold score, how often the noisy labels agree with the gold order.
    Under accelerate each process samples its share of the prompts and every process gets all the records."""
    t0 = time.time()
    mine = shard(len(prompts))
    replies = generate(
        policy,
        tok,
        [prompts[i] for i in mine for _ in range(samples)],
        settings,
        batch_size,
        seed=seed,
        backend=backend,
    )
    records = []
    for j, i in enumerate(mine):
        distinct = list(dict.fromkeys(str(r) for r in replies[j * samples : (j + 1) * samples]))
        if len(distinct) >= 2:  # a prompt it always answers the same way gives no comparison
            # one random stream per prompt: the labels do not depend on how prompts were split across processes
            records.append(
                labelled(
                    f"{id_prefix}-{i:05d}",
                    prompts[i],
                    distinct,
                    oracle,
                    label_temperature,
                    random.Random(f"{seed}:onpolicy:{i}"),
                )
            )
    records = sorted({r["id"]: r for r in gather(records)}.values(), key=lambda r: r["id"])
    golds = list(itertools.chain.from_iterable(r["gold_scores"] for r in records))
    stats = {
        "onpolicy/prompts": len(prompts),
        "onpolicy/ranked_prompts": len(records),
        "onpolicy/gold_mean": sum(golds) / len(golds) if golds else float("nan"),
        "onpolicy/label_agreement": label_agreement(records),
        "onpolicy/seconds": time.time() - t0,
    }
    return records, stats


def round_comparisons(
    policy,
    tok,
    prompts: list,
    r: int,
    oracle,
    samples: int,
    per_round: int,
    settings,
    batch_size: int,
    label_temperature: float,
    seed: int,
    backend: str = "hf",
) -> tuple[list[dict], dict]:
    """Round r's labels in make iterate (r > 1): `samples` replies of `policy` (round r-1's) to each of the round's
    `per_round` fresh prompts, the (r-1)-th slice of `prompts` (a list of {"messages": ...}), wrapping around, ranked
    by the same labellers as `onpolicy_comparisons`. The reward rounds and online DPO's rounds both label this way."""
    start = (r - 2) * per_round
    fresh = [prompts[(start + j) % len(prompts)]["messages"] for j in range(min(per_round, len(prompts)))]
    return onpolicy_comparisons(
        policy,
        tok,
        fresh,
        oracle,
        samples,
        settings,
        batch_size,
        label_temperature,
        seed + 2 + 101 * (r - 1),
        id_prefix=f"round{r}",
        backend=backend,
    )
