"""The RL sampler's two back ends (pipeline/inference/sampler.py): HF `generate` (the reference) and the
continuous-batching engine's runner. Same greedy tokens on a batch whose replies end at different lengths; the
engine's log-probs equal a recomputing forward at the sampling temperature; seeded draws repeat; both draw from the
same distribution; and after an in-place update the engine samples from the new weights."""

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.inference.sampler import Rollout, engine_applies, sample
from pipeline.models.token_model import TokenModel
from pipeline.rl.forward import policy_forward

V, PAD = 48, 0


def _config(vocab: int = V, pad: int = PAD) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
        pad_token_id=pad,
    )


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = _config()
    m = LlamaForCausalLM(cfg).eval()
    m.generation_config.pad_token_id = PAD
    return m


TOK = SimpleNamespace(pad_token_id=PAD)


def _prompts(lengths=(5, 9, 3, 7, 6, 4)):
    g = torch.Generator().manual_seed(1)
    P = max(lengths)
    ids = torch.full((len(lengths), P), PAD)
    mask = torch.zeros((len(lengths), P), dtype=torch.long)
    for i, n in enumerate(lengths):  # left-padded, as prompt_batch makes them
        ids[i, P - n :] = torch.randint(2, V, (n,), generator=g)
        mask[i, P - n :] = 1
    return ids, mask


def test_the_engine_applies_to_a_plain_llama_only(model):
    assert engine_applies(model) and engine_applies(TokenModel(model))
    from peft import LoraConfig, get_peft_model

    assert not engine_applies(
        get_peft_model(LlamaForCausalLM(model.config), LoraConfig(r=2, target_modules=["q_proj"]))
    )
    sharded = LlamaForCausalLM(model.config)
    sharded.lm_head.weight.data = torch.empty(0)  # as ZeRO-3 leaves a parameter between gathers: not the engine's
    assert not engine_applies(sharded)


def test_greedy_tokens_equal_with_replies_of_different_lengths(model):
    ids, mask = _prompts()
    ref = sample(model, TOK, ids, mask, [], 12, 1.0, greedy=True, backend="hf")
    # an end-of-turn token that some rows write early and others late or never: the 4th greedy token of row 0
    end = [int(ref.response_ids[0, 3])]
    a = sample(model, TOK, ids, mask, end, 12, 1.0, greedy=True, backend="hf")
    b = sample(model, TOK, ids, mask, end, 12, 1.0, greedy=True, backend="engine")
    lengths = a.response_mask.sum(-1).tolist()
    assert len(set(lengths)) > 1, lengths  # the case this test is for
    assert torch.equal(a.response_mask, b.response_mask) and torch.equal(a.ended, b.ended)
    assert torch.equal(
        torch.where(a.response_mask, a.response_ids, -1), torch.where(b.response_mask, b.response_ids, -1)
    )


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 0, 0.8)])
def test_engine_logprobs_equal_a_recomputing_forward(model, temperature, top_k, top_p):
    ids, mask = _prompts()
    torch.manual_seed(3)
    ro = sample(model, TOK, ids, mask, [7], 10, temperature, top_k, top_p, keep_logprobs=True, backend="engine")
    again = policy_forward(
        TokenModel(model),
        Rollout(ro.prompt_ids, ro.prompt_mask, ro.response_ids, ro.response_mask, ro.ended),
        temperature,
    )
    m = ro.response_mask
    assert m.sum() > 20
    assert torch.allclose(ro.logprobs[m], again[m], atol=1e-5)
    # the same quantity as the hf back end computes from generate's raw logits
    torch.manual_seed(3)
    ref = sample(model, TOK, ids, mask, [7], 10, temperature, top_k, top_p, keep_logprobs=True, backend="hf")
    back = policy_forward(
        TokenModel(model),
        Rollout(ref.prompt_ids, ref.prompt_mask, ref.response_ids, ref.response_mask, ref.ended),
        temperature,
    )
    assert torch.allclose(ref.logprobs[ref.response_mask], back[ref.response_mask], atol=1e-5)


def test_seeded_draws_repeat_and_differ_by_seed(model):
    ids, mask = _prompts()
    draws = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        draws.append(sample(model, TOK, ids, mask, [7], 10, 1.0, backend="engine").response_ids)
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


def _first_tokens(model, backend, n=3000, temperature=1.0, top_k=0):
    ids, mask = _prompts((6,))
    torch.manual_seed(11)
    ro = sample(model, TOK, ids.expand(n, -1), mask.expand(n, -1), [], 1, temperature, top_k, backend=backend)
    return torch.bincount(ro.response_ids[:, 0], minlength=V).double()


@pytest.fixture(scope="module")
def peaked(model):
    """The tiny model with its output layer scaled up: a random init's next-token distribution is nearly uniform,
    where no temperature shows; this one's is peaked, as a trained model's is."""
    import copy

    m = copy.deepcopy(model)
    with torch.no_grad():
        m.lm_head.weight.mul_(25.0)
    return m


def test_both_back_ends_draw_the_same_distribution(peaked):
    """A two-sample chi-square test on the first token over 3000 draws each, the rarest tokens pooled: the threshold
    is the 0.999 quantile, so a correct engine fails it about once in a thousand runs; a wrong temperature (1.3
    against 1.0) fails it."""
    a, b = _first_tokens(peaked, "hf"), _first_tokens(peaked, "engine")
    wrong = _first_tokens(peaked, "engine", temperature=1.3)

    def chi2(x, y):
        keep = (x + y) >= 20  # bins with enough mass; the rest pooled into one
        xs = torch.cat([x[keep], x[~keep].sum()[None]])
        ys = torch.cat([y[keep], y[~keep].sum()[None]])
        tot = xs + ys
        ok = tot > 0
        stat = (((xs - tot * xs.sum() / (xs.sum() + ys.sum())) ** 2) / (tot * xs.sum() / (xs.sum() + ys.sum())))[ok]
        stat2 = (((ys - tot * ys.sum() / (xs.sum() + ys.sum())) ** 2) / (tot * ys.sum() / (xs.sum() + ys.sum())))[ok]
        return float(stat.sum() + stat2.sum()), int(ok.sum()) - 1

    stat, df = chi2(a, b)
    # Wilson-Hilferty: the chi-square's 0.999 quantile with df degrees of freedom
    q999 = df * (1 - 2 / (9 * df) + 3.09 * math.sqrt(2 / (9 * df))) ** 3
    assert df >= 5 and stat < q999, (stat, df, q999)
    stat_w, df_w = chi2(a, wrong)
    assert stat_w > df_w * (1 - 2 / (9 * df_w) + 3.09 * math.sqrt(2 / (9 * df_w))) ** 3


def test_top_k_is_applied_as_generate_applies_it(peaked):
    a = _first_tokens(peaked, "engine", n=2000, top_k=3)
    assert int((a > 0).sum()) == 3
    b = _first_tokens(peaked, "hf", n=2000, top_k=3)
    assert torch.equal(a > 0, b > 0)  # the same three tokens


def test_after_an_in_place_update_the_engine_samples_from_the_new_weights():
    torch.manual_seed(0)
    cfg = _config()
    policy = TokenModel(LlamaForCausalLM(cfg))
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    ids, mask = _prompts()
    torch.manual_seed(2)
    ro = sample(policy, TOK, ids, mask, [7], 8, 1.0, keep_logprobs=True, backend="engine")
    fixed = Rollout(ro.prompt_ids, ro.prompt_mask, ro.response_ids, ro.response_mask, ro.ended)
    before = ro.logprobs
    # one optimizer step that raises the sampled tokens' log-probs, in place, as PPO's update does
    loss = -(policy_forward(policy, fixed, 1.0) * ro.response_mask).sum()
    loss.backward()
    opt.step()
    with torch.no_grad():
        fresh = policy_forward(policy, fixed, 1.0)
    torch.manual_seed(2)  # the same draw: where the tokens agree, the engine's log-probs are the new model's
    again = sample(policy, TOK, ids, mask, [7], 8, 1.0, keep_logprobs=True, backend="engine")
    m = ro.response_mask
    assert (fresh[m] - before[m]).abs().max() > 1e-2  # the update moved them
    same = again.response_ids[:, : ro.response_ids.shape[1]] == ro.response_ids[:, : again.response_ids.shape[1]]
    first = m[:, :1] & same[:, :1]  # the first token of each row is drawn from the same prompt state
    assert first.any()
    assert torch.allclose(again.logprobs[:, :1][first], fresh[:, :1][first], atol=1e-5)


def test_generate_gives_the_same_greedy_replies_through_either_back_end(tiny_tok):
    """pipeline.inference.generation.generate, the text-level decoder (the reward stage's on-policy answers, the
    labellers' samples), with backend=engine: the same replies, ends and token ids as model.generate."""
    from omegaconf import OmegaConf

    import pipeline.core.config  # noqa: F401
    from pipeline.core.config import GenerationSettings
    from pipeline.inference.generation import generate

    torch.manual_seed(0)
    cfg = _config(len(tiny_tok), tiny_tok.pad_token_id)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # a peaked model, so that some replies close their turn early
        m.lm_head.weight.mul_(8.0)
    prompts = [[{"role": "user", "content": f"What is {i} plus {i + 1}?"}] for i in range(10)]
    greedy = OmegaConf.structured(GenerationSettings(max_new_tokens=16))
    a = generate(m, tiny_tok, prompts, greedy, batch_size=4, backend="hf")
    b = generate(m, tiny_tok, prompts, greedy, batch_size=4, backend="engine")
    assert [str(x) for x in a] == [str(x) for x in b]
    assert [x.token_ids for x in a] == [x.token_ids for x in b] and [x.ended for x in a] == [x.ended for x in b]
    beams = OmegaConf.structured(GenerationSettings(max_new_tokens=8, num_beams=2))  # the engine has no beams: hf
    assert [str(x) for x in generate(m, tiny_tok, prompts[:2], beams, backend="engine")] == [
        str(x) for x in generate(m, tiny_tok, prompts[:2], beams, backend="hf")
    ]
    sampled = OmegaConf.structured(GenerationSettings(max_new_tokens=16, do_sample=True, temperature=0.8))
    c = generate(m, tiny_tok, prompts, sampled, batch_size=4, seed=3, backend="engine")
    assert [str(x) for x in c] == [
        str(x) for x in generate(m, tiny_tok, prompts, sampled, batch_size=4, seed=3, backend="engine")
    ]


def test_rloo_and_grpo_completions_through_the_engine(model):
    """What TRL's `_generate_single_turn` gets from the engine (pipeline/trainers/group_rl.py): one unpadded reply
    per prompt row, cut after its first end-of-turn; and None (TRL's own generate) where the engine cannot stand in."""
    from accelerate import Accelerator

    from pipeline.trainers.group_rl import engine_completions

    acc = Accelerator(cpu=True)
    tr = SimpleNamespace(
        args=SimpleNamespace(min_p=None, repetition_penalty=1.0, generation_kwargs=None),
        accelerator=acc,
        model_wrapped=model,
        processing_class=TOK,
        eos_token_ids=[7],
        max_completion_length=9,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
    )
    ids, mask = _prompts()
    prompt_ids = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    torch.manual_seed(0)
    out = engine_completions(tr, prompt_ids)
    assert len(out) == len(prompt_ids)
    for c in out:
        assert 1 <= len(c) <= 9 and (7 not in c[:-1])  # nothing after the first end-of-turn
    torch.manual_seed(0)  # the same draw as the RL sampler's engine back end on the same rows
    ro = sample(model, TOK, ids, mask, [7], 9, 1.0, backend="engine")
    assert out == [r[m].tolist() for r, m in zip(ro.response_ids, ro.response_mask)]
    tr.args.repetition_penalty = 1.2  # an option the engine lacks: TRL's generate
    assert engine_completions(tr, prompt_ids) is None
