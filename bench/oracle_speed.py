"""Gold-oracle throughput on one core: scores per second over the default world's ranked candidates.

    python bench/oracle_speed.py

"cold" clears the question-parse cache first (every prompt new, as in a first pass over data); "warm" is the
PPO case, where the same prompts come back with new responses. Timed in process CPU time, so a busy machine
slows the wall clock but not the figure (much: two processes on one core still share its caches, so read the
load average printed first). The world's lexicon (the words fluency is measured against) is built once per world
when the first oracle for it is made; its cost is printed separately and is not in the scores/s figures.
"""

from __future__ import annotations

import os
import platform
import time

from pipeline.core.config import WorldConfig
from pipeline.world.datasets import ranked_prompts
from pipeline.world.language import parse
from pipeline.world.lexicon import LEXICONS, lexicon
from pipeline.world.oracle import GoldOracle
from pipeline.world.world import cached_world


def measure(n_prompts: int = 2000, repeats: int = 3) -> dict[str, float]:
    cfg = WorldConfig(reward_prompts=n_prompts)
    recs = ranked_prompts(cfg, "train")
    prompts = [r["prompt"] for r in recs for _ in r["responses"]]
    responses = [x for r in recs for x in r["responses"]]
    oracle = GoldOracle(cached_world(cfg.seed, cfg.n_entities))
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


def lexicon_seconds() -> float:
    """CPU seconds to build the default world's lexicon from scratch (once per world and process)."""
    cfg = WorldConfig()
    world = cached_world(cfg.seed, cfg.n_entities)
    LEXICONS.clear()
    t = time.process_time()
    lexicon(world)
    return time.process_time() - t


if __name__ == "__main__":
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(f"lexicon of the default world: built in {lexicon_seconds():.2f}s of CPU, once per world")
    for mode, rate in measure().items():
        print(f"gold oracle, {mode} parse cache: {rate:,.0f} scores/s on one core")
