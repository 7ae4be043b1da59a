"""Gold-oracle throughput on one core: scores per second over the default world's ranked candidates.

    python bench/oracle_speed.py

"cold" clears the question-parse cache first (every prompt new, as in a first pass over data); "warm" is the
PPO case, where the same prompts come back with new responses. Timed in process CPU time, so a busy machine
slows the wall clock but not the figure.
"""

from __future__ import annotations

import time

from pipeline.oracle import GoldOracle, parse
from pipeline.synthetic import WorldConfig, _world, ranked_prompts


def measure(n_prompts: int = 2000, repeats: int = 3) -> dict[str, float]:
    cfg = WorldConfig(reward_prompts=n_prompts)
    recs = ranked_prompts(cfg, "train")
    prompts = [r["prompt"] for r in recs for _ in r["responses"]]
    responses = [x for r in recs for x in r["responses"]]
    oracle = GoldOracle(_world(cfg.seed, cfg.n_entities))
    out = {}
    for mode in ("cold", "warm"):
        best = float("inf")
        for _ in range(repeats):
            if mode == "cold":
                parse.cache_clear()
            t = time.process_time()
            oracle.score_batch(prompts, responses)
            best = min(best, time.process_time() - t)
        out[mode] = len(responses) / best
    return out


if __name__ == "__main__":
    for mode, rate in measure().items():
        print(f"gold oracle, {mode} parse cache: {rate:,.0f} scores/s on one core")
