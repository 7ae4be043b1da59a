"""The HTTP side: OpenAI's endpoints over the engine, with keys, rate limits, size limits and moderation.

    service = Service(cfg, load=lambda: (model, tokenizer),   # in a thread of this process, or with
                      model_name="default/ppo", spawn=(folder, "auto"))  # spawn, an engine process (the default)
    service.start_loading()                                   # 503 until the model is loaded
    app = create_app(service)                                 # a FastAPI app; uvicorn runs it (serving/server.py)

Routes: POST /v1/chat/completions (stream or not), GET /v1/models, POST /v1/moderations, GET /health,
GET /metrics, GET /openapi.json, GET / (the chat page). What a request goes through: the Host header in keyless
mode (403), size limit (413), key (401), the key's request lease (429: requests per minute, in flight), the
Content-Type (415), the JSON body (400), model name (404), message count and characters (400, before anything is
tokenised), then (off the event loop for a long prompt) the template, the tokens and the prompt's moderation (400
context_length_exceeded, content_filter), the tokens per minute (429), then the engine (503 when its queue is full).

Nothing a client sends can stop the server: every exception ends its own request, in OpenAI's error shape with the
request's `x-request-id` (a 500 for what is our fault, logged with its traceback but not its message, which could
quote the request), and the engine process, should it die, is reaped and started again (Service.supervise).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import json
import logging
import math
import threading
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.inference.engine import Engine, EngineFull, SamplingParams
from serving.limits import RateLimiter, identify, load_keys
from serving.metrics import Metrics
from serving.moderation import Moderator
from serving.prompts import PromptEncoder
from serving.protocol import (
    APIError,
    ChatCompletionRequest,
    ModerationRequest,
    chunk,
    completion,
    completion_id,
    first_bad_string,
    new_id,
    now,
    usage,
    validation_error,
)
from serving.text import ReplyText

log = logging.getLogger("serving")
# Prompts of up to this many characters are templated, tokenised and moderated on the event loop (about 0.2 ms):
# a hop to a thread costs the loop more than that, in hand-offs of the GIL (measured: ~13 ms more time to first
# token at 8 streams, ~10% fewer tokens/s at 32). Longer prompts go to a thread, so none stalls the streams.
INLINE_CHARS = 4096
PAGE = Path(__file__).with_name("static") / "chat.html"
FINGERPRINT = "rlhf-pipeline"


class Service:
    """What every route shares: the model once loaded, the engine, keys, limits, the moderator, the metrics."""

    def __init__(self, cfg, load: Callable[[], tuple], model_name: str, spawn: Optional[tuple] = None):
        self.cfg = cfg
        self.model_name = model_name
        self.keys = load_keys(cfg.auth.keys_env, cfg.auth.keys_file)
        self.limiter = RateLimiter(
            cfg.limits.requests_per_minute, cfg.limits.tokens_per_minute, cfg.limits.concurrent_requests
        )
        self.moderator = Moderator.from_settings(cfg.moderation)
        self.metrics = Metrics()
        self._load = load
        self._spawn = spawn  # (checkpoint folder, precision): what an engine process loads (engine.process)
        self._remote = False
        self._model = None
        self.engine: Optional[Engine] = None
        self.tok = None
        self.prompts: Optional[PromptEncoder] = None
        self.load_error: Optional[str] = None
        self.created = now()
        self.loop: Optional[asyncio.AbstractEventLoop] = None  # the server's, set when it starts (create_app)
        self.on_load_failed: Optional[Callable[[], None]] = None
        self.restarts = 0
        self._deaths: list[float] = []  # when the engine died lately: a crash loop backs off
        self._closing = False

    def start_loading(self) -> None:
        threading.Thread(target=self._load_now, name="load", daemon=True).start()

    def _load_now(self) -> None:
        try:
            e = self.cfg.engine
            self._remote = self._spawn is not None and e.process
            if self._remote:
                from pipeline.data.tokenizer import load_tokenizer

                tok = load_tokenizer(self._spawn[0], need_chat_template=True)
            else:
                if e.threads:
                    torch.set_num_threads(int(e.threads))
                self._model, tok = self._load()
            self.tok, self.prompts = tok, PromptEncoder(tok)
            engine = self._start_engine()
            log.info(
                "model %s loaded: context %d tokens, batches of up to %d rows",
                self.model_name,
                engine.context,
                engine.max_batch,
            )
        except Exception as e:  # noqa: BLE001 — reported once, in one line, by whoever started us
            self.load_error = str(e).splitlines()[0] if str(e) else type(e).__name__
            log.error("loading the model failed: %s", self.load_error)
            if self.on_load_failed is not None:
                self.on_load_failed()

    def _start_engine(self):
        """A new engine (a process, or a thread over the loaded model), started and made the one requests go to."""
        e = self.cfg.engine
        if self._remote:
            from serving.worker import EngineProcess

            engine = EngineProcess(
                self._spawn[0],
                self._spawn[1],
                max_batch=e.max_batch,
                max_waiting=e.max_waiting,
                seed=e.seed,
                fast=e.fast_path,
                threads=e.threads,
            )
        else:
            engine = Engine(
                self._model, self.tok, max_batch=e.max_batch, max_waiting=e.max_waiting, seed=e.seed, fast=e.fast_path
            )
        engine.on_step = self._on_step
        engine.on_death = self._engine_died
        if self._remote and self.loop is not None:
            # the engine process's pipe is read on the event loop itself: its tokens need no hand-over
            engine.sink = _deliver
            done = threading.Event()
            self.loop.call_soon_threadsafe(lambda: (engine.start(self.loop), done.set()))
            if not done.wait(60):
                raise RuntimeError("the server's event loop did not take the engine's pipe")
        else:
            engine.sink = self._sink
            engine.start()
        if self._closing:  # the server stopped while this one started
            engine.stop()
            raise RuntimeError("the server is stopping")
        self.engine = engine
        self.metrics.ready.set(1)
        return engine

    def _engine_died(self, error: BaseException) -> None:
        """The supervisor: the engine died (its requests in flight have ended with an error). Until a new one is
        up, /health says loading and requests get 503 with Retry-After; the restart is counted. Deaths in a row
        back off (1 s, 2 s, ... 30 s) rather than spin."""
        if self._closing:
            return
        self.engine = None
        self.metrics.ready.set(0)
        self.metrics.engine_restarts.inc()
        self.restarts += 1
        t = time.monotonic()
        self._deaths = [d for d in self._deaths if t - d < 60] + [t]
        delay = 0.0 if len(self._deaths) <= 1 else min(30.0, 2.0 ** (len(self._deaths) - 2))
        log.error("the generation engine died (%s); starting a new one%s", error, f" in {delay:.0f} s" if delay else "")

        def restart():
            time.sleep(delay)
            try:
                self._start_engine()
                log.info("the generation engine is back (restart %d)", self.restarts)
            except Exception as e:  # noqa: BLE001 — nothing to serve with: /health says error, the log why
                if not self._closing:
                    self.load_error = f"the engine could not be restarted: {str(e).splitlines()[0] if str(e) else e!r}"
                    log.error("%s", self.load_error)

        threading.Thread(target=restart, name="engine-restart", daemon=True).start()

    def close(self) -> None:
        self._closing = True
        if self.engine is not None:
            self.engine.stop()

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
            raise APIError(
                500, f"The model failed to load: {self.load_error}", type="server_error", reason="load_failed"
            )
        engine = self.engine
        if engine is None:
            raise APIError(
                503,
                "The model is still loading; try again shortly.",
                type="server_error",
                code="model_loading",
                retry_after=2,
                reason="loading",
            )
        if engine.error is not None:  # dead, and the supervisor about to replace it
            raise APIError(
                503,
                "The generation engine is restarting; try again shortly.",
                type="server_error",
                code="model_loading",
                retry_after=2,
                reason="loading",
            )
        return engine

    # ---- the heavy part of a request (off the event loop, asyncio.to_thread, for a long prompt) --------------
    def prepare(self, messages: list[dict], moderate: bool, in_thread: bool = False):
        """The prompt's token ids (control tokens in the messages kept as text), and the moderation verdicts of
        each system/developer/user message and of the whole conversation as the model reads it."""
        ids = self.prompts.encode(messages, in_thread)
        verdicts = []
        if moderate:
            said = [x["content"] for x in messages if x["role"] != "assistant"]
            if len(messages) > 1:  # a phrase split over messages is one phrase to the model
                said.append("\n".join(x["content"] for x in messages))
            verdicts = self.moderator.check_many(said)
        return ids, verdicts

    def count_tokens(self, texts: list[str]) -> int:
        """Tokens of /v1/moderations inputs: by the served model's tokenizer, or while it loads, OpenAI's rule of
        thumb (4 bytes a token)."""
        fast = getattr(self.tok, "backend_tokenizer", None)
        if fast is not None:
            return sum(len(e.ids) for e in fast.encode_batch(texts, add_special_tokens=False))
        return sum(math.ceil(len(t.encode("utf-8")) / 4) for t in texts)


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes gets 413 before anything reads it (by Content-Length, or as it
    arrives when the client streams it without one)."""

    def __init__(self, app, limit: int, metrics: Metrics):
        self.app, self.limit, self.metrics = app, int(limit), metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = APIError(
            413,
            f"Request body too large: the limit is {self.limit} bytes.",
            code="request_too_large",
            reason="too_large",
        )
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
    """ASGI middleware, the outermost: a request id on every response (x-request-id), each request counted and timed
    by endpoint and status (a stream when its last byte goes), and the last line of defence: an exception that gets
    this far is logged (its traceback, not its message: that could quote the request) and answered with OpenAI's
    500 if no response has started. (Pure ASGI, not BaseHTTPMiddleware: that one reads the body in a task of its
    own, where the body limit's 413 would turn into a 500.)"""

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
        started = [False]
        done = [False]

        def finish():
            if not done[0]:
                done[0] = True
                self.metrics.requests.labels(endpoint, str(status[0])).inc()
                self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)

        async def sending(msg):
            if msg["type"] == "http.response.start":
                started[0] = True
                status[0] = msg["status"]
                msg = {**msg, "headers": [*msg.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(msg)
            if msg["type"] == "http.response.body" and not msg.get("more_body", False):
                finish()

        try:
            await self.app(scope, receive, sending)
        except Exception as e:  # noqa: BLE001 — one request's failure, never the server's
            if not getattr(e, "_logged", False):
                log_exception(rid, e)
            if not started[0]:
                with contextlib.suppress(Exception):
                    await _server_error()(scope, receive, sending)
        finally:
            finish()


def log_exception(rid: str, e: BaseException) -> None:
    """An unexpected exception in the log: where it happened and its type, without its message (which may hold the
    request's text), with the request id to find it by."""
    stack = "".join(traceback.format_tb(e.__traceback__))
    log.error("request=%s failed with %s (a bug: please report it)\n%s", rid, type(e).__name__, stack.rstrip())
    with contextlib.suppress(Exception):
        e._logged = True


def _server_error() -> JSONResponse:
    return _error_response(
        APIError(
            500,
            "The server had an error while processing your request. Sorry about that! "
            "You can retry your request, or report it with its x-request-id.",
            type="server_error",
            reason="internal_error",
        )
    )


_LOOPBACK_NAMES = {"localhost", "localhost.", "ip6-localhost", "ip6-loopback"}


def is_loopback_host(host: Optional[str]) -> bool:
    """Whether a Host header names this machine by a loopback name or address (with or without a port)."""
    if not host:
        return False
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:8000
        name = host[1 : host.find("]")] if "]" in host else ""
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if name in _LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class LoopbackHost:
    """ASGI middleware for the keyless (loopback-only) mode: a request whose Host header is not a loopback name is
    refused (403). A web page the user visits can point its own host name at 127.0.0.1 (DNS rebinding) and then
    talk to a keyless server as a same-origin site; the Host header is what gives it away."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
            if not is_loopback_host(host):
                self.metrics.rejections.labels("host_not_allowed").inc()
                return await _error_response(
                    APIError(
                        403,
                        "This server has no API keys, so it only answers requests addressed to a loopback name "
                        "(localhost, 127.0.0.1, [::1]); the Host header named another. Set API keys to serve "
                        "other names.",
                        code="host_not_allowed",
                        reason="host_not_allowed",
                    )
                )(scope, receive, send)
        return await self.app(scope, receive, send)


class OpenAIJSON(JSONResponse):
    """JSON that never fails to encode: a string that is not valid Unicode (a lone surrogate) comes out with a
    replacement character instead of an exception."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode(
            "utf-8", "replace"
        )


def _error_response(e: APIError) -> JSONResponse:
    return OpenAIJSON(e.body(), status_code=e.status, headers=e.response_headers())


_JSON_TYPES = ("application/json",)


def _json_content_type(request: Request) -> None:
    """A JSON body must say so: a cross-site HTML form can POST text/plain without a CORS preflight, never JSON."""
    ctype = request.headers.get("content-type", "")
    media = ctype.split(";", 1)[0].strip().lower()
    if media not in _JSON_TYPES:
        shown = (ctype[:60] + "...") if len(ctype) > 60 else ctype
        raise APIError(
            415,
            f"Invalid Content-Type header ({shown or 'none'}); expected application/json.",
            code="unsupported_media_type",
            reason="unsupported_media_type",
        )


def _parse_json(raw: bytes):
    """The body as JSON, or a 400 that says what is wrong with it."""
    try:
        return json.loads(raw or b"null")
    except RecursionError:
        raise APIError(400, "The JSON body is nested too deeply.", code="invalid_json", reason="bad_request") from None
    except UnicodeDecodeError:
        raise APIError(400, "The request body is not valid UTF-8.", code="invalid_json", reason="bad_request") from None
    except ValueError as e:
        if "integer string conversion" in str(e):
            raise APIError(
                400,
                "The JSON body has an integer with more than 4300 digits.",
                code="invalid_json",
                reason="bad_request",
            ) from None
        raise APIError(
            400,
            "We could not parse the JSON body of your request. The body must be a JSON object.",
            code="invalid_json",
            reason="bad_request",
        ) from None


_BODIES = (ChatCompletionRequest, ModerationRequest)


def _openapi_body(model) -> dict:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
        }
    }


def _openapi(app: FastAPI):
    """FastAPI's schema of the routes, with the request bodies the routes validate themselves (pydantic's JSON
    schema of protocol.py's models) under components, so that clients and fuzzers see what is accepted."""
    from fastapi.openapi.utils import get_openapi

    def schema():
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version="1", routes=app.routes)
            comps = doc.setdefault("components", {}).setdefault("schemas", {})
            for model in _BODIES:
                s = model.model_json_schema(ref_template="#/components/schemas/{model}")
                comps.update(s.pop("$defs", {}))
                comps[model.__name__] = s
            app.openapi_schema = doc
        return app.openapi_schema

    return schema


def create_app(service: Service):
    """The FastAPI app with its routes, inside the middlewares (the returned ASGI app: give it to uvicorn)."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.loop = asyncio.get_running_loop()  # where the engine's tokens are handed over (Service._sink)
        yield
        service._closing = True  # shutting down: an engine that dies now is not restarted

    app = FastAPI(title="rlhf-pipeline", docs_url=None, redoc_url=None, openapi_url="/openapi.json", lifespan=lifespan)
    app.openapi = _openapi(app)
    m = service.metrics
    limits = service.cfg.limits

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        m.rejections.labels(e.reason).inc()
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        """The router's own 404 and 405, in OpenAI's shape (OpenAI says "Invalid URL (GET /v1/x)")."""
        where = f"{request.method} {request.url.path}"
        if e.status_code == 404:
            err = APIError(404, f"Invalid URL ({where})", reason="not_found")
        elif e.status_code == 405:
            err = APIError(
                405,
                f"Invalid method for this URL ({where}); it takes {e.headers.get('allow', '?')}"
                if e.headers
                else f"Invalid method for this URL ({where})",
                type="invalid_request_error",
                reason="method_not_allowed",
                headers=dict(e.headers or {}),
            )
        else:
            err = APIError(
                e.status_code,
                str(e.detail),
                type="invalid_request_error",
                reason="bad_request",
                headers=dict(e.headers or {}),
            )
        m.rejections.labels(err.reason).inc()
        return _error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        err = validation_error(list(e.errors()))
        m.rejections.labels(err.reason).inc()
        return _error_response(err)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        """Anything else is our bug: OpenAI's 500, logged once (Accounting, outside, sees it re-raised)."""
        log_exception(getattr(request.state, "rid", "-"), e)
        m.rejections.labels("internal_error").inc()
        return _server_error()

    def authorize(request: Request) -> str:
        return identify(service.keys, request.headers.get("authorization"))

    async def body(request: Request, model, lists: dict[str, int]):
        """The request's JSON body validated as `model`: Content-Type first, then the JSON (a large body parsed
        off the event loop), lists longer than their cap (`lists`: field -> most items) refused before they are
        validated, and strings that are not valid Unicode refused before anything uses them."""
        _json_content_type(request)
        raw = await request.body()
        obj = await asyncio.to_thread(_parse_json, raw) if len(raw) > 65536 else _parse_json(raw)
        if not isinstance(obj, dict):
            raise APIError(400, "The request body must be a JSON object.", code="invalid_json", reason="bad_request")
        for field, cap in lists.items():
            v = obj.get(field)
            if isinstance(v, list) and len(v) > cap:
                raise APIError(
                    400,
                    f"Invalid '{field}': array too long. Expected an array with maximum length "
                    f"{cap}, but got an array with length {len(v)} instead.",
                    param=field,
                    code="array_above_max_length",
                    reason="bad_request",
                )
        if b"\\u" in raw:  # a lone surrogate can only come from a \uD8xx escape
            bad = first_bad_string(obj)
            if bad is not None:
                raise APIError(
                    400,
                    f"Invalid value for '{bad or 'body'}': the string is not valid Unicode (it "
                    f"holds a lone surrogate).",
                    param=bad or None,
                    code="invalid_value",
                    reason="bad_request",
                )
        try:
            return model.model_validate(obj)
        except ValidationError as e:
            raise validation_error(e.errors()) from None

    @app.get("/health")
    async def health():
        if service.load_error:
            return OpenAIJSON({"status": "error"}, status_code=500)
        if service.engine is None or service.engine.error is not None:
            return OpenAIJSON(
                {"status": "loading", "restarts": service.restarts}, status_code=503, headers={"retry-after": "2"}
            )
        return {"status": "ok", "restarts": service.restarts}

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

    @app.post("/v1/moderations", openapi_extra=_openapi_body(ModerationRequest))
    async def moderations(request: Request):
        who = authorize(request)
        lease = _acquire(service, who)
        used = 0
        try:
            req = await body(request, ModerationRequest, {"input": limits.max_moderation_inputs})
            texts = [req.input] if isinstance(req.input, str) else list(req.input)
            tokens = await asyncio.to_thread(service.count_tokens, texts)
            _charge(service, lease, tokens)
            used = tokens
            verdicts = await asyncio.to_thread(service.moderator.check_many, texts)
        finally:
            lease.release(used)
        for v in verdicts:
            _count_moderation(m, "endpoint", v, request.state.rid)
        return OpenAIJSON(
            {
                "id": new_id("modr"),
                "model": service.moderator.classifier.name,
                "results": [v.as_openai() for v in verdicts],
            },
            headers=service.limiter.headers(who),
        )

    @app.post("/v1/chat/completions", openapi_extra=_openapi_body(ChatCompletionRequest))
    async def chat_completions(request: Request):
        t0 = time.perf_counter()
        who = authorize(request)
        lease = _acquire(service, who)  # counted from here: whatever is wrong with it, it was a request
        try:
            return await _chat(request, who, lease, t0)
        except BaseException:
            lease.release(0)
            raise

    async def _chat(request: Request, who: str, lease, t0: float):
        req = await body(request, ChatCompletionRequest, {"messages": limits.max_messages})
        engine = service.ready()
        bad = req.unsupported()
        if bad:
            raise APIError(400, bad[1], param=bad[0], code="unsupported_parameter", reason="bad_request")
        if req.model != service.model_name:
            raise _no_model(req.model)
        if req.n > engine.max_batch:
            raise APIError(
                400,
                f"n={req.n} is more than this server decodes at once ({engine.max_batch}).",
                param="n",
                code="invalid_value",
                reason="bad_request",
            )
        ctx = engine.context
        messages = [{"role": "system" if x.role == "developer" else x.role, "content": x.text()} for x in req.messages]
        chars = sum(len(x["content"]) for x in messages)
        if chars > service.prompts.max_chars(ctx):  # cannot fit, whatever the text: refused before tokenising
            raise APIError(
                400,
                f"This model's maximum context length is {ctx} tokens. However, your messages have "
                f"{chars} characters, more than {ctx} tokens can hold (at most "
                f"{service.prompts.max_chars(ctx)} characters of this model's tokens). Please reduce "
                f"the length of the messages.",
                param="messages",
                code="context_length_exceeded",
            )
        moderate = bool(service.cfg.moderation.input)
        lexicon = getattr(service.moderator.classifier, "longest", None) is not None  # a model always off the loop
        if chars <= INLINE_CHARS and (lexicon or not moderate):  # less work than a thread hop costs the loop
            ids, verdicts = service.prepare(messages, moderate)
        else:
            ids, verdicts = await asyncio.to_thread(service.prepare, messages, moderate, True)
        asked = req.max_completion_tokens or req.max_tokens
        max_tokens = asked or min(service.cfg.engine.max_tokens_default or ctx, ctx - len(ids))
        if len(ids) + max(1, max_tokens) > ctx:
            raise APIError(
                400,
                f"This model's maximum context length is {ctx} tokens. However, you requested "
                f"{len(ids) + max_tokens} tokens ({len(ids)} in the messages, {max_tokens} in the "
                f"completion). Please reduce the length of the messages or completion.",
                param="messages",
                code="context_length_exceeded",
            )
        if verdicts:
            flagged = sorted({c for v in verdicts for c in v.flagged_categories})
            for v in verdicts:
                _count_moderation(m, "input", v, request.state.rid)
            if flagged:
                raise APIError(
                    400,
                    f"The prompt was refused by the moderation filter (flagged: "
                    f"{', '.join(flagged)}). Please rephrase it.",
                    param="messages",
                    code="content_filter",
                    reason="moderation_input",
                )
        _charge(service, lease, len(ids) + max_tokens * req.n)
        headers = service.limiter.headers(who)
        engine = service.ready()  # again: the engine may have been replaced while the prompt was prepared
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed,
            ignore_eos=req.ignore_eos,
        )
        run = _Run(service, req, request.state.rid, len(ids), t0)
        try:
            run.request = engine.submit(ids, params, req.n, run.on_token)
        except EngineFull:
            raise APIError(
                503,
                "The server is overloaded; try again shortly.",
                type="server_error",
                code="overloaded",
                retry_after=1,
                reason="overloaded",
            ) from None
        m.prompt_tokens.inc(len(ids))
        if not req.stream:
            try:
                await _unless_gone(request, run.finished())
            finally:  # done, failed, or the client hung up while waiting: its rows are freed either way
                run.close(lease)
            if run.error:
                raise APIError(500, run.error, type="server_error", reason="engine_error")
            return OpenAIJSON(
                completion(
                    run.cid, service.model_name, run.choices_json(), len(ids), run.completion_tokens, FINGERPRINT
                ),
                headers=headers,
            )

        async def events():
            try:
                async for c in run.chunks():
                    yield c
            except Exception as e:  # noqa: BLE001 — a bug mid-stream: the status is sent, so the error is an event
                log_exception(run.rid, e)
                yield _event(
                    {
                        "error": {
                            "message": "The server had an error while processing your request.",
                            "type": "server_error",
                            "param": None,
                            "code": None,
                        }
                    }
                )
            finally:  # also when the client went away mid-stream (Starlette cancels this generator)
                run.close(lease)

        # Server-sent events as OpenAI (and vLLM) send them: `data: <json>` lines, one chat.completion.chunk each,
        # ending `data: [DONE]`. The events of one wake-up go out in one write (run.chunks).
        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={**headers, "cache-control": "no-cache", "x-accel-buffering": "no"},
        )

    return _wrap(app, service)


_ENDPOINTS = {"/v1/chat/completions", "/v1/models", "/v1/moderations", "/health", "/metrics", "/", "/openapi.json"}


def _wrap(app: FastAPI, service: Service):
    """The app inside its middlewares, outermost first: Accounting (request id, metrics, the last-resort 500), the
    Host check (keyless mode only), the body limit. They are outside FastAPI's own stack so that every response,
    its 500s included, passes through Accounting."""
    inner = BodyLimit(app, limit=service.cfg.limits.max_body_bytes, metrics=service.metrics)
    if not service.keys:
        inner = LoopbackHost(inner, service.metrics)
    outer = Accounting(inner, service.metrics)
    outer.fastapi = app
    return outer


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


def _acquire(service: Service, who: str):
    """The key's lease on one request (requests per minute, in flight), taken before any work is done for it."""
    try:
        return service.limiter.acquire(who)
    except APIError as e:  # a 429 tells the client where it stands, as every response does
        e.headers.update(service.limiter.headers(who))
        raise


def _charge(service: Service, lease, tokens: int) -> None:
    try:
        lease.charge(tokens)
    except APIError as e:
        e.headers.update(service.limiter.headers(lease.who))
        raise


def _no_model(name: str) -> APIError:
    return APIError(
        404,
        f"The model `{name}` does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
        reason="model_not_found",
    )


async def _moderate_piece(moderator: Moderator, text: str):
    """A piece of a reply as it streams: the lexicon inline (a short window, microseconds), a model off the loop."""
    if getattr(moderator.classifier, "longest", None) is not None:
        return moderator.check_many([text])[0]
    return (await asyncio.to_thread(moderator.check_many, [text]))[0]


def _count_moderation(m: Metrics, direction: str, v, rid: str) -> None:
    m.moderation.labels(direction, str(v.flagged).lower()).inc()
    for c in v.flagged_categories:
        m.moderation_categories.labels(direction, c).inc()
    # Every decision with its scores, never the text: a flag at info, a pass at debug.
    if v.flagged:
        log.info(
            "moderation %s request=%s flagged=%s",
            direction,
            rid,
            ",".join(f"{c}:{v.category_scores[c]:.2f}" for c in v.flagged_categories),
        )
    elif log.isEnabledFor(logging.DEBUG):
        log.debug(
            "moderation %s request=%s passed (highest %s)",
            direction,
            rid,
            max(v.category_scores.items(), key=lambda kv: kv[1], default=("-", 0))[0],
        )


class _Choice:
    def __init__(self, tok, stop, hold):
        self.text = ReplyText(tok, stop or (), hold=hold)
        self.delivered = ""  # text the client has (or will get): what passed the moderation filter
        self.streamed = False  # some of it has gone out
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
        text: dict[int, str] = {}  # released text not yet handed on, per choice
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
            due = [
                i
                for i in sorted(text)
                if self.choices[i].finish is not None
                or (text[i] and (tokens[i] >= self.interval or not self.choices[i].streamed))
            ]
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
            v = await _moderate_piece(self.moderator, self.moderator.window(c.delivered, piece))
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
        return [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.delivered, "refusal": None},
                "logprobs": None,
                "finish_reason": c.finish,
            }
            for i, c in enumerate(self.choices)
        ]

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
                out.append(
                    _event({"error": {"message": self.error, "type": "server_error", "param": None, "code": None}})
                )
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
            out.append(
                _event(
                    chunk(
                        self.cid,
                        self.service.model_name,
                        self.created,
                        [],
                        FINGERPRINT,
                        usage(self.prompt_tokens, self.completion_tokens),
                    )
                )
            )
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
        log.debug(
            "request=%s key=%s prompt_tokens=%d completion_tokens=%d finish=%s seconds=%.3f",
            self.rid,
            lease.who,
            self.prompt_tokens,
            self.completion_tokens,
            ",".join(str(c.finish) for c in self.choices),
            time.perf_counter() - self.t0,
        )
