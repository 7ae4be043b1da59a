"""serving/ without a server: the engine against model.generate, sampling, streaming text, rate limits, keys,
moderation scores and the error shape, each on hand-made cases (the live server is tests/test_serving_live.py)."""

import math

import pytest
import torch

from pipeline.core.config import GenerationSettings
from pipeline.data.prompts import encode_prompts
from pipeline.inference.generation import generate
from serving import limits
from pipeline.inference.engine import Engine, SamplingParams, sample_next
from serving.limits import Bucket, RateLimiter, identify, key_id, load_keys
from serving.moderation import CATEGORIES, LexiconClassifier, Moderator
from serving.protocol import APIError, ChatCompletionRequest, validation_error
from serving.text import ReplyText, partial_word


@pytest.fixture(scope="module")
def tok(tiny_tok):
    return tiny_tok


@pytest.fixture(scope="module")
def model(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return LlamaForCausalLM(cfg).eval()


PROMPTS = [
    [{"role": "user", "content": "How old is Bera?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 3 plus 4? Answer with just the number and nothing else."},
    ],
    "Tovi",
    "What is 7 plus 8?",
]


def _collect(outs, i):
    def on_token(choice, token, finish):
        if token >= 0:
            outs.setdefault((i, choice), []).append(token)
        if finish:
            outs.setdefault(("finish", i, choice), finish)

    return on_token


@pytest.mark.parametrize("fast", [True, False], ids=["llama-runner", "hf-runner"])
def test_engine_matches_generate_when_requests_join_and_leave_mid_batch(model, tok, fast):
    """Greedy replies are token for token those of model.generate one prompt at a time, although the requests
    join a running batch at different steps and leave it at different ones: with the lean Llama forward (slots
    swapped as rows leave) and with the model's own forward (caches merged, left-padded)."""
    ref = generate(model, tok, PROMPTS, GenerationSettings(max_new_tokens=24), batch_size=1)
    ids = encode_prompts(tok, PROMPTS)
    eng = Engine(model, tok, max_batch=8, fast=fast)
    assert type(eng.runner).__name__ == ("LlamaRunner" if fast else "HFRunner")
    outs: dict = {}
    lengths = [24, 9, 24, 17]  # different max_tokens: rows leave at different steps
    with torch.inference_mode():
        eng.submit(ids[0], SamplingParams(max_tokens=lengths[0], temperature=0), 1, _collect(outs, 0))
        for k in range(1, 4):
            for _ in range(3 * k):
                eng.step()
            eng.submit(ids[k], SamplingParams(max_tokens=lengths[k], temperature=0), 1, _collect(outs, k))
        while eng.running or eng.waiting:
            eng.step()
    for k in range(4):
        got = outs[(k, 0)]
        want = ref[k].token_ids
        n = min(len(want), lengths[k])
        assert got[:n] == want[:n], k
        assert outs[("finish", k, 0)] in ("stop", "length")
    assert max(eng.batch_sizes) >= 3  # they really ran together


@pytest.mark.parametrize("fast", [True, False], ids=["llama-runner", "hf-runner"])
def test_engine_cancel_frees_the_rows_at_the_next_step(model, tok, fast):
    eng = Engine(model, tok, max_batch=4, fast=fast)
    outs: dict = {}
    ids = encode_prompts(tok, PROMPTS)
    with torch.inference_mode():
        a = eng.submit(ids[0], SamplingParams(max_tokens=200, temperature=1.0, seed=1), 2, _collect(outs, 0))
        eng.submit(ids[1], SamplingParams(max_tokens=200, temperature=0), 1, _collect(outs, 1))
        eng.step()
        eng.step()
        assert eng.running == 3
        a.cancel()
        eng.step()
    assert eng.running == 1
    assert outs[("finish", 0, 0)] == outs[("finish", 0, 1)] == "cancelled"


def test_engine_ignore_eos_runs_to_max_tokens(model, tok):
    """Every token made an end of turn: a request stops after its first token ("stop"), unless it asks for
    ignore_eos (vLLM's), when it runs its whole max_tokens and ends with "length"."""
    ids = encode_prompts(tok, PROMPTS)[:2]
    eng, outs = Engine(model, tok, max_batch=8), {}
    eng.end_ids = set(range(len(tok)))
    with torch.inference_mode():
        eng.submit(ids[0], SamplingParams(max_tokens=9, temperature=0), 1, _collect(outs, 0))
        eng.submit(ids[1], SamplingParams(max_tokens=9, temperature=1.0, seed=3, ignore_eos=True), 1, _collect(outs, 1))
        while eng.running or eng.waiting:
            eng.step()
    assert len(outs[(0, 0)]) == 1 and outs[("finish", 0, 0)] == "stop"
    assert len(outs[(1, 0)]) == 9 and outs[("finish", 1, 0)] == "length"


def test_engine_n_choices_with_a_seed_are_reproducible_and_differ(model, tok):
    ids = encode_prompts(tok, PROMPTS)[:1]

    def run():
        eng, outs = Engine(model, tok, max_batch=8), {}
        with torch.inference_mode():
            eng.submit(ids[0], SamplingParams(max_tokens=12, temperature=1.0, seed=7), 3, _collect(outs, 0))
            while eng.running or eng.waiting:
                eng.step()
        return [outs[(0, c)] for c in range(3)]

    first, second = run(), run()
    assert first == second
    assert len({tuple(x) for x in first}) > 1  # seed + choice index: three different draws


def test_sample_next_greedy_and_nucleus_by_hand():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]])
    logits = probs.log()
    g = torch.Generator().manual_seed(0)
    # temperature 0 is argmax
    assert sample_next(logits, torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0]), [None, None], g).tolist() == [0, 2]
    # top_p 0.6 on row 0 keeps {0, 1} (0.5 < 0.6, 0.5 + 0.3 >= 0.6); top_p 0.5 on row 1 keeps {2} only
    seen0, seen1 = set(), set()
    for _ in range(300):
        t = sample_next(logits, torch.tensor([1.0, 1.0]), torch.tensor([0.6, 0.5]), [None, None], g).tolist()
        seen0.add(t[0])
        seen1.add(t[1])
    assert seen0 == {0, 1} and seen1 == {2}
    # a row's own generator decides its draw, whatever the other rows are
    a = sample_next(
        logits, torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]), [torch.Generator().manual_seed(5), None], g
    )[0]
    b = sample_next(logits[:1], torch.tensor([1.0]), torch.tensor([1.0]), [torch.Generator().manual_seed(5)], g)[0]
    assert a == b


class _Tok:
    """A byte-level tokenizer whose tokens are `pieces` (str, or bytes that may split a character)."""

    def __init__(self, pieces):
        self.pieces = [p.encode() if isinstance(p, str) else p for p in pieces]

    def decode(self, ids, skip_special_tokens=True):
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def _stream(pieces, **kw):
    t = ReplyText(_Tok(pieces), **kw)
    out = [t.add(i) for i in range(len(pieces))]
    return out, t.finish(), t


def test_reply_text_never_sends_a_stop_string_or_its_start():
    out, rest, t = _stream(["Hello", " wor", "ld", "\n", "\n", "more"], stop=["\n\n"])
    assert out == ["Hello", " wor", "ld", "", "", ""] and rest == "" and t.stopped
    out, rest, t = _stream(["Hi", "\n", "there"], stop=["\n\n"])  # a lone "\n" is held, then released
    assert out == ["Hi", "", "\nthere"] and not t.stopped
    out, rest, t = _stream(["ab", "cSTO", "P!"], stop=["STOP"])
    assert "".join(out) + rest == "abc" and t.stopped


def test_reply_text_holds_the_word_being_written_and_broken_characters():
    out, rest, _ = _stream(["Tovi", " is", " a bak", "er", "."], hold=partial_word)
    assert out == ["", "Tovi ", "is a ", "", ""] and rest == "baker."
    out, rest, _ = _stream(["caf", b"\xc3", b"\xa9!"])  # a character still being assembled is held
    assert "".join(out) + rest == "café!" and "\ufffd" not in "".join(out)


def test_reply_text_with_a_real_tokenizer_streams_what_decode_gives(tok):
    """ReplyText decodes through the Rust tokenizer directly; piece for piece, the stream must be the one that
    transformers' decode gives (special tokens skipped), for replies of random tokens, broken characters included."""

    class Wrapped:  # the tokenizer seen through transformers' decode only
        decode = staticmethod(tok.decode)

    assert ReplyText(tok).rust is not None and ReplyText(Wrapped()).rust is None
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        ids = torch.randint(0, len(tok), (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).tolist()
        fast, slow = ReplyText(tok), ReplyText(Wrapped())
        assert [fast.add(i) for i in ids] + [fast.finish()] == [slow.add(i) for i in ids] + [slow.finish()]


def test_bucket_refills_continuously(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(limits.time, "monotonic", lambda: clock[0])
    b = Bucket(60)  # 60 per minute: one per second
    b.take(60)
    assert b.wait_for(1) == pytest.approx(1.0)
    clock[0] += 0.5
    assert b.wait_for(1) == pytest.approx(0.5)
    clock[0] += 10
    assert b.wait_for(10) == 0.0 and b.level == pytest.approx(10.5)


def test_rate_limiter_requests_tokens_concurrency_and_refunds(monkeypatch):
    """The lease is taken first (a request and a place in flight), the tokens charged on it once they are known."""
    clock = [0.0]
    monkeypatch.setattr(limits.time, "monotonic", lambda: clock[0])
    rl = RateLimiter(requests_per_minute=2, tokens_per_minute=100, concurrent=2)
    a = rl.acquire("k")
    a.charge(30)
    b = rl.acquire("k")
    b.charge(30)
    with pytest.raises(APIError) as e:  # two in flight
        rl.acquire("k")
    assert e.value.status == 429 and e.value.reason == "concurrency"
    a.release(used_tokens=10)  # 20 of its 30 tokens come back
    with pytest.raises(APIError) as e:  # two requests this minute
        rl.acquire("k")
    assert e.value.reason == "requests" and e.value.retry_after == pytest.approx(30.0)
    assert e.value.response_headers()["retry-after"] == "30"
    assert rl.acquire("other")  # another key has its own budget
    clock[0] += 30
    c = rl.acquire("k")  # a request refilled; 100 - 30 - 30 + 20 + 50 refilled -> 100 capped
    with pytest.raises(APIError) as e:  # 101 never fits
        c.charge(101)
    assert e.value.reason == "tokens" and e.value.retry_after is None
    c.release(0)
    with pytest.raises(APIError) as e:  # the refused request still counted: none left this minute
        rl.acquire("k")
    assert e.value.reason == "requests"
    b.release(30)
    h = rl.headers("k")
    assert h["x-ratelimit-limit-requests"] == "2" and h["x-ratelimit-limit-tokens"] == "100"
    assert int(h["x-ratelimit-remaining-tokens"]) == 100


def test_keys_from_env_and_file_constant_time_ids(monkeypatch, tmp_path):
    monkeypatch.setenv("KEYS_T", "sk-a, sk-b")
    f = tmp_path / "keys.txt"
    f.write_text("# team keys\nsk-c  # ci\n\n")
    keys = load_keys("KEYS_T", str(f))
    assert sorted(keys.values()) == ["sk-a", "sk-b", "sk-c"] and key_id("sk-c") in keys
    assert identify(keys, "Bearer sk-b") == key_id("sk-b")
    for header, code in [(None, "missing_api_key"), ("Bearer sk-x", "invalid_api_key"), ("sk-a", "invalid_api_key")]:
        with pytest.raises(APIError) as e:
            identify(keys, header)
        assert e.value.status == 401 and e.value.code == code
        assert "sk-" not in e.value.message  # never echoed
    assert identify({}, None) == limits.ANONYMOUS


def test_lexicon_scores_by_hand():
    clf = LexiconClassifier({"violence": ["pummel"]})
    s = clf.scores(["I will kill you", "kill them, then murder", "a skillful kill-joy?", "PUMMEL it"])
    assert s[0]["violence"] == pytest.approx(0.8) and s[0]["harassment"] == 0
    assert s[1]["violence"] == pytest.approx(1 - (1 - 0.7) * (1 - 0.5))  # two phrases: 1 - prod(1 - w)
    assert s[2]["violence"] == 0  # whole words only
    assert s[3]["violence"] == 1.0  # an added term flags alone
    assert set(CATEGORIES) <= set(s[0])


def test_moderator_categories_and_thresholds():
    clf = LexiconClassifier()
    m = Moderator(clf, categories=["violence"], threshold=0.5, thresholds={"violence": 0.9})
    v = m.check("I will kill you, you are stupid")
    assert not v.flagged and v.category_scores["violence"] == pytest.approx(0.8)
    assert v.category_scores["harassment"] == pytest.approx(0.6) and not v.categories["harassment"]
    v = Moderator(clf).check("I will kill you")
    assert v.flagged and v.flagged_categories == ["violence"]
    assert set(v.as_openai()) == {"flagged", "categories", "category_scores"}


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"model": "m", "messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role", "not a supported role"),
        ({"model": "m", "messages": []}, "messages", "Invalid value"),
        (
            {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
            "temperature",
            "Invalid value",
        ),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": []}, "tools", "Unrecognized"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "model", "Missing required parameter"),
        (
            {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]},
            "stop",
            "at most 4",
        ),
    ],
)
def test_validation_errors_name_the_parameter(body, param, words):
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as e:
        ChatCompletionRequest.model_validate(body)
    err = validation_error(e.value.errors())
    assert err.status == 400 and err.param == param and words in err.message
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}


def test_every_rejection_has_openais_error_shape():
    e = APIError(429, "slow down", type="requests", code="rate_limit_exceeded", retry_after=1.2)
    assert e.body() == {
        "error": {"message": "slow down", "type": "requests", "param": None, "code": "rate_limit_exceeded"}
    }
    assert e.response_headers() == {"retry-after": "2", "retry-after-ms": "1200"}
    assert math.isclose(APIError(503, "x", retry_after=0.1).retry_after, 0.1)


@pytest.fixture(scope="module")
def classifier_dir(tok, tmp_path_factory):
    """A Hugging Face sequence-classification folder, as a local moderation model would be saved."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(1)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=2,
        id2label={0: "ok", 1: "VIOLENT"},
        label2id={"ok": 0, "VIOLENT": 1},
        pad_token_id=tok.pad_token_id,
    )
    d = tmp_path_factory.mktemp("clf")
    LlamaForSequenceClassification(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_a_hugging_face_classifier_as_the_moderator(classifier_dir):
    from omegaconf import OmegaConf
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    settings = OmegaConf.create(
        {
            "classifier": str(classifier_dir),
            "categories": ["violence"],
            "threshold": 0.5,
            "thresholds": {"violence": 0.0},
            "terms": None,
            "label_map": {"VIOLENT": "violence"},
        }
    )
    mod = Moderator.from_settings(settings)
    texts = ["How old is Bera?", "Tovi works as a baker."]
    verdicts = mod.check_many(texts)
    # the scores are the model's own softmax, label renamed through label_map
    tk = AutoTokenizer.from_pretrained(classifier_dir)
    m = AutoModelForSequenceClassification.from_pretrained(classifier_dir).eval()
    for text, v in zip(texts, verdicts):
        with torch.no_grad():
            p = torch.softmax(m(**tk([text], return_tensors="pt")).logits, -1)[0]
        assert v.category_scores["violence"] == pytest.approx(float(p[1]), abs=1e-5)
        assert v.category_scores["ok"] == pytest.approx(float(p[0]), abs=1e-5)
        assert v.flagged and v.flagged_categories == ["violence"]  # threshold 0: always, and only the chosen one
    assert mod.holdback("a half-writ") == len("half-writ")  # a model judges whole words
    with pytest.raises(Exception, match="unknown categories"):
        Moderator.from_settings(OmegaConf.merge(settings, {"categories": ["VIOLENT-typo"]}))


def test_stream_chunks_are_encoded_as_the_chunk_objects_would_be():
    """The streaming path encodes a reply's constant fields once (serving.app.chunk_encoder); every event must be
    byte for byte what encoding the whole chat.completion.chunk gives, whatever the id and model name hold."""
    from serving.app import _event, chunk_encoder
    from serving.protocol import chunk

    for with_usage in (False, True):
        for cid, model in (("chatcmpl-abc", "default/ppo"), ('odd"id\\', 'a "@" model \u00e9')):
            one = chunk_encoder(cid, model, 1700000000, "fp", with_usage)
            for i, delta, finish in (
                (0, {"role": "assistant", "content": ""}, None),
                (3, {"content": 'say "hi"\n\u00e9'}, None),
                (1, {}, "content_filter"),
            ):
                whole = chunk(
                    cid,
                    model,
                    1700000000,
                    [{"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}],
                    "fp",
                )
                assert one(i, delta, finish) == _event({**whole, **({"usage": None} if with_usage else {})})
