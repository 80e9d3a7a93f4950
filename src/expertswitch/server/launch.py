"""Build the engine, the router and the app, and run them under uvicorn.

run_server(base, {"math": "math.delta"}, router="router/", port=8000)   # blocks
with ServerThread(app) as srv: srv.url                                   # tests, benchmarks

Expert-parallel serving (`torchrun ... -m expertswitch.cli serve --expert-parallel-size N`):
rank 0 runs `build_app` and the HTTP server; every other rank runs `follow`, which replays rank
0's engine operations and steps with it (engine/mirror.py).
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from expertswitch.errors import ConfigError
from expertswitch.server.app import create_app
from expertswitch.server.async_engine import AsyncEngine
from expertswitch.server.serving import ServerConfig


def build_app(base: str | Path, experts: dict[str, str | Path], router: str | Path | None = None,
              device: str = "auto", dtype=None, cfg: ServerConfig | None = None,
              **engine_options):  # fmt: skip
    """(app, async engine): the engine loads the base; experts are checked now and load on first
    use. The caller closes the async engine when done. Under expert parallelism this is rank
    0's part; the other ranks run `follow` with the same arguments."""
    engine = make_engine(base, experts, device, dtype, **engine_options)
    rt = None
    try:
        if router is not None:
            from expertswitch.router import load_router

            rt = load_router(router, device="cpu")  # a MiniLM on the CPU: ~ms per query
        aengine = AsyncEngine(engine)
    except BaseException:
        engine.close()
        raise
    try:
        return create_app(aengine, rt, cfg), aengine
    except BaseException:
        aengine.close()
        raise


def make_engine(base, experts, device: str = "auto", dtype=None, **engine_options):
    """The serving engine; with expert_parallel_size > 1 (under torchrun) mirrored: rank 0
    leads, the others follow."""
    import torch

    from expertswitch.engine import Engine
    from expertswitch.engine.mirror import StepMirror
    from expertswitch.utils.imports import resolve_device

    device = resolve_device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    engine = Engine(base, experts, device=device, dtype=dtype, **engine_options)
    if engine.parallel:
        engine.mirror = StepMirror()
    return engine


def follow(base, experts, device: str = "auto", dtype=None, **engine_options) -> None:
    """A rank other than 0 of an expert-parallel server: the same engine as rank 0's, stepping
    with it until rank 0 stops (returns) or fails (a ParallelError)."""
    engine = make_engine(base, experts, device, dtype, **engine_options)
    try:
        engine.mirror.follow(engine)
    finally:
        engine.close()


FAILED_GRACE_S = 10.0  # /health answers 503 this long before a failed parallel server exits


def stop_when_the_ranks_fail(aengine, grace_s: float | None = None) -> None:
    """Rank 0 of a server split over ranks: when its engine loop stops on an error (a rank
    died, the ranks diverged, a step failed here alone), answer 503s for grace_s, then stop
    the server (SIGTERM to this process: run_server returns, the caller exits non-zero), so
    that torchrun ends the other ranks — which may wait in a collective this rank left —
    instead of leaving them until the process group's timeout."""
    import os
    import signal
    import threading
    import time

    grace = FAILED_GRACE_S if grace_s is None else grace_s

    def watch() -> None:
        while aengine.alive:
            time.sleep(0.5)
        if aengine.error:
            time.sleep(grace)
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="expertswitch-rank-watch", daemon=True).start()


def run_server(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve until Ctrl-C or SIGTERM, then return (the caller closes the engine, which stops
    an expert-parallel server's other ranks). uvicorn shuts down gracefully on either signal,
    then raises it again under the handlers it found: here no-ops, so that the signal does not
    kill the process (SIGTERM) or raise KeyboardInterrupt (Ctrl-C) before that cleanup."""
    import signal
    import threading

    import uvicorn

    stops = (signal.SIGINT, signal.SIGTERM)
    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, lambda *_: None) for s in stops} if main else {}
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class ServerThread:
    """uvicorn serving `app` on loopback from a background thread (a real HTTP server)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.host, self.port = host, port or free_port(host)
        config = uvicorn.Config(app, host=self.host, port=self.port, log_level=log_level,
                                timeout_graceful_shutdown=2)  # fmt: skip
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="uvicorn")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 60  # a hang guard, not a speed check
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise ConfigError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
