"""OpenMP worker pools of threads beside the engine's (utils/threads.py): a thread that ran a
parallel torch op keeps a pool of libgomp workers for its whole life, and once the pools hold
more threads than there are cores every parallel op of every thread sleeps and wakes through
a futex (the engine's decode step ran 2.5× slower on 2 cores). Each check runs in a fresh
process and counts the native threads Python does not know (libgomp's workers) before and
after: the pool must be gone once the side work ends."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from expertswitch.utils.threads import openmp_release_available

pytestmark = pytest.mark.skipif(
    not openmp_release_available(),
    reason="needs torch on libgomp with omp_pause_resource_all (OpenMP 5)",
)

PRELUDE = """
import os, threading, time
import torch
torch.set_num_threads(2)

def workers():  # native threads Python does not know: libgomp's workers
    python = {t.native_id for t in threading.enumerate()}
    return len({int(t) for t in os.listdir("/proc/self/task")} - python)

def parallel_op():  # an elementwise op past ATen's grain size: one OpenMP parallel region
    torch.ones(1 << 20).add_(1)

def settle(want, timeout=10.0):  # the release runs after the work's result is handed over,
    end = time.monotonic() + timeout  # and a joined thread leaves /proc a moment later
    while workers() != want and time.monotonic() < end:
        time.sleep(0.01)
    return workers()
"""


def run(body: str, first: str = "") -> None:
    """`body` in a fresh process after PRELUDE; `first`: imports before torch's."""
    code = first + PRELUDE + textwrap.dedent(body)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("other", [False, True])
def test_a_side_thread_leaves_no_workers_behind(other):
    """other: another package's libgomp loaded first (scikit-learn ships its own copy); the
    release must still reach torch's."""
    first = ""
    if other:
        pytest.importorskip("sklearn")
        first = "import sklearn.utils._openmp_helpers\n"
    run(
        first=first,
        body="""
    from expertswitch.utils.threads import release_openmp_threads, side_work
    before = workers()
    seen = {}
    def side(release):
        parallel_op()
        seen["during"] = workers()  # this thread's pool: one worker at 2 threads
        if release:
            with side_work():
                parallel_op()
        seen["after"] = workers()
        done.wait()
    for release, left in ((False, 1), (True, 0)):
        done = threading.Event()
        t = threading.Thread(target=side, args=(release,), daemon=True)  # (a failed check
        # below must not leave the process waiting for it)
        t.start()
        while "after" not in seen and t.is_alive():
            time.sleep(0.01)
        assert seen["during"] == before + 1, (seen, before)
        assert seen["after"] == before + left, (release, seen, before)
        done.set(); t.join(); seen.clear()
        assert settle(before) == before
    parallel_op()  # the main thread's own pool, freed and built again
    assert settle(before + 1) == before + 1
    assert release_openmp_threads() and settle(before) == before
    parallel_op()
    assert settle(before + 1) == before + 1
    """,
    )


def test_prefetch_threads_free_their_pools():
    """A load on the pool's prefetch thread (the engine's steps run meanwhile) leaves no
    OpenMP workers behind; the thread itself stays for the next prefetch."""
    run("""
    from expertswitch.engine.pool import ExpertPool
    from expertswitch.models.expert_weights import ExpertWeights

    def loader(name):
        parallel_op()
        return ExpertWeights(name, None, {}, {"w": torch.ones(4)})

    pool = ExpertPool(loader, "cpu")
    pool.register("a")
    before = workers()
    assert pool.prefetch("a").result(timeout=60) == "device"
    assert settle(before) == before, (workers(), before)
    assert pool.get("a").exact["w"].sum() == 4
    pool.close()
    """)


def test_async_engine_frees_the_loading_threads_pool(tmp_path):
    """The server builds the engine on its main thread, then steps it on the engine thread:
    the main thread's pool is freed at the hand-over, and the engine thread's own one is the
    only one left while requests run."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                      max_position_embeddings=256)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    run(f"""
    import asyncio
    from expertswitch.engine import Engine, SamplingParams
    from expertswitch.server.async_engine import AsyncEngine, OutputCollector

    before = workers()
    engine = Engine({str(tmp_path / "base")!r}, {{}}, tokenizer=False)
    parallel_op()  # (the load may not have needed a parallel region)
    assert workers() == before + 1
    aengine = AsyncEngine(engine)
    assert workers() == before, "the loading thread's pool outlived the hand-over"

    async def one():
        col = OutputCollector()
        sp = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        await aengine.submit(lambda e: [e.add_request([1, 2, 3], sampling=sp)], col)
        while True:
            if any(o.finished for o in await col.get()):
                return

    asyncio.run(one())
    # the engine thread ran the steps: at most its own pool is left
    assert workers() <= before + 1, (workers(), before)
    aengine.close()
    """)


def test_routing_and_index_work_on_asyncio_threads_free_their_pools():
    """The server's routing query (OpenAIServing._route) and guided decoding's vocabulary
    index (as_side_work) run on asyncio's worker threads, which live on: no pool is left."""
    run("""
    import asyncio, types
    from expertswitch.server.serving import OpenAIServing
    from expertswitch.utils.threads import as_side_work

    class Router:  # the MiniLM's forward pass, as far as OpenMP sees it: a parallel op
        def route(self, queries):
            parallel_op()
            return ["code"] * len(queries)

    serving = types.SimpleNamespace(router=Router(), _router_lock=threading.Lock())
    before = workers()

    async def main():
        got = await asyncio.to_thread(OpenAIServing._route, serving, "def f(): pass")
        assert got == "code"
        assert settle(before) == before, (workers(), before)
        assert await asyncio.to_thread(as_side_work, lambda: parallel_op() or 7) == 7
        assert settle(before) == before, (workers(), before)

    asyncio.run(main())
    """)
