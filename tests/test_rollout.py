"""pipeline/rl/forward.py and pipeline/inference/sampler.py: packed forward passes compute what the padded ones do,
only faster; the sampler's own log-probs match a recomputing forward; the wrapper that DDP sees is the one whose
forward runs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from pipeline.inference.sampler import Rollout, sample
from pipeline.models.token_model import TokenModel
from pipeline.rl.forward import (
    check_packing,
    critic_forward,
    packed_layout,
    padded_layout,
    policy_forward,
    response_logits,
)
from pipeline.rl.readout import score_rollout

V, PAD, END = 40, 0, 1


def _config():
    return LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=PAD,
        num_labels=1,
    )


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return (
        TokenModel(LlamaForCausalLM(_config()).eval()),
        TokenModel(LlamaForSequenceClassification(_config()).eval()),
    )


def _rollout(prompt_lens, response_lens, P=6, R=5, seed=0):
    """Left-padded prompts, right-padded responses of the given lengths (random real tokens >= 2)."""
    g = torch.Generator().manual_seed(seed)
    B = len(prompt_lens)
    pi, pm = torch.full((B, P), PAD), torch.zeros((B, P), dtype=torch.long)
    ri, rm = torch.full((B, R), PAD), torch.zeros((B, R), dtype=torch.bool)
    for b, (p, r) in enumerate(zip(prompt_lens, response_lens)):
        pi[b, P - p :] = torch.randint(2, V, (p,), generator=g)
        pm[b, P - p :] = 1
        ri[b, :r] = torch.randint(2, V, (r,), generator=g)
        rm[b, :r] = True
    return Rollout(pi, pm, ri, rm, torch.ones(B, dtype=torch.bool))


RO = _rollout([6, 2, 4, 1, 3, 5, 2], [5, 1, 3, 0, 5, 2, 4])


def test_packed_layout_by_hand():
    ro = _rollout([2, 1], [1, 2], P=2, R=2)  # lengths 3 and 3, 2 sequences per row: one row of width 6
    lay = packed_layout(ro, per_row=2)
    assert lay.attention_mask is None and lay.input_ids.shape == (1, 6)
    assert lay.position_ids.tolist() == [[0, 1, 2, 0, 1, 2]]
    assert lay.input_ids[0, :3].tolist() == ro.input_ids[0, [0, 1, 2]].tolist()  # row 0: no padding
    assert lay.input_ids[0, 3:].tolist() == ro.input_ids[1, [1, 2, 3]].tolist()  # row 1: its 3 real tokens
    assert lay.index[1, 1:4].tolist() == [3, 4, 5]
    lay = packed_layout(ro, per_row=1)  # two rows; no filler needed
    assert lay.input_ids.shape == (2, 3) and lay.position_ids.tolist() == [[0, 1, 2], [0, 1, 2]]
    uneven = packed_layout(_rollout([2, 1, 1], [2, 1, 1], P=2, R=2), per_row=2)  # widths 4 | 2+2: no filler
    assert uneven.input_ids.shape == (2, 4)
    filler = packed_layout(_rollout([2, 1, 1], [2, 1, 0], P=2, R=2), per_row=2)  # 4 | 2+1 and a filler of 1
    assert filler.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 0, 0]] or filler.position_ids.tolist() == [
        [0, 1, 0, 0],
        [0, 1, 2, 3],
    ]


@pytest.mark.parametrize("per_row", [1, 2, 3, 7])
def test_packed_forward_equals_padded(models, per_row):
    policy, critic = models
    m = RO.response_mask
    with torch.no_grad():
        for fn in (lambda r, k: response_logits(policy, r, k), lambda r, k: critic_forward(critic, r, k)):
            a, b = fn(RO, per_row), fn(RO, 0)
            torch.testing.assert_close(a[m], b[m], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            score_rollout(critic, RO, [END, 3], per_row), score_rollout(critic, RO, [END, 3]), atol=1e-5, rtol=1e-5
        )
    assert check_packing(policy, RO, per_row, 0.7) < 1e-5


def test_padded_forward_is_the_plain_model(models):
    """The padded path is the Hugging Face forward: same logits as model(input_ids, attention_mask, position_ids)."""
    policy, _ = models
    am = RO.attention_mask
    with torch.no_grad():
        full = policy.model(
            input_ids=RO.input_ids, attention_mask=am, position_ids=padded_layout(RO).position_ids
        ).logits
        ours = response_logits(policy, RO, 0)
    P = RO.prompt_ids.shape[1]
    torch.testing.assert_close(ours[RO.response_mask], full[:, P - 1 : -1][RO.response_mask])


def test_a_model_that_ignores_the_boundaries_is_caught(models):
    policy, _ = models

    class Leaky(TokenModel):  # attention across packed sequences: position ids without their restarts
        def forward(self, input_ids, position_ids, attention_mask, select):
            if attention_mask is None:
                position_ids = torch.arange(input_ids.shape[1]).expand_as(input_ids)
            return super().forward(input_ids, position_ids, attention_mask, select)

    assert check_packing(Leaky(policy.model), RO, 4, 0.7) > 1e-2


def test_entropy_is_logged_without_a_graph(models):
    policy, _ = models
    logp, ent = policy_forward(policy, RO, 0.7, 2, with_entropy=True)
    assert logp.requires_grad and not ent.requires_grad and (ent[RO.response_mask] > 0).all()


def test_the_samplers_logprobs_are_the_recomputed_ones(models):
    policy, _ = models
    prompts = _rollout([3, 5, 1], [0, 0, 0], R=1)
    torch.manual_seed(3)
    ro = sample(
        policy,
        type("Tok", (), {"pad_token_id": PAD})(),
        prompts.prompt_ids,
        prompts.prompt_mask,
        [END],
        max_new_tokens=6,
        temperature=0.7,
        keep_logprobs=True,
    )
    assert ro.logprobs is not None and ro.logprobs.shape == ro.response_ids.shape
    with torch.no_grad():
        again = policy_forward(policy, ro, 0.7, 2)
    torch.testing.assert_close(ro.logprobs[ro.response_mask], again[ro.response_mask], atol=1e-4, rtol=1e-4)
    assert ro[[0, 2]].logprobs.shape[0] == 2


def test_token_model_finds_heads_and_refuses_headless_models():
    from pipeline.core.errors import UserError

    assert TokenModel(LlamaForSequenceClassification(_config())).model.score is not None
    with pytest.raises(UserError, match="cannot find"):
        TokenModel(torch.nn.Linear(2, 2))


DDP_SCRIPT = """
import torch, torch.distributed as dist
from accelerate import Accelerator
from transformers import LlamaForSequenceClassification
from tests.test_rollout import _config, _rollout
from pipeline.models.token_model import TokenModel
from pipeline.rl.forward import critic_forward
acc = Accelerator(cpu=True)
torch.manual_seed(0)
critic = TokenModel(LlamaForSequenceClassification(_config()))
opt = torch.optim.SGD(critic.parameters(), lr=1.0)
critic, opt = acc.prepare(critic, opt)
ro = _rollout([3, 2, 4], [2, 3, 1], seed=acc.process_index)  # each process its own batch
loss = critic_forward(critic, ro, 2)[ro.response_mask].pow(2).mean()
acc.backward(loss)
opt.step()
flat = torch.cat([p.detach().flatten() for p in acc.unwrap_model(critic).parameters()])
both = [torch.zeros_like(flat) for _ in range(2)]
dist.all_gather(both, flat)
assert torch.equal(both[0], both[1]), "the processes' critics diverged: gradients were not all-reduced"
print("in sync", float((both[0] - both[1]).abs().max()), flush=True)
dist.barrier()
dist.destroy_process_group()
import os, sys
sys.stdout.flush()
os._exit(0)  # gloo's threads can still abort the process in static destructors at exit ("terminate called
             # without an active exception", seen once in a full make test); the check above has already passed
"""


def test_two_processes_keep_the_critic_in_sync(tmp_path):
    """Under DDP the wrapper's forward is the one that runs, so one step on different data leaves both
    processes with the same weights (the gradient all-reduce happened)."""
    import socket

    repo = Path(__file__).resolve().parents[1]
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", str(script)],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0 and "in sync" in p.stdout, p.stderr[-3000:]
