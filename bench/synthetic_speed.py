"""Synthetic-data generation time: CPU seconds to generate each data set of the default world from scratch.

    python bench/synthetic_speed.py                   # the default world (WorldConfig()), best of 2: ~40 s on 2 cores
    python bench/synthetic_speed.py --repeats 3 --no-results

What `materialise` writes for a run (pipeline.world.datasets.FILES: the pretraining corpus, SFT dialogues and their
held-out split, evaluation and PPO prompts) and the ranked comparisons of reward_data/ (regenerated in memory for
any other world), each generated from a cold start: the world, the question-parse cache and the lexicon are
cleared first, the world is built (and timed) on its own, and the parse cache is cleared again before each data
set. The lexicon (the words fluency is measured against) is built by the first gold oracle of the world, so its
cost is in reward_train's figure. Timed in process CPU time (time.process_time), so a
busy machine slows the wall clock but not the figure (much: two processes on one core still share its caches; the
load average is printed and recorded). Each figure is the best of `--repeats` runs. The corpus must stay under 20 s
of CPU on a 2-core box (the bound tests/test_synthetic.py used to assert): every `make pretrain` on a new world
config pays it once.

Adds a row to the "## Synthetic data generation" section of bench/results.md (other sections kept as they are).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from _common import REPO, machine, update_results  # (bench/ is on sys.path)

sys.path.insert(0, str(REPO))

from pipeline.core.config import WorldConfig
from pipeline.world.datasets import FILES, ranked_prompts
from pipeline.world.language import parse
from pipeline.world.lexicon import LEXICONS
from pipeline.world.world import cached_world

SECTION = "## Synthetic data generation"
SETS = ("world", *FILES, "reward_train", "reward_test")
HEADER = (
    "| date | machine | load avg | repeats | world config | "
    + " | ".join(f"{s} s" for s in SETS)
    + " | corpus docs / M chars | total s |"
)
INTRO = (
    "`python bench/synthetic_speed.py`: CPU seconds (time.process_time, best of the repeats) to generate each "
    "data set of the default world (`WorldConfig()`) from a cold start (world, parse cache and lexicon cleared "
    "first): the world itself, what `materialise` writes for a run (corpus, SFT dialogues and held-out split, "
    "evaluation and PPO prompts) and reward_data/'s ranked comparisons (train, test). Target: the corpus under "
    "20 s on 2 cores. Load avg: the 1-minute load at the start. One row per run, newest last."
)


def _cold() -> None:
    cached_world.cache_clear()
    parse.cache_clear()
    LEXICONS.clear()


def _cpu(fn) -> tuple[float, object]:
    t = time.process_time()
    out = fn()
    return time.process_time() - t, out


def measure(cfg: WorldConfig | None = None, repeats: int = 2) -> tuple[dict[str, float], dict[str, int]]:
    """({data set: best CPU seconds}, sizes: {"corpus_docs", "corpus_chars", and each data set's record count})."""
    cfg = cfg or WorldConfig()
    makers = {
        "world": lambda: cached_world(cfg.seed, cfg.n_entities),
        **{name: (lambda make=make: list(make(cfg))) for name, make in FILES.items()},
        "reward_train": lambda: ranked_prompts(cfg, "train"),
        "reward_test": lambda: ranked_prompts(cfg, "test"),
    }
    best = {name: float("inf") for name in makers}
    sizes: dict[str, int] = {}
    for _ in range(repeats):
        _cold()
        for name, make in makers.items():  # the world first: the others then find it built, as materialise does
            if name != "world":
                parse.cache_clear()  # each data set parses its own questions from scratch
            seconds, out = _cpu(make)
            best[name] = min(best[name], seconds)
            if name != "world":
                sizes[name] = len(out)
            if name == "corpus":
                sizes["corpus_chars"] = sum(len(r["text"]) for r in out)
    sizes["corpus_docs"] = sizes["corpus"]
    return best, sizes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2, help="runs per data set; the best (least disturbed) counts")
    ap.add_argument("--no-results", action="store_true", help="print only; leave bench/results.md alone")
    args = ap.parse_args()

    where, load = machine(), os.getloadavg()[0]
    print(f"[bench] {where}, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    cfg = WorldConfig()
    seconds, sizes = measure(cfg, args.repeats)
    for name in SETS:
        n = "" if name == "world" else f"  ({sizes[name]:,} records)"
        print(f"  {name:<13} {seconds[name]:7.3f} s of CPU{n}")
    total = sum(seconds.values())
    print(
        f"  corpus: {sizes['corpus_docs']:,} documents, {sizes['corpus_chars'] / 1e6:.1f}M characters "
        f"(target: under 20 s of CPU; {seconds['corpus']:.1f} s)"
    )
    print(f"  {'total':<13} {total:7.2f} s of CPU (world seed {cfg.seed}, {cfg.n_entities} entities)")
    if not args.no_results:
        cells = [
            time.strftime("%Y-%m-%d"),
            where,
            f"{load:.2f}",
            str(args.repeats),
            f"seed {cfg.seed}, {cfg.n_entities} entities",
            *[f"{seconds[s]:.3f}" for s in SETS],
            f"{sizes['corpus_docs']} / {sizes['corpus_chars'] / 1e6:.1f}",
            f"{total:.1f}",
        ]
        update_results(SECTION, INTRO, HEADER, "| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
        print("[bench] row added to bench/results.md (Synthetic data generation)")


if __name__ == "__main__":
    main()
