"""A model's whole weights, for a while, under FSDP2: what generation and saving need from a sharded policy.

Under FSDP2 (accelerate's FSDP with fsdp_version 2) every parameter of a prepared model is a DTensor holding this
process's shard. A forward through the prepared root gathers each wrapped block's weights just before the block
runs and frees them after, which is right for training. Generation is hundreds of forwards of one token each, and
`generate` (or the engine) calls the inner model, not the root, so it would either fail on the root's shards (the
embedding is not inside any block) or gather every block once per token. `full_weights` gathers every block once,
keeps the weights whole while the body runs (rollouts, evaluation, saving), and frees them after: one all-gather per
block per rollout phase, however many tokens are generated (tests/test_fsdp.py counts them).

Outside FSDP (one process, DDP) it does nothing, so the stages call it unconditionally.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch


def fsdp_modules(model: torch.nn.Module) -> list:
    """The FSDP2-wrapped modules of `model`, outermost first (empty when it is not sharded)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover — a torch without FSDP2
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model: torch.nn.Module) -> bool:
    return bool(fsdp_modules(model))


def parameter_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes of parameters this process holds, bytes of the whole model): equal unless the model is sharded."""
    local = full = 0
    for p in model.parameters():
        here = p.to_local() if hasattr(p, "to_local") else p
        local += here.numel() * here.element_size()
        full += p.numel() * p.element_size()
    return local, full


def sharding_record(model: torch.nn.Module) -> dict | None:
    """{"per_rank": [parameter bytes each process holds], "full": bytes of the whole model} for a sharded model,
    None otherwise: the proof, for the log and the manifest, that a run really trained sharded. Collective when
    sharded: call it on every process."""
    if not is_sharded(model):
        return None
    from accelerate.utils import gather_object

    here, whole = parameter_bytes(model)
    return {"per_rank": gather_object([here]), "full": whole}


@contextmanager
def full_weights(model: torch.nn.Module):
    """Every parameter of `model` whole and a plain tensor inside the block; yields the seconds the gathering took
    (0.0 when `model` is not sharded). Call it on every process: gathering is collective. `model` is the prepared
    root (accelerate's unwrap_model of it); the weights are the training weights themselves, so whatever runs inside
    samples from the latest update, and nothing is copied to a second model."""
    mods = fsdp_modules(model)
    if not mods:
        yield 0.0
        return
    # FSDP2 makes the first module to run forward its root. Generation may run the blocks before any forward of the
    # prepared root has (PPO evaluates at iteration 0), so the root is fixed here, as its first forward would.
    mods[0]._get_fsdp_state()._lazy_init()
    groups = [g for m in mods for g in m._get_fsdp_state()._fsdp_param_groups]
    after_forward = [g.post_forward_mesh_info for g in groups]  # whether each block frees its weights after forward
    t0 = time.perf_counter()
    for m in mods:
        m.set_reshard_after_forward(False, recurse=False)  # kept whole through every forward of the block
        m.unshard()
    seconds = time.perf_counter() - t0
    try:
        yield seconds
    finally:
        for m in mods:
            m.reshard()
        for g, info in zip(groups, after_forward):
            g.post_forward_mesh_info = info  # training frees them after forward again, as configured


def without_tied(model, state_dict: dict | None) -> dict | None:
    """`state_dict` less the keys `model` ties to another key (a tied lm_head): gathered from shards, the two are
    separate tensors with equal values, which save_pretrained would write twice (it drops only tensors that share
    storage), so a sharded run's final/ would differ from one process's."""
    if state_dict is None:
        return None
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return {k: v for k, v in state_dict.items() if not (k in tied and tied[k] in state_dict)}
