"""Ranked comparisons as preference pairs: a ranking of K replies to one prompt gives every pair of them that the
ranking orders (K(K-1)/2 without ties), in TRL's conversational preference format. The `ranked` format of
pipeline/data/formats.py and the world's generated comparisons (pipeline/world/datasets.py) both expand through it.
"""

from __future__ import annotations

import itertools


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
