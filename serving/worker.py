"""The engine in a process of its own, behind the same interface as `Engine` (submit, cancel, stop_choice, sink).

    engine = EngineProcess(path, precision="fp32", max_batch=32)   # spawns, loads the model there, waits for it
    req = engine.submit(prompt_ids, SamplingParams(...), n=1, on_token=None)
    engine.sink = deliver                                           # each step's tokens, as with Engine

Why a process: in one process the model's Python (a few hundred tensor ops a step) and the HTTP side share one
GIL, so on a small model the server tops out at one core however many it has. Here the engine process runs
`Engine`'s steps in its one thread, taking the commands that arrived (submit, cancel, stop a choice, stop) from one
pipe between steps; each step's tokens go back on another pipe, one message per step, and the server's event loop
reads them when the pipe wakes it (`start(loop)`; a reader thread without a loop) and turns them back into
`(request, choice, token, finish)`. (Pipes rather than multiprocessing queues: no feeder threads to hang an exit,
no semaphores to leak.)

If the process dies (killed, out of memory, a crash), the server hears it at once (the pipe closes): every request
in flight ends with "error", the process is reaped (joined, its pipes closed, no zombie left) and `on_death` is
called; the server's supervisor starts a new one (serving/app.py, Service).
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing as mp
import threading
from dataclasses import asdict
from typing import Callable, Optional

from pipeline.inference.engine import EngineFull, SamplingParams

log = logging.getLogger("serving.worker")


class RemoteRequest:
    def __init__(self, engine: "EngineProcess", rid: int, n: int, on_token):
        self.engine, self.id, self.n, self.on_token = engine, rid, n, on_token
        self.open = n  # choices not finished yet
        self.cancelled = False

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self.engine._send(("cancel", self.id))

    def stop_choice(self, choice: int) -> None:
        self.engine._send(("stop_choice", self.id, choice))


class EngineProcess:
    def __init__(
        self,
        path,
        precision: str,
        max_batch: int = 32,
        max_waiting: int = 512,
        seed: int = 0,
        fast: bool = True,
        threads: Optional[int] = None,
        start_timeout: float = 600,
    ):
        ctx = mp.get_context("spawn")  # a clean interpreter: no fork of this process's threads and locks
        self._cmd, child_cmd = ctx.Pipe(duplex=False)[::-1]  # (send end here, receive end there)
        self._out, child_out = ctx.Pipe(duplex=False)  # (receive end here, send end there)
        self._lock = threading.Lock()  # the event loop and the main thread both send commands
        self.proc = ctx.Process(
            target=_child,
            name="engine",
            daemon=True,
            args=(
                str(path),
                precision,
                dict(max_batch=max_batch, max_waiting=max_waiting, seed=seed, fast=fast),
                threads,
                child_cmd,
                child_out,
            ),
        )
        self.max_batch, self.max_waiting = int(max_batch), int(max_waiting)
        self.proc.start()
        child_cmd.close()
        child_out.close()
        msg = self._first(start_timeout)
        if msg[0] == "error":
            self.proc.join(5)
            raise RuntimeError(msg[1])
        _, self.context, self.runner_name = msg
        self._requests: dict[int, RemoteRequest] = {}
        self._ids = itertools.count(1)
        self.sink: Optional[Callable[[list], None]] = None
        self.on_step: Optional[Callable[[int, int], None]] = None  # as Engine's: (rows running, rows decoded)
        self.error: Optional[BaseException] = None
        self.running = self.waiting = self.decoded = 0
        self.on_death: Optional[Callable[[BaseException], None]] = None  # after the requests in flight have failed
        self._loop = None
        self._reader = threading.Thread(target=self._read, name="engine-reader", daemon=True)

    def _send(self, msg) -> None:
        with self._lock:
            try:
                self._cmd.send(msg)
            except (OSError, ValueError):  # the process is gone; the reader reports it
                pass

    def _recv(self, timeout: float):
        """The next message, or None after `timeout` s; ("gone",) once the process has exited."""
        try:
            if self._out.poll(timeout):
                return self._out.recv()
        except (EOFError, OSError):
            return ("gone",)
        return None if self.proc.is_alive() else ("gone",)

    def _first(self, timeout: float):
        while True:
            msg = self._recv(1.0)
            if msg is not None and msg[0] != "gone":
                return msg
            timeout -= 1
            if msg is not None:
                return ("error", f"the engine process exited ({self.proc.exitcode}) while loading")
            if timeout <= 0:
                self.proc.kill()
                return ("error", "the engine process did not finish loading in time")

    def start(self, loop=None) -> None:
        """Read the engine's messages on `loop` (an asyncio loop; call from its thread), woken by the pipe itself,
        or, without one, in a reader thread. On the loop, no thread waits for the GIL between the pipe and the
        requests, and the sink runs where the requests live."""
        if loop is None:
            self._reader.start()
            return
        fd = self._out.fileno()
        self._loop = loop

        def readable():
            while True:
                try:
                    if not self._out.poll():
                        return
                    msg = self._out.recv()
                except (EOFError, OSError):
                    msg = ("gone",)
                if not self._handle(msg):
                    return

        loop.add_reader(fd, readable)

    def submit(self, prompt: list[int], params: SamplingParams, n: int, on_token) -> RemoteRequest:
        if self.error is not None:
            raise EngineFull("the engine process has stopped")
        if len(self._requests) >= self.max_batch + self.max_waiting:
            raise EngineFull(f"{len(self._requests)} requests in flight")
        req = RemoteRequest(self, next(self._ids), int(n), on_token)
        self._requests[req.id] = req
        self._send(("submit", req.id, list(prompt), asdict(params), int(n)))
        return req

    def _read(self) -> None:
        while True:
            msg = self._recv(1.0)
            if msg is not None and not self._handle(msg):
                return

    def _handle(self, msg) -> bool:
        """One message from the engine process; False once it has no more to say."""
        if msg[0] == "gone":
            self._reap()
            code = self.proc.exitcode  # None until the reaper has joined it
            self._fail(RuntimeError("the engine process exited" + (f" ({code})" if code is not None else "")))
            return False
        if msg[0] == "stopped":
            self._reap()
            return False
        if msg[0] == "error":
            self._reap()
            self._fail(RuntimeError(msg[1]))
            return False
        _, events, self.running, self.waiting, self.decoded = msg
        out = []
        for rid, choice, token, finish in events:
            req = self._requests.get(rid)
            if req is None:
                continue
            out.append((req, choice, token, finish))
            if finish is not None:
                req.open -= 1
                if req.open == 0:
                    del self._requests[rid]
        if out and self.sink is not None:
            self.sink(out)
        elif self.sink is None:
            for req, choice, token, finish in out:
                req.on_token(choice, token, finish)
        if self.on_step is not None:
            self.on_step(self.running, self.decoded)
        return True

    def _reap(self) -> None:
        """The process is gone or going: stop reading its pipe, close both ends, join it (no zombie)."""
        if self._loop is not None:
            try:
                self._loop.remove_reader(self._out.fileno())
            except (OSError, ValueError):
                pass
        with self._lock:
            for end in (self._cmd, self._out):
                try:
                    end.close()
                except OSError:
                    pass

        def join():  # in a thread: this runs on the event loop, and an exiting interpreter takes its time
            self.proc.join(5)
            if self.proc.is_alive():  # said it failed but did not exit: make sure
                self.proc.kill()
                self.proc.join(5)

        threading.Thread(target=join, name="engine-reap", daemon=True).start()

    def _fail(self, e: BaseException) -> None:
        log.error("the engine process failed: %s", e)
        self.error = e
        events = [(req, c, -1, "error") for req in self._requests.values() for c in range(req.n)]
        self._requests.clear()
        if events and self.sink is not None:
            self.sink(events)
        elif events:
            for req, c, t, f in events:
                req.on_token(c, t, f)
        if self.on_death is not None:
            self.on_death(e)

    def stop(self) -> None:
        self.on_death = None  # stopping is not dying: nobody restarts it
        if self.proc.is_alive():
            self._send(("stop",))
            self.proc.join(10)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(5)


def _child(path, precision, engine_kwargs, threads, cmd, out) -> None:
    """The engine process: load, say ready, then one loop that takes every command waiting and runs one engine step,
    in one thread. (A second thread for the commands would wait for the GIL, which the engine's Python holds
    between tensor ops, up to the interpreter's switch interval, 5 ms, per command: a burst of 32 requests took
    a sixth of a second to admit.)"""
    import signal

    import torch

    # Ctrl-C and a SIGTERM to the process group are the server's to handle: it stops us with "stop" (and should it
    # die, we notice and exit); dying first would have the server's supervisor start another engine as it stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def send(msg):
        try:
            out.send(msg)
        except (OSError, ValueError):
            pass

    from pipeline.models.loading import load_policy
    from pipeline.inference.engine import Engine

    try:
        if threads:
            torch.set_num_threads(int(threads))
        model, tok = load_policy(path, precision)
        engine = Engine(model, tok, **engine_kwargs)
    except Exception as e:  # noqa: BLE001 — the parent reports it in one line
        send(("error", str(e).splitlines()[0] if str(e) else type(e).__name__))
        return
    requests: dict[int, object] = {}  # the parent's id -> the engine's request
    remaining: dict[int, int] = {}  # the parent's id -> choices not finished

    def sink(events):
        msg = []
        for req, choice, token, finish in events:
            msg.append((req.tag, choice, token, finish))
            if finish is not None:
                remaining[req.tag] = remaining.get(req.tag, 1) - 1
                if remaining[req.tag] <= 0:
                    requests.pop(req.tag, None)
                    remaining.pop(req.tag, None)
        send(("tokens", msg, engine.running, engine.waiting, engine.decoded))

    def command(c) -> bool:
        """Carry out one command; False for stop."""
        if c[0] == "submit":
            _, rid, prompt, params, n = c
            remaining[rid] = n
            try:
                requests[rid] = engine.submit(prompt, SamplingParams(**params), n, on_token=None, tag=rid)
            except (EngineFull, ValueError):
                remaining.pop(rid, None)
                send(("tokens", [(rid, i, -1, "error") for i in range(n)], engine.running, engine.waiting, 0))
        elif c[0] in ("cancel", "stop_choice"):
            req = requests.get(c[1])
            if req is not None:
                req.cancel() if c[0] == "cancel" else req.stop_choice(c[2])
        elif c[0] == "stop":
            return False
        return True

    engine.sink = sink
    send(("ready", engine.context, type(engine.runner).__name__))
    parent = mp.parent_process()
    with torch.inference_mode():
        while True:
            busy = engine.running or engine.waiting
            try:  # every command waiting; with nothing to generate, wait for one (a second at a time)
                if cmd.poll(0 if busy else 1.0):
                    go = True
                    while go and cmd.poll(0):
                        go = command(cmd.recv())
                    if not go:
                        break
                elif not busy and parent is not None and not parent.is_alive():
                    break  # the server was killed: nobody left to serve
            except (EOFError, OSError):  # the server is gone
                break
            if engine.running or engine.waiting:
                try:
                    engine.step()
                except Exception as e:  # noqa: BLE001 — every request fails, the parent says why, in one line
                    engine.fail(e)
                    send(("error", f"the generation engine failed: {str(e).splitlines()[0] if str(e) else e!r}"))
                    return
    send(("stopped",))
