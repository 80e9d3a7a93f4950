"""`AsyncEngine`: the engine's step loop in one thread; HTTP handlers only enqueue and await.

The `Engine` is single-threaded by design (its scheduler, pool bookkeeping and KV blocks have no
locks). One thread owns it: it runs every command a handler sends (add requests, abort them, load
an expert, read stats) between steps, then steps while there is work and hands the outputs to
the `OutputCollector` of the handler that waits for them — one wake-up of the event loop per
step. A collector merges the outputs its handler has not read yet, so a client that stops
reading costs one output per request, not one per step. A handler that goes away (client
disconnect) sends an abort that the loop runs before its next step, so the sequence and its KV
blocks are freed within one step.
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

from expertswitch.engine import Engine
from expertswitch.engine.request import RequestOutput
from expertswitch.errors import ParallelError
from expertswitch.utils.threads import release_openmp_threads

log = logging.getLogger("expertswitch.server")


class EngineDead(RuntimeError):
    """The step loop stopped (closed, or an internal error it could not recover from)."""


class ClientGone(Exception):
    """The client of a request went away (its collector was closed)."""


class OutputCollector:
    """The outputs of one HTTP request's engine requests; lives on the event loop."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self._latest: dict[str, RequestOutput] = {}  # not read yet, merged per request
        self._ready = asyncio.Event()
        self.closed = False

    def put(self, out: RequestOutput) -> None:
        prev = self._latest.get(out.request_id)
        if prev is not None:  # the handler is behind: merge (latest text and state, all tokens)
            prev.new_token_ids.extend(out.new_token_ids)
            out.new_token_ids = prev.new_token_ids
        self._latest[out.request_id] = out
        self._ready.set()

    def close(self) -> None:
        """The client left: `get` raises ClientGone from now on."""
        self.closed = True
        self._ready.set()

    async def get(self) -> list[RequestOutput]:
        """Every output that arrived since the last call (waits for at least one)."""
        while not self._latest and not self.closed:
            self._ready.clear()
            await self._ready.wait()
        if self.closed:
            raise ClientGone()
        outs = list(self._latest.values())
        self._latest.clear()
        return outs


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._waiters: dict[str, OutputCollector] = {}  # touched only by the loop thread
        self._lock = threading.Lock()  # closing + enqueueing are atomic: no command is lost
        self._closing = False
        self.error: str | None = None  # why the loop died, if it did
        self.steps = 0
        self._thread = threading.Thread(target=self._run, name="expertswitch-engine",
                                         daemon=True)  # fmt: skip
        # the engine runs on its own thread from now on: the OpenMP pool this thread built
        # while loading it would throttle every CPU op of its steps (utils/threads.py)
        release_openmp_threads()
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closing

    # called from the event loop ------------------------------------------------------------

    def _put(self, item) -> bool:
        with self._lock:
            if self._closing:
                return False
            self._commands.put(item)
            return True

    def post(self, fn: Callable, *args) -> None:
        """Run fn(*args) on the engine thread, not waiting for it (nothing if it is shut
        down): for cleanup that must not be lost to a cancelled task."""
        self._put((fn, args, Future()))

    async def call(self, fn: Callable, *args):
        """Run fn(*args) on the engine thread (between steps); its result or its exception."""
        fut: Future = Future()
        if not self._put((fn, args, fut)):
            raise EngineDead(self.error or "the engine is shut down")
        return await asyncio.wrap_future(fut)

    async def submit(self, make: Callable[[Engine], list[str]],
                     collector: OutputCollector) -> list[str]:  # fmt: skip
        """`make(engine)` adds requests on the engine thread (all or none) and returns their
        ids; `collector` receives their RequestOutputs, each request's last with `finished`."""

        def add() -> list[str]:
            rids = make(self.engine)
            for rid in rids:
                self._waiters[rid] = collector
            return rids

        try:
            return await self.call(add)
        except asyncio.CancelledError:  # `add` may still run: abort whatever it adds
            collector.close()
            self._put((self._abort_closed, (collector,), None))
            raise

    def abort(self, request_id: str) -> None:
        """Abort without awaiting: safe from a handler being cancelled (client gone)."""
        self._put((self._abort, (request_id,), None))

    @property
    def in_flight(self) -> int:
        """Requests a handler awaits (read on the engine thread, e.g. through `call`)."""
        return len(self._waiters)

    def close(self, timeout: float = 30.0) -> None:
        if self._put((self._shutdown, (), None)):
            self._thread.join(timeout)

    # the engine thread ---------------------------------------------------------------------

    def _abort(self, request_id: str) -> None:
        self._waiters.pop(request_id, None)
        self.engine.abort(request_id)

    def _abort_closed(self, collector: OutputCollector) -> None:
        for rid in [r for r, c in self._waiters.items() if c is collector]:
            self._abort(rid)

    def _shutdown(self) -> None:
        with self._lock:
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
                else:
                    self.engine.idle()  # expert-parallel serving: heartbeat the other ranks
        except BaseException as e:  # noqa: BLE001 — reported to every waiter, then the loop ends
            self.error = f"engine loop stopped: {type(e).__name__}: {e}"
            log.error("%s\n%s", self.error, traceback.format_exc())
        finally:
            with self._lock:
                self._closing = True
            self._fail_all(self.error or "the server is shutting down")
            self._fail_commands()
            with contextlib.suppress(Exception):
                self.engine.close()

    def _drain(self, block: bool) -> None:
        try:
            item = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            fn, args, fut = item
            if fut is None:  # fire and forget (abort, shutdown): an error is logged, not fatal
                try:
                    fn(*args)
                except Exception:
                    log.exception("engine command %s failed", getattr(fn, "__name__", fn))
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
        except ParallelError:  # the ranks no longer step together: this loop cannot go on
            raise
        except Exception as e:  # a bug: fail every request in flight, keep the server up
            if self.engine.mirror is not None:  # unless other ranks stepped with this one:
                raise  # where their step failed is unknown, so they can no longer follow
            msg = f"internal error in the engine step: {type(e).__name__}: {e}"
            log.error("%s\n%s", msg, traceback.format_exc())
            self._fail_all(msg)
            return
        self.steps += 1
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outs:
            collector = self._waiters.get(out.request_id)
            if collector is None:
                continue  # aborted: nobody waits
            if out.finished:
                del self._waiters[out.request_id]
            by_loop.setdefault(collector.loop, []).append((collector, out))
        for loop, items in by_loop.items():  # one wake-up per step, not one per request
            with contextlib.suppress(RuntimeError):  # a loop closed under us
                loop.call_soon_threadsafe(_deliver, items)

    def _fail_all(self, msg: str) -> None:
        for rid, collector in list(self._waiters.items()):
            with contextlib.suppress(Exception):  # best effort: the engine may be broken
                self.engine.abort(rid)
            out = RequestOutput(rid, [], [], None, None, True, "error", error=msg)
            with contextlib.suppress(RuntimeError):  # the event loop may be closed already
                collector.loop.call_soon_threadsafe(collector.put, out)
        self._waiters.clear()  # the aborts' own outputs come with the next step, to nobody

    def _fail_commands(self) -> None:
        while True:
            try:
                _, _, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            if fut is not None and fut.set_running_or_notify_cancel():
                fut.set_exception(EngineDead(self.error or "the engine is shut down"))


def _deliver(items: list[tuple[OutputCollector, RequestOutput]]) -> None:
    for collector, out in items:
        collector.put(out)
