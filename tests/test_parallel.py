"""Expert parallelism on real torch.distributed processes (gloo, CPU), launched by torchrun:
tests/parallel_worker.py runs each scenario on every rank against a single-process oracle (or
DeepSpeed's own MoE) and rank 0 writes the errors it measured; these tests assert on them."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from expertswitch.errors import ConfigError
from expertswitch.parallel import expert_data_parallel_ranks, expert_parallel_ranks

WORKER = Path(__file__).parent / "parallel_worker.py"
TOL = 2e-6  # fp32, different summation order


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)  # CPU tensors run the torch references anyway
    return env


def torchrun(nproc: int, scenario: str, tmp_path: Path) -> dict:
    out = tmp_path / f"{scenario}-{nproc}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", str(WORKER), scenario, str(out)]  # fmt: skip
    env = dict(_env(), PARALLEL_TMP=str(tmp_path))
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    said = f"exit code {run.returncode}, results written: {out.exists()}\n"
    assert run.returncode == 0 and out.exists(), said + run.stdout[-3000:] + run.stderr[-6000:]
    return json.loads(out.read_text())


def test_group_layout_is_deepspeeds():
    assert expert_parallel_ranks(16, 2)[:3] == [[0, 1], [2, 3], [4, 5]]
    assert expert_data_parallel_ranks(16, 2) == [list(range(0, 16, 2)), list(range(1, 16, 2))]
    assert expert_parallel_ranks(8, 8) == [list(range(8))]
    assert expert_data_parallel_ranks(8, 1) == [list(range(8))]
    assert expert_data_parallel_ranks(4, 4) == [[0], [1], [2], [3]]
    with pytest.raises(ConfigError, match="must divide the world size"):
        expert_parallel_ranks(6, 4)


def test_expert_parallel_layer_needs_a_process_group():
    """Without torch.distributed: the error says to launch with torchrun; inside a world too
    small for ep_size (another test may have made a world of 1 in this process): says so."""
    import torch.distributed as dist

    from expertswitch.moe import MoE

    expected = "must divide the world size" if dist.is_initialized() else "torchrun"
    with pytest.raises(ConfigError, match=expected):
        MoE(8, torch.nn.Linear(8, 8), num_experts=4, ep_size=2)
    with pytest.raises(ConfigError, match="multiple of ep_size"):
        MoE.stacked(8, 16, 6, ep_size=4)


@pytest.mark.parametrize("nproc", [2, 4])
def test_expert_parallel_layer_equals_one_process(nproc, tmp_path):
    """Forward and backward of MoE layers (module and stacked experts, top-1/2, dropless and
    dropping, Residual-MoE, a rank with no tokens; ep 2 and ep = world; the flat, DeepSpeed's
    padded and the hierarchical all-to-all) equal one process holding every expert, after
    allreduce_gradients."""
    found = torchrun(nproc, "layer", tmp_path)
    assert found["world"] == nproc and len(found["ranks"]) == nproc
    cases = found["ranks"][0]
    assert {
        "ep2 modules k2",
        "ep2 dropping k2",
        "rank without tokens",
        "ep2 padded dropping k2",
        f"ep{nproc} padded dropless k1",
        f"ep{nproc} stacked, other ranks get no rows",
    } <= set(cases)
    if nproc == 4:
        assert "ep4 stacked k2" in cases
        assert sum("hierarchical ranks_per_node" in case for case in cases) == 4
        assert "ep4 stacked, other ranks get no rows hierarchical" in cases
    worst = {(r, case, what): err for r, f in enumerate(found["ranks"])
             for case, errs in f.items() for what, err in errs.items()}  # fmt: skip
    assert max(worst.values()) < TOL, sorted(worst.items(), key=lambda kv: -kv[1])[:5]


def test_expert_parallel_layer_equals_deepspeeds(tmp_path):
    """DeepSpeed's MoE(ep_size=2) on two gloo ranks, its defaults on, training: the same
    outputs, aux loss, counts and gradients as ours at ep_size=2 from the same seed."""
    pytest.importorskip("deepspeed")
    found = torchrun(2, "deepspeed", tmp_path)
    for rank in found["ranks"]:
        assert len(rank) == 3
        for case, errs in rank.items():
            assert errs.pop("counts_equal") == 1.0, case
            assert max(errs.values()) < TOL, (case, errs)


@pytest.mark.parametrize("at", ["forward", "backward"])
def test_a_dead_rank_fails_the_others_with_a_clear_error(at, tmp_path):
    """The last rank exits before the all-to-all (of the forward, or of the backward): the
    others raise a ParallelError naming the problem within seconds, instead of hanging."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "die.json"
    procs = []
    for rank in range(2):
        env = _env() | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                        "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
                        "PARALLEL_TIMEOUT_S": "60", "PARALLEL_DIE_AT": at}  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, str(WORKER), "die", str(out)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))  # fmt: skip
    start = time.monotonic()
    logs = [p.communicate(timeout=300) for p in procs]
    assert time.monotonic() - start < 240
    report = Path(f"{out}.0")
    assert report.exists(), logs[0][1].decode()[-3000:]
    found = json.loads(report.read_text())
    assert found["error"] and found["error"].startswith("ParallelError"), found
    assert "stopped, timed out" in found["error"] and "ranks [0, 1]" in found["error"]
    assert ("(backward)" in found["error"]) == (at == "backward")
    assert found["seconds"] < 90


def test_pr_moe_model_with_per_layer_ep_sizes_equals_one_process(tmp_path):
    """A small PR-MoE (4 Residual experts at ep 2, 8 stacked at ep 4, on one world of 4):
    outputs and every gradient equal one process."""
    found = torchrun(4, "pyramid", tmp_path)
    worst = max(v for f in found["ranks"] for c in f.values() for v in c.values())
    assert worst < TOL, found["ranks"][0]


def test_checkpoint_saved_at_ep4_loads_at_ep2_and_ep1(tmp_path, monkeypatch):
    """Saved by 4 ranks (ep 2 and 4), loaded by 2 ranks (ep 1 and 2) and by one process into
    models with other weights: the same outputs on the same tokens."""
    from parallel_worker import TinyPRMoE, batches

    from expertswitch.parallel import load_sharded, read_manifest

    ckpt = tmp_path / "ckpt"
    monkeypatch.setenv("PARALLEL_CKPT", str(ckpt))
    monkeypatch.setenv("PARALLEL_SAVE_WORLD", "4")
    saved = torchrun(4, "save", tmp_path)
    manifest = read_manifest(ckpt)
    assert {n: s["saved_ep_size"] for n, s in manifest["layers"].items()} == {"moe1": 2, "moe2": 4}
    assert len(manifest["files"]) == 1 + 4 + 8
    loaded = torchrun(2, "load", tmp_path)
    assert loaded["ranks"][0]["ep"] == [1, 2]
    one = TinyPRMoE(1, 1, seed=123)
    load_sharded(one, ckpt)
    for r, batch in enumerate(batches(4)):
        ref = torch.tensor(saved["ranks"][r]["out"])
        with torch.no_grad():
            torch.testing.assert_close(one(batch)[0], ref, rtol=1e-5, atol=1e-5)
        for rank in loaded["ranks"]:
            torch.testing.assert_close(torch.tensor(rank["outs"][r]), ref, rtol=1e-5, atol=1e-5)


def _saved_tiny(tmp_path):
    from parallel_worker import TinyPRMoE

    from expertswitch.parallel import save_sharded

    model = TinyPRMoE(1, 1, seed=4)
    return model, save_sharded(model, tmp_path / "ck")


def test_checkpoint_refuses_overwrite_and_other_models(tmp_path):
    from parallel_worker import TinyPRMoE

    from expertswitch.errors import CheckpointError
    from expertswitch.moe import MoE
    from expertswitch.parallel import load_sharded, save_sharded

    model, ckpt = _saved_tiny(tmp_path)
    with pytest.raises(CheckpointError, match="overwrite=True"):
        save_sharded(model, ckpt)
    save_sharded(model, ckpt, overwrite=True)
    other = MoE(12, torch.nn.Linear(12, 12), num_experts=4)
    with pytest.raises(CheckpointError, match="MoE layers"):
        load_sharded(other, ckpt)
    wider = TinyPRMoE(1, 1)
    wider.moe2 = MoE.stacked(12, 20, 4, k=2, activation="gelu", use_residual=True)
    with pytest.raises(CheckpointError, match="layer 'moe2'"):
        load_sharded(wider, ckpt)
    with pytest.raises(CheckpointError, match="not a MoE checkpoint"):
        load_sharded(model, tmp_path)
    with pytest.raises(CheckpointError, match="no MoE layer"):
        save_sharded(torch.nn.Linear(3, 3), tmp_path / "x")


def test_checkpoint_loader_fuzz(tmp_path):
    """Truncated, corrupted or removed files and mangled manifests: a CheckpointError naming
    the problem every time, and the model is never loaded with wrong weights silently."""
    import random

    from parallel_worker import TinyPRMoE

    from expertswitch.errors import CheckpointError
    from expertswitch.parallel import load_sharded

    model, ckpt = _saved_tiny(tmp_path)
    files = sorted(p for p in ckpt.rglob("*") if p.is_file())
    pristine = {p: p.read_bytes() for p in files}
    rng = random.Random(0)
    for trial in range(60):
        victim = rng.choice(files)
        data = bytearray(pristine[victim])
        how = rng.choice(["truncate", "flip", "delete", "empty", "garbage"])
        if how == "truncate":
            data = data[: rng.randrange(len(data))]
        elif how == "flip":
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        elif how == "garbage":
            data = bytearray(rng.randbytes(rng.randrange(1, 200)))
        if how == "delete":
            victim.unlink()
        else:
            victim.write_bytes(bytes(data if how != "empty" else b""))
        target = TinyPRMoE(1, 1, seed=trial + 10)
        try:
            load_sharded(target, ckpt)
        except CheckpointError as e:
            assert str(e)  # a message a user can act on
        else:  # only a no-op corruption (e.g. reformatted JSON) may load, and then exactly
            for a, b in zip(target.state_dict().values(), model.state_dict().values()):
                assert torch.equal(a, b), (victim, how)
        victim.write_bytes(pristine[victim])


@pytest.mark.parametrize("nproc", [2, 4])
def test_tensor_sliced_dense_layers_with_expert_parallel_moe(nproc, tmp_path):
    """Column- then row-parallel MLPs (tp = 2, Megatron's gradients; split and gathered
    forms) feeding a MoE layer at ep = world, data parallel over the tp groups at 4 ranks:
    after allreduce_gradients over the whole model, outputs and every gradient equal one
    process."""
    found = torchrun(nproc, "tensor", tmp_path)
    assert len(found["ranks"][0]) == 2
    worst = max(v for f in found["ranks"] for c in f.values() for v in c.values())
    assert worst < TOL, found["ranks"]


def test_tensor_parallel_layout_and_errors():
    from expertswitch.parallel import ColumnParallelLinear, tensor_parallel_ranks

    assert tensor_parallel_ranks(8, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ConfigError, match="must divide"):
        tensor_parallel_ranks(6, 4)
    import torch.distributed as dist

    if not dist.is_initialized():  # (another test may have made a world of 1 here)
        with pytest.raises(ConfigError, match="torchrun"):
            ColumnParallelLinear(8, 8, None)
    else:  # a world of one: the whole layer on this rank
        assert ColumnParallelLinear(8, 6, None).out_per_rank == 6


def test_second_save_is_refused_on_every_rank_and_tied_weights_save(tmp_path, monkeypatch):
    """Saving again without overwrite raises the same CheckpointError on both ranks (neither
    waits in a collective); a model with tied weights saves, and loads with the tie kept."""
    monkeypatch.setenv("PARALLEL_CKPT", str(tmp_path / "ck"))
    found = torchrun(2, "save_twice", tmp_path)
    for rank in found["ranks"]:
        assert "already holds a MoE checkpoint" in rank["second"]
        assert rank["same"] == 0.0 and rank["tied"]


def test_checkpoint_names_a_submodule_called_root_apart_from_a_root_moe(tmp_path):
    """Expert keys are named from the real module path: a submodule named `root` keeps its
    experts out of dense.safetensors; an empty directory is required unless overwrite."""
    from safetensors.torch import load_file

    from expertswitch.errors import CheckpointError
    from expertswitch.moe import MoE
    from expertswitch.parallel import load_sharded, save_sharded

    holder = torch.nn.Module()
    holder.root = MoE.stacked(8, 16, 4, k=2)
    save_sharded(holder, tmp_path / "a")
    assert not [k for k in load_file(tmp_path / "a" / "dense.safetensors") if "experts" in k]
    other = torch.nn.Module()
    other.root = MoE.stacked(8, 16, 4, k=2)
    load_sharded(other, tmp_path / "a")
    assert torch.equal(other.root.experts.w_in, holder.root.experts.w_in)
    bare = MoE.stacked(8, 16, 4, k=2)  # the model itself is the MoE layer
    save_sharded(bare, tmp_path / "b")
    assert (tmp_path / "b" / "experts" / "@root" / "3.safetensors").is_file()
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not empty"):
        save_sharded(bare, tmp_path / "c")
    save_sharded(bare, tmp_path / "c", overwrite=True)
    assert (tmp_path / "c" / "notes.txt").read_text() == "mine"


def test_ranks_that_disagree_on_a_step_all_stop(tmp_path):
    """engine/mirror.py's agree(): every rank learns that one rank's tokens differ."""
    found = torchrun(3, "agree", tmp_path)
    for r in found["ranks"]:
        assert r["error"] is not None and r["error"].startswith("ParallelError")
        assert "disagree on the tokens at step 4" in r["error"]


def test_engine_ranks_whose_tokens_differ_all_stop(tmp_path):
    """One rank samples another token: every rank stops before the next forward pass (the
    check rides on the next step's batch agreement), or at the end of generate when it was
    the last step."""
    found = torchrun(2, "agree_engine", tmp_path)
    for r in found["ranks"]:
        assert r["mid"].startswith("ParallelError"), r
        assert "the previous step's tokens at step 4" in r["mid"]
        assert r["last"].startswith("ParallelError"), r
        assert "disagree on the tokens at step 1" in r["last"]


@pytest.mark.parametrize("nproc", [2, 4])
def test_engine_split_over_ranks_equals_one_process(nproc, tmp_path):
    """The serving engine with attention and MLPs tensor-sliced (Llama GQA, Qwen2 with biases
    and tied embeddings, Qwen2-MoE's MoE block and shared expert whole beside sliced
    attention, an expertswitch_moe model), experts spread (each rank routing its
    share of the batch every rank holds) and both at once: tokens equal to one process,
    greedy and seeded, logprobs within fp32 rounding, each rank holding its kv heads only.
    Compressed experts of the dense models, sliced like the base (their deltas' rows or whole
    quantization groups of input channels, their exact biases), and a PEFT LoRA adapter (its
    B's rows or A's input columns, its tuned biases), in a batch with the base: one process's
    tokens; an expert whose groups a slice would cut fails its own requests
    with an error naming the alignment.
    The MoE layer's share routing equals one process for fewer tokens than ranks too, and
    moves 1/world of the all-to-all bytes of every rank sending the whole batch."""
    found = torchrun(nproc, "engine_split", tmp_path)
    for t in (1, 3, 17):  # bytes sent by all ranks together (routing differs per share)
        shared, every = (sum(r[f"layer share T={t}"]["bytes"][i] for r in found["ranks"])
                         for i in (0, 1))  # fmt: skip
        assert 0 < shared < every, (t, shared, every)
        if t == 17:  # the token rows dominate the split-size exchange
            assert shared * nproc < 1.25 * every, (shared, every)
    served_lora = 0
    for rank, cases in enumerate(found["ranks"]):
        engines = [c for c in cases if not c.startswith("layer")]
        assert len(engines) == (7 if nproc == 2 else 4), cases
        for name, res in cases.items():
            if name.startswith("layer"):
                assert res["err"] < TOL and res["err_every"] < TOL, (rank, name, res)
                continue
            tp = int(name.split(" tp")[1].split()[0])
            split_heads, whole_heads = res["kv_heads"]
            assert split_heads == max(whole_heads // tp, 1), (name, res)  # past kv: one
            if "expert errors" in res:  # llama, qwen2, qwen3: compressed experts `a` and `b`
                assert res["expert changes tokens"] is True, (name, res)
                errors = res["expert errors"]
                if tp == 4:  # `b`'s quantization groups do not fit a rank's slice: its own
                    assert errors[2] and "multiples of 64" in errors[2], errors  # requests fail
                    errors = errors[:2] + errors[3:]
                assert not any(errors), (name, errors)
            if "lora errors" in res:  # and a PEFT LoRA adapter, its factors sliced
                assert res["lora changes tokens"] is True, (name, res)
                assert not any(res["lora errors"]), (name, res)
                served_lora += 1
            for key, value in res.items():
                if key.endswith("tokens equal"):
                    assert value is True, (rank, name, key)
                elif key.endswith("logprob diff"):
                    assert value < 1e-4, (rank, name, key, value)
    if importlib.util.find_spec("peft") is not None:  # llama, qwen2 (and qwen3 on 2 ranks)
        assert served_lora == (3 if nproc == 2 else 2) * nproc, served_lora
