"""Pretraining data: documents -> token blocks, and a sampler whose position is a pure function of the step.

Because batch contents depend only on (seed, step, rank), resuming at step s replays exactly the batches an
uninterrupted run would have seen, with no loader state to save.
"""

from __future__ import annotations

import random
from functools import lru_cache

import torch

from pipeline.core.errors import UserError


def split_documents(docs: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Held-out split by document (not by block), so no document leaks across."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(round(len(docs) * val_fraction))) if len(docs) > 1 else 0
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return [docs[i] for i in train], [docs[i] for i in val]


def pack(docs: list[str], tokenizer, block_size: int, where: str = "corpus") -> torch.Tensor:
    """Concatenate documents, each followed by the end token, and cut into [n_blocks, block_size] (tail dropped)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for chunk in range(0, len(docs), 2048):
        for doc in tokenizer(docs[chunk : chunk + 2048], add_special_tokens=False)["input_ids"]:
            ids.extend(doc)
            ids.append(eos)
    n = len(ids) // block_size
    if n == 0:
        raise UserError(
            f"{where}: {len(ids)} tokens is less than one block of {block_size}; add data or lower train.block_size"
        )
    return torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)


@lru_cache(maxsize=4)
def _perm(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def batch_indices(
    n: int, batch_size: int, step: int, micro: int, accum: int, world: int, rank: int, seed: int
) -> torch.Tensor:
    """Indices of this rank's micro-batch: a fresh seeded permutation every epoch, disjoint across ranks."""
    start = ((step * accum + micro) * world + rank) * batch_size
    g = torch.arange(start, start + batch_size)
    epochs, pos = g // n, g % n
    return torch.stack([_perm(n, seed, int(e))[int(p)] for e, p in zip(epochs, pos)])
