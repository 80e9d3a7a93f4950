"""Model-level distillation of step sizes (BitDelta's scale distillation; ME-Switch's learnable
steps, trained end to end).

Layer-wise tuning (compress/tune.py) fits each layer's own output on base-model activations;
errors that add up across layers, and what matters — the next-token distribution — are out of
its sight. Here the fine-tuned expert is the teacher and the whole compressed model the student:

    teacher   the expert's top-k next-token log-probabilities on the calibration windows,
              computed once and kept (int32 ids): the expert is freed before the student is
              built, so the two never share memory
    student   the base with every quantized linear weight W + Δ̂(s), Δ̂ = dequant(codes; s) plus
              the salient channels, exact; the codes stay fixed, the step sizes s (one per row
              and group, log-parametrised) are trained
    loss      KL(teacher ‖ student) over the teacher's top-k tokens plus one bucket for the
              rest of the vocabulary, Adam, a fixed number of steps; validation on held-apart
              windows every few steps, and the best step sizes seen are kept — so distillation
              never ends worse (on held-apart text) than the fit it started from

Only 2-D linear deltas in [out, in] layout take part (stacked MoE experts and transposed Conv1D
weights keep their fitted steps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from expertswitch.compress.packed import PackedDelta
from expertswitch.compress.packing import unpack_codes
from expertswitch.compress.quant import dequantize_groups

_FP16_TOP_EXP = 14  # as PackedDelta.build: the largest stored fp16 value ≤ 2^14


@dataclass
class DistillOptions:
    steps: int = 100
    lr: float = 1e-2
    top_k: int = 32
    batch_size: int = 4
    val_share: float = 0.25
    eval_every: int = 10


class _Student(torch.nn.Module):
    """One linear weight as W + Δ̂(s): the codes' term with trainable steps, the salient
    channels' exact values fixed."""

    def __init__(self, base_w: torch.Tensor, p: PackedDelta, device):
        super().__init__()
        mult = 2.0**p.scale_exp
        self.base = base_w.detach().float().to(device)
        self.codes = unpack_codes([t.to(device) for t in p.planes], p.bits)
        self.zeros = None if p.zeros is None else p.zeros.to(device)
        self.p = p
        scales = p.scales.float().to(device) * mult
        self.log_s = torch.nn.Parameter(scales.clamp_min(torch.finfo(torch.float32).tiny).log())
        self.keep = torch.ones(p.k, device=device)
        self.salient = torch.zeros(p.shape, device=device)
        if p.salient_idx is not None:  # the salient channels' Δ̂ as stored: fixed, exact
            idx = p.salient_idx.long().to(device)
            body = self._codes_term(scales)
            exact = body[:, idx] + p.salient_cols.float().to(device) * mult
            self.keep[idx] = 0.0
            self.salient[:, idx] = exact

    def _codes_term(self, scales: torch.Tensor) -> torch.Tensor:
        p = self.p
        return dequantize_groups(self.codes, scales, self.zeros, p.bits, p.group_size, p.k)

    def delta(self) -> torch.Tensor:
        return self._codes_term(self.log_s.exp()) * self.keep + self.salient

    def weight(self) -> torch.Tensor:
        return self.base + self.delta()

    def packed(self) -> PackedDelta:
        """The PackedDelta with the trained steps (codes unchanged; salient residuals
        recomputed so the salient channels keep their exact values)."""
        p = self.p
        with torch.no_grad():
            s = self.log_s.exp()
            resid = None
            if p.salient_idx is not None:
                idx = p.salient_idx.long().to(s.device)
                resid = self.salient[:, idx] - self._codes_term(s)[:, idx]
            peak = max(s.abs().max().item(), 0 if resid is None else resid.abs().max().item())
            exp = math.ceil(math.log2(peak)) - _FP16_TOP_EXP if peak > 0 else 0
            mult = 2.0**-exp
            return PackedDelta(
                shape=p.shape, bits=p.bits, group_size=p.group_size, symmetric=p.symmetric,
                scale_exp=exp, planes=p.planes, scales=(s * mult).half().cpu(), zeros=p.zeros,
                salient_idx=p.salient_idx,
                salient_cols=None if resid is None else (resid * mult).half().cpu(),
            )  # fmt: skip


def teacher_topk(expert_dir: str | Path, windows: torch.Tensor, k: int, batch: int, device):
    """(log-probs fp32 [B, T, k], ids int32 [B, T, k]) of the expert's k most likely next
    tokens at every position; the model is freed before returning."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(expert_dir, dtype=torch.float32).to(device)
    vals, ids = [], []
    with torch.inference_mode():
        for chunk in windows.split(batch):
            logp = torch.log_softmax(model(chunk.to(device)).logits.float(), dim=-1)
            v, i = logp.topk(k, dim=-1)
            vals.append(v.cpu())
            ids.append(i.int().cpu())
    del model
    return torch.cat(vals), torch.cat(ids)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x ≤ 0, stable."""
    return torch.where(x > -0.693, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _kl(student_logits: torch.Tensor, t_logp: torch.Tensor, t_ids: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) on the teacher's top-k tokens plus one bucket for all the others
    (exact for that coarsening of the vocabulary): the student is held to the teacher's
    probabilities of its likely tokens and to the mass it leaves elsewhere."""
    log_ps = torch.log_softmax(student_logits.float(), dim=-1).gather(-1, t_ids.long())
    eps = -1e-6  # a bucket of (numerically) zero mass would be −inf
    t_tail = _log1mexp(torch.logsumexp(t_logp, -1).clamp_max(eps))
    s_tail = _log1mexp(torch.logsumexp(log_ps, -1).clamp_max(eps))
    top = (t_logp.exp() * (t_logp - log_ps)).sum(-1)
    return (top + t_tail.exp() * (t_tail - s_tail)).mean()


def distill_steps(base_dir: str | Path, expert_dir: str | Path,
                  packed: dict[str, PackedDelta], windows: torch.Tensor,
                  opts: DistillOptions, device: str = "cpu", progress: bool = False,
                  fixed: dict[str, torch.Tensor] | None = None,
                  ) -> tuple[dict[str, PackedDelta], dict]:  # fmt: skip
    """Distil the step sizes of `packed` (weight name → PackedDelta) on token windows [B, T].
    `fixed`: every other tensor the rebuilt expert changes (name → its value), set in the
    student, which is then the model the archive rebuilds. Returns the tuned PackedDeltas and a
    report of the losses."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    n_val = max(1, int(len(windows) * opts.val_share))
    if len(windows) < 2:
        raise ValueError("distillation needs at least two calibration windows")
    train, val = windows[n_val:], windows[:n_val]
    t_vals, t_ids = teacher_topk(expert_dir, windows, opts.top_k, opts.batch_size, device)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(device)
    model.requires_grad_(False)
    state = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, value in (fixed or {}).items():
            if name not in state or tuple(state[name].shape) != tuple(value.shape):
                raise ValueError(f"{name}: not a parameter of this shape in the student")
            state[name].copy_(value.to(state[name].dtype))
    students: dict[str, _Student] = {}
    for name, p in packed.items():
        mod = model.get_submodule(name.removesuffix(".weight"))
        if not isinstance(mod, torch.nn.Linear) or tuple(mod.weight.shape) != p.shape:
            continue
        students[name] = _Student(mod.weight, p, device)
        _bind(mod, students[name])
    if not students:
        return {}, {"tensors": 0}
    params = [s.log_s for s in students.values()]
    opt = torch.optim.Adam(params, lr=opts.lr)

    def val_loss() -> float:
        with torch.no_grad():
            losses = [_kl(model(c.to(device)).logits, t_vals[:n_val][i : i + len(c)],
                          t_ids[:n_val][i : i + len(c)])
                      for i, c in zip(range(0, n_val, opts.batch_size),
                                      val.split(opts.batch_size))]  # fmt: skip
        return float(torch.stack(losses).mean())

    first = best = val_loss()
    best_state = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(0)
    for step in tqdm(range(1, opts.steps + 1), desc="distilling", disable=not progress):
        pick = torch.randint(0, len(train), (min(opts.batch_size, len(train)),), generator=gen)
        loss = _kl(model(train[pick].to(device)).logits, t_vals[n_val:][pick],
                   t_ids[n_val:][pick])  # fmt: skip
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % opts.eval_every == 0 or step == opts.steps:
            cur = val_loss()
            if cur < best:
                best, best_state = cur, [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, b in zip(params, best_state):
            p.copy_(b)
    tuned = {name: s.packed() for name, s in students.items()}
    return tuned, {"tensors": len(tuned), "val_kl_before": float(f"{first:.6g}"),
                   "val_kl_after": float(f"{best:.6g}"), "steps": opts.steps}  # fmt: skip


def _bind(mod: torch.nn.Linear, student: _Student) -> None:
    """Make `mod` compute with the student's weight (recomputed each forward, so gradients reach
    the step sizes)."""
    del mod.weight
    mod.register_module("student", student)

    def pre_hook(m, args):
        m.weight = m.student.weight()

    mod.register_forward_pre_hook(pre_hook)
