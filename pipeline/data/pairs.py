"""Ranked comparisons as preference pairs: a ranking of K replies to one prompt gives every pair of them that the
ranking orders (K(K-1)/2 without ties), in TRL's conversational preference format. The `ranked` format of
pipeline/data/formats.py and the world's generated comparisons (pipeline/world/datasets.py) both expand through it.
"""

from __future__ import annotations

import itertools
from typing import Optional


def expand_pairs(ranked_records: list[dict]) -> list[dict]:
    """All pairs of each ranked record in TRL's conversational preference format (ties and duplicates skipped)."""
    out = []
    for rec in ranked_records:
        gold = rec.get("gold_scores")
        for i, j in itertools.combinations(range(len(rec["responses"])), 2):
            if rec["ranks"][i] == rec["ranks"][j] or rec["responses"][i] == rec["responses"][j]:
                continue
            c, r = (i, j) if rec["ranks"][i] < rec["ranks"][j] else (j, i)
            out.append(
                {
                    "prompt": rec["prompt"],
                    "chosen": [{"role": "assistant", "content": rec["responses"][c]}],
                    "rejected": [{"role": "assistant", "content": rec["responses"][r]}],
                    "group": rec["id"],
                    "gold_margin": round(gold[c] - gold[r], 4) if gold else None,
                }
            )
    return out


def fresh_copies(n_old: int, n_new: int, share: Optional[float]) -> int:
    """How many times n_new fresh pairs are repeated so that they make about `share` of what an update samples from
    (n_old older pairs beside them); at least once, and once with no share asked for."""
    if not share or not n_new:
        return 1
    return max(1, round(share / (1 - share) * n_old / n_new))


def repeat_pairs(pairs: list[dict], times: int) -> list[dict]:
    """`times` copies of `pairs`, every copy's rankings renamed (`<group>#<k>`, the first copy as it was): batches
    that keep a prompt's ranking together then hold one copy of it, not all of them."""
    out = list(pairs)
    for k in range(1, times):
        out += [{**p, "group": f"{p['group']}#{k}"} for p in pairs]
    return out
