"""One reward readout for every caller: TRL's training tokenization, the text-level scorer (reward statistics,
evaluation, bench/bon_frontier.py) and PPO's rollouts (padded and packed) read a reward model at the same token, the
last of the chat-templated conversation (the "\\n" after the reply's <|end|>), and so give the same score."""

import runpy
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from pipeline.data.prompts import prompt_batch
from pipeline.data.tokenizer import END, train_bpe
from pipeline.inference.sampler import Rollout
from pipeline.models.token_model import TokenModel
from pipeline.rl.readout import (
    close_replies,
    read_reward,
    rm_input_ids,
    score_ids,
    score_rollout,
    score_texts,
    turn_closing,
)

PROMPTS = [
    [{"role": "user", "content": "How old is Bera?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 3 plus 4?"}],
    [{"role": "user", "content": "Tell me about Tovi."}],
    [{"role": "user", "content": "What is 12 plus 13? Answer with just the number."}],
]
REPLIES = ["Hello.", "7", "Tovi works as a baker and is 12 years old.", "25 is the answer to what you asked"]
ENDED = [True, True, True, False]  # the last one ran out of tokens: read as the text it is, closed by the template


@pytest.fixture(scope="module")
def tok():
    texts = [f"Bera is {i} years old. Tovi works as a baker. What is {i} plus {i + 1}? Hello." for i in range(300)]
    return train_bpe(texts, 400)


@pytest.fixture(scope="module")
def rm(tok):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        num_labels=1,
    )
    return LlamaForSequenceClassification(cfg).eval()


def trl_scores(rm, tok):
    """What TRL's RewardTrainer trains: apply_chat_template(prompt + [reply]) (TRL's own tokenizer call when
    importable), read by the sequence classifier's own pooling, one unpadded sequence at a time."""
    try:
        from trl.data_utils import _tokenize
    except ImportError:  # pragma: no cover
        _tokenize = None
    out = []
    for p, r in zip(PROMPTS, REPLIES):
        conv = p + [{"role": "assistant", "content": r}]
        ids = _tokenize(tok, conv) if _tokenize else tok.apply_chat_template(conv, tokenize=True, return_dict=True)
        ids = list(ids["input_ids"])
        assert ids == rm_input_ids(tok, p, r)
        with torch.no_grad():
            out.append(float(rm(input_ids=torch.tensor([ids])).logits[0, 0]))
    return out


def ppo_rollout(tok) -> Rollout:
    """The (prompt, reply) pairs as PPO's sampler leaves them: prompts left-padded, replies right-padded and cut
    after their end-of-turn token (none for an unfinished one)."""
    p_ids, p_mask = prompt_batch(tok, PROMPTS, 256, "cpu")
    end = tok.convert_tokens_to_ids(END)
    reps = [tok(r, add_special_tokens=False)["input_ids"] + ([end] if e else []) for r, e in zip(REPLIES, ENDED)]
    R = max(map(len, reps)) + 2
    ids = torch.full((len(reps), R), tok.pad_token_id)
    mask = torch.zeros((len(reps), R), dtype=torch.bool)
    for b, r in enumerate(reps):
        ids[b, : len(r)], mask[b, : len(r)] = torch.tensor(r), True
    return Rollout(p_ids, p_mask, ids, mask, torch.tensor(ENDED))


def test_the_closing_comes_from_the_template(tok):
    ids = rm_input_ids(tok, [{"role": "user", "content": "Hi"}], "Hello.")
    assert tok.convert_ids_to_tokens(ids)[-3:] == [".", "<|end|>", "Ċ"]  # the template writes "\n" after <|end|>
    assert tok.convert_ids_to_tokens(turn_closing(tok)) == ["<|end|>", "Ċ"]


def test_close_replies_by_hand():
    ro = Rollout(
        torch.tensor([[5], [6], [7]]),
        torch.ones(3, 1, dtype=torch.long),
        torch.tensor([[2, 3, 1], [4, 1, 0], [2, 3, 4]]),  # ended at 1 | ended at 1 | ran out of tokens
        torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]], dtype=torch.bool),
        torch.tensor([True, True, False]),
    )
    c = close_replies(ro, [1, 9])
    m = c.response_mask
    assert [c.response_ids[b][m[b]].tolist() for b in range(3)] == [[2, 3, 1, 9], [4, 1, 9], [2, 3, 4, 1, 9]]
    assert m.sum(-1).tolist() == [4, 3, 5] and c.response_ids.shape == (3, 5)


def test_every_path_reads_the_same_score(tok, rm, monkeypatch):
    ref = trl_scores(rm, tok)
    close = lambda xs: pytest.approx(ref, abs=1e-5)  # noqa: E731

    # the text-level scorer (bare model and TokenModel), in batches that pad
    assert score_texts(rm, tok, PROMPTS, REPLIES, batch_size=3) == close(ref)
    assert score_ids(
        TokenModel(rm), [rm_input_ids(tok, p, r) for p, r in zip(PROMPTS, REPLIES)], tok.pad_token_id, 4
    ) == close(ref)

    # PPO's rollouts: the reply tokens are the ones the template gives, so the sequences are the same
    ro = ppo_rollout(tok)
    closing = turn_closing(tok)
    for pack in (0, 1, 2, 3):
        assert score_rollout(TokenModel(rm), ro, closing, pack).tolist() == close(ref), pack
    assert score_rollout(rm, ro, closing).tolist() == close(ref)  # a bare model through its own forward
    # the old readout (at <|end|>, or at the last generated token of the unfinished reply) is somewhere else
    old = read_reward(TokenModel(rm), ro).tolist()
    assert all(abs(a - b) > 1e-4 for a, b in zip(old, ref))

    # the reward stage's statistics on the SFT policy's answers
    import pipeline.eval.reward_model as rm_eval

    monkeypatch.setattr(rm_eval, "generate", lambda policy, tok_, msgs, *a, **k: list(REPLIES))
    cfg = SimpleNamespace(
        train=SimpleNamespace(stats_samples=1, gen_batch_size=4, eval_batch_size=2, batch_size=2),
        generation=None,
        seed=0,
    )
    stats = rm_eval.reward_stats(None, rm, tok, PROMPTS, cfg)
    assert stats["n"] == 4 and stats["mean"] == pytest.approx(sum(ref) / 4, abs=1e-5)

    # bench/bon_frontier.py's scorer
    bench = Path(__file__).resolve().parents[1] / "bench"
    sys.path.insert(0, str(bench))
    try:
        bon = runpy.run_path(str(bench / "bon_frontier.py"))
    finally:
        sys.path.remove(str(bench))
    assert bon["rm_scores"](rm, tok, PROMPTS, REPLIES, 2) == close(ref)
