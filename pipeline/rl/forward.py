"""The scoring forward passes over a rollout: padded, or packed (the real tokens only, several sequences per row).

Packed: with no attention mask, transformers reads the sequence boundaries from the position ids and masks
attention block-diagonally, so a packed forward computes the same numbers as the padded one without the padding,
which is most of a rollout batch (short prompts left-padded to the longest, short replies right-padded to the
longest). `check_packing` verifies that on the first batch of a run.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from pipeline.inference.sampler import Rollout, position_ids
from pipeline.models.token_model import TokenModel
from pipeline.models.tokens import logprobs_from_logits
from pipeline.rl.ops import entropy_from_logits


@dataclass
class Layout:
    """One forward pass's input, and where each (row, column) of the rollout's padded layout landed in its
    flattened output (`index`, [B, T]; a padding column points at a real token of the same row: garbage that the
    response mask drops)."""

    input_ids: Tensor
    position_ids: Tensor
    attention_mask: Optional[Tensor]
    index: Tensor


def padded_layout(ro: Rollout) -> Layout:
    am = ro.attention_mask
    B, T = am.shape
    return Layout(ro.input_ids, position_ids(am), am, torch.arange(B * T, device=am.device).view(B, T))


def packed_layout(ro: Rollout, per_row: int) -> Layout:
    """The real tokens of the batch, `per_row` sequences to a row (longest first, each to the emptiest row), rows
    padded to the widest with a filler sequence of its own (positions restarting at 0). No attention mask: the
    position ids mark the sequence boundaries."""
    am = ro.attention_mask.bool()
    B, T = am.shape
    dev = am.device
    lengths = am.sum(-1).tolist()
    k = max(1, -(-B // max(per_row, 1)))
    rows, filled = [[] for _ in range(k)], [0] * k
    for b in sorted(range(B), key=lambda b: -lengths[b]):
        j = min(range(k), key=filled.__getitem__)
        rows[j].append(b)
        filled[j] += lengths[b]
    W = max(filled)
    start = [0] * B
    for j, members in enumerate(rows):
        offset = j * W
        for b in members:
            start[b], offset = offset, offset + lengths[b]
    index = torch.tensor(start, device=dev)[:, None] + position_ids(am)  # [B, T]
    ids = torch.zeros(k * W, dtype=torch.long, device=dev)
    pos = torch.zeros(k * W, dtype=torch.long, device=dev)
    for j, f in enumerate(filled):
        pos[j * W + f : (j + 1) * W] = torch.arange(W - f, device=dev)  # the filler: a sequence of its own
    ids[index[am]] = ro.input_ids[am]
    pos[index[am]] = position_ids(am)[am]
    return Layout(ids.view(k, W), pos.view(k, W), None, index)


def layout(ro: Rollout, pack: int) -> Layout:
    return packed_layout(ro, pack) if pack else padded_layout(ro)


def run_layout(model: TokenModel, lay: Layout, select: Tensor) -> Tensor:
    """`model`'s outputs on a layout's sequences, at the positions `select` picks (the readout's and the losses')."""
    return model(lay.input_ids, lay.position_ids, lay.attention_mask, select)


def response_logits(model: TokenModel, ro: Rollout, pack: int = 0) -> Tensor:
    """Logits at the positions that predict each response token ([B, R, V])."""
    lay = layout(ro, pack)
    return run_layout(model, lay, lay.index[:, ro.prompt_ids.shape[1] - 1 : -1])


def policy_forward(policy: TokenModel, ro: Rollout, temperature: float, pack: int = 0, with_entropy: bool = False):
    """Log-probs of the response tokens under `policy` at the sampling temperature ([B, R]), optionally with the
    entropy (for logging only: computed without a graph)."""
    logits = response_logits(policy, ro, pack)
    logp = logprobs_from_logits(logits, ro.response_ids, temperature)
    if not with_entropy:
        return logp
    with torch.no_grad():
        return logp, entropy_from_logits(logits, temperature)


def critic_forward(critic: TokenModel, ro: Rollout, pack: int = 0) -> Tensor:
    """V(s_t) for each response token t: the critic read at the position that predicts it ([B, R])."""
    lay = layout(ro, pack)
    return run_layout(critic, lay, lay.index[:, ro.prompt_ids.shape[1] - 1 : -1]).squeeze(-1).float()


def check_packing(model: TokenModel, ro: Rollout, pack: int, temperature: float) -> float:
    """Largest |difference| of response log-probs between the packed and the padded forward. A model whose
    attention ignores position-id boundaries (cross-sequence attention) shows differences of order 1."""
    with torch.no_grad():
        a = policy_forward(model, ro, temperature, pack)
        b = policy_forward(model, ro, temperature, 0)
    m = ro.response_mask
    return float((a - b).abs()[m].max()) if bool(m.any()) else 0.0


def chunked(fn, ro: Rollout, size: int, no_grad: bool = True) -> Tensor:
    """Run `fn(sub_rollout)` over chunks of the batch and concatenate (bounded activation memory)."""
    with torch.no_grad() if no_grad else nullcontext():
        return torch.cat([fn(ro[i : i + size]) for i in range(0, len(ro.ended), size)])
