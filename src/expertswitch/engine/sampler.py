"""Next-token choice per request: greedy (argmax) or temperature → top-k → top-p → sample, each
request with its own generator, so a seeded request gets the same tokens in any batch."""

from __future__ import annotations

import torch

from expertswitch.engine.request import Logprob, Request


class SamplingFailure(str):
    """In place of a token: why this request's sampling failed (its logits were not finite)."""


def sample(logits: torch.Tensor, requests: list[Request],
           eos: list[frozenset[int]] | None = None) -> list[int | SamplingFailure]:  # fmt: skip
    """logits fp32 [B, V] (one row per request) → one token id per request; a request whose
    row cannot be sampled gets a SamplingFailure, and the others their tokens. eos: each
    request's EOS ids (min_tokens bans them; needed when a request sets it). A request with
    logits adjustments gets them on a copy of its own row: `logits` (whose logprobs are
    reported) is left as the model gave it."""
    out: list = logits.argmax(dim=-1).tolist()
    nan = torch.isnan(logits).any(dim=-1).tolist()  # −inf is legitimate (vocabulary padding)
    rows: dict[int, torch.Tensor] = {}
    for i, req in enumerate(requests):
        if req.sampling.adjusts_logits and not nan[i]:
            row = logits[i].clone()
            adjust_logits(row, req, eos[i] if eos else frozenset())
            if bool(torch.isneginf(row).all()):
                out[i] = SamplingFailure("every token is banned for this request (logit_bias, "
                                         "min_tokens and stop_token_ids)")  # fmt: skip
                continue
            rows[i] = row
            out[i] = int(row.argmax())
    for i, req in enumerate(requests):
        if isinstance(out[i], SamplingFailure):
            continue
        if nan[i]:
            out[i] = SamplingFailure("the model's logits are NaN for this request")
        elif not req.sampling.greedy:
            try:
                out[i] = _sample_row(rows.get(i, logits[i]), req)
            except RuntimeError as e:  # e.g. NaN or inf probabilities
                out[i] = SamplingFailure(f"sampling failed: {str(e).splitlines()[0]}")
    return out


def adjust_logits(row: torch.Tensor, req: Request, eos: frozenset[int]) -> None:
    """In place, in vLLM's order: logit_bias, min_tokens, then the repetition, frequency and
    presence penalties (sampling.py has their definitions)."""
    sp, dev = req.sampling, row.device
    if sp.logit_bias:
        ids = torch.tensor(list(sp.logit_bias), device=dev)
        row.index_add_(0, ids, torch.tensor(list(sp.logit_bias.values()), device=dev,
                                            dtype=row.dtype))  # fmt: skip
    if len(req.output_token_ids) < sp.min_tokens:
        banned = set(sp.stop_token_ids) | (set() if sp.ignore_eos else set(eos))
        banned = [t for t in banned if t < row.numel()]
        if banned:
            row[torch.tensor(banned, device=dev)] = float("-inf")
    if sp.repetition_penalty != 1:
        seen = torch.tensor(sorted(set(req.all_token_ids)), device=dev)
        vals = row[seen]
        p = sp.repetition_penalty
        row[seen] = torch.where(vals > 0, vals / p, vals * p)
    if (sp.frequency_penalty or sp.presence_penalty) and req.output_token_ids:
        ids, counts = torch.tensor(req.output_token_ids, device=dev).unique(return_counts=True)
        row[ids] -= sp.frequency_penalty * counts.to(row.dtype) + sp.presence_penalty


def _sample_row(row: torch.Tensor, req: Request) -> int:
    sp = req.sampling
    row = row / sp.temperature
    if sp.min_p > 0:  # tokens below min_p × the top token's probability are dropped
        probs = torch.softmax(row, dim=-1)
        row = row.masked_fill(probs < sp.min_p * probs.max(), float("-inf"))
    if 0 < sp.top_k < row.numel():
        kth = torch.topk(row, sp.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    probs = torch.softmax(row, dim=-1)
    if sp.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = torch.cumsum(sorted_p, 0) - sorted_p >= sp.top_p
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs.cpu(), 1, generator=req.generator))


def logprobs_of(logits: torch.Tensor, tokens: list[int], k: int) -> list[Logprob]:
    """logits fp32 [N, V] and the token chosen after each row → each token's log-probability
    under the row's distribution and the row's top-k tokens."""
    lsm = torch.log_softmax(logits, dim=-1)  # [N, V]
    chosen = lsm.gather(1, torch.tensor(tokens, device=lsm.device)[:, None])[:, 0].tolist()
    top_v, top_i = lsm.topk(k, dim=-1) if k else (lsm[:, :0], lsm[:, :0].long())
    rows = zip(tokens, chosen, top_i.tolist(), top_v.tolist())
    return [Logprob(t, lp, list(zip(ids, vals))) for t, lp, ids, vals in rows]
