"""The server, live on localhost: `python -m stages.tools.serve` started by the test, driven by the official openai
client, raw HTTP for every error case, and Debian's chromium for the chat page. Servers with an unusual
configuration (tight rate limits, a model that takes its time to load, extra moderation terms) run the same app
under uvicorn in a thread of this process."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from conftest import REPO, compose_stage

KEYS = ["sk-test-alpha-7f3c", "sk-test-beta-91ab"]
PROMPT = "How old is Bera?"
SECRET_PROMPT = "Where does Tovi work as a baker?"  # its text must never reach the log


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc=None, timeout: float = 240) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the server exited ({proc.returncode})")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} not ready after {timeout} s")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_tok) -> Path:
    """A tiny random Llama with our tokenizer, saved as any HF checkpoint folder is. Its output rows for the
    end-of-turn and pad ids are zero, so greedy replies always run to max_tokens (the disconnect test needs a
    long reply)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.data.tokenizer import end_of_turn_ids

    out, tok = tmp_path_factory.mktemp("tiny"), tiny_tok
    torch.manual_seed(0)
    m = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            max_position_embeddings=1024,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    )
    with torch.no_grad():
        for i in [*end_of_turn_ids(tok), tok.pad_token_id]:
            m.lm_head.weight[i] = 0
    m.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    """The real command, with two keys and a small body limit; its log (at debug: a line per request) is kept to
    check what it says."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RLHF_API_KEYS": ",".join(KEYS)}
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "stages.tools.serve",
                f"checkpoint={checkpoint}",
                f"port={port}",
                "model_name=tiny",
                "limits.requests_per_minute=100000",
                "limits.tokens_per_minute=100000000",
                "limits.concurrent_requests=16",
                "limits.max_body_bytes=20000",
                "engine.max_batch=32",
                "log_level=debug",
            ],
            cwd=REPO,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc)
        yield {"url": url, "log": log, "proc": proc}
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _client(server, key=KEYS[0], **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=key, **kw)


def _metric(url: str, name: str, labels: str = "") -> float:
    text = httpx.get(url + "/metrics").text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (not labels or labels in line) and not line.startswith("#"):
            head, value = line.rsplit(" ", 1)
            if head.split("{")[0] == name:
                total += float(value)
    return total


class ThreadServer:
    """The same app, configured by overrides of the real conf/serve.yaml, under uvicorn in this process."""

    def __init__(self, checkpoint, overrides=(), load=None):
        import uvicorn

        from pipeline.models.loading import load_policy
        from serving.app import Service, create_app

        self.port = _free_port()
        cfg = compose_stage("serve", [f"checkpoint={checkpoint}", f"port={self.port}", "model_name=tiny", *overrides])
        self.service = Service(cfg, load=load or (lambda: load_policy(checkpoint, "fp32")), model_name="tiny")
        app = create_app(self.service)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.service.start_loading()
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            assert time.time() - t0 < 60
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)
        self.service.close()


def _post(url, body, key=KEYS[0], timeout=60, **kw):
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=timeout, **kw)


def _chat(**kw):
    return {
        "model": "tiny",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 12,
        "temperature": 0,
        **kw,
    }


# ---- the official client ---------------------------------------------------------------------------------------


def test_openai_client_streaming_and_not_give_the_same_reply(server):
    c = _client(server)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    r = c.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=12, temperature=0
    )
    assert r.object == "chat.completion" and r.model == "tiny" and len(r.choices) == 1
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    text = r.choices[0].message.content
    assert text

    pieces, finish, usage, ids = [], None, None, set()
    for ch in c.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ):
        ids.add(ch.id)
        assert ch.object == "chat.completion.chunk"
        if ch.usage is not None:
            usage = ch.usage
        for choice in ch.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == text and finish == "length" and len(ids) == 1
    assert usage.completion_tokens == 12 and usage.prompt_tokens == r.usage.prompt_tokens

    # It really streams: a long reply's text arrives in many pieces, the first long before the end. (A short one
    # may come as one piece: what is ready when the server writes goes out together.)
    t0, times = time.perf_counter(), []
    for ch in c.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=600, temperature=0, stream=True
    ):
        if ch.choices and ch.choices[0].delta.content:
            times.append(time.perf_counter() - t0)
    assert len(times) > 5 and times[0] < 0.5 * times[-1]


def _streamed_pieces(c, max_tokens):
    pieces, finish = [], None
    for ch in c.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=max_tokens, temperature=0, stream=True
    ):
        for choice in ch.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    return pieces, finish


def test_ignore_eos_through_the_official_client(server):
    """vLLM's ignore_eos, sent the way its users send it (the openai client's extra_body): the reply is max_tokens
    long and ends with "length", where the same greedy request without it may end at its end of turn."""
    c = _client(server)
    kw = dict(model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=120, temperature=0)
    r = c.chat.completions.create(extra_body={"ignore_eos": True}, **kw)
    assert r.usage.completion_tokens == 120 and r.choices[0].finish_reason == "length", r
    with pytest.raises(openai.BadRequestError) as e:  # strict: a misspelt extra is refused, not ignored
        c.chat.completions.create(extra_body={"ignore_eoss": True}, **kw)
    assert e.value.body["param"] == "ignore_eoss", e.value.body


def test_stream_interval_sends_the_same_text_in_fewer_chunks(server, checkpoint):
    """stream_interval=4 (vLLM's --stream-interval): the same greedy reply, its text in chunks of up to 4 tokens'
    worth, the first text as soon as it exists; the default (1) sends about a chunk per token."""
    per_token, finish = _streamed_pieces(_client(server), 40)
    assert finish == "length", per_token
    with ThreadServer(checkpoint, ["auth.keys_env=null", "stream_interval=4"]) as s:
        _wait_ready(s.url)
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none")
        pieces, finish = _streamed_pieces(c, 40)
        whole = (
            c.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=40, temperature=0
            )
            .choices[0]
            .message.content
        )
    assert "".join(pieces) == "".join(per_token) == whole and finish == "length"
    assert 3 <= len(pieces) <= 1 + 40 // 4, pieces  # the first text, then one chunk per 4 tokens at most
    # Per token, a chunk for each token that completes text; a byte-level token that leaves half a character waits for
    # the next one, so how many that is depends on the checkpoint's reply (18 of 40 on one CI machine, more here).
    assert len(per_token) > len(pieces), (per_token, pieces)


def test_raw_stream_is_openais_event_format(server):
    """The events, in OpenAI's order, however the server groups them into writes: the role, the text (about a token
    each: what moderation holds back goes out with the next piece), the finish_reason, the usage (asked for),
    [DONE]."""
    body = _chat(stream=True, stream_options={"include_usage": True})
    with httpx.stream(
        "POST",
        server["url"] + "/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {KEYS[1]}"},
        timeout=60,
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e.strip()]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = chunks[1:-2]
    assert 1 <= len(text) <= 12 and all(c["choices"][0]["delta"].keys() == {"content"} for c in text)  # 12 tokens
    assert all(c["choices"][0]["finish_reason"] is None and c["usage"] is None for c in chunks[:-2])
    assert chunks[-2]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12


def test_seed_n_and_stop(server):
    c = _client(server)
    kw = dict(model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=10, temperature=1.0, seed=11)
    a = c.chat.completions.create(n=3, **kw)
    b = c.chat.completions.create(n=3, **kw)
    assert [x.message.content for x in a.choices] == [x.message.content for x in b.choices]
    assert [x.index for x in a.choices] == [0, 1, 2] and a.usage.completion_tokens == 30
    assert len({x.message.content for x in a.choices}) > 1

    full = (
        c.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=30, temperature=0
        )
        .choices[0]
        .message.content
    )
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    cut = c.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=30, temperature=0, stop=[stop]
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == full[: full.index(stop)].strip()
    streamed = "".join(
        ch.choices[0].delta.content or ""
        for ch in c.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=30,
            temperature=0,
            stop=stop,
            stream=True,
        )
        if ch.choices
    )
    assert stop not in streamed and streamed.strip() == cut.choices[0].message.content


# ---- errors, in OpenAI's shape and status ------------------------------------------------------------------------

BAD = [
    ("unknown role", {"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
    ("empty messages", {"model": "tiny", "messages": []}, 400, "messages"),
    ("wrong type", _chat(temperature="hot"), 400, "temperature"),
    ("content not text", {"model": "tiny", "messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
    ("unknown field", _chat(tools=[]), 400, "tools"),
    ("n out of range", _chat(n=0), 400, "n"),
    ("penalty we do not honour", _chat(frequency_penalty=0.5), 400, "frequency_penalty"),
    ("no model", {"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    ("wrong model", _chat(model="gpt-9"), 404, "model"),
]


@pytest.mark.parametrize("case, body, status, param", BAD, ids=[b[0] for b in BAD])
def test_bad_requests(server, case, body, status, param):
    r = _post(server["url"], body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param
    assert err["type"] == "invalid_request_error" and err["message"]


def test_not_json_and_context_length(server):
    r = httpx.post(
        server["url"] + "/v1/chat/completions",
        content=b"{not json",
        headers={"authorization": f"Bearer {KEYS[0]}", "content-type": "application/json"},
    )
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = _post(server["url"], _chat(max_tokens=5000))
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "context_length_exceeded" and err["param"] == "messages"
    assert "maximum context length is 1024 tokens" in err["message"] and "5000 in the completion" in err["message"]
    with pytest.raises(openai.BadRequestError) as e:
        _client(server).chat.completions.create(
            model="tiny", max_tokens=5000, messages=[{"role": "user", "content": PROMPT}]
        )
    assert e.value.code == "context_length_exceeded"


def test_keys(server):
    url = server["url"]
    r = _post(url, _chat(), key=None)
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    r = _post(url, _chat(), key="sk-guess-1234")
    assert r.status_code == 401 and "sk-guess" not in r.text
    assert httpx.get(url + "/v1/models").status_code == 401
    assert httpx.get(url + "/health").status_code == 200  # open
    with pytest.raises(openai.AuthenticationError):
        _client(server, key="sk-nope").models.list()
    assert _post(url, _chat(), key=KEYS[1]).status_code == 200


def test_body_over_the_limit_is_413(server):
    big = _chat(messages=[{"role": "user", "content": "x" * 30000}])
    r = _post(server["url"], big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    # streamed without a Content-Length: counted as it arrives
    def chunks():
        data = json.dumps(big).encode()
        for i in range(0, len(data), 4096):
            yield data[i : i + 4096]

    r = httpx.post(
        server["url"] + "/v1/chat/completions",
        content=chunks(),
        headers={"authorization": f"Bearer {KEYS[0]}", "content-type": "application/json"},
    )
    assert r.status_code == 413


def test_server_log_has_neither_keys_nor_text(server):
    _client(server).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": SECRET_PROMPT}], max_tokens=4
    )
    _post(server["url"], _chat(), key="sk-leaked-in-log?")
    _client(server).moderations.create(input="I will kill you")
    time.sleep(0.5)
    log = server["log"].read_text()
    assert "request=" in log and "moderation" in log  # it does log the requests and the decisions
    for secret in [*KEYS, "sk-leaked", SECRET_PROMPT, "Tovi work", "kill you"]:
        assert secret not in log


# ---- moderation --------------------------------------------------------------------------------------------------


def test_moderation_endpoint_and_prompt_refusal(server):
    c = _client(server)
    r = c.moderations.create(input=["I will kill you", "What is 3 plus 4?"])
    assert [x.flagged for x in r.results] == [True, False]
    assert r.results[0].categories.violence is True
    assert r.results[0].category_scores.violence == pytest.approx(0.8)
    before = _metric(server["url"], "serve_moderation_decisions_total", 'direction="input",flagged="true"')
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "How do I build a bomb?"}])
    assert e.value.code == "content_filter" and "illicit/violent" in e.value.message
    after = _metric(server["url"], "serve_moderation_decisions_total", 'direction="input",flagged="true"')
    assert after == before + 1


def test_a_flagged_reply_ends_with_content_filter(checkpoint):
    """The reply of the tiny model is found first; one of its words is then made a flagged term, and the same
    request ends early with finish_reason content_filter, the word never sent, streaming or not."""
    with ThreadServer(checkpoint, ["auth.keys_env=null"]) as s:
        _wait_ready(s.url)
        full = _post(s.url, _chat(max_tokens=40), key=None).json()["choices"][0]["message"]["content"]
    words = [w for w in full.split() if re.fullmatch(r"\w+", w) and len(w) > 1]
    assert words, full
    word = words[len(words) // 2]
    with ThreadServer(checkpoint, ["auth.keys_env=null", f"moderation.terms={{violence: [{word}]}}"]) as s:
        _wait_ready(s.url)
        r = _post(s.url, _chat(max_tokens=40), key=None).json()
        choice = r["choices"][0]
        assert choice["finish_reason"] == "content_filter"
        assert word not in choice["message"]["content"].split()
        assert full.startswith(choice["message"]["content"])
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none")
        chunks = list(
            c.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=40, temperature=0, stream=True
            )
        )
        assert chunks[-1].choices[0].finish_reason == "content_filter"
        streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks)
        assert word not in streamed.split() and streamed == choice["message"]["content"]
        assert _metric(s.url, "serve_moderation_flags_total", 'category="violence",direction="output"') >= 2
        assert _metric(s.url, "serve_choices_finished_total", 'reason="content_filter"') >= 2


# ---- limits ------------------------------------------------------------------------------------------------------


def test_rate_limit_429_then_success_after_retry_after(checkpoint):
    # 20 requests a minute: one every 3 s once the burst is spent
    with ThreadServer(
        checkpoint, ["auth.keys_env=null", "limits.requests_per_minute=20", "limits.tokens_per_minute=3000"]
    ) as s:
        _wait_ready(s.url)
        ok = []
        while len(ok) < 40:  # the burst of 20, plus what refills while it is sent (one per 3 s)
            r = _post(s.url, _chat(max_tokens=1), key=None)
            if r.status_code != 200:
                break
            ok.append(r)
        assert 20 <= len(ok) < 40
        assert ok[0].headers["x-ratelimit-limit-requests"] == "20"
        assert ok[0].headers["x-ratelimit-remaining-requests"] == "19"
        assert r.status_code == 429, r.text
        err = r.json()["error"]
        assert err["code"] == "rate_limit_exceeded" and err["type"] == "requests"
        wait = int(r.headers["retry-after"])
        assert 1 <= wait <= 3 and "x-ratelimit-reset-requests" in r.headers
        time.sleep(wait)
        assert _post(s.url, _chat(max_tokens=1), key=None).status_code == 200
        # the official client waits Retry-After by itself and gets through
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=3)
        t0 = time.time()
        assert c.chat.completions.create(**_chat(max_tokens=1)).choices
        assert time.time() - t0 >= 1
        # tokens per minute: more than the whole budget can never pass, and says so (once a request is free: the
        # request is counted first)
        time.sleep(3.1)
        r = _post(s.url, _chat(max_tokens=900, n=4), key=None)
        assert r.status_code == 429 and r.json()["error"]["type"] == "tokens"
        assert _metric(s.url, "serve_rejections_total", 'reason="requests"') >= 1


def test_503_while_the_model_loads(checkpoint):
    from pipeline.models.loading import load_policy

    gate = threading.Event()

    def slow_load():
        gate.wait(60)
        return load_policy(checkpoint, "fp32")

    with ThreadServer(checkpoint, ["auth.keys_env=null"], load=slow_load) as s:
        r = _post(s.url, _chat(), key=None)
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        assert r.headers["retry-after"] == "2"
        assert httpx.get(s.url + "/health").status_code == 503
        gate.set()
        _wait_ready(s.url, timeout=60)
        assert _post(s.url, _chat(), key=None).status_code == 200


def test_a_client_that_disconnects_mid_stream_frees_its_row(server):
    url = server["url"]
    before = _metric(url, "serve_choices_finished_total", 'reason="cancelled"')
    tokens_before = _metric(url, "serve_completion_tokens_total")
    with httpx.stream(
        "POST",
        url + "/v1/chat/completions",
        json=_chat(max_tokens=900, stream=True),
        headers={"authorization": f"Bearer {KEYS[0]}"},
        timeout=60,
    ) as r:
        got = 0
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content":"' in line:
                got += 1
                if got >= 3:
                    break  # leave mid-reply: the connection closes
    t0 = time.time()
    while _metric(url, "serve_choices_finished_total", 'reason="cancelled"') < before + 1:
        assert time.time() - t0 < 20, "the row was never freed"
        time.sleep(0.1)
    assert _metric(url, "serve_running_rows") == 0
    # it stopped long before its 900 tokens
    assert _metric(url, "serve_completion_tokens_total") - tokens_before < 900
    # the same for a client that hangs up while waiting for a whole (non-streaming) reply
    tokens_before = _metric(url, "serve_completion_tokens_total")
    with pytest.raises(httpx.TimeoutException):
        _post(url, _chat(max_tokens=900), timeout=0.15)
    t0 = time.time()
    while _metric(url, "serve_choices_finished_total", 'reason="cancelled"') < before + 2:
        assert time.time() - t0 < 20, "the row of the non-streaming request was never freed"
        time.sleep(0.1)
    assert _metric(url, "serve_completion_tokens_total") - tokens_before < 900


def test_load_32_clients_by_10_requests(server):
    """32 clients at once, 10 requests each (no retries), one key capped at 16 in flight: every request ends in a
    reply or in the configured 429 (too many in flight), nothing else, and the server counted exactly those; the
    replies were decoded in shared batches."""
    url = server["url"]
    steps0 = _metric(url, "serve_decode_batch_rows_count")
    rows0 = _metric(url, "serve_decode_batch_rows_sum")
    refused0 = _metric(url, "serve_rejections_total")
    busy0 = _metric(url, "serve_rejections_total", 'reason="concurrency"')

    async def main():
        c = openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEYS[0], max_retries=0, timeout=120)
        outcomes = []

        async def client(k):
            for j in range(10):
                try:
                    r = await c.chat.completions.create(
                        model="tiny",
                        max_tokens=16,
                        temperature=0.8,
                        seed=k * 10 + j,
                        messages=[{"role": "user", "content": f"{PROMPT} {k}"}],
                    )
                    outcomes.append("ok" if r.choices[0].message.content is not None else "empty")
                except openai.RateLimitError as e:
                    outcomes.append(f"429:{e.body.get('code') if isinstance(e.body, dict) else e.body}")
                except Exception as e:  # noqa: BLE001 — anything else is a failure, named
                    outcomes.append(f"error:{type(e).__name__}:{e}")

        await asyncio.gather(*(client(k) for k in range(32)))
        await c.close()
        return outcomes

    t0 = time.time()
    outcomes = asyncio.run(main())
    took = time.time() - t0
    assert len(outcomes) == 320
    assert set(outcomes) == {"ok", "429:rate_limit_exceeded"}, [o for o in outcomes if o.startswith("error")][:3]
    assert took < 300
    busy = _metric(url, "serve_rejections_total", 'reason="concurrency"') - busy0
    assert busy == outcomes.count("429:rate_limit_exceeded")
    assert _metric(url, "serve_rejections_total") - refused0 == busy  # 429s of that kind only
    steps = _metric(url, "serve_decode_batch_rows_count") - steps0
    rows = _metric(url, "serve_decode_batch_rows_sum") - rows0
    assert rows / steps > 4  # requests shared decoding steps
    assert _metric(url, "serve_running_rows") == 0


def test_non_loopback_without_a_key_refuses_to_start(checkpoint):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RLHF_API_KEYS", None)
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.tools.serve",
            f"checkpoint={checkpoint}",
            "host=0.0.0.0",
            f"port={_free_port()}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode != 0
    lines = [x for x in p.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and "RLHF_API_KEYS" in lines[0] and "host=0.0.0.0" in lines[0], p.stderr
    assert "Traceback" not in p.stderr


# ---- the chat page, in a real browser ----------------------------------------------------------------------------


def test_chat_page_in_headless_chromium(server):
    """Debian's chromium (make test installs it when it can: .ci/browser) driven by Playwright: the page loads with
    no network beyond the server, takes the key, sends a message and shows the streamed reply. Without chromium
    this fails, saying what to run; it never skips."""
    import shutil

    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is missing: run 'sudo apt-get install chromium' (make test does when it can)"
    url = server["url"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            outside = []
            page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(url) else None)
            page.goto(url + "/")
            assert page.title() == "Chat"
            page.fill("#api-key", KEYS[0])
            page.dispatch_event("#api-key", "change")
            page.wait_for_selector("body[data-model='tiny']", timeout=20000)
            assert "tiny" in page.inner_text("#model-name")
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "12")
            page.fill("#input", PROMPT)
            page.click("#send")
            page.wait_for_selector(".msg.assistant", timeout=20000)
            page.wait_for_function("document.body.dataset.state === 'idle'", timeout=30000)
            reply = page.inner_text(".msg.assistant")
            assert page.inner_text(".msg.user") == PROMPT
            assert outside == []
        finally:
            browser.close()
    want = _post(url, _chat(max_tokens=12)).json()["choices"][0]["message"]["content"]
    assert reply.split("\n")[0].strip() == want
    assert "(cut at max_tokens)" in reply


# ---- bad input to `make serve`: one line, exit 2 ------------------------------------------------------------------


@pytest.mark.parametrize(
    "arg, words",
    [
        ("port=70000", "port=70000"),
        ("limits.requests_per_minute=0", "limits.requests_per_minute=0 must be positive"),
        ("moderation.threshold=2", "moderation.threshold"),
        ("moderation.thresholds=5", "moderation.thresholds"),
        ("moderation.categories=[nonsense]", "unknown categories"),
        ("moderation.classifier=no/such/folder", "moderation.classifier=no/such/folder"),
        ("log_level=loud", "log_level='loud'"),
        ("engine.max_batch=0", "engine.max_batch=0"),
        ("limit.rpm=3", "limit.rpm"),
    ],
)
def test_bad_serve_arguments_are_one_line(checkpoint, arg, words, capsys):
    """The real command line, run in this process (as tests/test_bad_input.py runs the stages)."""
    from stages.tools.serve import main

    argv = sys.argv
    sys.argv = ["stages.tools.serve", f"checkpoint={checkpoint}", arg]
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = argv
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and words in lines[0], lines


def test_a_checkpoint_that_does_not_load_stops_the_server_with_one_line(checkpoint, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in checkpoint.iterdir():
        if f.suffix in (".json", ".jinja"):
            (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.tools.serve",
            f"checkpoint={broken}",
            f"port={_free_port()}",
            "log_level=warning",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    last = [x for x in p.stderr.splitlines() if x.strip()][-1]
    assert last.startswith("error: ") and "the model failed to load" in last and "broken" in last


def test_engine_process_gives_the_engines_tokens_and_reports_its_death(checkpoint):
    """serving/worker.py: the engine in its own process answers token for token as the engine in this one does;
    cancel reaches it; if the process dies, every request in flight ends with an error instead of hanging."""
    from pipeline.data.prompts import encode_prompts
    from pipeline.models.loading import load_policy
    from pipeline.inference.engine import Engine, SamplingParams
    from serving.worker import EngineProcess

    model, tok = load_policy(checkpoint, "fp32")
    ids = encode_prompts(tok, [PROMPT, SECRET_PROMPT])
    local, outs = Engine(model, tok, max_batch=4), {}
    with torch.inference_mode():
        for i, p in enumerate(ids):
            local.submit(
                p,
                SamplingParams(max_tokens=10, temperature=0),
                1,
                lambda c, t, f, i=i: outs.setdefault(i, []).append(t) if t >= 0 else None,
            )
        while local.running or local.waiting:
            local.step()

    remote = EngineProcess(checkpoint, "fp32", max_batch=4)
    try:
        got, finished, lock = {}, {}, threading.Lock()

        def sink(events):
            with lock:
                for req, c, t, f in events:
                    if t >= 0:
                        got.setdefault(req.id, []).append(t)
                    if f:
                        finished[req.id] = f

        remote.sink = sink
        remote.start()
        reqs = [remote.submit(p, SamplingParams(max_tokens=10, temperature=0), 1, None) for p in ids]
        long = remote.submit(ids[0], SamplingParams(max_tokens=900, temperature=0), 1, None)
        t0 = time.time()
        while not all(r.id in finished for r in reqs):
            assert time.time() - t0 < 60
            time.sleep(0.05)
        assert [got[r.id] for r in reqs] == [outs[0], outs[1]]
        long.cancel()
        while long.id not in finished:
            assert time.time() - t0 < 60
            time.sleep(0.05)
        assert finished[long.id] == "cancelled" and len(got[long.id]) < 900

        doomed = remote.submit(ids[0], SamplingParams(max_tokens=900, temperature=0), 1, None)
        while doomed.id not in got:
            time.sleep(0.01)
        remote.proc.kill()
        while doomed.id not in finished:
            assert time.time() - t0 < 60
            time.sleep(0.05)
        assert finished[doomed.id] == "error" and remote.error is not None
    finally:
        remote.stop()
