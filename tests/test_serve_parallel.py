"""The OpenAI-compatible server over expert-parallel ranks (`torchrun --nproc-per-node 2 -m
expertswitch.cli serve --expert-parallel-size 2`): rank 0 takes the HTTP requests, rank 1
replays its engine operations and steps with it (each holds half of every MoE layer's experts).
Its answers are compared with the same requests sent to a one-process server on the same
checkpoint. The ranks are real processes on gloo; the client is the official `openai` one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import httpx
import openai
import pytest
import torch
from conftest import _DIST_VARS

from expertswitch.compress import CompressOptions, compress_expert, make_method
from expertswitch.models.causal_lm import CausalLM
from expertswitch.server import ServerConfig, ServerThread, build_app
from expertswitch.server.launch import free_port

HANG_GUARD_S = 600  # a hang guard for a busy 2-core machine, not a speed check
# the ranks' collective timeout: past the leader's heartbeat (5 s), short enough that the idle
# period below would end the followers if heartbeats stopped
DIST_TIMEOUT_S = 15


def moe_checkpoint(root: Path) -> Path:
    """A tiny expertswitch_moe model (two MoE layers of 4 experts, top-2 and top-1) with a real
    BPE tokenizer and chat template, and `attn.delta`: an expert whose attention was tuned
    (deltas of MoE experts are not served yet), compressed to 4 bits."""
    from expertswitch.zoo.corpora import load_corpora
    from expertswitch.zoo.tokenizer import train_tokenizer

    corpora = load_corpora(0, scale=0.02)
    tok = train_tokenizer([d for c in corpora.values() for d in c.train[:60]], 300)
    layer = {"num_experts": 4, "k": 2, "use_residual": False, "drop_tokens": False}
    cfg = {"model_type": "expertswitch_moe", "hidden_size": 64, "intermediate_size": 96,
           "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
           "vocab_size": len(tok), "max_position_embeddings": 256, "hidden_act": "silu",
           "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
           "moe_layers": [None, layer, {**layer, "k": 1}]}  # fmt: skip
    torch.manual_seed(5)
    path = root / "moe"
    model = CausalLM.from_config(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    with torch.no_grad():
        for name, w in model.named_parameters():
            if "self_attn" in name:
                w.add_(torch.randn_like(w) * 0.05)
    model.save_pretrained(root / "attn-full")
    with warnings.catch_warnings():  # transformers cannot build expertswitch_moe: the layout
        warnings.simplefilter("ignore")  # comes from the usual linear names, which is right here
        compress_expert(path, root / "attn-full", root / "attn.delta",
                        make_method("rtn", bits=4), CompressOptions(progress=False))  # fmt: skip
    return path


@pytest.fixture(scope="module")
def moe_base(tmp_path_factory) -> Path:
    return moe_checkpoint(tmp_path_factory.mktemp("serve-ep"))


def _as_in_a_terminal() -> None:
    """A rank started from a background job inherits an ignored SIGINT (and Ctrl-C would test
    nothing): give it the default disposition, as a terminal's torchrun does."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Ranks:
    """Two server ranks started as torchrun starts them (RANK, WORLD_SIZE, MASTER_* in the
    environment), so the test can kill one and watch the other."""

    def __init__(self, base: Path, tmp: Path, *extra: str, cwds: tuple = (None, None)):
        self.port = free_port()
        master = str(free_port())
        env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
        env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=master, WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   EXPERTSWITCH_DIST_TIMEOUT_S=str(DIST_TIMEOUT_S))  # fmt: skip
        cmd = [sys.executable, "-m", "expertswitch.cli", "serve", "--base", str(base),
               "--device", "cpu", "--port", str(self.port), "--expert-parallel-size", "2",
               "--max-num-seqs", "8", "--kv-cache-size", "16MiB", *extra]  # fmt: skip
        self.logs = [tmp / f"rank{r}.log" for r in range(2)]
        self.procs = []
        for r in range(2):
            rank_env = {**env, "RANK": str(r), "LOCAL_RANK": str(r)}
            with open(self.logs[r], "w") as log:
                self.procs.append(subprocess.Popen(cmd, env=rank_env, stdout=log,
                                                   stderr=subprocess.STDOUT, cwd=cwds[r],
                                                   preexec_fn=_as_in_a_terminal))  # fmt: skip
        self.url = f"http://127.0.0.1:{self.port}"

    def log(self, r: int) -> str:
        return self.logs[r].read_text()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + HANG_GUARD_S
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                pytest.fail("a rank exited while starting:\n" + self.log(0)[-3000:]
                            + "\n--- rank 1 ---\n" + self.log(1)[-3000:])  # fmt: skip
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        pytest.fail("the expert-parallel server did not start:\n" + self.log(0)[-3000:])

    def wait_exit(self) -> list[int]:
        return [p.wait(HANG_GUARD_S) for p in self.procs]

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def ask_all(url: str) -> dict:
    """A mixed load sent at once: greedy and seeded completions (n=2, different lengths),
    a chat completion, a stream, and prompt token ids; answers by name."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
    jobs = {
        "greedy": dict(kind="cmpl", prompt="def add(a, b):", max_tokens=12, temperature=0),
        "long": dict(
            kind="cmpl", prompt="The history of the " * 6, max_tokens=20, temperature=0
        ),  # fmt: skip
        "seeded": dict(
            kind="cmpl", prompt="x = ", max_tokens=10, temperature=0.9, seed=11, n=2
        ),  # fmt: skip
        "ids": dict(
            kind="cmpl", prompt=[5, 17, 33, 8], max_tokens=8, temperature=0.7, top_p=0.9, seed=3
        ),  # fmt: skip
        "chat": dict(
            kind="chat",
            messages=[{"role": "user", "content": "What is 12 + 30?"}],
            max_tokens=10,
            temperature=0,
        ),  # fmt: skip
        "stream": dict(kind="stream", prompt="import os\n", max_tokens=9, temperature=0),
        "expert": dict(
            kind="cmpl", model="attn", prompt="def add(a, b):", max_tokens=12, temperature=0
        ),  # fmt: skip
        "expert-seeded": dict(
            kind="cmpl", model="attn", prompt="x = ", max_tokens=10, temperature=0.9, seed=11
        ),  # fmt: skip
    }
    got: dict = {}

    def run(name, job):
        kind, model = job.pop("kind"), job.pop("model", "base")
        if kind == "chat":
            r = client.chat.completions.create(model=model, **job)
            got[name] = [c.message.content for c in r.choices]
        elif kind == "stream":
            parts = client.completions.create(model=model, stream=True, **job)
            got[name] = ["".join(c.choices[0].text for c in parts if c.choices)]
        else:
            r = client.completions.create(model=model, **job)
            got[name] = [c.text for c in sorted(r.choices, key=lambda c: c.index)]

    threads = [threading.Thread(target=run, args=(n, dict(j))) for n, j in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG_GUARD_S)
    assert set(got) == set(jobs), f"some requests failed: {sorted(set(jobs) - set(got))}"
    return got


@pytest.fixture(scope="module")
def one_process(moe_base) -> dict:
    """ask_all's answers from a one-process server on the same checkpoint and expert."""
    expert = moe_base.parent / "attn.delta"
    app, aengine = build_app(moe_base, {"attn": expert}, device="cpu", cfg=ServerConfig(),
                             max_num_seqs=8, kv_cache_bytes=16 << 20)  # fmt: skip
    try:
        with ServerThread(app) as srv:
            want = ask_all(srv.url)
    finally:
        aengine.close()
    assert all(isinstance(t, str) for ts in want.values() for t in ts)
    assert len(want["seeded"]) == 2
    assert want["expert"] != want["greedy"]  # the expert's delta changes its answer
    return want


def test_expert_parallel_server_answers_as_one_process(moe_base, one_process, tmp_path):
    """Concurrent requests of every kind (base and a compressed expert in one batch) get exactly
    the one-process server's answers; a client that leaves mid-stream is aborted on both
    ranks; experts pinned, unpinned, unloaded and loaded over the admin API on rank 0 change
    rank 1 too; the ranks idle past a heartbeat and serve again; stopping rank 0 stops rank 1
    cleanly."""
    expert, want = moe_base.parent / "attn.delta", one_process
    (tmp_path / "elsewhere").mkdir()  # rank 1's working directory: relative paths differ
    ranks = Ranks(moe_base, tmp_path, "--expert", f"attn={expert}", "--enable-admin",
                  cwds=(moe_base.parent, tmp_path / "elsewhere"))  # fmt: skip
    try:
        ranks.wait_ready()
        assert ask_all(ranks.url) == want
        # unseeded sampling: rank 0 draws the seed and sends it with the request
        free = httpx.post(ranks.url + "/v1/completions", timeout=120,
                          json={"model": "attn", "prompt": "x = ", "max_tokens": 6,
                                "temperature": 1.0, "n": 2})  # fmt: skip
        assert free.status_code == 200 and len(free.json()["choices"]) == 2, free.text
        # a stream the client abandons: the abort travels to rank 1 with the next step
        body = {"model": "base", "prompt": "for i in", "max_tokens": 200, "temperature": 0,
                "ignore_eos": True, "stream": True}  # fmt: skip
        with httpx.stream("POST", ranks.url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    break
        for op, body in [("pin", {"name": "attn"}), ("unpin", {"name": "attn"}),
                         ("unload", {"name": "attn"}),
                         ("load", {"name": "attn", "path": str(expert), "pin": True})]:  # fmt: skip
            r = httpx.post(f"{ranks.url}/v1/experts/{op}", json=body, timeout=120)
            assert r.status_code == 200, (op, r.text)
        # an archive rank 1 cannot read (a path relative to rank 0's directory): a 400 that
        # names rank 1, the expert registered on no rank, and the ranks serving on
        r = httpx.post(f"{ranks.url}/v1/experts/load", json={"name": "rel", "path": "attn.delta"},
                       timeout=120)  # fmt: skip
        assert r.status_code == 400 and "rank 1 could not register it" in r.text, r.text
        listed = httpx.get(f"{ranks.url}/v1/experts", timeout=60).json()["data"]
        assert "rel" not in {e["name"] for e in listed}
        r = httpx.post(f"{ranks.url}/v1/experts/load", json={"name": "rel", "path": str(expert)},
                       timeout=120)  # fmt: skip
        assert r.status_code == 200, r.text  # the name is free again on every rank
        time.sleep(DIST_TIMEOUT_S + 5)  # idle past the timeout: rank 1 lives on heartbeats
        assert ask_all(ranks.url) == want
        stats = httpx.get(ranks.url + "/metrics", timeout=30).text
        assert "expertswitch" in stats
        ranks.procs[0].send_signal(signal.SIGINT)  # Ctrl-C on the server
        assert ranks.wait_exit() == [0, 0], ranks.log(0)[-3000:] + ranks.log(1)[-3000:]
    finally:
        ranks.kill()


def test_tensor_and_expert_parallel_server_answers_as_one_process(moe_base, one_process,
                                                                 tmp_path):  # fmt: skip
    """`serve --tensor-parallel-size 2 --expert-parallel-size 2`: attention sliced by heads
    and the dense MLP by rows over both ranks (the compressed expert's deltas sliced alike),
    the MoE layers' experts spread over them, each rank routing half of the batch's tokens:
    the one-process server's answers; SIGTERM stops both ranks cleanly."""
    expert = moe_base.parent / "attn.delta"
    ranks = Ranks(moe_base, tmp_path, "--tensor-parallel-size", "2", "--expert",
                  f"attn={expert}")  # fmt: skip
    try:
        ranks.wait_ready()
        assert ask_all(ranks.url) == one_process
        ranks.procs[0].send_signal(signal.SIGTERM)
        assert ranks.wait_exit() == [0, 0], ranks.log(0)[-3000:] + ranks.log(1)[-3000:]
    finally:
        ranks.kill()


def test_a_dead_rank_stops_the_server_clearly(moe_base, tmp_path):
    """Rank 1 killed: rank 0's engine stops with a ParallelError naming the failed broadcast
    (never a hang), /health turns 503, and requests get a clear 503 instead of hanging."""
    ranks = Ranks(moe_base, tmp_path)
    try:
        ranks.wait_ready()
        ranks.procs[1].kill()
        ranks.procs[1].wait()
        r = None
        deadline = time.monotonic() + HANG_GUARD_S
        while time.monotonic() < deadline:  # the next heartbeat (≤ 5 s) finds rank 1 gone
            r = httpx.get(ranks.url + "/health", timeout=30)
            if r.status_code != 200:
                break
            time.sleep(0.5)
        assert r is not None and r.status_code == 503, r and r.text
        assert "rank" in r.text and "broadcast" in r.text
        c = httpx.post(ranks.url + "/v1/completions", timeout=60,
                       json={"model": "base", "prompt": "a", "max_tokens": 2})  # fmt: skip
        assert c.status_code == 503
        body = c.json()["error"]
        assert "engine loop stopped" in body["message"] and "ParallelError" in body["message"]
        # then rank 0 exits non-zero, so that torchrun ends a job whose ranks cannot go on
        assert ranks.procs[0].wait(HANG_GUARD_S) == 2
        assert "error: engine loop stopped: ParallelError" in ranks.log(0)
    finally:
        ranks.kill()


def test_serve_expert_parallel_needs_a_world_of_its_size(moe_base, capsys):
    """Without torchrun's world, or with --demo: a one-line error that says what to run."""
    from expertswitch.cli import main

    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    r = subprocess.run([sys.executable, "-m", "expertswitch.cli", "serve", "--base",
                        str(moe_base), "--device", "cpu", "--expert-parallel-size", "2"],
                       env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)  # fmt: skip
    assert r.returncode == 2 and "torchrun --nproc-per-node 2" in r.stderr
    assert "Traceback" not in r.stderr
    assert main(["serve", "--demo", "--expert-parallel-size", "2"]) == 2
    assert "--demo's family is dense" in capsys.readouterr().err


def test_expert_parallelism_refuses_a_dense_checkpoint(tmp_path):
    """A checkpoint without MoE layers has no experts to spread: said before anything loads."""
    from expertswitch.errors import ConfigError
    from expertswitch.models.decoder import Decoder

    cfg = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
           "vocab_size": 50, "max_position_embeddings": 64}  # fmt: skip
    CausalLM.from_config(cfg).save_pretrained(tmp_path / "dense")
    with pytest.raises(ConfigError, match="has none: leave expert_parallel_size at 1"):
        Decoder.load(tmp_path / "dense", "cpu", torch.float32, 2)
    assert Decoder.load(tmp_path / "dense", "cpu", torch.float32, 1).layers


def test_tensor_parallelism_refusals(tmp_path):
    """Sizes that do not split the heads, or a world that does not fit: one-line errors that
    name the fix, before anything loads."""
    from expertswitch.engine import Engine
    from expertswitch.errors import ConfigError
    from expertswitch.models.decoder import Decoder

    cfg = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
           "vocab_size": 50, "max_position_embeddings": 64}  # fmt: skip
    CausalLM.from_config(cfg).save_pretrained(tmp_path / "dense")
    with pytest.raises(ConfigError, match="num_key_value_heads=2 neither splits over nor "
                       "replicates evenly across tensor_parallel_size 3"):  # fmt: skip
        Decoder.load(tmp_path / "dense", "cpu", torch.float32, tp_size=3)
    with pytest.raises(ConfigError, match="num_attention_heads=4 does not split over "
                       "tensor_parallel_size 8: choose a size that divides it"):  # fmt: skip
        Decoder.load(tmp_path / "dense", "cpu", torch.float32, tp_size=8)
    with pytest.raises(ConfigError, match="tensor_parallel_size must be a positive integer"):
        Engine(tmp_path / "dense", tensor_parallel_size=0)
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    r = subprocess.run([sys.executable, "-m", "expertswitch.cli", "generate", "--base",
                        str(tmp_path / "dense"), "--prompt-ids", "1,2", "--tensor-parallel-size",
                        "2", "--expert-parallel-size", "3"], env=env, capture_output=True,
                       text=True, timeout=HANG_GUARD_S)  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "torchrun with a world that is a multiple of 6" in r.stderr
    assert "torchrun --nproc-per-node 6" in r.stderr


def test_mixed_compression_calibrates_on_an_moe_base(moe_base, tmp_path):
    """ME-Switch's mixed precision needs the base's activations; an `expertswitch train` MoE
    checkpoint (no transformers class) is run by the project's own model: the attention
    deltas are calibrated, keep their salient channels, and the engine serves the archive
    with the greedy tokens of the checkpoint `reconstruct` rebuilds from it."""
    from expertswitch.compress.reconstruct import reconstruct
    from expertswitch.engine import Engine, SamplingParams
    from expertswitch.io.archive import open_archive

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = compress_expert(moe_base, moe_base.parent / "attn-full", tmp_path / "mixed.delta",
                              make_method("mixed", bits=2, group_size=32, salient=4),
                              CompressOptions(progress=False))  # fmt: skip
    attn = [e for e in open_archive(out) if "self_attn" in e.name and e.kind == "quantized"]
    assert attn and all(e.meta["calibrated"] and e.meta["n_salient"] == 4 for e in attn), [
        (e.name, e.meta) for e in attn]  # fmt: skip
    reconstruct(moe_base, out, tmp_path / "rebuilt", progress=False)
    lm = CausalLM.from_pretrained(tmp_path / "rebuilt").eval()
    prompt = [5, 17, 33, 8]
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            seq.append(int(lm(torch.tensor([seq])).logits[0, -1].argmax()))
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    engine = Engine(moe_base, {"mixed": out})
    assert engine.generate(prompt, "mixed", greedy)[0].token_ids == seq[len(prompt) :]
    assert engine.generate(prompt, None, greedy)[0].token_ids != seq[len(prompt) :]
