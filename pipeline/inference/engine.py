"""The generation engine: continuous batching of every request in flight over one shared KV cache.

    engine = Engine(model, tokenizer, max_batch=32)
    engine.start()                                        # a background thread owns the model from here on
    req = engine.submit(prompt_ids, SamplingParams(max_tokens=64, temperature=0.7), n=1, on_token=callback)
    req.cancel()                                          # the client went away: its rows leave at the next step

One thread runs the model; callers only submit and cancel. Each loop turn (a "step"):
  1. rows whose request was cancelled, or that the caller stopped (a stop string, the moderation filter), leave;
  2. waiting prompts join while there is room;
  3. one forward for the running rows (their newest token) and the joining prompts (prefilled) together, one
     token sampled per row (a joining row's first), rows that ended (end of turn, max_tokens, the model's
     context) leave.
So a request never waits for another to finish (what static batching does), and a new one starts within one step.
How the model runs a growing and shrinking batch (its KV cache, padding, a fast path for Llamas) is the runner's
business: pipeline/inference/runners.py.

The tokens go out through `on_token(choice, token_id, finish_reason)`; finish_reason is None while the row runs,
then "stop" (end of turn), "length" (max_tokens or the model's context), "cancelled", or "error".

A request can fail only itself: what is done per row (its seeded generator, its sampling, handing its tokens on)
is guarded per row, and a row that fails ends its own request with "error" while the others go on. A forward that
raises ends the rows that were in it with "error", and the engine starts over on an empty batch with a new runner
(the cache of a forward that failed half-way is not trusted); it takes requests as before. By default the engine
thread calls on_token itself; with `engine.sink` set, it hands each step's tokens over in one list instead
(`sink([(request, choice, token, finish), ...])`), so that a server wakes its event loop once a step, not once a
token. Callers turn tokens into text (serving/text.py) on their own side.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from pipeline.inference.runners import make_runner

log = logging.getLogger(__name__)


# Temperatures below this are greedy (vLLM's _SAMPLING_EPS): dividing logits by a smaller one overflows to inf.
TEMPERATURE_EPS = 1e-5


@dataclass
class SamplingParams:
    """Decoding for one request, as OpenAI's API names it. temperature 0 (below TEMPERATURE_EPS) is greedy."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None
    ignore_eos: bool = False  # vLLM's extra parameter: run to max_tokens through end-of-turn (benchmarks, load tests)


@dataclass
class _Row:
    """One choice of one request: a row of the batch once admitted."""

    request: "Request"
    choice: int
    generator: Optional[torch.Generator]
    n_generated: int = 0
    last: int = -1  # the newest sampled token, not yet fed to the model
    stopped: bool = False  # the caller asked this choice to end (stop string, moderation)


@dataclass
class Request:
    """A submitted request: `n` rows that share a prompt. `cancel()` is safe from any thread."""

    id: int
    prompt: list[int]
    params: SamplingParams
    n: int
    on_token: Callable[[int, int, Optional[str]], None]
    tag: object = None  # the caller's own name for it (the engine process's parent id)
    cancelled: bool = False
    rows: list[_Row] = field(default_factory=list)

    def cancel(self) -> None:
        self.cancelled = True

    def stop_choice(self, choice: int) -> None:
        """End one choice early (its reply is complete as far as the caller is concerned)."""
        for r in self.rows:
            if r.choice == choice:
                r.stopped = True


class EngineFull(Exception):
    """More requests are waiting than the engine accepts (engine.max_waiting)."""


def sample_next(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    generators: list[Optional[torch.Generator]],
    default: torch.Generator,
) -> torch.Tensor:
    """One token per row of `logits` [B, V]: greedy where temperature is below TEMPERATURE_EPS, otherwise nucleus
    sampling at that temperature with the row's own generator (seeded requests) or the engine's. Non-finite logits
    are tamed first (NaN is never drawn, +inf counts as the largest float); a row with no finite logit at all, or
    whose draw fails, gets -1: it cannot be sampled, and the engine ends that row alone."""
    x = logits.float()
    bad = None
    if not bool(torch.isfinite(x).all()):
        x = torch.nan_to_num(x, nan=float("-inf"), posinf=torch.finfo(torch.float32).max)
        bad = ~(x > float("-inf")).any(-1)
    greedy = x.argmax(-1)
    hot = temperature >= TEMPERATURE_EPS
    if bad is not None:
        hot &= ~bad
    out = greedy
    if bool(hot.any()):
        y = x[hot]
        # shifted so the largest is 0 before dividing: nothing overflows to +inf, whatever the temperature
        y = (y - y.max(-1, keepdim=True).values) / temperature[hot, None]
        probs = torch.softmax(y, -1)
        p = top_p[hot]
        if bool((p < 1).any()):
            sorted_p, order = probs.sort(-1, descending=True)
            # keep the smallest set whose mass reaches top_p (the most likely token always stays)
            drop = sorted_p.cumsum(-1) - sorted_p >= p[:, None]
            drop[:, 0] = False  # even when top_p rounds to 0 in float32 (5e-324 does)
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        out = greedy.clone()
        rows = hot.nonzero().flatten().tolist()
        for j, i in enumerate(rows):
            try:
                out[i] = torch.multinomial(probs[j], 1, generator=generators[i] or default)[0]
            except RuntimeError:  # this row cannot be drawn; the others still are
                log.exception("sampling row %d failed", i)
                out[i] = -1
    if bad is not None and bool(bad.any()):
        out = out.clone() if out is greedy else out
        out[bad] = -1
    return out


class Engine:
    """Continuous batching over a Hugging Face causal LM (see the module docstring; the model runs in a runner)."""

    def __init__(self, model, tokenizer, max_batch: int = 32, max_waiting: int = 512, seed: int = 0, fast: bool = True):
        from pipeline.data.tokenizer import end_of_turn_ids

        self.max_batch, self.max_waiting = int(max_batch), int(max_waiting)
        # A generated pad ends the reply too: `generate` cuts there (pipeline.models.tokens.response_mask), so the
        # server does.
        self.end_ids = set(end_of_turn_ids(tokenizer)) | ({tokenizer.pad_token_id} - {None})
        cfg = model.config
        self.context = int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 2048))
        self._rng = torch.Generator(device="cpu").manual_seed(seed)
        self._waiting: deque[Request] = deque()
        self._rows: list[_Row] = []  # the running rows, in the runner's batch order
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._make_runner = lambda: make_runner(model, pad, self.max_batch, self.context, fast=fast)
        self.runner = self._make_runner()
        self._ids = itertools.count(1)
        self._wake = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._running = False
        self.steps = 0
        self.batch_sizes: deque[int] = deque(maxlen=1000)  # rows per decoding step, for the metrics
        self.decoded = 0  # rows the last step decoded (0: it decoded none)
        self.on_step: Optional[Callable[[int, int], None]] = None  # on_step(rows running, rows decoded)
        self.sink: Optional[Callable[[list], None]] = None
        self._out: list = []  # this step's (request, choice, token, finish), for the sink
        self.error: Optional[BaseException] = None
        self.on_death: Optional[Callable[[BaseException], None]] = None  # the loop died (after fail)

    # ---- the callers' side --------------------------------------------------------------------------------------
    def submit(
        self,
        prompt: list[int],
        params: SamplingParams,
        n: int,
        on_token: Optional[Callable[[int, int, Optional[str]], None]],
        tag: object = None,
    ) -> Request:
        if n > self.max_batch:
            raise ValueError(f"n={n} is more than the engine decodes at once (engine.max_batch={self.max_batch})")
        if self.error is not None:
            raise EngineFull("the engine has stopped")
        req = Request(next(self._ids), list(prompt), params, int(n), on_token, tag=tag)
        with self._wake:
            if len(self._waiting) >= self.max_waiting:
                raise EngineFull(f"{len(self._waiting)} requests are waiting (engine.max_waiting)")
            self._waiting.append(req)
            self._wake.notify()
        return req

    @property
    def running(self) -> int:
        return len(self._rows)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def start(self) -> None:
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._running = False
        with self._wake:
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # ---- the engine thread --------------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            with torch.inference_mode():
                while self._running:
                    with self._wake:
                        while self._running and not self._rows and not self._waiting:
                            self._wake.wait()
                    self.step()
        except BaseException as e:  # noqa: BLE001 — a broken model fails every request, loudly, not silently
            self.fail(e)
            if self.on_death is not None:
                self.on_death(e)

    def fail(self, e: BaseException) -> None:
        """The model broke: every request in flight or waiting ends with "error", and the engine takes no more."""
        log.exception("the engine stopped", exc_info=e)
        self.error = e
        self._out = []
        for r in self._rows:
            self._tell(r.request, r.choice, -1, "error")
        for req in self._waiting:
            for c in range(req.n):
                self._tell(req, c, -1, "error")
        self._rows, self._waiting = [], deque()
        self._flush()

    def step(self) -> None:
        """One turn of the loop (see the module docstring); public so tests can drive the engine by hand."""
        self._retire(
            [r for r in self._rows if r.request.cancelled or r.stopped],
            lambda r: "cancelled" if r.request.cancelled else None,
        )
        new = self._admit()
        running = list(self._rows)
        self.decoded = len(running)
        if running or new:
            try:
                logits = self.runner.step([r.last for r in running], [r.request.prompt for r in new])
            except Exception as e:  # noqa: BLE001 — the rows of this forward fail; the engine goes on
                self._forward_failed(running + new, e)
                return
            self._rows = running + new
            self._sample(running + new, logits)
            if running:
                self.batch_sizes.append(len(running))
                self.steps += 1
        self._flush()
        if self.on_step is not None:
            self.on_step(len(self._rows), self.decoded)

    def _forward_failed(self, rows: list[_Row], e: BaseException) -> None:
        """A forward raised: its rows end with "error", and a new runner starts from an empty batch."""
        log.exception("a forward of %d rows failed; they end with an error, the engine goes on", len(rows), exc_info=e)
        self._out = []
        for r in rows:
            self._tell(r.request, r.choice, -1, "error")
        self._rows = []
        old, self.runner = self.runner, None
        del old
        self.runner = self._make_runner()
        self._flush()
        if self.on_step is not None:
            self.on_step(0, 0)

    def _tell(self, req: "Request", choice: int, token: int, finish: Optional[str]) -> None:
        if self.sink is not None:
            self._out.append((req, choice, token, finish))
            return
        try:
            req.on_token(choice, token, finish)
        except Exception:
            log.exception("the callback of request %d raised; the request is cancelled", req.id)
            req.cancel()

    def _flush(self) -> None:
        if self._out and self.sink is not None:
            out, self._out = self._out, []
            self.sink(out)

    def _admit(self) -> list[_Row]:
        rows: list[_Row] = []
        with self._wake:
            while self._waiting and len(self._rows) + len(rows) + self._waiting[0].n <= self.max_batch:
                req = self._waiting.popleft()
                if req.cancelled:
                    continue
                try:
                    gens = [None] * req.n
                    if req.params.seed is not None:  # choice c of a seeded request draws from seed + c (mod 2**64)
                        gens = [
                            torch.Generator(device="cpu").manual_seed((int(req.params.seed) + c) % 2**64)
                            for c in range(req.n)
                        ]
                except Exception:
                    log.exception("admitting request %d failed", req.id)
                    for c in range(req.n):
                        self._tell(req, c, -1, "error")
                    continue
                for c in range(req.n):
                    row = _Row(req, c, gens[c])
                    req.rows.append(row)
                    rows.append(row)
        return rows

    def _params(self, rows: list[_Row]):
        t = torch.tensor([r.request.params.temperature for r in rows], dtype=torch.float32)
        p = torch.tensor([r.request.params.top_p for r in rows], dtype=torch.float32)
        return t, p, [r.generator for r in rows]

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Each row's next token from its logits (the prefill's or a decoding step's), handed on."""
        t, p, g = self._params(rows)
        tokens = sample_next(logits, t, p, g, self._rng).tolist()
        failed = [r for r, tok in zip(rows, tokens) if tok < 0]
        if failed:  # rows that could not be sampled (no finite logit, a failed draw) end alone, with "error"
            log.error("%d row(s) could not be sampled; their requests end with an error", len(failed))
            bad = {id(r) for r in failed}
            kept = [(r, tok) for r, tok in zip(rows, tokens) if id(r) not in bad]
            self._retire(failed, lambda r: "error")
            rows, tokens = [r for r, _ in kept], [tok for _, tok in kept]
        for r, tok in zip(rows, tokens):
            r.last = tok
        self._emit(rows, tokens)

    def _emit(self, rows: list[_Row], tokens: list[int]) -> None:
        """Hand each row's new token to its request, and retire the rows that ended with it."""
        done: dict[int, str] = {}
        for r, tok in zip(rows, tokens):
            r.n_generated += 1
            if tok in self.end_ids and not r.request.params.ignore_eos:
                done[id(r)] = "stop"
            elif r.n_generated >= r.request.params.max_tokens or len(r.request.prompt) + r.n_generated >= self.context:
                done[id(r)] = "length"
            if r.request.cancelled:
                continue
            self._tell(r.request, r.choice, tok, done.get(id(r)))
        if done:
            self._retire([r for r in rows if id(r) in done], lambda r: None)

    def _retire(self, rows: list[_Row], reason: Callable[[_Row], Optional[str]]) -> None:
        """Drop `rows` from the batch; `reason(row)` is told to the request (None: it already was)."""
        if not rows:
            return
        gone = {id(r) for r in rows}
        for r in rows:
            why = reason(r)
            if why is not None:
                self._tell(r.request, r.choice, -1, why)
        order = self.runner.remove([i for i, r in enumerate(self._rows) if id(r) in gone])
        self._rows = [self._rows[i] for i in order]
