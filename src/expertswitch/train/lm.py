"""A plain causal-LM training loop: AdamW, warm-up then cosine decay, random windows of a
token stream (or a mixture of streams), progress bar with the running loss. A stream is raw text
(every token is a target) or a `SupervisedStream` of (prompt, answer) examples: windows start at
an example and hold whole examples, and only answer tokens are targets (as instruction tuning
masks the prompt). With validation
streams it evaluates every `val_every` steps and ends on the best weights seen (early stopping:
a fine-tune on a small domain — the `small` family's prose has ~100K tokens — must not end
memorising it)."""

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
    val_every: int = 0  # 0: no validation
    val_windows: int = 64  # seq_len windows per validation stream


@dataclass
class SupervisedStream:
    ids: torch.Tensor  # [N] examples end to end
    answer: torch.Tensor  # [N] bool: a target token (the answer and its separator)
    starts: torch.Tensor  # [E] offset of each example, increasing
    pad_id: int = 0

    def __len__(self) -> int:
        return len(self.ids)


def supervised_stream(tok, pairs, sep: str = "\n\n") -> SupervisedStream:
    """Tokenize (prompt, answer) pairs into a SupervisedStream; each answer is followed by `sep`
    (also a target: the model learns to stop)."""
    sep_ids = tok(sep)["input_ids"]
    ids: list[int] = []
    answer: list[bool] = []
    starts: list[int] = []
    for prompt, ans in pairs:
        p = tok(prompt)["input_ids"]
        whole = tok(prompt + ans)["input_ids"]
        if whole[: len(p)] != p:  # the answer's tokens must follow the prompt's unchanged
            raise ValueError(f"the tokenizer merges prompt {prompt!r} into its answer {ans!r}: "
                             "end prompts before the answer's whitespace")  # fmt: skip
        a = whole[len(p) :] + sep_ids
        starts.append(len(ids))
        ids += p + a
        answer += [False] * len(p) + [True] * len(a)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    return SupervisedStream(torch.tensor(ids), torch.tensor(answer), torch.tensor(starts), pad)


@dataclass
class TrainResult:
    losses: list[float]
    best_step: int | None = None  # steps done when the kept weights were seen; None: no val
    val_losses: list[tuple[int, float]] | None = None


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def sample_batch(streams: list, cfg: TrainConfig, gen: torch.Generator):
    """([B, T] input ids, [B, T] labels, -100 where nothing is predicted); each row from a stream
    drawn by the mixture weights."""
    rows, labels = [], []
    weights = torch.tensor(cfg.mixture or [1.0] * len(streams), dtype=torch.float)
    which = torch.multinomial(weights, cfg.batch_size, replacement=True, generator=gen)
    for s in which.tolist():
        stream = streams[s]
        if isinstance(stream, SupervisedStream):
            row, label = _supervised_window(stream, cfg.seq_len, gen)
        else:
            start = int(torch.randint(len(stream) - cfg.seq_len, (1,), generator=gen))
            row = stream[start : start + cfg.seq_len]
            label = row
        rows.append(row)
        labels.append(label)
    return torch.stack(rows), torch.stack(labels)


def _supervised_window(s: SupervisedStream, seq_len: int, gen: torch.Generator):
    """Whole examples from a random one on, as many as fit in seq_len, then padding."""
    k = int(torch.randint(len(s.starts), (1,), generator=gen))
    start = int(s.starts[k])
    ends = torch.cat([s.starts[k + 1 :], torch.tensor([len(s.ids)])])
    fits = ends[ends <= start + seq_len]
    if not len(fits):
        raise ValueError(f"an example of {int(ends[0]) - start} tokens exceeds seq_len {seq_len}")
    end = int(fits[-1])
    row = torch.full((seq_len,), s.pad_id, dtype=s.ids.dtype)
    row[: end - start] = s.ids[start:end]
    label = torch.full((seq_len,), -100, dtype=s.ids.dtype)
    label[: end - start] = torch.where(s.answer[start:end], s.ids[start:end], -100)
    return row, label


def val_windows(stream: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """Up to cfg.val_windows non-overlapping seq_len windows, evenly spread: [N, seq_len]."""
    n = min(cfg.val_windows, len(stream) // cfg.seq_len)
    if n < 1:
        raise ValueError(f"a validation stream of {len(stream)} tokens is shorter than seq_len")
    starts = torch.linspace(0, len(stream) - cfg.seq_len, n).long()
    return torch.stack([stream[s : s + cfg.seq_len] for s in starts.tolist()])


@torch.no_grad()
def validation_loss(model, windows: list[torch.Tensor], batch_size: int, device) -> float:
    """Mean next-token loss over every window of every stream (streams weigh equally)."""
    was_training = model.training
    model.eval()
    per_stream = []
    for w in windows:
        total = torch.zeros((), device=device)
        for i in range(0, len(w), batch_size):
            batch = w[i : i + batch_size].to(device)
            with torch.autocast("cuda", torch.bfloat16, enabled=str(device).startswith("cuda")):
                total += model(input_ids=batch, labels=batch).loss.float() * len(batch)
        per_stream.append(total / len(w))
    model.train(was_training)
    return float(torch.stack(per_stream).mean())


def train_lm(
    model,
    streams: list[torch.Tensor],
    cfg: TrainConfig,
    device="cpu",
    progress=True,
    desc="training",
    val_streams: list[torch.Tensor] | None = None,
) -> TrainResult:
    """Train `model` (an HF causal LM) in place. With val_streams and cfg.val_every, the model
    ends on the weights of the best validation loss (checked every val_every steps and at the
    end)."""
    from tqdm.auto import tqdm

    too_short = [len(s) for s in streams
                 if not isinstance(s, SupervisedStream) and len(s) <= cfg.seq_len]  # fmt: skip
    for s in streams:  # checked before any step: a long example must not end a run halfway
        if isinstance(s, SupervisedStream):
            if not len(s.starts):
                raise ValueError("a supervised stream holds no examples")
            ends = torch.cat([s.starts[1:], torch.tensor([len(s.ids)])])
            longest = int((ends - s.starts).max())
            if longest > cfg.seq_len:
                raise ValueError(f"an example of {longest} tokens exceeds seq_len {cfg.seq_len}")
    if too_short:
        raise ValueError(f"a token stream of {too_short[0]} tokens is shorter than seq_len")
    validate = bool(val_streams) and cfg.val_every > 0
    windows = [val_windows(v, cfg) for v in val_streams] if validate else []
    gen = torch.Generator().manual_seed(cfg.seed)
    model.to(device).train()
    on_gpu = str(device).startswith("cuda")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0}],
        lr=cfg.lr, betas=(0.9, 0.95), fused=on_gpu or None,
    )  # fmt: skip
    pending: list[torch.Tensor] = []  # losses still on the device: no host sync per step
    losses: list[float] = []
    result = TrainResult(losses, None, [] if validate else None)
    best = (float("inf"), None)
    if validate:  # the starting point competes too: a fine-tune that only hurts keeps the base
        v = validation_loss(model, windows, cfg.batch_size, device)
        result.val_losses.append((0, round(v, 4)))
        best = (v, {k: t.detach().clone() for k, t in model.state_dict().items()})
        result.best_step = 0
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress, unit="step")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        batch, labels = (t.to(device, non_blocking=True) for t in sample_batch(streams, cfg, gen))
        # bf16 autocast on a GPU (fp32 master weights): the ~90M `small` family in minutes
        with torch.autocast("cuda", torch.bfloat16, enabled=on_gpu):
            out = model(input_ids=batch, labels=labels)  # HF shifts: t+1 predicted from ≤ t
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        pending.append(out.loss.detach())
        if len(pending) == 10 or step == cfg.steps - 1:
            losses += torch.stack(pending).float().tolist()
            pending.clear()
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
        done = step + 1
        if validate and (done % cfg.val_every == 0 or done == cfg.steps):
            v = validation_loss(model, windows, cfg.batch_size, device)
            result.val_losses.append((done, round(v, 4)))
            if v < best[0]:
                state = {k: t.detach().clone() for k, t in model.state_dict().items()}
                best = (v, state)
                result.best_step = done
    if validate and best[1] is not None:
        model.load_state_dict(best[1])
    model.eval()
    return result
