"""The HTTP side: OpenAI's endpoints over the engine, with keys, rate limits, size limits and moderation.

    service = Service(cfg, load=lambda: (model, tokenizer),   # in a thread of this process, or with
                      model_name="default/ppo", spawn=(folder, "auto"))  # spawn, an engine process (the default)
    service.start_loading()                                   # 503 until the model is loaded
    app = create_app(service)                                 # a FastAPI app; uvicorn runs it (serving/server.py)

Routes: POST /v1/chat/completions (stream or not), GET /v1/models, POST /v1/moderations, GET /health,
GET /metrics, GET / (the chat page). What a request goes through, in OpenAI's order: size limit (413), key (401),
the JSON body (400), model name (404), context length (400 context_length_exceeded), the prompt's moderation
(400 content_filter), rate limits (429), then the engine (503 when its queue is full).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from serving.engine import Engine, EngineFull, SamplingParams
from serving.limits import RateLimiter, identify, load_keys
from serving.metrics import Metrics
from serving.moderation import HFClassifier, Moderator
from serving.protocol import (APIError, ChatCompletionRequest, ModerationRequest, chunk, completion, completion_id,
                              new_id, now, usage, validation_error)
from serving.text import ReplyText

log = logging.getLogger("serving")
PAGE = Path(__file__).with_name("static") / "chat.html"
FINGERPRINT = "rlhf-pipeline"


class Service:
    """What every route shares: the model once loaded, the engine, keys, limits, the moderator, the metrics."""

    def __init__(self, cfg, load: Callable[[], tuple], model_name: str, spawn: Optional[tuple] = None):
        self.cfg = cfg
        self.model_name = model_name
        self.keys = load_keys(cfg.auth.keys_env, cfg.auth.keys_file)
        self.limiter = RateLimiter(cfg.limits.requests_per_minute, cfg.limits.tokens_per_minute,
                                   cfg.limits.concurrent_requests)
        self.moderator = Moderator.from_settings(cfg.moderation)
        self.metrics = Metrics()
        self._load = load
        self._spawn = spawn  # (checkpoint folder, precision): what an engine process loads (engine.process)
        self.engine: Optional[Engine] = None
        self.tok = None
        self.load_error: Optional[str] = None
        self.created = now()
        self.loop: Optional[asyncio.AbstractEventLoop] = None  # the server's, set when it starts (create_app)
        self.on_load_failed: Optional[Callable[[], None]] = None

    def start_loading(self) -> None:
        threading.Thread(target=self._load_now, name="load", daemon=True).start()

    def _load_now(self) -> None:
        try:
            e = self.cfg.engine
            remote = self._spawn is not None and e.process
            if remote:
                from pipeline.data.tokenizer import load_tokenizer
                from serving.worker import EngineProcess

                tok = load_tokenizer(self._spawn[0], need_chat_template=True)
                engine = EngineProcess(self._spawn[0], self._spawn[1], max_batch=e.max_batch,
                                       max_waiting=e.max_waiting, seed=e.seed, fast=e.fast_path, threads=e.threads)
            else:
                if e.threads:
                    torch.set_num_threads(int(e.threads))
                model, tok = self._load()
                engine = Engine(model, tok, max_batch=e.max_batch, max_waiting=e.max_waiting, seed=e.seed,
                                fast=e.fast_path)
            engine.on_step = self._on_step
            if remote and self.loop is not None:
                # the engine process's pipe is read on the event loop itself: its tokens need no hand-over
                engine.sink = _deliver
                done = threading.Event()
                self.loop.call_soon_threadsafe(lambda: (engine.start(self.loop), done.set()))
                if not done.wait(60):
                    raise RuntimeError("the server's event loop did not take the engine's pipe")
            else:
                engine.sink = self._sink
                engine.start()
            self.tok, self.engine = tok, engine
            self.metrics.ready.set(1)
            log.info("model %s loaded: context %d tokens, batches of up to %d rows", self.model_name,
                     engine.context, engine.max_batch)
        except Exception as e:  # noqa: BLE001 — reported once, in one line, by whoever started us
            self.load_error = str(e).splitlines()[0] if str(e) else type(e).__name__
            log.error("loading the model failed: %s", self.load_error)
            if self.on_load_failed is not None:
                self.on_load_failed()

    def _on_step(self, running: int, decoded: int) -> None:
        m = self.metrics
        m.running.set(running)
        if self.engine is not None:
            m.waiting.set(self.engine.waiting)
        if decoded:
            m.batch.observe(decoded)

    def _sink(self, events: list) -> None:
        """The engine thread's tokens of one step: one wake-up of the event loop for all of them."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(_deliver, events)

    def ready(self) -> Engine:
        if self.load_error:
            raise APIError(500, f"The model failed to load: {self.load_error}", type="server_error",
                           reason="load_failed")
        if self.engine is None:
            raise APIError(503, "The model is still loading; try again shortly.", type="server_error",
                           code="model_loading", retry_after=2, reason="loading")
        if self.engine.error is not None:
            raise APIError(500, "The generation engine stopped; see the server log.", type="server_error",
                           reason="engine_error")
        return self.engine


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes gets 413 before anything reads it (by Content-Length, or as it
    arrives when the client streams it without one)."""

    def __init__(self, app, limit: int, metrics: Metrics):
        self.app, self.limit, self.metrics = app, int(limit), metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = APIError(413, f"Request body too large: the limit is {self.limit} bytes.",
                           code="request_too_large", reason="too_large")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            self.metrics.rejections.labels("too_large").inc()
            return await _error_response(too_big)(scope, receive, send)
        seen = 0

        async def counted():  # the route reads the body through this; over the limit it raises the 413
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise too_big
            return msg

        await self.app(scope, counted, send)


class Accounting:
    """ASGI middleware: a request id on every response (x-request-id), and each request counted and timed by
    endpoint and status, a stream when its last byte goes. (Pure ASGI, not BaseHTTPMiddleware: that one reads
    the body in a task of its own, where the body limit's 413 would turn into a 500.)"""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        rid = new_id("req")
        scope.setdefault("state", {})["rid"] = rid
        endpoint = scope["path"] if scope["path"] in _ENDPOINTS else "other"
        status = [500]
        done = [False]

        def finish():
            if not done[0]:
                done[0] = True
                self.metrics.requests.labels(endpoint, str(status[0])).inc()
                self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)

        async def sending(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
                msg = {**msg, "headers": [*msg.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(msg)
            if msg["type"] == "http.response.body" and not msg.get("more_body", False):
                finish()

        try:
            await self.app(scope, receive, sending)
        finally:
            finish()


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.response_headers())


def create_app(service: Service) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.loop = asyncio.get_running_loop()  # where the engine's tokens are handed over (Service._sink)
        yield

    app = FastAPI(title="rlhf-pipeline", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    m = service.metrics

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        m.rejections.labels(e.reason).inc()
        return _error_response(e)

    def authorize(request: Request) -> str:
        return identify(service.keys, request.headers.get("authorization"))

    async def body(request: Request, model):
        raw = await request.body()
        try:
            obj = json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError(400, "We could not parse the JSON body of your request. The body must be a JSON "
                                "object.", reason="bad_request") from None
        if not isinstance(obj, dict):
            raise APIError(400, "The request body must be a JSON object.", reason="bad_request")
        try:
            return model.model_validate(obj)
        except ValidationError as e:
            raise validation_error(e.errors()) from None

    @app.get("/health")
    async def health():
        if service.load_error or (service.engine is not None and service.engine.error is not None):
            return JSONResponse({"status": "error"}, status_code=500)
        if service.engine is None:
            return JSONResponse({"status": "loading"}, status_code=503, headers={"retry-after": "2"})
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    def model_card() -> dict:
        return {"id": service.model_name, "object": "model", "created": service.created, "owned_by": "rlhf-pipeline"}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        service.ready()
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        authorize(request)
        service.ready()
        if name != service.model_name:
            raise _no_model(name)
        return model_card()

    @app.post("/v1/moderations")
    async def moderations(request: Request):
        who = authorize(request)
        req = await body(request, ModerationRequest)
        texts = [req.input] if isinstance(req.input, str) else list(req.input)
        lease = _acquire(service, who, 0)
        try:
            verdicts = await _moderate(service.moderator, texts)
        finally:
            lease.release(0)
        for v in verdicts:
            _count_moderation(m, "endpoint", v, request.state.rid)
        return JSONResponse({"id": new_id("modr"), "model": service.moderator.classifier.name,
                             "results": [v.as_openai() for v in verdicts]}, headers=service.limiter.headers(who))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        t0 = time.perf_counter()
        who = authorize(request)
        req = await body(request, ChatCompletionRequest)
        engine = service.ready()
        bad = req.unsupported()
        if bad:
            raise APIError(400, bad[1], param=bad[0], code="unsupported_parameter", reason="bad_request")
        if req.model != service.model_name:
            raise _no_model(req.model)
        if req.n > engine.max_batch:
            raise APIError(400, f"n={req.n} is more than this server decodes at once ({engine.max_batch}).",
                           param="n", code="invalid_value", reason="bad_request")
        tok = service.tok
        messages = [{"role": "system" if x.role == "developer" else x.role, "content": x.text()}
                    for x in req.messages]
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = _encode(tok, prompt)
        ctx = engine.context
        asked = req.max_completion_tokens or req.max_tokens
        max_tokens = asked or min(service.cfg.engine.max_tokens_default or ctx, ctx - len(ids))
        if len(ids) + max(1, max_tokens) > ctx:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                                f"{len(ids) + max_tokens} tokens ({len(ids)} in the messages, {max_tokens} in the "
                                f"completion). Please reduce the length of the messages or completion.",
                           param="messages", code="context_length_exceeded")
        if service.cfg.moderation.input:
            said = [x["content"] for x in messages if x["role"] != "assistant"]
            verdicts = await _moderate(service.moderator, said)
            flagged = sorted({c for v in verdicts for c in v.flagged_categories})
            for v in verdicts:
                _count_moderation(m, "input", v, request.state.rid)
            if flagged:
                raise APIError(400, f"The prompt was refused by the moderation filter (flagged: "
                                    f"{', '.join(flagged)}). Please rephrase it.", param="messages",
                               code="content_filter", reason="moderation_input")
        lease = _acquire(service, who, len(ids) + max_tokens * req.n)
        headers = service.limiter.headers(who)
        params = SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed)
        run = _Run(service, req, request.state.rid, len(ids), t0)
        try:
            run.request = engine.submit(ids, params, req.n, run.on_token)
        except EngineFull:
            lease.release(0)
            raise APIError(503, "The server is overloaded; try again shortly.", type="server_error",
                           code="overloaded", retry_after=1, reason="overloaded") from None
        m.prompt_tokens.inc(len(ids))
        if not req.stream:
            try:
                await _unless_gone(request, run.finished())
            finally:  # done, failed, or the client hung up while waiting: its rows are freed either way
                run.close(lease)
            if run.error:
                raise APIError(500, run.error, type="server_error", reason="engine_error")
            return JSONResponse(completion(run.cid, service.model_name, run.choices_json(), len(ids),
                                           run.completion_tokens, FINGERPRINT), headers=headers)

        async def events():
            try:
                async for c in run.chunks():
                    yield c
            finally:  # also when the client went away mid-stream (Starlette cancels this generator)
                run.close(lease)

        # Server-sent events as OpenAI (and vLLM) send them: `data: <json>` lines, one chat.completion.chunk each,
        # ending `data: [DONE]`. The events of one wake-up go out in one write (run.chunks).
        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={**headers, "cache-control": "no-cache", "x-accel-buffering": "no"})

    return _wrap(app, service)


_ENDPOINTS = {"/v1/chat/completions", "/v1/models", "/v1/moderations", "/health", "/metrics", "/"}


def _wrap(app: FastAPI, service: Service):
    """The app inside its two middlewares (the last added is the outermost)."""
    app.add_middleware(BodyLimit, limit=service.cfg.limits.max_body_bytes, metrics=service.metrics)
    app.add_middleware(Accounting, metrics=service.metrics)
    return app


async def _unless_gone(request: Request, work) -> None:
    """Await `work`, giving up as soon as the client disconnects (a non-streaming client that hangs up should
    not keep its rows busy until the reply is complete)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                return None
    finally:
        if not task.done():
            task.cancel()


def _acquire(service: Service, who: str, tokens: int):
    try:
        return service.limiter.acquire(who, tokens)
    except APIError as e:  # a 429 tells the client where it stands, as every response does
        e.headers.update(service.limiter.headers(who))
        raise


def _encode(tok, text: str) -> list[int]:
    """Token ids of a templated prompt (the template holds any bos). The Rust tokenizer directly where there is
    one: transformers' wrapper around it costs more than the encoding itself, once per request."""
    fast = getattr(tok, "backend_tokenizer", None)
    if fast is not None:
        return fast.encode(text, add_special_tokens=False).ids
    return tok(text, add_special_tokens=False)["input_ids"]


def _no_model(name: str) -> APIError:
    return APIError(404, f"The model `{name}` does not exist or you do not have access to it.", param="model",
                    code="model_not_found", reason="model_not_found")


async def _moderate(moderator: Moderator, texts: list[str]):
    if isinstance(moderator.classifier, HFClassifier):  # a model: keep it off the event loop
        return await asyncio.to_thread(moderator.check_many, texts)
    return moderator.check_many(texts)


def _count_moderation(m: Metrics, direction: str, v, rid: str) -> None:
    m.moderation.labels(direction, str(v.flagged).lower()).inc()
    for c in v.flagged_categories:
        m.moderation_categories.labels(direction, c).inc()
    # Every decision with its scores, never the text: a flag at info, a pass at debug.
    if v.flagged:
        log.info("moderation %s request=%s flagged=%s", direction, rid,
                 ",".join(f"{c}:{v.category_scores[c]:.2f}" for c in v.flagged_categories))
    elif log.isEnabledFor(logging.DEBUG):
        log.debug("moderation %s request=%s passed (highest %s)", direction, rid,
                  max(v.category_scores.items(), key=lambda kv: kv[1], default=("-", 0))[0])


class _Choice:
    def __init__(self, tok, stop, hold):
        self.text = ReplyText(tok, stop or (), hold=hold)
        self.delivered = ""      # text the client has (or will get): what passed the moderation filter
        self.streamed = False    # some of it has gone out
        self.n_tokens = 0
        self.finish: Optional[str] = None


def _event(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def chunk_encoder(cid: str, model: str, created: int, fingerprint: str, with_usage: bool):
    """`one(index, delta, finish=None)` -> one streamed chunk as an SSE event, the bytes `_event(chunk(...))` would
    give. Everything but the choice is the same in every chunk of a reply, so it is encoded once, not per token."""
    dumps = functools.partial(json.dumps, separators=(",", ":"))
    before, after = dumps(chunk(cid, model, created, ["@"], fingerprint)).split('"@"')  # around the one choice
    after = after[:-1] + (',"usage":null}' if with_usage else "}")

    def one(i: int, delta: dict, finish: Optional[str] = None) -> bytes:
        choice = f'{{"index":{i},"delta":{dumps(delta)},"logprobs":null,"finish_reason":{dumps(finish)}}}'
        return f"data: {before}{choice}{after}\n\n".encode()

    return one


def _deliver(events: list) -> None:
    for req, choice, token, finish in events:
        req.on_token(choice, token, finish)


class _Run:
    """One chat completion in flight: the engine's tokens in, text out. Everything runs on the event loop."""

    def __init__(self, service: Service, req: ChatCompletionRequest, rid: str, prompt_tokens: int, t0: float):
        self.service, self.req, self.rid, self.prompt_tokens, self.t0 = service, req, rid, prompt_tokens, t0
        self.cid, self.created = completion_id(), now()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.moderator = service.moderator if service.cfg.moderation.output else None
        self.interval = service.cfg.stream_interval if req.stream else 1
        hold = self.moderator.holdback if self.moderator is not None else None
        self.choices = [_Choice(service.tok, req.stop, hold) for _ in range(req.n)]
        self.request = None
        self.error: Optional[str] = None
        self.first_text: Optional[float] = None
        self.closed = False

    def on_token(self, choice: int, token: int, finish: Optional[str]) -> None:
        self.queue.put_nowait((choice, token, finish))

    @property
    def completion_tokens(self) -> int:
        return sum(c.n_tokens for c in self.choices)

    async def _pieces(self):
        """Lists of (choice, new text, finish_reason or None) as the replies grow, one list per wake-up: whatever
        arrived meanwhile is merged, so a slow reader gets fewer, longer chunks instead of falling behind."""
        open_ = set(range(len(self.choices)))
        text: dict[int, str] = {}   # released text not yet handed on, per choice
        tokens: dict[int, int] = {}  # tokens since a choice's last piece went out
        while open_:
            events = [await self.queue.get()]
            while not self.queue.empty():
                events.append(self.queue.get_nowait())
            for i, token, finish in events:
                c = self.choices[i]
                if c.finish is not None:
                    continue
                piece = await self._advance(i, c, token, finish)
                tokens[i] = tokens.get(i, 0) + (token >= 0)
                if piece:
                    text[i] = text.get(i, "") + piece
                if c.finish is not None:
                    open_.discard(i)
                    text.setdefault(i, "")
                    self.service.metrics.finished.labels(c.finish).inc()
            # a choice's text goes out at its end, with its first text, or every `stream_interval` tokens
            due = [i for i in sorted(text) if self.choices[i].finish is not None or
                   (text[i] and (tokens[i] >= self.interval or not self.choices[i].streamed))]
            if any(text[i] for i in due) and self.first_text is None:
                self.first_text = time.perf_counter()
                self.service.metrics.ttft.observe(self.first_text - self.t0)
            if due:
                out = [(i, text.pop(i), self.choices[i].finish) for i in due]
                for i, piece, _ in out:
                    tokens[i] = 0
                    self.choices[i].streamed |= bool(piece)
                yield out

    async def _advance(self, i: int, c: _Choice, token: int, finish: Optional[str]) -> str:
        """One engine event for choice i: the text it releases (after stop strings and moderation)."""
        if finish in ("error", "cancelled"):
            if finish == "error":
                self.error = "The generation engine failed; see the server log."
            c.finish = finish
            return ""
        piece = ""
        if token >= 0:
            c.n_tokens += 1
            piece = c.text.add(token)
        if c.text.stopped:
            finish = "stop"
            self.request.stop_choice(i)  # a stop string: the engine lets this row go
        if finish is not None:
            piece += c.text.finish()
        if piece and self.moderator is not None:
            v = (await _moderate(self.moderator, [self.moderator.window(c.delivered, piece)]))[0]
            if v.flagged:
                _count_moderation(self.service.metrics, "output", v, self.rid)
                piece, finish = "", "content_filter"
                self.request.stop_choice(i)
            elif finish is not None:
                _count_moderation(self.service.metrics, "output", v, self.rid)
        c.delivered += piece
        c.finish = finish
        return piece

    async def finished(self) -> None:
        async for _ in self._pieces():
            pass

    def choices_json(self) -> list[dict]:
        return [{"index": i, "message": {"role": "assistant", "content": c.delivered, "refusal": None},
                 "logprobs": None, "finish_reason": c.finish} for i, c in enumerate(self.choices)]

    async def chunks(self):
        """The stream's server-sent events (`data: <chat.completion.chunk>\\n\\n` each, then `data: [DONE]`), as
        bytes, one piece per wake-up: every event that is due then goes out in one write, not one write each (the
        role with the first text, the last text with its finish_reason, the usage and [DONE]). What a client
        parses is the same events either way; the writes are what cost."""
        with_usage = bool(self.req.stream_options and self.req.stream_options.include_usage)
        one = chunk_encoder(self.cid, self.service.model_name, self.created, FINGERPRINT, with_usage)
        out = [one(i, {"role": "assistant", "content": ""}) for i in range(len(self.choices))]
        async for batch in self._pieces():
            if self.error:
                out.append(_event({"error": {"message": self.error, "type": "server_error", "param": None,
                                             "code": None}}))
                yield b"".join(out)
                return
            for i, piece, finish in batch:
                if piece:
                    out.append(one(i, {"content": piece}))
                if finish is not None:
                    out.append(one(i, {}, finish))
            if any(c.finish is None for c in self.choices):
                yield b"".join(out)
                out = []
        if with_usage:
            out.append(_event(chunk(self.cid, self.service.model_name, self.created, [], FINGERPRINT,
                                    usage(self.prompt_tokens, self.completion_tokens))))
        out.append(b"data: [DONE]\n\n")
        yield b"".join(out)

    def close(self, lease) -> None:
        """The request is over (done, failed, or the client left): free its rows and give back unused tokens."""
        if self.closed:
            return
        self.closed = True
        if self.request is not None and any(c.finish is None for c in self.choices):
            self.request.cancel()
            for c in self.choices:
                if c.finish is None:
                    c.finish = "cancelled"
                    self.service.metrics.finished.labels("cancelled").inc()
        self.service.metrics.completion_tokens.inc(self.completion_tokens)
        lease.release(self.prompt_tokens + self.completion_tokens)
        log.debug("request=%s key=%s prompt_tokens=%d completion_tokens=%d finish=%s seconds=%.3f", self.rid,
                 lease.who, self.prompt_tokens, self.completion_tokens,
                 ",".join(str(c.finish) for c in self.choices), time.perf_counter() - self.t0)
