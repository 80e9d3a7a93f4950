"""Keeping torch's CPU thread pools from throttling each other.

torch on Linux runs its CPU parallel regions on GNU OpenMP (libgomp), and libgomp keeps one
pool of worker threads for every thread that ever ran a parallel region, for that thread's
whole life. Once the pools together hold more threads than the machine has cores (the CPUs of
the process's affinity mask), libgomp makes every worker spin ~100 times instead of ~300,000
before it sleeps, so each small parallel op pays a futex sleep and wake-up: on 2 cores, small
ops (a [64, 128] × [128, 256] linear and an index_add_) ran 5-9× slower on a thread while
another thread that had once run torch ops sat idle (357K context switches in 20K iterations
instead of none), and the engine's decode step slowed 2.5× when it ran on a thread other than
the one that built it — which is what a server does (the engine on its own thread, the model
loaded on the main one, the router and the prefetch loads on worker threads).

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
    """omp_pause_resource_all of the OpenMP runtime torch itself links (looked up through
    libtorch_cpu, whose dependencies dlsym searches: another copy loaded by another package,
    e.g. scikit-learn's libgomp, is not it), when that runtime is libgomp; else None: not
    Linux, another runtime (whose pools do not throttle this way; not measured here), a
    libgomp before OpenMP 5 (GCC < 9), or anything unexpected — releasing is an optimisation
    and must never fail the caller."""
    try:
        import torch

        lib = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
        if not os.path.exists(lib):
            return None
        fn = ctypes.CDLL(lib).omp_pause_resource_all  # (already loaded: the same copy)
        info = _DlInfo()
        libc = ctypes.CDLL(None)
        if not libc.dladdr(ctypes.cast(fn, ctypes.c_void_p), ctypes.byref(info)):
            return None
        if not os.path.basename(os.fsdecode(info.dli_fname or b"")).startswith("libgomp"):
            return None
        fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
        return fn
    except Exception:  # noqa: BLE001 — no runtime to ask: nothing is released
        return None


class _DlInfo(ctypes.Structure):
    """dladdr's Dl_info: which loaded library a symbol lives in."""

    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]  # fmt: skip


def openmp_release_available() -> bool:
    return _pause_all() is not None


def release_openmp_threads() -> bool:
    """Free the calling thread's OpenMP worker pool; True when libgomp did (False: no libgomp
    to ask, or a thread inside a parallel region, which keeps its pool). Its cost is the
    pool's rebuild at the thread's next parallel op: ~0.1-0.3 ms with 2 threads here, more
    on a host with many cores."""
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
