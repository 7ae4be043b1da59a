"""API keys and rate limits per key, the way OpenAI's API meters them.

    keys = load_keys("RLHF_API_KEYS", "keys.txt")           # {key id: key}; ids are what logs and metrics see
    who = identify(keys, request.headers.get("authorization"))  # a key id, or raises APIError 401
    lease = limiter.acquire(who)                             # one request, before any work: or 429, Retry-After
    lease.charge(prompt + max_tokens * n)                    # its tokens, once the prompt is tokenised: or 429
    ...; lease.release(used_tokens)                          # unused tokens go back to the budget

Keys come from an environment variable (comma-separated) and/or a file (one per line, # comments). They are
compared in constant time (hmac.compare_digest against every key, so the time does not depend on which one
matched), and are never logged or echoed: logs and metrics name a key by the first 8 hex digits of its SHA-256.

Each key has three limits: requests per minute and tokens per minute (token buckets that refill continuously, so
a client that waits Retry-After seconds gets through), and requests in flight at once. A request takes its request
and its place in flight first, before its body is even read, so a request that turns out bad still counts (a
flood of bad requests meets the limit like any other); it is then charged its prompt tokens plus max_tokens for each
of its n choices, as OpenAI estimates it, and the tokens it did not generate are given back when it ends. A 429
carries `Retry-After` (and `retry-after-ms`, which the official client reads first) and the `x-ratelimit-*` headers
on every response, so existing clients back off by themselves.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from serving.protocol import APIError

ANONYMOUS = "anonymous"  # the one identity when the server runs without keys (loopback only)


def key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def load_keys(env_var: Optional[str], path: Optional[str]) -> dict[str, str]:
    from pipeline.core.errors import UserError

    keys: list[str] = []
    if env_var and os.environ.get(env_var):
        keys += [k.strip() for k in os.environ[env_var].split(",") if k.strip()]
    if path:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"auth.keys_file={path}: no such file")
        for line in p.read_text(encoding="utf-8").splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                keys.append(line)
    return {key_id(k): k for k in keys}


def identify(keys: dict[str, str], authorization: Optional[str]) -> str:
    """The id of the key in an `Authorization: Bearer <key>` header; APIError 401 when it is missing or wrong."""
    if not keys:
        return ANONYMOUS
    if not authorization:
        raise APIError(
            401,
            "You didn't provide an API key. Send it in an Authorization header as 'Authorization: Bearer YOUR_KEY'.",
            code="missing_api_key",
        )
    scheme, _, given = authorization.partition(" ")
    given = given.strip()
    if scheme.lower() != "bearer" or not given:
        raise APIError(401, "The Authorization header must be 'Bearer YOUR_KEY'.", code="invalid_api_key")
    found = None
    for kid, key in keys.items():  # every key compared, constant time each: no early exit to time
        if hmac.compare_digest(given.encode(), key.encode()):
            found = kid
    if found is None:
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
    return found


def _duration(seconds: float) -> str:
    """OpenAI's reset format: 120ms, 1s, 6m0s."""
    if seconds < 1:
        return f"{max(0, int(seconds * 1000))}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    m, s = divmod(int(math.ceil(seconds)), 60)
    return f"{m}m{s}s"


class Bucket:
    """A token bucket of `capacity` that refills `capacity` per minute, continuously."""

    def __init__(self, capacity: float):
        self.capacity = float(capacity)
        self.level = float(capacity)
        self.t = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.t) * self.capacity / 60.0)
        self.t = now

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` is available (0: now)."""
        self._refill()
        return 0.0 if self.level >= amount else (amount - self.level) * 60.0 / self.capacity

    def take(self, amount: float) -> None:
        self.level -= amount

    def give(self, amount: float) -> None:
        self._refill()
        self.level = min(self.capacity, self.level + amount)

    def reset_in(self) -> float:
        self._refill()
        return (self.capacity - self.level) * 60.0 / self.capacity


@dataclass
class Lease:
    limiter: "RateLimiter"
    who: str
    tokens: int = 0
    released: bool = False

    def charge(self, tokens: int) -> None:
        """Take `tokens` from the key's tokens-per-minute budget, or raise its 429 (the request still counted)."""
        self.limiter._charge(self, int(tokens))

    def release(self, used_tokens: int) -> None:
        if not self.released:
            self.released = True
            self.limiter._release(self, used_tokens)


class RateLimiter:
    def __init__(self, requests_per_minute: int, tokens_per_minute: int, concurrent: int):
        self.rpm, self.tpm, self.concurrent = int(requests_per_minute), int(tokens_per_minute), int(concurrent)
        self._lock = threading.Lock()
        self._req: dict[str, Bucket] = {}
        self._tok: dict[str, Bucket] = {}
        self._inflight: dict[str, int] = {}

    def _buckets(self, who: str) -> tuple[Bucket, Bucket]:
        if who not in self._req:
            self._req[who], self._tok[who] = Bucket(self.rpm), Bucket(self.tpm)
        return self._req[who], self._tok[who]

    def headers(self, who: str) -> dict[str, str]:
        with self._lock:
            rq, tk = self._buckets(who)
            rq._refill()
            tk._refill()
            return {
                "x-ratelimit-limit-requests": str(self.rpm),
                "x-ratelimit-limit-tokens": str(self.tpm),
                "x-ratelimit-remaining-requests": str(max(0, int(rq.level))),
                "x-ratelimit-remaining-tokens": str(max(0, int(tk.level))),
                "x-ratelimit-reset-requests": _duration(rq.reset_in()),
                "x-ratelimit-reset-tokens": _duration(tk.reset_in()),
            }

    def acquire(self, who: str) -> Lease:
        """A lease on one request (its place in flight and one of the minute's requests), or APIError 429 saying
        which limit and for how long."""
        with self._lock:
            rq, _ = self._buckets(who)
            if self._inflight.get(who, 0) >= self.concurrent:
                raise APIError(
                    429,
                    f"Too many requests in flight: the limit is {self.concurrent} at once. "
                    f"Please try again when one has finished.",
                    type="requests",
                    code="rate_limit_exceeded",
                    retry_after=1.0,
                    reason="concurrency",
                )
            wait = rq.wait_for(1)
            if wait > 0:
                raise APIError(
                    429,
                    f"Rate limit reached on requests per min (RPM): limit {self.rpm}. Please try "
                    f"again in {_duration(wait)}.",
                    type="requests",
                    code="rate_limit_exceeded",
                    retry_after=wait,
                    reason="requests",
                )
            rq.take(1)
            self._inflight[who] = self._inflight.get(who, 0) + 1
            return Lease(self, who)

    def _charge(self, lease: Lease, tokens: int) -> None:
        with self._lock:
            _, tk = self._buckets(lease.who)
            if tokens > self.tpm:
                raise APIError(
                    429,
                    f"Request too large: it needs up to {tokens} tokens (prompt + max_tokens x n), "
                    f"more than the limit of {self.tpm} tokens per minute. Lower max_tokens or "
                    f"shorten the messages.",
                    type="tokens",
                    code="rate_limit_exceeded",
                    reason="tokens",
                )
            wait = tk.wait_for(tokens)
            if wait > 0:
                raise APIError(
                    429,
                    f"Rate limit reached on tokens per min (TPM): limit {self.tpm}, remaining "
                    f"{max(0, int(tk.level))}, requested {tokens}. Please try again in "
                    f"{_duration(wait)}.",
                    type="tokens",
                    code="rate_limit_exceeded",
                    retry_after=wait,
                    reason="tokens",
                )
            tk.take(tokens)
            lease.tokens += tokens

    def _release(self, lease: Lease, used: int) -> None:
        with self._lock:
            self._inflight[lease.who] = max(0, self._inflight.get(lease.who, 0) - 1)
            self._tok[lease.who].give(max(0, lease.tokens - used))
