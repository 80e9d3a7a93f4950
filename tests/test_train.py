"""`expertswitch train`: the trainable decoder against transformers and the serving engine,
loss going down for dense / MoE / PR-MoE, Mixture-of-Students (KD weight 0 = plain training of
the student; staged KD switching itself off), resume after a real SIGKILL reproducing the
uninterrupted loss curve, checkpoint export, and clear errors for bad configs and run
directories. Tiny models and corpora: seconds per run on a CPU."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import _DIST_VARS

from expertswitch.errors import CheckpointError, ConfigError
from expertswitch.models.causal_lm import CausalLM
from expertswitch.train.checkpoint import list_checkpoints, load_checkpoint
from expertswitch.train.config import load_config
from expertswitch.train.logs import read_csv
from expertswitch.train.trainer import train

# small corpora, a 512-token vocabulary, 64-wide models: one step ≈ 0.1 s on 2 cores
TINY = ["data.scale=0.02", "data.tokens_per_domain=40000", "data.val_tokens_per_domain=4000",
        "data.vocab_size=512", "data.seq_len=64", "optim.batch_size=8", "optim.warmup=5",
        "model.hidden_size=64", "model.intermediate_size=128", "model.num_heads=4",
        "model.num_kv_heads=2", "eval_every=10", "eval_windows=8", "log_every=5",
        "tensorboard=false"]  # fmt: skip


def tiny(preset: str, out: Path, *extra: str):
    return load_config(None, preset, [*TINY, f"out={out}", "device=cpu", *extra])


def clean_env(**extra: str) -> dict[str, str]:
    """This process' environment without torch.distributed's variables (the DeepSpeed
    oracle's fixture sets a world of one here): a child sees what a user's shell gives it."""
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    return {**env, **extra}


def run_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("env", clean_env())
    return subprocess.run([sys.executable, "-m", "expertswitch.cli", *args], capture_output=True,
                          text=True, timeout=900, **kw)  # fmt: skip


def cli_args(preset: str, out: Path, *extra: str) -> list[str]:
    sets = [a for s in [*TINY, *extra] for a in ("--set", s)]
    return ["train", "--preset", preset, "--out", str(out), "--device", "cpu", "--quiet", *sets]


# --- the model ---------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
def test_causal_lm_equals_transformers_both_ways(tmp_path, tied):
    """A transformers Llama checkpoint loads into CausalLM with equal logits and loss, and
    CausalLM's own save loads into transformers with equal logits (GQA, tied or not)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                      max_position_embeddings=64, tie_word_embeddings=tied)  # fmt: skip
    hf = LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = CausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 100, (2, 17))
    with torch.no_grad():
        a, b = hf(ids, labels=ids), ours(ids, labels=ids)
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.loss, a.loss)
    with torch.no_grad():  # change every weight, then save ours and load it with transformers
        for p in ours.parameters():
            p.add_(0.01 * torch.randn_like(p))
    (tmp_path / "ours").mkdir()
    ours.save_pretrained(tmp_path / "ours")
    back = LlamaForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)


def moe_config(residual: bool = True, drop_tokens: bool = False) -> dict:
    layer = {"num_experts": 4, "k": 2, "use_residual": residual, "drop_tokens": drop_tokens}
    return {"model_type": "expertswitch_moe", "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 120, "max_position_embeddings": 128, "hidden_act": "silu",
            "eos_token_id": 119, "moe_layers": [None, layer, {**layer, "k": 1}]}  # fmt: skip


def test_engine_serves_a_trained_moe_checkpoint(tmp_path):
    """One model definition: the serving engine (paged attention, dropless grouped experts)
    greedy-decodes an expertswitch_moe checkpoint exactly as CausalLM's full recompute."""
    from expertswitch.engine import Engine, SamplingParams

    torch.manual_seed(3)
    model = CausalLM.from_config(moe_config()).eval()
    (tmp_path / "m").mkdir()
    model.save_pretrained(tmp_path / "m")
    again = CausalLM.from_pretrained(tmp_path / "m").eval()
    prompt = torch.randint(0, 119, (9,)).tolist()
    seq = list(prompt)
    with torch.no_grad():
        torch.testing.assert_close(again(torch.tensor([seq])).logits,
                                   model(torch.tensor([seq])).logits)  # fmt: skip
        for _ in range(12):
            nxt = int(model(torch.tensor([seq])).logits[0, -1].argmax())
            if nxt == 119:
                break
            seq.append(nxt)
    greedy = SamplingParams(temperature=0, max_tokens=12)
    out = Engine(tmp_path / "m").generate(prompt, sampling=greedy)
    assert out[0].token_ids[: len(seq) - len(prompt)] == seq[len(prompt) :]


def test_bad_moe_config_and_checkpoint_errors(tmp_path):
    bad = moe_config()
    bad["moe_layers"] = bad["moe_layers"][:2]
    with pytest.raises(ConfigError, match="moe_layers"):
        CausalLM.from_config(bad)
    bad = moe_config()
    bad["moe_layers"][1]["k"] = 9
    with pytest.raises(ConfigError, match="k ≤ num_experts"):
        CausalLM.from_config(bad)
    bad = moe_config()
    bad["moe_layers"][1]["capacity"] = 2
    with pytest.raises(ConfigError, match="unknown MoE layer options"):
        CausalLM.from_config(bad)
    model = CausalLM.from_config(moe_config())
    (tmp_path / "m").mkdir()
    model.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["moe_layers"][1]["num_experts"] = 8  # the tensors hold 4
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape"):
        CausalLM.from_pretrained(tmp_path / "m")


# --- training ----------------------------------------------------------------------------


def first_last(rows: list[dict], key: str, n: int = 5) -> tuple[float, float]:
    vals = [r[key] for r in rows]
    return sum(vals[:n]) / n, sum(vals[-n:]) / n


@pytest.fixture(scope="module")
def pr_moe_teacher(tmp_path_factory):
    """A trained tiny PR-MoE (the teacher of the MoS tests), and its run's summary."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    s = train(tiny("pr-moe", out, "optim.steps=40"), progress=False, log=lambda *_: None)
    return out, s


@pytest.mark.parametrize("preset", ["dense", "moe"])
def test_loss_drops(tmp_path, preset):
    s = train(tiny(preset, tmp_path / "run", "optim.steps=40", "tensorboard=true"),
              progress=False)  # fmt: skip
    rows = read_csv(tmp_path / "run" / "metrics.csv")
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))
    assert [r["step"] for r in rows] == list(range(1, 41))
    first, last = first_last(rows, "lm_loss")
    assert last < first - 0.5, (first, last)
    assert s.val[-1]["val_loss"] < s.val[0]["val_loss"] - 0.2
    if preset == "moe":
        assert all(r["aux_loss"] > 0 for r in rows)  # 3 MoE layers, each ≈ 1 when balanced
        assert s.active_params < s.params
    else:
        assert all(r["aux_loss"] == 0 for r in rows) and s.active_params == s.params


def test_pr_moe_loss_drops_and_exports(pr_moe_teacher):
    out, s = pr_moe_teacher
    rows = read_csv(out / "metrics.csv")
    first, last = first_last(rows, "lm_loss")
    assert last < first - 0.5, (first, last)
    assert s.val[-1]["val_loss"] < s.val[0]["val_loss"] - 0.2
    cfg = json.loads((out / "model" / "config.json").read_text())
    assert cfg["model_type"] == "expertswitch_moe"
    assert [e and (e["num_experts"], e["use_residual"]) for e in cfg["moe_layers"]] == \
        [None, (4, True), None, (4, True), None, (8, True)]  # fmt: skip
    # the exported model is the trained one: its validation loss is the run's last
    from expertswitch.train.data import prepare_data, val_batches
    from expertswitch.train.trainer import evaluate

    run_cfg = tiny("pr-moe", out, "optim.steps=40")
    data = prepare_data(run_cfg, out / "data")
    model = CausalLM.from_pretrained(out / "model")
    val = evaluate(model, val_batches(data, run_cfg), 8, torch.device("cpu"))
    assert val["val_loss"] == pytest.approx(s.val[-1]["val_loss"], abs=1e-4)


def test_mos_with_kd_weight_zero_equals_plain_student_training(tmp_path, pr_moe_teacher):
    """MoS at β = 0 is exactly training the student alone: the student built from the
    teacher (its layers 0, 1, 2, 4, 5), exported, then trained by the plain loop."""
    from expertswitch.train import distill

    teacher_dir = pr_moe_teacher[0] / "model"
    teacher = CausalLM.from_pretrained(teacher_dir)
    student = distill.make_student(teacher, [0, 1, 2, 4, 5])
    assert [e and e["num_experts"] for e in student.hf_config["moe_layers"]] == \
        [None, 4, None, None, 8]  # fmt: skip
    (tmp_path / "student").mkdir()
    student.save_pretrained(tmp_path / "student")
    common = ["optim.steps=15", f"data.tokenizer={teacher_dir}"]
    mos = train(tiny("mos", tmp_path / "mos", *common, f"kd.teacher={teacher_dir}",
                     "kd.beta=0.0"), progress=False)  # fmt: skip
    plain = train(tiny("dense", tmp_path / "plain", *common,
                       f"model.init_from={tmp_path / 'student'}"), progress=False)  # fmt: skip
    assert mos.losses == plain.losses
    assert [r["val_loss"] for r in mos.val] == [r["val_loss"] for r in plain.val]
    assert all(r["kd_loss"] == 0 for r in read_csv(tmp_path / "mos" / "metrics.csv"))


def test_staged_kd_switches_itself_off(tmp_path, pr_moe_teacher):
    teacher = str(pr_moe_teacher[0] / "model")
    s = train(tiny("mos", tmp_path / "step", "optim.steps=20", f"kd.teacher={teacher}",
                   "kd.stop_step=12"), progress=False)  # fmt: skip
    rows = read_csv(tmp_path / "step" / "metrics.csv")
    assert [r["kd_weight"] for r in rows] == [1.0] * 12 + [0.0] * 8
    assert all(r["kd_loss"] > 0 for r in rows[:12]) and all(r["kd_loss"] == 0 for r in rows[12:])
    assert s.kd["stopped_at"] == 12 and "stop_step" in s.kd["reason"]
    # a plateau: no evaluation improves on the first by 100 nats, so KD stops at the second
    s = train(tiny("mos", tmp_path / "plateau", "optim.steps=30", f"kd.teacher={teacher}",
                   "kd.plateau_patience=1", "kd.min_delta=100"), progress=False)  # fmt: skip
    assert s.kd["stopped_at"] == 20 and "plateau" in s.kd["reason"]
    kd_active = [r["kd_active"] for r in read_csv(tmp_path / "plateau" / "eval.csv")]
    assert kd_active == [1, 1, 0]  # on during steps 11-20, off after the evaluation at 20
    rows = read_csv(tmp_path / "plateau" / "metrics.csv")
    assert [r["kd_weight"] for r in rows] == [1.0] * 20 + [0.0] * 10


def test_kd_keeps_the_student_closer_to_the_teacher(tmp_path, pr_moe_teacher):
    """The KD term does its job: after the same steps, the student trained with β = 1 is closer
    to the teacher on held-out text (KL(teacher ‖ student)) than the one trained with β = 0."""
    from expertswitch.train import distill
    from expertswitch.train.data import prepare_data, val_batches

    teacher_dir = pr_moe_teacher[0] / "model"
    teacher = CausalLM.from_pretrained(teacher_dir).eval()
    kl = {}
    for beta in (0.0, 1.0):
        cfg = tiny("mos", tmp_path / str(beta), "optim.steps=20", f"kd.teacher={teacher_dir}",
                   f"kd.beta={beta}")  # fmt: skip
        train(cfg, progress=False)
        student = CausalLM.from_pretrained(tmp_path / str(beta) / "model").eval()
        windows = torch.cat(list(val_batches(prepare_data(cfg, tmp_path / str(beta) / "data"),
                                             cfg).values()))[:, :-1]  # fmt: skip
        with torch.no_grad():
            kl[beta] = float(distill.kd_loss(student(windows).logits, teacher(windows).logits, 1))
    assert kl[1.0] < 0.8 * kl[0.0], kl


# --- checkpoints and resume --------------------------------------------------------------


def test_resume_after_sigkill_reproduces_the_uninterrupted_run(tmp_path):
    """A run killed with SIGKILL (possibly mid-checkpoint) and started again with the same
    command logs the very loss curve of a run never interrupted."""
    extra = ["optim.steps=60", "checkpoint_every=10", "log_every=3"]  # rows flushed at saves
    full = run_cli(*cli_args("moe", tmp_path / "full", *extra))
    assert full.returncode == 0, full.stderr[-2000:]
    args = cli_args("moe", tmp_path / "cut", *extra)
    proc = subprocess.Popen([sys.executable, "-m", "expertswitch.cli", *args], env=clean_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    ckpts = tmp_path / "cut" / "checkpoints"
    deadline = time.monotonic() + 600
    while not (ckpts / "step-00000020").exists() and proc.poll() is None:
        assert time.monotonic() < deadline, "the run made no checkpoint in 10 minutes"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (tmp_path / "cut" / "model").exists()
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming" in again.stdout + again.stderr
    a, b = read_csv(tmp_path / "full" / "metrics.csv"), read_csv(tmp_path / "cut" / "metrics.csv")
    keys = ["step", "tokens", "lr", "loss", "lm_loss", "aux_loss", "grad_norm"]
    assert [[r[k] for k in keys] for r in b] == [[r[k] for k in keys] for r in a]
    assert read_csv(tmp_path / "full" / "eval.csv") == read_csv(tmp_path / "cut" / "eval.csv")
    assert [s for s, _ in list_checkpoints(tmp_path / "cut")] == [50, 60]  # keep 2


def test_unreadable_checkpoint_falls_back_and_export_works(tmp_path):
    out = tmp_path / "run"
    train(tiny("dense", out, "optim.steps=20", "checkpoint_every=5", "keep_checkpoints=3"),
          progress=False)  # fmt: skip
    assert [s for s, _ in list_checkpoints(out)] == [10, 15, 20]
    newest = out / "checkpoints" / "step-00000020" / "state.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # a disk error: truncated
    with pytest.raises(CheckpointError, match="delete it"):
        load_checkpoint(newest.parent)
    logs: list[str] = []
    s = train(tiny("dense", out, "optim.steps=25", "checkpoint_every=5", "keep_checkpoints=3"),
              progress=False, log=logs.append)  # fmt: skip
    assert any("warning" in m and "step-00000020" in m for m in logs)
    assert any("resuming" in m and "step 15" in m for m in logs)
    assert [r["step"] for r in read_csv(out / "metrics.csv")] == list(range(1, 26))
    assert s.losses and len(s.losses) == 10  # steps 16 … 25 ran in this call
    r = run_cli("export-checkpoint", str(out / "checkpoints" / "step-00000025"), "--out",
                str(tmp_path / "hf"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = CausalLM.from_pretrained(out / "model").eval()
    ids = torch.randint(0, 500, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)
    assert (tmp_path / "hf" / "tokenizer.json").is_file()


def test_checkpoint_loader_fuzz(tmp_path):
    """Truncations and garbage at any length: a CheckpointError naming the way out, never a
    deep torch traceback."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from expertswitch.train.checkpoint import save_checkpoint

    path = save_checkpoint(tmp_path, 3, {"step": 3, "model": {"w": torch.randn(4, 4)}}, 1)
    good = (path / "state.pt").read_bytes()
    assert load_checkpoint(path)["step"] == 3

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.integers(0, len(good) - 1), st.binary(max_size=64))
    def check(cut, junk):
        (path / "state.pt").write_bytes(good[:cut] + junk)
        try:
            state = load_checkpoint(path)
        except CheckpointError as e:
            assert "delete it" in str(e)
        else:  # junk that happens to complete a valid file must still be this checkpoint
            assert state["step"] == 3

    check()


# --- configs and run directories ----------------------------------------------------------


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config(None, "gigantic")
    with pytest.raises(ConfigError, match=r"unknown setting optim\.lrr"):
        load_config(None, "dense", ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="multiple of grad_accum"):
        load_config(None, "dense", ["optim.batch_size=10", "optim.grad_accum=4"])
    with pytest.raises(ConfigError, match="give 3 MoE layers"):
        load_config(None, "moe", ["model.moe.experts=8x2"])
    with pytest.raises(ConfigError, match="student_layers"):
        load_config(None, "mos", ["kd.student_layers=null"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, "dense", ["optim.lr"])
    (tmp_path / "c.yaml").write_text("preset: moe\noptim: [1, 2]\n")
    with pytest.raises(ConfigError, match="optim. must be a mapping"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "c.yaml").write_text("preset: moe\nmodel: {moe: {experts: '4x1+8x2'}}\n")
    assert load_config(tmp_path / "c.yaml").moe_layers()[5]["num_experts"] == 8
    r = run_cli("train", "--preset", "dense", "--set", "optim.steps=0", "--out",
                str(tmp_path / "x"))  # fmt: skip
    assert r.returncode == 2 and "optim.steps must be a positive integer" in r.stderr
    assert "Traceback" not in r.stderr


def test_config_loader_fuzz():
    """Any mapping of YAML scalars: a RunConfig or a ConfigError, nothing else."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    keys = st.sampled_from(["seed", "optim", "optim.lr", "optim.steps", "model.moe",
                            "model.moe.k", "model.moe.experts", "data.seq_len", "kd", "kd.beta",
                            "eval_every", "model.num_layers", "nope"])  # fmt: skip
    values = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.floats(-1, 10),
                       st.sampled_from(["8x2", "x", "4x1+8x2", "", "[1, 2]",
                                        "{a: 1}"]))  # fmt: skip

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.tuples(keys, values), max_size=4), st.sampled_from(["dense", "moe", "mos"]))
    def check(items, preset):
        with contextlib.suppress(ConfigError):
            load_config(None, preset, [f"{k}={v}" for k, v in items])

    check()


def test_run_directory_is_protected(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(ConfigError, match="not a training run"):
        train(tiny("dense", tmp_path / "mine", "optim.steps=2"), progress=False)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
    train(tiny("dense", tmp_path / "run", "optim.steps=2"), progress=False)
    with pytest.raises(ConfigError, match="another config"):
        train(tiny("dense", tmp_path / "run", "optim.steps=2", "optim.lr=1e-4"), progress=False)
    s = train(tiny("dense", tmp_path / "run", "optim.steps=2", "optim.lr=1e-4"),
              overwrite=True, progress=False)  # fmt: skip
    assert s.losses and json.loads((tmp_path / "run" / "run.json").read_text())["optim"]["lr"] \
        == 1e-4  # fmt: skip


def test_torchrun_data_parallel_equals_one_process(tmp_path):
    """`torchrun -m expertswitch.train` with 2 gloo ranks, each on half of every batch, follows
    the single-process run (gradients averaged over ranks, experts' included). Dropless and
    without the aux loss: capacity and the balance loss are per rank's tokens by design (as in
    DeepSpeed), which would make the two runs differ legitimately."""
    extra = ["optim.steps=8", "eval_every=4", "model.moe.drop_tokens=false", "aux_loss_coef=0"]
    one = run_cli(*cli_args("moe", tmp_path / "one", *extra))
    assert one.returncode == 0, one.stderr[-2000:]
    sets = cli_args("moe", tmp_path / "two", *extra)[1:]
    env = clean_env(OMP_NUM_THREADS="1")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2", "-m", "expertswitch.train", *sets],
                         capture_output=True, text=True, timeout=900, env=env)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    a = read_csv(tmp_path / "one" / "eval.csv")
    b = read_csv(tmp_path / "two" / "eval.csv")
    for ra, rb in zip(a, b, strict=True):
        assert rb["val_loss"] == pytest.approx(ra["val_loss"], abs=2e-4)
    # the pre-clip gradient norm: a gradient summed instead of averaged over ranks shows here
    # (clipping and Adam would hide it from the weights)
    g1 = [r["grad_norm"] for r in read_csv(tmp_path / "one" / "metrics.csv")]
    g2 = [r["grad_norm"] for r in read_csv(tmp_path / "two" / "metrics.csv")]
    assert g2 == pytest.approx(g1, rel=1e-4)
    m1 = CausalLM.from_pretrained(tmp_path / "one" / "model")
    m2 = CausalLM.from_pretrained(tmp_path / "two" / "model")
    for (n, p), q in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=2e-4, msg=n)


def test_torchrun_expert_parallel_equals_one_process_and_resumes(tmp_path):
    """ep_size 2 on 2 gloo ranks (each holds half of every MoE layer's experts, tokens move by
    all-to-all) follows the single-process run; its sharded checkpoints resume exactly, and
    export-checkpoint gathers the experts back into one HF checkpoint."""
    extra = ["optim.steps=8", "eval_every=4", "checkpoint_every=4", "keep_checkpoints=3",
             "model.moe.drop_tokens=false", "aux_loss_coef=0"]  # fmt: skip
    one = run_cli(*cli_args("moe", tmp_path / "one", *extra))
    assert one.returncode == 0, one.stderr[-2000:]
    args = ["--standalone", "--nproc-per-node", "2", "-m", "expertswitch.train",
            *cli_args("moe", tmp_path / "ep", *extra, "ep_size=2")[1:]]  # fmt: skip
    env = clean_env(OMP_NUM_THREADS="1")

    def torchrun():
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", *args],
                           capture_output=True, text=True, timeout=900, env=env)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        return r

    torchrun()
    ckpt = tmp_path / "ep" / "checkpoints" / "step-00000008"
    assert sorted(p.name for p in ckpt.iterdir()) == ["meta.json", "state-rank00000.pt",
                                                      "state-rank00001.pt"]  # fmt: skip
    m1 = CausalLM.from_pretrained(tmp_path / "one" / "model")
    m2 = CausalLM.from_pretrained(tmp_path / "ep" / "model")
    for (n, p), q in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=2e-4, msg=n)
    g1 = [r["grad_norm"] for r in read_csv(tmp_path / "one" / "metrics.csv")]
    g2 = [r["grad_norm"] for r in read_csv(tmp_path / "ep" / "metrics.csv")]
    assert g2 == pytest.approx(g1, rel=1e-4)  # experts' shares summed over the EP group
    r = run_cli("export-checkpoint", str(ckpt), "--out", str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    m3 = CausalLM.from_pretrained(tmp_path / "hf")
    for (n, p), q in zip(m2.named_parameters(), m3.parameters()):
        assert torch.equal(p, q), n

    def curve():  # all but the throughput
        return [{k: v for k, v in r.items() if k != "tokens_per_s"}
                for r in read_csv(tmp_path / "ep" / "metrics.csv")]  # fmt: skip

    before = curve()

    shutil.rmtree(ckpt)  # back to step 4: the second launch resumes there
    shutil.rmtree(tmp_path / "ep" / "model")
    again = torchrun()
    assert "resuming" in again.stdout + again.stderr and "at step 4" in again.stdout
    assert curve() == before
    # one process cannot resume a 2-rank expert-parallel checkpoint: told so, never skipped
    from expertswitch.train.checkpoint import LayoutMismatch, latest_state

    with pytest.raises(LayoutMismatch, match="same world size"):
        latest_state(tmp_path / "ep")
    r = run_cli(*cli_args("moe", tmp_path / "ep", *extra, "ep_size=2"))
    assert r.returncode == 2 and "multiple of it" in r.stderr


def test_engine_expert_parallel_generate_equals_one_process(tmp_path):
    """The engine's MoE path over 2 gloo ranks (`torchrun -m expertswitch.cli generate
    --expert-parallel-size 2`): each rank holds half the experts, tokens reach them by
    all-to-all, and the answers are the single process' (seeded sampling); unseeded
    sampling draws rank 0's seed on every rank (the CLI checks that the ranks agree)."""
    torch.manual_seed(3)
    model = CausalLM.from_config(moe_config())
    model.save_pretrained(tmp_path)
    env = clean_env(OMP_NUM_THREADS="1")
    ask = ["generate", "--base", str(tmp_path), "--prompt-ids", "5,6,7,8", "--prompt-ids",
           "9,10,11", "--max-tokens", "8"]  # fmt: skip
    for sampling in (["--temperature", "0.8", "--seed", "3"],):
        one = run_cli(*ask, *sampling)
        assert one.returncode == 0, one.stderr[-2000:]
        two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              "--nproc-per-node", "2", "-m", "expertswitch.cli", *ask, *sampling,
                              "--expert-parallel-size", "2"], capture_output=True, text=True,
                             timeout=900, env=env)  # fmt: skip
        assert two.returncode == 0, two.stderr[-3000:]
        assert two.stdout.strip() == one.stdout.strip() and one.stdout.count("[base]") == 2
    free = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", "-m", "expertswitch.cli", *ask,
                           "--temperature", "1.0", "--expert-parallel-size", "2"],
                          capture_output=True, text=True, timeout=900, env=env)  # fmt: skip
    assert free.returncode == 0, free.stderr[-3000:]
    r = run_cli(*ask, "--expert-parallel-size", "2")
    assert r.returncode == 2 and "torchrun" in r.stderr


def test_expert_parallel_with_replicas_equals_one_process(tmp_path):
    """World 4, ep_size 2: two EP groups, each expert shard replicated twice (expert gradients
    reduced over the expert-data-parallel group only, the gradient norm over an EP group, the
    export from ranks 0 and 1): still the single-process run."""
    extra = ["optim.steps=4", "eval_every=2", "model.moe.drop_tokens=false", "aux_loss_coef=0"]
    one = run_cli(*cli_args("moe", tmp_path / "one", *extra))
    assert one.returncode == 0, one.stderr[-2000:]
    env = clean_env(OMP_NUM_THREADS="1")
    four = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "4", "-m", "expertswitch.train",
                           *cli_args("moe", tmp_path / "four", *extra, "ep_size=2")[1:]],
                          capture_output=True, text=True, timeout=900, env=env)  # fmt: skip
    assert four.returncode == 0, four.stderr[-3000:]
    g1 = [r["grad_norm"] for r in read_csv(tmp_path / "one" / "metrics.csv")]
    g4 = [r["grad_norm"] for r in read_csv(tmp_path / "four" / "metrics.csv")]
    assert g4 == pytest.approx(g1, rel=1e-4)
    m1 = CausalLM.from_pretrained(tmp_path / "one" / "model")
    m4 = CausalLM.from_pretrained(tmp_path / "four" / "model")
    for (n, p), q in zip(m1.named_parameters(), m4.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=2e-4, msg=n)


def test_prepared_data_is_protected_and_checked(tmp_path):
    mine = tmp_path / "datasets"
    mine.mkdir()
    (mine / "corpus.txt").write_text("precious")
    with pytest.raises(ConfigError, match="not prepared training data"):
        train(tiny("dense", tmp_path / "a", "optim.steps=2", f"data.dir={mine}"), progress=False)
    assert (mine / "corpus.txt").read_text() == "precious"
    shared = tmp_path / "shared"
    train(tiny("dense", tmp_path / "b", "optim.steps=2", f"data.dir={shared}"), progress=False)
    assert not (tmp_path / "b" / "data").exists()
    with pytest.raises(ConfigError, match="prepared with other settings.*tokenizer"):
        train(tiny("dense", tmp_path / "c", "optim.steps=2", f"data.dir={shared}",
                   "data.vocab_size=600"), progress=False)  # fmt: skip
    with pytest.raises(ConfigError, match="prepared with other settings.*seed"):
        train(tiny("dense", tmp_path / "d", "optim.steps=2", f"data.dir={shared}", "seed=1"),
              progress=False)  # fmt: skip
    # the model a run exports carries the run's tokenizer: the same data serves a run from it
    s = train(tiny("dense", tmp_path / "e", "optim.steps=2", f"data.dir={shared}",
                   f"model.init_from={tmp_path / 'b' / 'model'}"), progress=False)  # fmt: skip
    assert s.losses


def test_export_checkpoint_never_destroys_a_directory(tmp_path):
    out = tmp_path / "run"
    train(tiny("dense", out, "optim.steps=2"), progress=False)
    ckpt = out / "checkpoints" / "step-00000002"
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("precious")
    from expertswitch.train.checkpoint import export_checkpoint

    for target in (tmp_path / "precious", out, ckpt):
        with pytest.raises(ConfigError):
            export_checkpoint(ckpt, target, overwrite=True)
    assert (tmp_path / "precious" / "thesis.tex").read_text() == "precious"
    assert (ckpt / "state.pt").is_file()
    export_checkpoint(ckpt, tmp_path / "m")
    with pytest.raises(ConfigError, match="--overwrite"):
        export_checkpoint(ckpt, tmp_path / "m")
    export_checkpoint(ckpt, tmp_path / "m", overwrite=True)
    r = run_cli("export-checkpoint", str(ckpt), "--out", str(tmp_path / "precious"),
                "--overwrite")  # fmt: skip
    assert r.returncode == 2 and "not a model checkpoint" in r.stderr, r.stderr
    (ckpt / "meta.json").write_text("{not json")
    r = run_cli("export-checkpoint", str(ckpt), "--out", str(tmp_path / "m2"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr


def test_resume_refuses_a_checkpoint_past_the_steps_and_diverging_runs_stop(tmp_path):
    out = tmp_path / "run"
    train(tiny("dense", out, "optim.steps=6"), progress=False)
    with pytest.raises(ConfigError, match="past optim.steps"):
        train(tiny("dense", out, "optim.steps=4"), progress=False)
    # a start model with a NaN weight: every update is skipped, then the run stops, clearly
    model = CausalLM.from_pretrained(out / "model")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    (tmp_path / "nan").mkdir()
    model.save_pretrained(tmp_path / "nan")
    (tmp_path / "nan" / "tokenizer.json").write_bytes((out / "model" / "tokenizer.json")
                                                      .read_bytes())  # fmt: skip
    from expertswitch.train.trainer import MAX_BAD_STEPS, TrainingDiverged

    logs: list[str] = []
    with pytest.raises(TrainingDiverged, match="non-finite"):
        cfg = tiny("dense", tmp_path / "n", "optim.steps=20", f"model.init_from={tmp_path / 'nan'}")
        train(cfg, progress=False, log=logs.append)
    assert sum("skipped" in m for m in logs) == MAX_BAD_STEPS


def test_moe_validation_loss_does_not_depend_on_the_eval_batch(pr_moe_teacher):
    """Evaluation routes dropless (as serving does), so the loss is the same whatever the
    micro-batch, hence whatever the world size."""
    from expertswitch.train.data import prepare_data, val_batches
    from expertswitch.train.trainer import evaluate

    out = pr_moe_teacher[0]
    cfg = tiny("pr-moe", out, "optim.steps=40")
    batches = val_batches(prepare_data(cfg, out / "data"), cfg)
    model = CausalLM.from_pretrained(out / "model")
    a = evaluate(model, batches, 8, torch.device("cpu"))
    b = evaluate(model, batches, 1, torch.device("cpu"))
    assert a == pytest.approx(b, abs=2e-5)
    assert all(m.gate.drop_tokens for m in model.moe_layers())  # restored after


def test_student_keeps_its_layers_attention_windows(tmp_path):
    """A Qwen2 teacher whose last layers use sliding windows: the student's kept layers keep
    their own kind of attention."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from expertswitch.train import distill

    cfg = Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                      max_position_embeddings=64, use_sliding_window=True, sliding_window=8,
                      max_window_layers=2)  # fmt: skip
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "t")
    teacher = CausalLM.from_pretrained(tmp_path / "t")
    assert teacher.cfg.sliding_windows == [None, None, 8, 8]
    student = distill.make_student(teacher, [1, 3])
    assert student.cfg.sliding_windows == [None, 8]
    x = torch.randn(1, 20, 64)  # 20 tokens > the window of 8: a window changes the output
    cos_sin = teacher.rope.cos_sin(torch.arange(20))
    with torch.no_grad():  # the student's layer 1 is the teacher's layer 3, window and all
        want = teacher.model.layers[3](x, teacher.rope, *cos_sin)[0]
        got = student.model.layers[1](x, student.rope, *cos_sin)[0]
        teacher.model.layers[3].self_attn.window = None
        unwindowed = teacher.model.layers[3](x, teacher.rope, *cos_sin)[0]
    assert torch.equal(got, want) and not torch.allclose(want, unwindowed)


def test_yaml_and_config_json_fuzz(tmp_path):
    """Random YAML documents and random moe_layers entries: a config or a ConfigError."""
    import yaml
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from expertswitch.models.config import ModelConfig

    scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(-2, 2),
                        st.text(max_size=4))  # fmt: skip
    names = ["preset", "optim", "model", "moe", "lr", "steps", "kd", "experts", "data", "k"]
    keys = st.one_of(st.sampled_from(names), st.integers(0, 3))
    docs = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(keys, inner, max_size=4)),
                        max_leaves=12)  # fmt: skip
    path = tmp_path / "c.yaml"

    @settings(max_examples=400, deadline=None)
    @given(docs)
    def check_yaml(doc):
        path.write_text(yaml.safe_dump(doc))
        with contextlib.suppress(ConfigError):
            load_config(path)

    check_yaml()
    base = moe_config()

    @settings(max_examples=150, deadline=None)
    @given(st.lists(st.one_of(st.none(), scalars, st.dictionaries(
        st.sampled_from(["num_experts", "k", "use_residual", "drop_tokens", "capacity_factor",
                         "noisy_gate_policy", "min_capacity", "x"]), scalars, max_size=4)),
        min_size=3, max_size=3))  # fmt: skip
    def check_layers(layers):
        with contextlib.suppress(ConfigError):
            ModelConfig.from_dict({**base, "moe_layers": layers})

    check_layers()
    bad = {**base, "moe_layers": [None, {"num_experts": 4, "drop_tokens": "no"}, None]}
    with pytest.raises(ConfigError, match="true or false"):
        ModelConfig.from_dict(bad)


@pytest.mark.gpu
def test_gpu_training_step_runs_experts_in_bf16_with_fp32_gradients(tmp_path):
    """On a GPU under bf16 autocast: the stacked experts' grouped kernels get bf16 operands
    (autocast does not reach a custom autograd Function by itself), the gate stays fp32, the
    master weights get fp32 gradients, and a short run's loss goes down."""
    from expertswitch.models.causal_lm import build_moe
    from expertswitch.models.config import ModelConfig, MoELayerSpec

    cfg = ModelConfig.from_dict(moe_config())
    moe = build_moe(cfg, MoELayerSpec(num_experts=4, k=2)).cuda().train()
    x = torch.randn(64, cfg.hidden_size, device="cuda", requires_grad=True)
    with torch.autocast("cuda", torch.bfloat16):
        out, aux, _ = moe(x)
    assert out.dtype == torch.bfloat16 and aux.dtype == torch.float32
    out.float().sum().backward()
    assert moe.experts.w_in.grad.dtype == torch.float32
    assert moe.experts.w_in.grad.abs().sum() > 0 and moe.gate.wg.weight.grad.abs().sum() > 0
    moe.eval()
    with torch.no_grad():
        plain = moe.gate(x).probs
        with torch.autocast("cuda", torch.bfloat16):
            cast = moe.gate(x).probs
    assert torch.equal(plain, cast)  # fp32 logits under autocast too
    s = train(tiny("moe", tmp_path / "run", "optim.steps=30", "device=cuda"), progress=False)
    first, last = first_last(read_csv(tmp_path / "run" / "metrics.csv"), "lm_loss")
    assert last < first - 0.5 and s.val[-1]["val_loss"] < s.val[0]["val_loss"]


def test_yaml_moe_section_offers_every_moe_layer_option():
    """model.moe (the YAML schema) and MoELayerSpec (config.json's moe_layers) name the same
    gate options: one added to the layer must be settable from a run's config too."""
    from dataclasses import fields

    from expertswitch.models.config import MoELayerSpec
    from expertswitch.train.config import MoESection

    layout = {"experts", "moe_every", "first_moe_layer"}
    yaml_opts = {f.name: f.default for f in fields(MoESection) if f.name not in layout}
    spec_opts = {f.name: f.default for f in fields(MoELayerSpec) if f.name != "num_experts"}
    assert yaml_opts == spec_opts
