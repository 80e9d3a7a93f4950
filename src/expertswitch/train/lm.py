"""A plain causal-LM training loop: AdamW, warm-up then cosine decay, random windows of a
token stream (or a mixture of streams), progress bar with the running loss."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class TrainConfig:
    steps: int
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 20
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    mixture: tuple[float, ...] | None = None  # sampling weight of each stream; None = equal


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def sample_batch(streams: list[torch.Tensor], cfg: TrainConfig, gen: torch.Generator):
    """[B, T] windows; each row from a stream drawn by the mixture weights."""
    rows = []
    weights = torch.tensor(cfg.mixture or [1.0] * len(streams), dtype=torch.float)
    which = torch.multinomial(weights, cfg.batch_size, replacement=True, generator=gen)
    for s in which.tolist():
        stream = streams[s]
        start = int(torch.randint(len(stream) - cfg.seq_len, (1,), generator=gen))
        rows.append(stream[start : start + cfg.seq_len])
    return torch.stack(rows)


def train_lm(model, streams: list[torch.Tensor], cfg: TrainConfig, device="cpu", progress=True,
             desc="training") -> list[float]:  # fmt: skip
    """Train `model` (an HF causal LM) in place; returns the loss of every step."""
    from tqdm.auto import tqdm

    too_short = [len(s) for s in streams if len(s) <= cfg.seq_len]
    if too_short:
        raise ValueError(f"a token stream of {too_short[0]} tokens is shorter than seq_len")
    gen = torch.Generator().manual_seed(cfg.seed)
    model.to(device).train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0}],
        lr=cfg.lr, betas=(0.9, 0.95),
    )  # fmt: skip
    losses = []
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress, unit="step")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        batch = sample_batch(streams, cfg, gen).to(device)
        # bf16 autocast on a GPU (fp32 master weights): the ~90M `small` family in minutes
        with torch.autocast("cuda", torch.bfloat16, enabled=str(device).startswith("cuda")):
            out = model(input_ids=batch, labels=batch)  # HF shifts: t+1 predicted from ≤ t
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    model.eval()
    return losses
