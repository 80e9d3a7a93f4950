"""ExpertPool on real archives: a tiny llama base, three RTN-2 experts, a corrupt archive and one
made against another base, each loaded through `load_expert` as the engine does."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time

import pytest
import torch
from conftest import finetune_like, model_class, save_pair

from expertswitch.compress import CompressOptions, compress_expert, make_method
from expertswitch.compress.calibration import CalibOptions
from expertswitch.engine.pool import ExpertLoadError, ExpertPool, PoolError
from expertswitch.io.archive import DELTA_FILE, open_archive
from expertswitch.io.checkpoint import Checkpoint
from expertswitch.models.expert_weights import load_expert

EXPERTS = ("a", "b", "c")


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    """{name: archive dir} for a, b, c (one base), "corrupt" (a copy of a with one flipped byte)
    and "other" (made against a different base), plus the base's fingerprint and shapes."""
    root = tmp_path_factory.mktemp("pool")
    base_dir, first = save_pair(root / "m", seed=0)
    experts = {"a": first}
    for name, seed in (("b", 11), ("c", 12)):
        model = model_class("llama").from_pretrained(base_dir)
        finetune_like(model, seed)
        model.save_pretrained(root / name)
        experts[name] = root / name
    other_base, experts["other"] = save_pair(root / "o", seed=5)
    opts = CompressOptions(calib=CalibOptions(tokenizer="bytes"), progress=False)
    method = make_method("rtn", bits=2)
    paths = {}
    for name, d in experts.items():
        base = other_base if name == "other" else base_dir
        paths[name] = compress_expert(base, d, root / f"ar-{name}", method, opts)
    paths["corrupt"] = root / "ar-corrupt"
    shutil.copytree(paths["a"], paths["corrupt"])
    delta = paths["corrupt"] / DELTA_FILE
    data = bytearray(delta.read_bytes())
    data[-5] ^= 0xFF  # in the last tensor's bytes: the header parses, the checksum does not match
    delta.write_bytes(bytes(data))
    base = Checkpoint(base_dir)
    return paths, base.fingerprint(), {n: base.shape(n) for n in base.names()}


class Loader:
    """load_expert over the archives, counting calls; `gate` (an Event) holds every call until
    set, so a test can catch a load in flight."""

    def __init__(self, archives, gate: threading.Event | None = None):
        self.paths, self.fingerprint, self.shapes = archives
        self.calls: list[str] = []
        self.gate = gate

    def __call__(self, name):
        self.calls.append(name)
        if self.gate is not None:
            assert self.gate.wait(10), "test gate never opened"
        return load_expert(name, self.paths[name], self.fingerprint, self.shapes)


def make_pool(archives, names=EXPERTS, loader=None, **kw) -> ExpertPool:
    pool = ExpertPool(loader or Loader(archives), "cpu", **kw)
    for n in names:
        pool.register(n)
    return pool


@pytest.fixture(scope="module")
def size(archives) -> int:
    sizes = {Loader(archives)(n).nbytes() for n in EXPERTS}
    assert len(sizes) == 1, sizes  # same architecture, same method: the LRU arithmetic needs it
    return sizes.pop()


def test_loaded_tensors_are_the_archive_parts(archives):
    paths = archives[0]
    pool = make_pool(archives)
    w = pool.get("b")
    archive = open_archive(paths["b"])
    for entry in archive:
        parts = archive.parts(entry.name)
        held = w.deltas[entry.name].parts() if entry.kind == "quantized" else {
            "value": w.exact[entry.name]}  # fmt: skip
        assert held.keys() == parts.keys()
        assert all(torch.equal(held[k], parts[k]) for k in parts), entry.name
    part_bytes = sum(
        torch.Size(p["shape"]).numel() * getattr(torch, p["dtype"]).itemsize
        for p in archive.manifest["parts"].values()
    )
    assert w.nbytes() == part_bytes
    assert pool.bytes_resident() == {"device": part_bytes, "host": 0}  # CPU: one tier


def test_hits_and_misses(archives):
    loader = Loader(archives)
    pool = make_pool(archives, loader=loader)
    a = pool.get("a")
    assert pool.get("a") is a
    pool.get("b")
    s = pool.stats()
    assert (s["disk_loads"], s["device_hits"], s["host_hits"], s["switches"]) == (2, 1, 0, 2)
    assert s["switch_time_total_s"] >= s["switch_time_last_s"] > 0
    assert s["bytes_disk_to_host"] == 2 * a.nbytes() and s["bytes_host_to_device"] == 0
    assert loader.calls == ["a", "b"]
    assert pool.residency() == {"a": "device", "b": "device", "c": "disk"}
    with pytest.raises(PoolError, match="not registered"):
        pool.get("zzz")


def test_lru_eviction(archives, size):
    pool = make_pool(archives, device_budget_bytes=2 * size)
    pool.get("a")
    pool.get("b")
    pool.get("a")  # b is now the least recently used
    pool.get("c")
    assert pool.residency() == {"a": "device", "b": "disk", "c": "device"}
    assert pool.bytes_resident()["device"] == 2 * size
    pool.get("b")  # evicts a
    assert pool.residency() == {"a": "disk", "b": "device", "c": "device"}
    s = pool.stats()
    assert (s["disk_loads"], s["evictions_device"], s["device_hits"]) == (4, 2, 1)


def test_eviction_to_host_and_host_hit(archives, size):
    # A CPU device with a separate host tier runs the CUDA engine's two-tier bookkeeping.
    loader = Loader(archives)
    pool = make_pool(
        archives, loader=loader, device_budget_bytes=size, host_budget_bytes=2 * size,
        host_tier=True,
    )  # fmt: skip
    pool.get("a")
    pool.get("b")  # a leaves the device, its host copy stays
    assert pool.residency() == {"a": "host", "b": "device", "c": "disk"}
    assert pool.bytes_resident() == {"device": size, "host": 2 * size}
    pool.get("a")  # a host hit
    pool.get("c")  # the full host tier drops b, used least recently, for c's copy
    assert pool.residency() == {"a": "host", "b": "disk", "c": "device"}
    assert pool.bytes_resident() == {"device": size, "host": 2 * size}
    s = pool.stats()
    assert (s["disk_loads"], s["host_hits"], s["evictions_device"], s["evictions_host"]) == (
        3, 1, 3, 1)  # fmt: skip
    assert s["bytes_host_to_device"] == 4 * size and loader.calls == ["a", "b", "c"]
    # a host tier smaller than an expert only stages: nothing is kept, nothing fails
    pool = make_pool(archives, device_budget_bytes=size, host_budget_bytes=0, host_tier=True)
    pool.get("a")
    pool.get("b")
    assert pool.residency() == {"a": "disk", "b": "device", "c": "disk"}
    assert pool.bytes_resident() == {"device": size, "host": 0}


def test_pinned_experts_are_never_evicted(archives, size):
    pool = make_pool(archives, device_budget_bytes=2 * size)
    pool.pin("a")
    for n in ("b", "c", "b", "c"):
        pool.get(n)
        assert pool.residency()["a"] == "device"
    pool.pin("b")
    with pytest.raises(PoolError, match=r"pinned \['a', 'b'\].*unpin"):
        pool.get("c")
    pool.unpin("a")
    pool.get("c")
    assert pool.residency() == {"a": "disk", "b": "device", "c": "device"}
    assert pool.status("b").pinned and not pool.status("a").pinned


def test_in_use_experts_are_never_evicted(archives, size):
    pool = make_pool(archives, device_budget_bytes=2 * size)
    with pool.using(["a", "b"]) as batch:
        assert set(batch) == {"a", "b"} and pool.status("a").in_use == 1
        with pytest.raises(PoolError, match=r"in-use \['a', 'b'\].*release"):
            pool.get("c")
        assert pool.residency() == {"a": "device", "b": "device", "c": "disk"}
    pool.get("c")  # released: a (least recently used) goes
    assert pool.residency() == {"a": "disk", "b": "device", "c": "device"}
    with pytest.raises(PoolError, match="device budget"):
        pool.acquire(["a", "b", "c"])  # a batch larger than the device holds
    assert all(pool.status(n).in_use == 0 for n in EXPERTS)  # the partial acquire was undone
    with pytest.raises(PoolError, match="without a matching acquire"):
        pool.release(["a"])


def test_budget_smaller_than_one_expert(archives, size):
    pool = make_pool(archives, device_budget_bytes=size - 1)
    with pytest.raises(PoolError, match=f"needs {size} bytes.*raise device_budget_bytes"):
        pool.get("a")
    with pytest.raises(PoolError, match="raise device_budget_bytes"):  # again, without a load
        pool.get("a")
    assert pool.stats()["disk_loads"] == 1 and pool.residency()["a"] == "disk"
    assert pool.prefetch("a").result(timeout=10) == "disk"  # a prefetch is a hint: no error
    pool.close()


def test_bad_archives_fail_only_their_own_expert(archives):
    loader = Loader(archives)
    pool = make_pool(archives, names=("a", "corrupt", "other", "b"), loader=loader)
    with pytest.raises(ExpertLoadError, match="'corrupt'.*checksum mismatch"):
        pool.get("corrupt")
    with pytest.raises(ExpertLoadError, match="'other'.*different base"):
        pool.acquire(["a", "other"])
    assert pool.status("a").in_use == 0
    pool.get("b")
    pool.get("a")
    assert pool.residency() == {
        "a": "device",
        "corrupt": "failed",
        "other": "failed",
        "b": "device",
    }
    assert "checksum mismatch" in pool.status("corrupt").error
    with pytest.raises(ExpertLoadError, match="forget"):
        pool.get("corrupt")  # remembered: the archive is not read again
    with pytest.raises(ExpertLoadError, match="checksum"):
        pool.prefetch("corrupt").result(timeout=10)
    assert loader.calls.count("corrupt") == 1 and pool.stats()["failures"] == 2
    pool.forget("corrupt")  # retry: read (and fail) again
    assert pool.residency()["corrupt"] == "disk"
    with pytest.raises(ExpertLoadError):
        pool.get("corrupt")
    pool.register("other")
    with pytest.raises(ExpertLoadError):
        pool.prefetch("other").result(timeout=10)
    assert loader.calls.count("corrupt") == 2 and loader.calls.count("other") == 2
    pool.close()


def test_prefetch_then_get(archives):
    loader = Loader(archives)
    with make_pool(archives, loader=loader) as pool:
        assert pool.prefetch("c").result(timeout=10) == "device"
        w = pool.get("c")
        ref = loader("c")
    assert all(torch.equal(x, y) for x, y in zip(w.tensors(), ref.tensors(), strict=True))
    s = pool.stats()
    assert (s["disk_loads"], s["prefetches"], s["device_hits"], s["switches"]) == (1, 1, 1, 0)


def test_get_waits_for_a_prefetch_in_flight(archives):
    gate = threading.Event()
    loader = Loader(archives, gate)
    with make_pool(archives, loader=loader) as pool:
        fut = pool.prefetch("a")
        assert pool.prefetch("a") is fut  # one load, however often it is hinted
        _wait_for(lambda: loader.calls)
        assert pool.residency()["a"] == "loading"
        threading.Timer(0.05, gate.set).start()
        w = pool.get("a")  # blocks until the prefetch lands
    assert fut.result() == "device" and w.device.type == "cpu"
    s = pool.stats()
    assert loader.calls == ["a"] and (s["disk_loads"], s["load_waits"], s["switches"]) == (1, 1, 1)


def test_concurrent_get_loads_once(archives):
    gate = threading.Event()
    loader = Loader(archives, gate)
    pool = make_pool(archives, loader=loader)
    got = []
    threads = [threading.Thread(target=lambda: got.append(pool.get("b"))) for _ in range(2)]
    for t in threads:
        t.start()
    _wait_for(lambda: loader.calls)
    time.sleep(0.05)  # let the second thread reach the wait
    gate.set()
    for t in threads:
        t.join(10)
    assert loader.calls == ["b"] and len(got) == 2
    assert got[0].tensors()[0].data_ptr() == got[1].tensors()[0].data_ptr()
    assert pool.stats()["disk_loads"] == 1


def test_import_does_not_initialise_cuda():
    code = (
        "import torch, expertswitch.engine.pool as p; "
        "p.ExpertPool(lambda n: None, 'cpu', 1); assert not torch.cuda.is_initialized()"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.gpu
def test_cuda_prefetch_side_stream_and_pinned_host(archives, size):
    pool = ExpertPool(Loader(archives), "cuda", device_budget_bytes=size)
    for n in EXPERTS:
        pool.register(n)
    with pool:
        assert pool.prefetch("a").result(timeout=30) == "device"
        w = pool.get("a")  # the compute stream waits on the side stream's event
        ref = Loader(archives)("a")
        assert all(torch.equal(x.cpu(), y) for x, y in zip(w.tensors(), ref.tensors(), strict=True))
        assert w.device.type == "cuda"
        pool.get("b")  # a goes back to its pinned host copy
        assert pool.residency()["a"] == "host"
        assert pool._entries["a"].host.tensors()[0].is_pinned()
        pool.get("a")
        s = pool.stats()
        assert (s["disk_loads"], s["host_hits"]) == (2, 1)
        assert s["bytes_host_to_device"] == 3 * size


def _wait_for(cond, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)
