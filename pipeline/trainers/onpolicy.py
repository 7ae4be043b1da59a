"""On-policy comparisons: the current policy's own samples, ranked by the world's simulated labellers
(pipeline/world/labellers.py), as InstructGPT's labellers ranked the SFT model's outputs. The reward stage labels
the SFT policy's samples; every round of make iterate (its reward rounds and online DPO's) labels the round before's
policy on a fresh slice of the prompts. Sampling is pipeline.inference.generation.generate (sampler=engine|hf)."""

from __future__ import annotations

import itertools
import random
import time

from pipeline.core.dist import gather, shard
from pipeline.inference.generation import generate
from pipeline.world.labellers import label_agreement, labelled


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
