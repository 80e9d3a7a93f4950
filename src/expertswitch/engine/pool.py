"""Expert residency for the serving engine: device ⇄ host ⇄ disk, LRU per tier, async prefetch.

Every registered expert is always on disk (its archive). The pool keeps copies in two tiers:

    device   what `get` returns and the running batch reads (a GPU, or the CPU itself)
    host     RAM, pinned on a CUDA engine so that host→device copies are DMA and can overlap
             compute; on a CPU engine host and device are the same memory and the pool keeps
             one tier (counted once)

and moves experts between them the way LoRAX (GPU / host / disk tiers, async prefetch), vLLM
(`max_loras` / `max_cpu_loras` LRU) and DeltaZip (LRU deltas on GPU and host) do:

    get       device hit → at once; host hit → copy to the device; miss → `loader` (disk) →
              host → device
    prefetch  the same path in a background thread; on CUDA the host→device copy runs on a side
              stream and records an event that `get` makes the compute stream wait on
    evict     least recently used first, per tier, to stay within its budget; never a pinned
              expert, one in use by the running batch (`acquire` / `release`) or one being
              loaded. A load stages through the host tier, which keeps that copy while its
              budget allows, so a device eviction leaves the expert on the host and switching
              back costs a copy, not a disk read.

One lock guards the bookkeeping; disk reads and copies run outside it, and a `get` of an expert
that is already loading waits for that load instead of reading the archive twice. A loader error
marks only that expert failed (`status`, `ExpertLoadError`); `forget` or `register` retries it.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

from expertswitch.errors import ConfigError, ExpertSwitchError
from expertswitch.models.expert_weights import ExpertWeights
from expertswitch.utils.threads import side_work


class PoolError(ExpertSwitchError):
    """An expert cannot be made resident: it exceeds a budget, or the tier is held by pinned or
    in-use experts."""


class PoolFullError(PoolError):
    """No room now: the tier is held by pinned, in-use or loading experts. Transient: the same
    request can succeed once others are released (an engine defers rather than fails)."""


class ExpertLoadError(ExpertSwitchError):
    """An expert's archive could not be loaded (corrupt, wrong base, ...); other experts work."""


@dataclass
class ExpertStatus:
    name: str
    residency: str  # "device" | "host" | "disk" | "failed" | "loading"
    pinned: bool
    in_use: int
    nbytes: int | None  # known once loaded
    error: str | None


@dataclass
class PoolStats:
    device_hits: int = 0  # `get` found the expert on the device
    host_hits: int = 0  # a load found the host copy (no disk read)
    disk_loads: int = 0  # loader calls that succeeded: the misses
    load_waits: int = 0  # `get` waited for a load already under way (prefetch or another thread)
    prefetches: int = 0
    bytes_disk_to_host: int = 0
    bytes_host_to_device: int = 0
    evictions_device: int = 0
    evictions_host: int = 0
    failures: int = 0
    switches: int = 0  # `get` calls that were not device hits
    # Wall time until such a `get` returned. On CUDA the host→device copy is queued, not
    # finished, by then: the compute stream waits for it, the host thread does not.
    switch_time_total_s: float = 0.0
    switch_time_last_s: float = 0.0


@dataclass
class _Entry:
    name: str
    device: ExpertWeights | None = None
    host: ExpertWeights | None = None
    nbytes: int | None = None
    ready: torch.cuda.Event | None = None  # a side-stream copy no compute stream waited on yet
    loading: Future | None = None  # its result: the tier the load reached
    error: str | None = None
    pinned: bool = False
    in_use: int = 0


class _Tier:
    """LRU order (least recent first) and bytes held; `budget` None is unlimited."""

    def __init__(self, name: str, budget: int | None):
        self.name, self.budget = name, budget
        self.lru: OrderedDict[str, int] = OrderedDict()
        self.used = 0

    def add(self, name: str, nbytes: int) -> None:
        self.lru[name] = nbytes
        self.used += nbytes

    def remove(self, name: str) -> None:
        self.used -= self.lru.pop(name)

    def touch(self, name: str) -> None:
        self.lru.move_to_end(name)

    def fits(self, nbytes: int) -> bool:
        return self.budget is None or self.used + nbytes <= self.budget


class ExpertPool:
    """Where each expert lives. `loader(name)` returns its `ExpertWeights` on the CPU and raises
    (an `ExpertSwitchError` for a corrupt archive or a wrong base) when it cannot. Budgets are
    bytes of `ExpertWeights.nbytes()`; None is unlimited. `host_tier` keeps a host tier apart
    from the device tier: by default only when the device is not the CPU (on a CPU engine both
    budgets then bound the one tier); forcing it on a CPU device exercises the two-tier path."""

    def __init__(
        self,
        loader: Callable[[str], ExpertWeights],
        device: torch.device | str,
        device_budget_bytes: int | None = None,
        host_budget_bytes: int | None = None,
        *,
        host_tier: bool | None = None,
        prefetch_workers: int = 2,
    ):
        for what, b in (("device", device_budget_bytes), ("host", host_budget_bytes)):
            if b is not None and b < 0:
                raise ConfigError(f"{what}_budget_bytes is {b}; use a byte count ≥ 0 or None")
        if prefetch_workers < 1:
            raise ConfigError(f"prefetch_workers is {prefetch_workers}; use 1 or more")
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda"
        self._two_tiers = self.device.type != "cpu" if host_tier is None else host_tier
        self._same_memory = self.device.type == "cpu" and not self._two_tiers
        if not self._two_tiers:
            given = [b for b in (device_budget_bytes, host_budget_bytes) if b is not None]
            device_budget_bytes, host_budget_bytes = min(given, default=None), 0
        self._loader = loader
        self._device = _Tier("device", device_budget_bytes)
        self._host = _Tier("host", host_budget_bytes)
        self._entries: dict[str, _Entry] = {}
        self._stats = PoolStats()
        self._lock = threading.Lock()
        self._workers = prefetch_workers
        self._executor: ThreadPoolExecutor | None = None
        self._stream: torch.cuda.Stream | None = None

    # registry ------------------------------------------------------------------------------

    def register(self, name: str) -> None:
        """Make `name` known (the loader finds its archive). Registering a failed expert again
        clears its failure, so the next `get` retries the archive."""
        with self._lock:
            e = self._entries.setdefault(name, _Entry(name))
            e.error = None

    def names(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def forget(self, name: str) -> None:
        """Drop every copy and any failure: the next `get` reads the archive again."""
        with self._lock:
            e = self._entry(name)
            flags = {"pinned": e.pinned, "in use": e.in_use, "loading": e.loading is not None}
            busy = [word for word, on in flags.items() if on]
            if busy:
                raise PoolError(
                    f"cannot forget expert {name!r}: it is {' and '.join(busy)}; unpin it, release "
                    "it or wait for its load first"
                )
            self._drop(e, self._device)
            self._drop(e, self._host)
            e.error, e.nbytes = None, None

    # residency -----------------------------------------------------------------------------

    def get(self, name: str) -> ExpertWeights:
        """The expert resident on the device (loading it, evicting others, when it is not)."""
        start = time.perf_counter()
        switched = False
        while True:
            with self._lock:
                e = self._entry(name)
                if e.error is not None:
                    raise self._load_error(e)
                if e.device is not None and e.loading is None:
                    self._touch(name)
                    if switched:
                        self._record_switch(time.perf_counter() - start)
                    else:
                        self._stats.device_hits += 1
                    return self._ready(e)
                fut, owner = e.loading, e.loading is None
                if owner:
                    if e.nbytes is not None:
                        self._check_budget(self._device, e.nbytes, name)
                    e.loading = fut = Future()
                elif not switched:
                    self._stats.load_waits += 1
            switched = True
            if owner:
                self._run_load(e, fut, strict=True)
                fut.result()  # raises this load's error (PoolError, ExpertLoadError, ...)
            else:
                wait([fut])  # its outcome shows in the entry: on the device, failed, or neither

    def prefetch(self, name: str) -> Future:
        """Start making `name` device-resident in the background; returns a Future of the tier
        it reached ("device", or "host"/"disk" when the device is full of pinned or in-use
        experts: prefetch is a hint and never raises PoolError). A loader error is the Future's
        exception and marks the expert failed."""
        with self._lock:
            e = self._entry(name)
            if e.loading is not None:
                return e.loading
            if e.error is not None or e.device is not None:
                done: Future = Future()
                if e.error is not None:
                    done.set_exception(self._load_error(e))
                else:
                    done.set_result("device")
                return done
            e.loading = fut = Future()
            self._stats.prefetches += 1
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self._workers, "expert-prefetch")
            self._executor.submit(self._prefetch_load, e, fut)
            return fut

    def wait_loads(self) -> bool:
        """Wait for every load under way (prefetches); True when there was any."""
        with self._lock:
            pending = [e.loading for e in self._entries.values() if e.loading is not None]
        wait(pending)
        return bool(pending)

    def pin(self, name: str) -> ExpertWeights:
        """Load `name` to the device and keep it there until `unpin`."""
        with self._lock:
            e = self._entry(name)
            was, e.pinned = e.pinned, True  # before the load, so no concurrent load evicts it
        try:
            return self.get(name)
        except BaseException:
            with self._lock:
                e.pinned = was
            raise

    def unpin(self, name: str) -> None:
        with self._lock:
            self._entry(name).pinned = False

    def acquire(self, names: Iterable[str]) -> dict[str, ExpertWeights]:
        """Mark the running batch's experts in use (never evicted until `release`) and return
        them device-resident. Each is marked before it is loaded, so loading the next one cannot
        evict it; on an error the ones marked are released again."""
        names = list(dict.fromkeys(names))
        marked: list[str] = []
        try:
            for n in names:
                with self._lock:
                    self._entry(n).in_use += 1
                marked.append(n)
            return {n: self.get(n) for n in names}
        except BaseException:
            self.release(marked)
            raise

    def release(self, names: Iterable[str]) -> None:
        with self._lock:
            entries = [self._entry(n) for n in dict.fromkeys(names)]
            for e in entries:
                if e.in_use == 0:
                    raise PoolError(f"release({e.name!r}) without a matching acquire")
            for e in entries:
                e.in_use -= 1

    @contextmanager
    def using(self, names: Iterable[str]) -> Iterator[dict[str, ExpertWeights]]:
        names = list(names)
        experts = self.acquire(names)
        try:
            yield experts
        finally:
            self.release(names)

    # introspection -------------------------------------------------------------------------

    def status(self, name: str) -> ExpertStatus:
        with self._lock:
            e = self._entry(name)
            return ExpertStatus(name, _residency(e), e.pinned, e.in_use, e.nbytes, e.error)

    def residency(self) -> dict[str, str]:
        with self._lock:
            return {n: _residency(e) for n, e in self._entries.items()}

    def bytes_resident(self) -> dict[str, int]:
        with self._lock:
            return {"device": self._device.used, "host": self._host.used}

    def stats(self) -> dict:
        with self._lock:
            return asdict(self._stats)

    def close(self) -> None:
        """Wait for prefetches under way and stop the prefetch threads."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def __enter__(self) -> ExpertPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # loading steps -------------------------------------------------------------------------

    def _prefetch_load(self, e: _Entry, fut: Future) -> None:
        """A prefetch thread's load; the thread's OpenMP pool freed after it, or the engine's
        CPU ops run throttled while the thread idles (utils/threads.py)."""
        with side_work():
            self._run_load(e, fut, strict=False)

    def _run_load(self, e: _Entry, fut: Future, strict: bool) -> None:
        """disk or host → device for `e`, whose `loading` is `fut`. Never raises: the outcome
        (the tier reached, or the error) goes to `fut`. `strict` (get): a device that cannot make
        room raises PoolError; otherwise (prefetch) the load stops at the host."""
        try:
            host = self._stage_host(e)
            on_device = self._stage_device(e, host, strict=strict, side_stream=not strict)
            outcome = "device" if on_device else "host" if e.host is not None else "disk"
        except BaseException as exc:  # delivered to whoever waits on fut, re-raised by `get`
            self._finish(e, fut, error=exc)
        else:
            self._finish(e, fut, result=outcome)

    def _finish(self, e: _Entry, fut: Future, result: str = "", error=None) -> None:
        with self._lock:  # cleared first, so a waiter woken by fut sees the entry settled
            if e.loading is fut:
                e.loading = None
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)

    def _stage_host(self, e: _Entry) -> ExpertWeights:
        """The expert in host memory: the host tier's copy, or a fresh read of its archive
        (kept in the host tier when it has or can make room, else only staged for the copy)."""
        with self._lock:
            if e.host is not None:
                self._stats.host_hits += 1
                self._host.touch(e.name)
                return e.host
        try:
            w = self._loader(e.name)
        except Exception as exc:
            msg = str(exc) if isinstance(exc, ExpertSwitchError) else f"{type(exc).__name__}: {exc}"
            with self._lock:
                e.error = msg
                self._stats.failures += 1
            raise self._load_error(e) from exc
        if self._cuda:
            w = w.pin_memory()  # pageable memory would make the copy synchronous
        n = w.nbytes()
        with self._lock:
            e.nbytes = n
            self._stats.disk_loads += 1
            self._stats.bytes_disk_to_host += n
            if self._two_tiers and self._make_room(self._host, n, e.name, strict=False):
                e.host = w
                self._host.add(e.name, n)
        return w

    def _stage_device(
        self, e: _Entry, host: ExpertWeights, strict: bool, side_stream: bool
    ) -> bool:
        n = host.nbytes()
        with self._lock:
            if not self._make_room(self._device, n, e.name, strict=strict):
                return False
            self._device.add(e.name, n)  # reserved before the copy: concurrent loads see it
            if self._same_memory:
                e.device = host
                return True
        try:
            dev, ready = self._copy_to_device(host, side_stream)
        except BaseException:
            with self._lock:
                self._device.remove(e.name)
            raise
        with self._lock:
            e.device, e.ready = dev, ready
            self._stats.bytes_host_to_device += n
        return True

    def _copy_to_device(self, host: ExpertWeights, side_stream: bool):
        if not self._cuda:
            return host.to(self.device), None
        if not side_stream:  # on the compute stream: later kernels are ordered after it
            return host.to(self.device, non_blocking=True), None
        with self._lock:  # two prefetch threads must not each make a stream
            if self._stream is None:
                self._stream = torch.cuda.Stream(self.device)
            stream = self._stream
        with torch.cuda.stream(stream):
            dev = host.to(self.device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(stream)
        return dev, ready

    def _ready(self, e: _Entry) -> ExpertWeights:
        """e.device, after making the current stream wait for its side-stream copy (once)."""
        if e.ready is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(e.ready)
            for t in e.device.tensors():
                # allocated on the side stream, read on this one: the allocator must not reuse
                # the memory for the side stream's next copy before this stream is done with it
                t.record_stream(stream)
            e.ready = None
        return e.device

    # eviction (under the lock) -------------------------------------------------------------

    def _check_budget(self, tier: _Tier, n: int, name: str) -> None:
        if tier.budget is not None and n > tier.budget:
            raise PoolError(
                f"expert {name!r} needs {n} bytes but the {tier.name} budget is {tier.budget} "
                f"bytes; raise {tier.name}_budget_bytes to at least {n}"
            )

    def _make_room(self, tier: _Tier, n: int, name: str, strict: bool) -> bool:
        """Evict least recently used experts from `tier` until `n` more bytes fit. Nothing is
        evicted unless enough can be. False (or PoolError when `strict`) when it cannot."""
        if tier.fits(n):
            return True
        if tier.budget is not None and n > tier.budget:
            if strict:
                self._check_budget(tier, n, name)
            return False
        victims, freed = [], 0
        for victim, size in tier.lru.items():
            if tier.used - freed + n <= tier.budget:
                break
            if self._evictable(self._entries[victim], tier):
                victims.append(victim)
                freed += size
        if tier.used - freed + n > tier.budget:
            if strict:
                raise PoolFullError(self._full_message(tier, n, name))
            return False
        for victim in victims:
            self._evict(self._entries[victim], tier)
        return True

    def _evictable(self, e: _Entry, tier: _Tier) -> bool:
        if e.loading is not None:  # its copies are the source or target of a copy under way
            return False
        # a host copy can go even when pinned or in use: the device copy is what is read
        return tier is self._host or (not e.pinned and e.in_use == 0)

    def _evict(self, e: _Entry, tier: _Tier) -> None:
        # From the device this is an eviction to host whenever the host tier still holds the
        # copy the load staged through (it keeps one while its budget allows): no copy back.
        self._drop(e, tier)
        if tier is self._device:
            self._stats.evictions_device += 1
        else:
            self._stats.evictions_host += 1

    def _touch(self, name: str) -> None:
        """A use: most recent in the device tier and in the host tier too, so that a full host
        tier drops the copies of the experts used least recently overall."""
        self._device.touch(name)
        if name in self._host.lru:
            self._host.touch(name)

    def _drop(self, e: _Entry, tier: _Tier) -> None:
        if e.name in tier.lru:
            tier.remove(e.name)
        if tier is self._device:
            e.device, e.ready = None, None
        else:
            e.host = None

    def _full_message(self, tier: _Tier, n: int, name: str) -> str:
        held = [self._entries[x] for x in tier.lru]
        pinned = [x.name for x in held if x.pinned]
        in_use = [x.name for x in held if x.in_use and not x.pinned]
        loading = [x.name for x in held if x.loading is not None]
        return (
            f"cannot make {tier.name} room for expert {name!r} ({n} bytes): the "
            f"{tier.name} budget of {tier.budget} bytes is held by pinned {pinned}, in-use "
            f"{in_use} and loading {loading} experts; raise {tier.name}_budget_bytes, unpin an "
            "expert, or release the running batch's experts"
        )

    # helpers -------------------------------------------------------------------------------

    def _entry(self, name: str) -> _Entry:
        e = self._entries.get(name)
        if e is None:
            raise PoolError(f"expert {name!r} is not registered; known: {sorted(self._entries)}")
        return e

    def _load_error(self, e: _Entry) -> ExpertLoadError:
        return ExpertLoadError(
            f"expert {e.name!r} failed to load: {e.error}. Other experts are unaffected; fix "
            f"its archive, then call forget({e.name!r}) or register({e.name!r}) to retry"
        )

    def _record_switch(self, seconds: float) -> None:
        self._stats.switches += 1
        self._stats.switch_time_total_s += seconds
        self._stats.switch_time_last_s = seconds


def _residency(e: _Entry) -> str:
    if e.error is not None:
        return "failed"
    if e.loading is not None:
        return "loading"
    return "device" if e.device is not None else "host" if e.host is not None else "disk"
