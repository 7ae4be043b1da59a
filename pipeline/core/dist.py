"""Which share of the work this process does under `accelerate launch`, and putting the shares back together.

One sharding rule for every stage: every world-size-th item from the process's rank, padded so that every process
runs the same number of forward passes (`shard`), and `gather` to concatenate the results on every process.
"""

from __future__ import annotations


def _dist():
    """(rank, world size) of this process; (0, 1) outside accelerate."""
    from accelerate import PartialState

    s = PartialState()
    return s.process_index, s.num_processes


def shard(n: int) -> list[int]:
    """The indices of n items this process handles (every world-size-th, from its rank). Every process gets the
    same count: a short shard repeats its first index (drop repeats with `seen`), because under FSDP / ZeRO-3 all
    processes must run the same number of forward passes or they wait for each other forever."""
    rank, world = _dist()
    mine = list(range(rank, n, world))
    per = -(-n // world)
    return mine + [mine[0] if mine else 0] * (per - len(mine)) if n else []


def gather(items: list) -> list:
    """Concatenate every process's `items` (a plain list outside accelerate)."""
    if _dist()[1] == 1:
        return items
    from accelerate.utils import gather_object

    return gather_object(items)
