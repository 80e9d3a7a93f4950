"""Keeping torch's CPU thread pools from throttling each other.

torch on Linux runs its CPU parallel regions on GNU OpenMP (libgomp), and libgomp keeps one
pool of worker threads for every thread that ever ran a parallel region, for that thread's
whole life. Once the pools together hold more threads than the machine has cores, libgomp
makes every worker spin ~100 times instead of ~300,000 before it sleeps, so each small
parallel op pays a futex sleep and wake-up: on 2 cores, small ops (a [64, 128] × [128, 256]
linear and an index_add_) ran 5-9× slower on a thread while another thread that had once run
torch ops sat idle (357K context switches in 20K iterations instead of none), and the engine's
decode step slowed 2.5× when it ran on a thread other than the one that built it — which is
what a server does (the engine on its own thread, the model loaded on the main one, the router
and the prefetch loads on worker threads).

`release_openmp_threads` (OpenMP 5's omp_pause_resource_all, soft) frees the calling thread's
pool and takes its threads out of libgomp's count; the next parallel region on that thread
builds a new one. Threads that do occasional torch work beside the engine call it when done
(`side_work`); the thread that built an engine calls it before another thread runs it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from collections.abc import Iterator

_OMP_PAUSE_SOFT = 1


@functools.cache
def _pause_all():
    """libgomp's omp_pause_resource_all from the copy this process loaded (torch's own, in
    torch/lib), or None: not Linux, another OpenMP runtime (whose pools do not throttle this
    way; not measured here), or a libgomp before OpenMP 5 (GCC < 9)."""
    import torch  # noqa: F401  (loads the OpenMP runtime torch was built with)

    try:
        with open(f"/proc/{os.getpid()}/maps") as f:
            paths = {line.split()[-1] for line in f if "/libgomp" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            fn = ctypes.CDLL(path).omp_pause_resource_all  # already loaded: the same copy
        except (OSError, AttributeError):
            continue
        fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
        return fn
    return None


def openmp_release_available() -> bool:
    return _pause_all() is not None


def release_openmp_threads() -> bool:
    """Free the calling thread's OpenMP worker pool; True when there was a runtime to ask (a
    thread inside a parallel region is refused by libgomp, and keeps its pool)."""
    fn = _pause_all()
    return fn is not None and fn(_OMP_PAUSE_SOFT) == 0


@contextlib.contextmanager
def side_work() -> Iterator[None]:
    """Torch work on a thread other than the engine's (a prefetch load, a routing query):
    the thread's OpenMP pool is freed when it ends, so the engine's parallel ops are not
    throttled while this thread sits idle."""
    try:
        yield
    finally:
        release_openmp_threads()


def as_side_work(fn, *args):
    """fn(*args) under `side_work`: for asyncio.to_thread, whose worker threads live on."""
    with side_work():
        return fn(*args)
