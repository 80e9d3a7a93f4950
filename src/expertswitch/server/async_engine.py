"""`AsyncEngine`: the engine's step loop in one thread; HTTP handlers only enqueue and await.

The `Engine` is single-threaded by design (its scheduler, pool bookkeeping and KV blocks have no
locks). One thread owns it: it runs every command a handler sends (add a request, abort one,
load an expert, read stats) between steps, then steps while there is work and hands each
request's outputs to the asyncio queue of the handler that waits for it. A handler that goes
away (client disconnect) sends an abort that the loop runs before its next step, so the
sequence and its KV blocks are freed within one step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import traceback
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from expertswitch.engine import Engine
from expertswitch.engine.request import RequestOutput

log = logging.getLogger("expertswitch.server")


@dataclass
class _Waiter:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class EngineDead(RuntimeError):
    """The step loop stopped (closed, or an internal error it could not recover from)."""


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._waiters: dict[str, _Waiter] = {}  # touched only by the loop thread
        self._closing = False
        self.error: str | None = None  # why the loop died, if it did
        self.steps = 0
        self._thread = threading.Thread(target=self._run, name="expertswitch-engine",
                                         daemon=True)  # fmt: skip
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closing

    # called from the event loop ------------------------------------------------------------

    async def call(self, fn: Callable, *args):
        """Run fn(*args) on the engine thread (between steps); its result or its exception."""
        if not self.alive:
            raise EngineDead(self.error or "the engine is shut down")
        fut: Future = Future()
        self._commands.put((fn, args, fut))
        return await asyncio.wrap_future(fut)

    async def submit(self, make: Callable[[Engine], list[str]]) -> tuple[list[str], asyncio.Queue]:
        """`make(engine)` adds requests on the engine thread (all or none) and returns their
        ids; one queue receives all their RequestOutputs, each request's last with `finished`."""
        waiter = _Waiter(asyncio.get_running_loop(), asyncio.Queue())

        def add() -> list[str]:
            rids = make(self.engine)
            for rid in rids:
                self._waiters[rid] = waiter
            return rids

        return await self.call(add), waiter.queue

    @property
    def in_flight(self) -> int:
        """Requests a handler awaits (read on the engine thread, e.g. through `call`)."""
        return len(self._waiters)

    def abort(self, request_id: str) -> None:
        """Abort without awaiting: safe from a handler being cancelled (client gone)."""
        if self.alive:
            self._commands.put((self._abort, (request_id,), None))

    def close(self, timeout: float = 30.0) -> None:
        if self._thread.is_alive():
            self._commands.put((self._shutdown, (), None))
            self._thread.join(timeout)
        self._closing = True

    # the engine thread ---------------------------------------------------------------------

    def _abort(self, request_id: str) -> None:
        self._waiters.pop(request_id, None)
        self.engine.abort(request_id)

    def _shutdown(self) -> None:
        self._closing = True

    def _run(self) -> None:
        try:
            while not self._closing:
                busy = self.engine.has_unfinished() or self.engine.has_outputs()
                self._drain(block=not busy)
                if self._closing:
                    break
                if self.engine.has_unfinished() or self.engine.has_outputs():
                    self._step()
        except BaseException as e:  # noqa: BLE001 — reported to every waiter, then the loop ends
            self.error = f"engine loop stopped: {type(e).__name__}: {e}"
            log.error("%s\n%s", self.error, traceback.format_exc())
        finally:
            self._closing = True
            self._fail_all(self.error or "the server is shutting down")
            self._fail_commands()
            self.engine.close()

    def _drain(self, block: bool) -> None:
        try:
            item = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            fn, args, fut = item
            if fut is None:
                fn(*args)
            elif fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(*args))
                except Exception as e:  # the caller's error (bad request, unknown expert, ...)
                    fut.set_exception(e)
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return

    def _step(self) -> None:
        try:
            outs = self.engine.step()
        except Exception as e:  # a bug: fail this step's requests, keep serving the others
            msg = f"internal error in the engine step: {type(e).__name__}: {e}"
            log.error("%s\n%s", msg, traceback.format_exc())
            self._fail_all(msg)
            return
        self.steps += 1
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outs:
            waiter = self._waiters.get(out.request_id)
            if waiter is None:
                continue  # aborted: nobody waits
            if out.finished:
                del self._waiters[out.request_id]
            by_loop.setdefault(waiter.loop, []).append((waiter.queue, out))
        for loop, items in by_loop.items():  # one wake-up per step, not one per request
            with contextlib.suppress(RuntimeError):  # a loop closed under us
                loop.call_soon_threadsafe(_deliver, items)

    def _fail_all(self, msg: str) -> None:
        for rid, waiter in list(self._waiters.items()):
            with contextlib.suppress(Exception):  # best effort: the engine may be broken
                self.engine.abort(rid)
            out = RequestOutput(rid, [], [], None, None, True, "error", error=msg)
            with contextlib.suppress(RuntimeError):  # the event loop may be closed already
                waiter.loop.call_soon_threadsafe(waiter.queue.put_nowait, out)
        self._waiters.clear()  # the aborts' own outputs come with the next step, to nobody

    def _fail_commands(self) -> None:
        while True:
            try:
                _, _, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            if fut is not None and fut.set_running_or_notify_cancel():
                fut.set_exception(EngineDead(self.error or "the engine is shut down"))


def _deliver(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for q, out in items:
        q.put_nowait(out)
