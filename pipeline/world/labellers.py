"""Simulated labellers ranking replies: InstructGPT's comparisons, made on the fly (the policy's samples they rank
are drawn by pipeline/trainers/onpolicy.py: the world knows no policy).

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
