"""`train(cfg)`: language-model training for dense, MoE and PR-MoE models (models/causal_lm.py)
and Mixture-of-Students distillation, single process or data parallel under torchrun.

Per step: the step's batch (train/data.py), split into grad_accum micro-batches and across
ranks; loss = LM + aux_loss_coef·Σ aux + w_kd·T²·KL(teacher ‖ student); bf16 autocast on a
GPU (fp32 master weights); gradients averaged over ranks (parallel/grads.py), clipped; AdamW
with linear warm-up then cosine decay to min_lr_ratio·lr. Evaluation every eval_every steps on
the held-out streams; a checkpoint every checkpoint_every steps and at the end; the final model
exported to RUN/model as an HF checkpoint.

    RUN/run.json  config      RUN/data/  tokenizer + token streams
    RUN/metrics.csv, eval.csv, tb/       RUN/checkpoints/step-N/      RUN/model/

Started again with the same config and --out, a run resumes from its newest checkpoint and
continues exactly as the uninterrupted run would have (same batches, same RNG draws).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from expertswitch.errors import CheckpointError, ConfigError, ExpertSwitchError
from expertswitch.models.causal_lm import CausalLM
from expertswitch.train import checkpoint as ckpt
from expertswitch.train import distill, sharding
from expertswitch.train.config import RunConfig, config_json, from_dict
from expertswitch.train.data import RunData, prepare_data, step_batch, val_batches
from expertswitch.train.logs import MetricsLog

RUN_FILE = "run.json"
MAX_BAD_STEPS = 10  # non-finite gradient norms in a row before the run stops


class TrainingDiverged(ExpertSwitchError):
    """The loss or the gradients stopped being finite and stayed so."""


@dataclass
class TrainSummary:
    run_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)  # LM loss per step (this process' share)
    val: list[dict] = field(default_factory=list)  # one row per evaluation
    kd: dict | None = None
    params: int = 0
    active_params: int = 0
    seconds: float = 0.0


@dataclass
class _World:
    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def from_rank0(self, value):
        """Rank 0's value (any picklable) on every rank."""
        if self.size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, 0)
        return box[0]


def _world(device: str) -> _World:
    """torchrun's environment (WORLD_SIZE > 1) → a process group: gloo on CPU, NCCL on GPUs."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and device != "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device} was asked for, but torch sees no CUDA GPU")
    if size == 1:
        return _World(device=torch.device(device if device.startswith("cuda") else
                                          "cuda" if cuda else "cpu"))  # fmt: skip
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    dev = torch.device(f"cuda:{local}" if cuda else "cpu")
    return _World(dist.get_rank(), dist.get_world_size(), dev)


def lr_factor(step: int, cfg: RunConfig) -> float:
    o = cfg.optim
    if step < o.warmup:
        return (step + 1) / o.warmup
    progress = min(1.0, (step - o.warmup) / max(1, o.steps - o.warmup))
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _hf_config(cfg: RunConfig, tok) -> dict:
    m = cfg.model
    moe = cfg.moe_layers()
    out = {
        "model_type": "expertswitch_moe" if moe else "llama",
        "architectures": ["ExpertSwitchMoEForCausalLM" if moe else "LlamaForCausalLM"],
        "hidden_size": m.hidden_size, "intermediate_size": m.intermediate_size,
        "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.num_kv_heads, "vocab_size": len(tok),
        "max_position_embeddings": m.max_position_embeddings, "rms_norm_eps": 1e-6,
        "rope_theta": m.rope_theta, "hidden_act": "silu",
        "tie_word_embeddings": m.tie_word_embeddings, "initializer_range": 0.02,
        "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }  # fmt: skip
    if moe:
        out["moe_layers"] = moe
    return out


# what a run writes in its directory: --overwrite deletes these and nothing else
RUN_ENTRIES = (RUN_FILE, "checkpoints", "model", "metrics.csv", "eval.csv", "tb", "data")


def _inputs(cfg: RunConfig) -> dict[str, str]:
    return {k: v for k, v in (("kd.teacher", cfg.kd and cfg.kd.teacher),
                              ("model.init_from", cfg.model.init_from),
                              ("data.tokenizer", cfg.data.tokenizer),
                              ("data.dir", cfg.data.dir)) if v}  # fmt: skip


def _prepare_run_dir(cfg: RunConfig, overwrite: bool) -> Path:
    """The run directory: new, or this same run's (resume), never someone else's files. A
    run.json whose run made no checkpoint yet is replaced (a config fixed after a failed
    start); one with checkpoints only with --overwrite, which deletes the run's own entries
    (RUN_ENTRIES) and refuses when an input of the run lies inside them."""
    run = Path(cfg.out)
    meta = run / RUN_FILE
    if run.resolve() == Path.cwd().resolve() or run.resolve() in Path.cwd().resolve().parents:
        raise ConfigError(f"--out {run} is the current directory or one above it: name a new "
                          "directory for the run")  # fmt: skip
    if meta.is_file():
        try:
            old = from_dict(json.loads(meta.read_text()))
        except (ValueError, ConfigError) as e:
            raise ConfigError(f"{meta} is unreadable ({e}); choose another --out") from None
        started = bool(ckpt.list_checkpoints(run))
        if old.fingerprint() != cfg.fingerprint() and started and not overwrite:
            raise ConfigError(f"{run} holds a run with another config: choose another --out, "
                              "or pass --overwrite to start it over (its checkpoints are "
                              "deleted)")  # fmt: skip
        if overwrite or old.fingerprint() != cfg.fingerprint():
            owned = [run / e for e in RUN_ENTRIES]
            for flag, path in _inputs(cfg).items():
                p = Path(path).resolve()
                if any(p == o.resolve() or o.resolve() in p.parents for o in owned):
                    raise ConfigError(f"{flag} {path} lies inside the run in --out {run}, "
                                      "which would be deleted: move it out first")  # fmt: skip
            for o in owned:
                if o.is_dir() and not o.is_symlink():
                    shutil.rmtree(o)
                elif o.exists() or o.is_symlink():
                    o.unlink()
    elif run.exists() and (not run.is_dir() or any(run.iterdir())):
        raise ConfigError(f"--out {run} exists and is not a training run: choose a new "
                          "directory")  # fmt: skip
    run.mkdir(parents=True, exist_ok=True)
    tmp = run / (RUN_FILE + ".tmp")
    tmp.write_text(config_json(cfg))
    os.replace(tmp, meta)
    return run


def _build_models(cfg: RunConfig, data: RunData) -> tuple[CausalLM, CausalLM | None]:
    """(the model to train, the teacher or None)."""
    torch.manual_seed(cfg.seed)
    teacher = None
    if cfg.kd is not None:
        teacher = CausalLM.from_pretrained(cfg.kd.teacher).eval().requires_grad_(False)
        layers = distill.student_layers(teacher.cfg.num_layers, cfg.kd.student_layers,
                                        cfg.kd.depth)  # fmt: skip
        model = distill.make_student(teacher, layers)
    elif cfg.model.init_from:
        model = CausalLM.from_pretrained(cfg.model.init_from)
    else:
        model = CausalLM.from_config(_hf_config(cfg, data.tokenizer))
    if model.cfg.vocab_size < data.vocab_size:
        raise ConfigError(f"the model's vocabulary ({model.cfg.vocab_size}) is smaller than the "
                          f"tokenizer's ({data.vocab_size}): give data.tokenizer the model's "
                          "own tokenizer")  # fmt: skip
    if cfg.data.seq_len >= model.cfg.max_position_embeddings:
        raise ConfigError(f"data.seq_len {cfg.data.seq_len} reaches the model's "
                          f"max_position_embeddings {model.cfg.max_position_embeddings}: "
                          "lower it")  # fmt: skip
    return model, teacher


def _optimizer(model: CausalLM, cfg: RunConfig, device: torch.device):
    o = cfg.optim
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # matrices decay; norms and biases (experts' stacked b_in/b_out are 2-D) do not
    decay = [p for n, p in params if p.dim() >= 2 and not _is_bias(n)]
    other = [p for n, p in params if p.dim() < 2 or _is_bias(n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": other, "weight_decay": 0}],
        lr=o.lr, betas=(o.beta1, o.beta2), fused=device.type == "cuda" or None,
    )  # fmt: skip
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    return opt, sched


def _is_bias(name: str) -> bool:
    return name.endswith(("bias", ".b_in", ".b_out"))


def _rng_state(device: torch.device) -> dict:
    out = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _autocast(device: torch.device):
    return torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def evaluate(model: CausalLM, batches: dict[str, torch.Tensor], micro: int, device) -> dict:
    """domain → mean next-token loss over its windows, and 'val_loss': their mean. MoE layers
    route dropless here, as the served model does: capacity would make the loss depend on
    the evaluation batch, so on the world size."""
    was = model.training
    model.eval()
    gates = [m.gate for m in model.moe_layers()]
    drops = [g.drop_tokens for g in gates]
    for g in gates:
        g.drop_tokens = False
    out = {}
    for name, windows in batches.items():
        total = 0.0
        for i in range(0, len(windows), micro):
            w = windows[i : i + micro].to(device)
            with _autocast(device):
                logits = model(w[:, :-1]).logits
            total += float(F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten())) * len(w)
        out[name] = round(total / len(windows), 5)
    out["val_loss"] = round(sum(out.values()) / len(out), 5)
    for g, d in zip(gates, drops):
        g.drop_tokens = d
    model.train(was)
    return out


class _Step:
    """One optimiser step's losses, kept on the device until the next log flush."""

    def __init__(self, device):
        self.lm = torch.zeros((), device=device)
        self.aux = torch.zeros((), device=device)
        self.kd = torch.zeros((), device=device)
        self.loss = torch.zeros((), device=device)


def _micro_step(model, teacher, x, y, cfg: RunConfig, w_kd: float, scale: float, acc: _Step):
    with _autocast(x.device):
        out = model(x)
        lm = F.cross_entropy(out.logits.flatten(0, 1), y.flatten())
        loss = lm + cfg.aux_loss_coef * out.aux_loss
        kd = None
        if w_kd > 0:
            with torch.no_grad():
                t_logits = teacher(x).logits
            kd = distill.kd_loss(out.logits, t_logits, cfg.kd.temperature)
            loss = loss + w_kd * kd
    (loss * scale).backward()
    acc.lm += lm.detach() * scale
    acc.aux += out.aux_loss.detach() * scale
    acc.loss += loss.detach() * scale
    if kd is not None:
        acc.kd += kd.detach() * scale


def _rank_rows(batch: torch.Tensor, cfg: RunConfig, world: _World) -> list[torch.Tensor]:
    """The step's batch → this rank's micro-batches."""
    ga = cfg.optim.grad_accum
    per_micro = cfg.optim.batch_size // ga
    if per_micro % world.size:
        raise ConfigError(f"optim.batch_size / grad_accum = {per_micro} sequences per "
                          "micro-batch is not a multiple of the world size "
                          f"{world.size}")  # fmt: skip
    return [batch[m * per_micro : (m + 1) * per_micro][world.rank :: world.size]
            for m in range(ga)]  # fmt: skip


def train(cfg: RunConfig, overwrite: bool = False, progress: bool = True,
          log=print) -> TrainSummary:  # fmt: skip
    """Run (or resume) the training `cfg` describes; see the module docstring."""
    from tqdm.auto import tqdm

    from expertswitch.parallel.grads import allreduce_gradients

    world = _world(cfg.device)
    ep = cfg.ep_size
    if ep > 1 and world.size % ep:
        raise ConfigError(f"ep_size {ep} needs a world size that is a multiple of it (now "
                          f"{world.size}): launch with torchrun --nproc-per-node N")  # fmt: skip
    say = log if world.main else (lambda *_: None)
    run = _prepare_run_dir(cfg, overwrite) if world.main else Path(cfg.out)
    world.barrier()
    data_dir = Path(cfg.data.dir) if cfg.data.dir else run / "data"
    if world.main:
        ckpt.clear_partial(run)
        data = prepare_data(cfg, data_dir, say)
    world.barrier()
    if not world.main:
        data = prepare_data(cfg, data_dir, say)
    model, teacher = _build_models(cfg, data)
    params, active = model.num_parameters(), model.num_parameters(active=True)
    if ep > 1:  # every rank built the same full model (same seed): keep this rank's experts
        full, model = model, CausalLM(model.cfg, model.hf_config, ep_size=ep)
        sharding.shard_from_full(model, full)
        del full
    model.to(world.device).train()
    if teacher is not None:
        teacher.to(world.device)
    opt, sched = _optimizer(model, cfg, world.device)
    kd_state = distill.KDState()
    start, tokens = 0, 0
    state = ckpt.latest_state(run, say, sharded=ep > 1)
    if state is not None:
        missing = sorted({"model", "optimizer", "scheduler", "rng", "kd", "tokens"} - set(state))
        if missing:
            raise CheckpointError(f"the newest checkpoint of {run} lacks {missing}: it was "
                                  "not written by this trainer; remove it or choose another "
                                  "--out")  # fmt: skip
        if state["step"] > cfg.optim.steps:
            raise ConfigError(f"{run} has a checkpoint of step {state['step']}, past "
                              f"optim.steps {cfg.optim.steps}: raise optim.steps, or use "
                              "another --out")  # fmt: skip
        try:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            _set_rng_state(state["rng"], world.device)
            kd_state = distill.KDState(**state["kd"])
            start, tokens = int(state["step"]), int(state["tokens"])
        except (RuntimeError, ValueError, TypeError, KeyError) as e:
            err = CheckpointError(f"the newest checkpoint of {run} does not fit this model "
                                  f"({type(e).__name__}: {str(e)[:300]}); did the teacher or "
                                  "init_from model change? Use another --out")  # fmt: skip
            raise err from None
        say(f"resuming {run} at step {start}")
    else:
        torch.manual_seed(cfg.seed + 1)  # the gates' noise: the same draws on every resume
    if kd_state.stopped_at is not None or cfg.kd is None:
        teacher = None  # not needed again: free its memory
    summary = TrainSummary(run, cfg.optim.steps, params=params, active_params=active)
    val_sets = val_batches(data, cfg) if cfg.eval_every else {}
    logs = MetricsLog(run, [*cfg.data.domains, "val_loss", "kd_active"], start,
                      cfg.tensorboard, say) if world.main else None  # fmt: skip
    micro = cfg.optim.batch_size // cfg.optim.grad_accum // world.size
    tokens_per_step = cfg.optim.batch_size * cfg.data.seq_len
    pending: list[tuple[int, float, float, _Step, torch.Tensor]] = []
    bad_steps = 0
    t0, tok0 = time.perf_counter(), tokens
    bar = tqdm(range(start, cfg.optim.steps), initial=start, total=cfg.optim.steps,
               desc="training", unit="step", disable=not (progress and world.main))  # fmt: skip
    began = time.perf_counter()
    for step in bar:
        msg = distill.update_on_step(kd_state, step, cfg.kd.stop_step if cfg.kd else None)
        if msg:
            say(msg)
            teacher = None
        w_kd = distill.kd_weight(kd_state, cfg.kd.beta) if cfg.kd and teacher is not None else 0.0
        acc = _Step(world.device)
        scale = 1.0 / cfg.optim.grad_accum
        for rows in _rank_rows(step_batch(data, cfg, step), cfg, world):
            rows = rows.to(world.device, non_blocking=True)
            _micro_step(model, teacher, rows[:, :-1], rows[:, 1:], cfg, w_kd, scale, acc)
        allreduce_gradients(model)
        norm = sharding.clip_grad_norm(model, cfg.optim.grad_clip)
        lr = opt.param_groups[0]["lr"]
        # a non-finite gradient (equal on every rank: reduced first) skips the update, not the
        # batch; a run of them is an error, not weights turned to NaN
        finite = bool(torch.isfinite(norm))
        if finite:
            opt.step()
            bad_steps = 0
        else:
            bad_steps += 1
            say(f"warning: step {step + 1} has a non-finite gradient norm; its update is skipped")
            if bad_steps >= MAX_BAD_STEPS:
                raise TrainingDiverged(f"{bad_steps} steps in a row had non-finite gradients "
                                       f"(last: step {step + 1}): lower optim.lr, or resume "
                                       "from an earlier checkpoint")  # fmt: skip
        with warnings.catch_warnings():  # a skipped update still advances the schedule
            if not finite:
                warnings.simplefilter("ignore", UserWarning)
            sched.step()
        opt.zero_grad(set_to_none=True)
        tokens += tokens_per_step
        done = step + 1
        pending.append((done, lr, w_kd, acc, norm.detach()))
        save = (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) \
            or done == cfg.optim.steps  # fmt: skip
        if len(pending) >= cfg.log_every or save:  # a checkpoint never outruns its logged rows
            rate = (tokens - tok0) / max(time.perf_counter() - t0, 1e-9)
            rows_out = _flush(pending, tokens, tokens_per_step, rate)
            summary.losses += [r["lm_loss"] for r in rows_out]
            if logs:
                logs.steps(rows_out)
            bar.set_postfix(loss=f"{rows_out[-1]['loss']:.3f}", tok_s=f"{rate:,.0f}")
            pending.clear()
            t0, tok0 = time.perf_counter(), tokens
        if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.optim.steps):
            row = {"step": done, **evaluate(model, val_sets, micro, world.device)}
            row["kd_active"] = int(kd_state.active and cfg.kd is not None)
            row = world.from_rank0(row)  # one KD decision for all ranks
            if cfg.kd is not None:
                msg = distill.update_on_eval(kd_state, done, row["val_loss"],
                                             cfg.kd.plateau_patience, cfg.kd.min_delta)  # fmt: skip
                if msg:
                    say(msg)
                    teacher = None
            summary.val.append(row)
            if logs:
                logs.evaluation(row)
        if save:
            if logs:
                logs.flush()
            state = {"step": done, "tokens": tokens, "model": model.state_dict(),
                     "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                     "rng": _rng_state(world.device), "kd": kd_state.to_dict(),
                     "hf_config": model.hf_config, "ep_size": ep}  # fmt: skip
            if ep > 1:
                ckpt.save_sharded_checkpoint(run, done, state, cfg.keep_checkpoints)
            elif world.main:
                ckpt.save_checkpoint(run, done, state, cfg.keep_checkpoints)
            world.barrier()
    summary.seconds = round(time.perf_counter() - began, 2)
    summary.kd = kd_state.to_dict() if cfg.kd else None
    if logs:
        logs.close()
    if ep > 1:  # the whole model on rank 0 (a collective)
        state = sharding.full_state(model)
        if world.main:
            model = CausalLM(model.cfg, model.hf_config)
            model.load_state_dict(state)
    if world.main:
        ckpt.export_model(model, data.tokenizer, run / "model")
        say(f"trained {cfg.optim.steps} steps; the model is in {run / 'model'}")
    world.barrier()
    return summary


def _flush(pending, tokens: int, per_step: int, rate: float) -> list[dict]:
    """The pending steps' scalars in one host transfer → metrics rows."""
    vals = torch.stack([torch.stack([a.loss, a.lm, a.aux, a.kd, n.float()])
                        for _, _, _, a, n in pending]).float().cpu().tolist()  # fmt: skip
    first = tokens - per_step * (len(pending) - 1)
    rows = []
    for i, ((done, lr, w_kd, _, _), v) in enumerate(zip(pending, vals)):
        rows.append({"step": done, "tokens": first + i * per_step, "lr": lr, "loss": v[0],
                     "lm_loss": v[1], "aux_loss": v[2], "kd_loss": v[3], "kd_weight": w_kd,
                     "grad_norm": v[4], "tokens_per_s": round(rate, 1)})  # fmt: skip
    return rows
