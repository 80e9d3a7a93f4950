"""Step-size tuning by layer-wise distillation (ME-Switch's learnable step sizes).

The fine-tuned layer computes x·(W + Δ)ᵀ and the compressed one x·(W + Δ̂)ᵀ, so on calibration
inputs x the error of the layer's output is x·(Δ − Δ̂)ᵀ: the base weight cancels and the teacher
output needs no forward pass of the expert. The step sizes (log-parametrised, one per row and
group) are trained with Adam through a straight-through rounding (LSQ), codes following the
steps. The best step sizes seen are kept, so tuning never ends worse than it started.
"""

from __future__ import annotations

import torch

from expertswitch.compress.quant import from_groups, qmax, to_groups


def _fake_quant(wg, scale, zero, bits):
    qm = qmax(bits)
    s = scale.unsqueeze(-1)
    v = wg / s + (qm / 2 if zero is None else 0.0)
    v = v + (torch.round(v) - v).detach()  # straight-through rounding
    if zero is not None:
        v = v + zero.unsqueeze(-1).float()
    q = torch.clamp(v, 0, qm)
    offset = qm / 2 if zero is None else zero.unsqueeze(-1).float()
    return (q - offset) * s


def tune_scales(
    delta: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    x: torch.Tensor,
    bits: int,
    group_size: int,
    steps: int,
    lr: float = 1e-2,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float, float]:
    """Refine step sizes [N, G] of delta [N, K] on calibration inputs x [R, K].

    keep: [K] float mask, 0 on channels handled elsewhere (salient ones kept in fp16).
    Returns (scales, loss before, loss after), losses as mean squared output error.
    """
    k = delta.shape[1]
    x = x.to(delta.device).float()
    keep = torch.ones(k, device=delta.device) if keep is None else keep.to(delta.device).float()
    xk = x * keep  # masked channels contribute nothing, whatever their codes hold
    target = xk @ delta.T  # [R, N]
    wg = to_groups(delta, group_size)
    log_s = torch.nn.Parameter(scales.float().clamp_min(torch.finfo(torch.float32).tiny).log())
    opt = torch.optim.Adam([log_s], lr=lr)

    def loss_fn():
        approx = from_groups(_fake_quant(wg, log_s.exp(), zeros, bits), k)
        return (xk @ approx.T - target).square().mean()

    first = best = None
    best_s = log_s.detach().clone()
    for step in range(steps + 1):
        loss = loss_fn()  # loss of the current step sizes, before this step's update
        cur = loss.item()
        if first is None:
            first = cur
        if best is None or cur < best:
            best, best_s = cur, log_s.detach().clone()
        if step == steps:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return best_s.exp(), first, best
