"""pipeline.inference.generation on a tiny random Llama with our tokenizer: every decoding mode, stopping at the end of
the turn, determinism, and that nothing of the model's own generation_config leaks in."""

import pickle

import pytest
import torch

from pipeline.core.config import GenerationSettings
from pipeline.data.prompts import encode_prompts
from pipeline.data.tokenizer import END, end_of_turn_ids
from pipeline.inference.generation import Reply, generate, generation_config, stream

PROMPTS = [
    [{"role": "user", "content": "How old is Bera?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 3 plus 4? Answer with just the number."},
    ],
    "Tell me about Tovi.",  # a bare string is one user turn
]


@pytest.fixture(scope="module")
def tok(tiny_tok):
    return tiny_tok


@pytest.fixture(scope="module")
def model(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    m = LlamaForCausalLM(cfg).eval()
    # A sampling default of the kind a checkpoint ships with: it must not leak into greedy decoding.
    m.generation_config.do_sample, m.generation_config.temperature, m.generation_config.top_p = True, 0.7, 0.9
    return m


MODES = {
    "greedy": GenerationSettings(max_new_tokens=10),
    "sample": GenerationSettings(max_new_tokens=10, do_sample=True, temperature=0.8),
    "top_k": GenerationSettings(max_new_tokens=10, do_sample=True, temperature=1.0, top_k=5),
    "top_p": GenerationSettings(max_new_tokens=10, do_sample=True, temperature=1.2, top_p=0.8),
    "repetition_penalty": GenerationSettings(max_new_tokens=10, repetition_penalty=1.3),
    "beam": GenerationSettings(max_new_tokens=10, num_beams=3),
}


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_runs_and_is_deterministic_with_a_seed(model, tok, mode):
    s = MODES[mode]
    a = generate(model, tok, PROMPTS, s, batch_size=2, seed=3)
    b = generate(model, tok, PROMPTS, s, batch_size=2, seed=3)
    assert len(a) == len(PROMPTS) and all(isinstance(r, Reply) and isinstance(r, str) for r in a)
    assert a == b and [r.token_ids for r in a] == [r.token_ids for r in b]
    assert all(1 <= r.n_tokens <= s.max_new_tokens for r in a)
    assert all(END not in r and "<|" not in r for r in a)  # special tokens are stripped


def test_sampling_depends_on_the_seed_and_leaves_the_global_rng_alone(model, tok):
    s = GenerationSettings(max_new_tokens=12, do_sample=True, temperature=1.5)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    outs = {tuple(generate(model, tok, PROMPTS, s, batch_size=3, seed=k)) for k in range(4)}
    assert torch.rand(1) == before  # generate forked the RNG instead of consuming it
    assert len(outs) > 1


def test_greedy_ignores_padding_and_batching(model, tok):
    s = MODES["greedy"]
    together = generate(model, tok, PROMPTS, s, batch_size=3)
    alone = [generate(model, tok, [p], s, batch_size=1)[0] for p in PROMPTS]
    assert together == alone
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]


def test_greedy_ignores_the_models_sampling_defaults(model, tok):
    gc = generation_config(MODES["greedy"], tok)
    assert gc.do_sample is False and gc.eos_token_id == end_of_turn_ids(tok)
    g = MODES["greedy"]
    assert generate(model, tok, PROMPTS, g, seed=1) == generate(model, tok, PROMPTS, g, seed=2)


def test_prompts_go_through_the_chat_template(tok):
    ids = encode_prompts(tok, [PROMPTS[0]])[0]
    assert tok.decode(ids).endswith("<|assistant|>\n")
    assert tok.decode(encode_prompts(tok, [PROMPTS[0]], max_prompt_len=4)[0]) == tok.decode(ids[-4:])


@pytest.fixture
def scripted(model, tok):
    """The model says token X three times, then <|end|>: a forward hook on lm_head rigs the logits per step."""
    x, end = tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids(END)
    calls = {"n": 0}

    def hook(module, inputs, out):
        out = out.clone()
        out[..., x if calls["n"] < 3 else end] += 1e4
        calls["n"] += 1
        return out

    h = model.lm_head.register_forward_hook(hook)
    yield calls, x
    h.remove()


def test_stops_at_end_of_turn(model, tok, scripted):
    calls, x = scripted
    r = generate(model, tok, PROMPTS[:2], GenerationSettings(max_new_tokens=20), batch_size=2)
    assert [str(t) for t in r] == [tok.decode([x, x, x])] * 2
    assert all(t.ended and t.n_tokens == 4 and t.token_ids[-1] in end_of_turn_ids(tok) for t in r)
    assert calls["n"] == 4  # prefill + 3 steps: generation stopped at <|end|>, not at max_new_tokens


def test_cut_off_reply_is_flagged(model, tok, scripted):
    r = generate(model, tok, PROMPTS[:1], GenerationSettings(max_new_tokens=2))[0]
    assert not r.ended and r.n_tokens == 2


def test_stream_matches_generate(model, tok, scripted):
    calls, x = scripted
    text = "".join(stream(model, tok, PROMPTS[0], GenerationSettings(max_new_tokens=20)))
    assert text == tok.decode([x, x, x])


def test_stream_greedy_equals_batch_greedy(model, tok):
    s = MODES["greedy"]
    assert "".join(stream(model, tok, PROMPTS[1], s)).strip() == generate(model, tok, [PROMPTS[1]], s)[0]


def test_reply_pickles():
    r = pickle.loads(pickle.dumps(Reply("hi", True, [7, 1])))
    assert r == "hi" and r.ended and r.n_tokens == 2 and r.token_ids == [7, 1]
