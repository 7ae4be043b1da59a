"""OpenAI's wire format: the request bodies we accept, the objects we return, and the error shape.

Requests are pydantic models that reject what OpenAI's API rejects (unknown fields, a role it does not know, values
out of range), so a client gets a 400 naming the parameter instead of a silently different answer. Errors always
have OpenAI's body, `{"error": {"message", "type", "param", "code"}}`, with the HTTP status it would use.
"""

from __future__ import annotations

import itertools
import math
import re
import time
import uuid
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator


class APIError(Exception):
    """An error the client caused (or may retry), in OpenAI's shape. `reason` labels it in the metrics."""

    def __init__(
        self,
        status: int,
        message: str,
        type: Optional[str] = None,
        param: Optional[str] = None,
        code: Optional[str] = None,
        retry_after: Optional[float] = None,
        reason: Optional[str] = None,
        headers: Optional[dict] = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or (
            "invalid_request_error"
            if 400 <= status < 500 and status != 429
            else "rate_limit_error"
            if status == 429
            else "server_error"
        )
        self.retry_after = retry_after
        self.reason = reason or code or self.type
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response_headers(self) -> dict[str, str]:
        h = dict(self.headers)
        if self.retry_after is not None:
            h["retry-after"] = str(max(1, math.ceil(self.retry_after)))
            h["retry-after-ms"] = str(max(1, math.ceil(self.retry_after * 1000)))
        return h


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: Optional[str] = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    model: str
    messages: list[Message] = Field(min_length=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(None, ge=-(2**63), le=2**63 - 1)  # OpenAI's int64
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    # vLLM's extra parameter (the openai client sends it in extra_body): generate max_tokens tokens, end of turn or not,
    # for load tests and benchmarks that need replies of a known length.
    ignore_eos: bool = False
    # Accepted at their neutral values, refused otherwise: we would not honour them.
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logprobs: Optional[bool] = None
    user: Optional[str] = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if isinstance(v, str):
            v = [v]
        if v is not None and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    def unsupported(self) -> Optional[tuple[str, str]]:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                return name, f"{name} is not supported by this server; leave it at 0"
        if self.logprobs:
            return "logprobs", "logprobs is not supported by this server"
        return None


class ModerationRequest(_Strict):
    input: Union[str, list[str]]
    model: Optional[str] = None


def first_bad_string(obj) -> Optional[str]:
    """The dotted path of the first string (key or value) in a parsed JSON body that is not valid Unicode (a lone
    surrogate, which JSON's \\uD800 escapes allow and nothing downstream can encode), "" for the body itself, or
    None when all are valid. Walked with a stack, not recursion: the body may be nested deep."""
    stack: list[tuple[object, str]] = [(obj, "")]
    while stack:
        x, path = stack.pop()
        if isinstance(x, str):
            if not _valid_unicode(x):
                return path
        elif isinstance(x, dict):
            for k, v in x.items():
                sub = f"{path}.{k}" if path else str(k)
                if not _valid_unicode(k):
                    return path
                stack.append((v, sub))
        elif isinstance(x, list):
            stack.extend((v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(x))
    return None


def _valid_unicode(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


_PREFIX = uuid.uuid4().hex[:12]  # ids are unique, not secret: a random prefix per process and a counter
_COUNTER = itertools.count(1)


def new_id(kind: str) -> str:
    return f"{kind}-{_PREFIX}{next(_COUNTER):012x}"


def completion_id() -> str:
    return new_id("chatcmpl")


def now() -> int:
    return int(time.time())


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion(
    cid: str, model: str, choices: list[dict], prompt_tokens: int, completion_tokens: int, fingerprint: str
) -> dict:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": now(),
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk(
    cid: str, model: str, created: int, choices: list[dict], fingerprint: str, usage_: Optional[dict] = None
) -> dict:
    out = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": choices,
    }
    if usage_ is not None:
        out["usage"] = usage_
    return out


_UNION_TAG = re.compile(r"^(str|int|float|bool|none|list|dict)$|[\[\]-]")


def validation_error(errors: list[dict]) -> APIError:
    """pydantic's first complaint as OpenAI's 400, `param` the dotted path of the field."""
    e = errors[0]
    loc = []
    for x in e.get("loc", ()):
        if isinstance(x, str) and _UNION_TAG.match(x):  # pydantic names the union member it tried: not a field
            break
        if x != "body":
            loc.append(str(x))
    param = ".".join(loc) or None
    kind = e.get("type", "")
    if kind == "extra_forbidden":
        msg = f"Unrecognized request argument supplied: {param}"
    elif kind == "missing":
        msg = f"Missing required parameter: '{param}'."
    elif kind in ("json_invalid", "model_attributes_type") or not loc:
        msg = "We could not parse the JSON body of your request. The body must be a JSON object."
    elif loc[-1] == "role" or (len(loc) >= 3 and loc[0] == "messages" and kind == "literal_error"):
        msg = (
            f"Invalid value for '{param}': {e.get('input')!r} is not a supported role; supported roles are "
            f"'system', 'developer', 'user', 'assistant'."
        )
    else:
        msg = f"Invalid value for '{param}': {e.get('msg', 'invalid')}."
    return APIError(
        400, msg, param=param, code="invalid_value" if kind not in ("missing",) else None, reason="bad_request"
    )
