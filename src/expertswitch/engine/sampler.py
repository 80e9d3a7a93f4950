"""Next-token choice per request: greedy (argmax) or temperature → top-k → top-p → sample, each
request with its own generator, so a seeded request gets the same tokens in any batch."""

from __future__ import annotations

import torch

from expertswitch.engine.request import Logprob, Request


class SamplingFailure(str):
    """In place of a token: why this request's sampling failed (its logits were not finite)."""


def sample(logits: torch.Tensor, requests: list[Request]) -> list[int | SamplingFailure]:
    """logits fp32 [B, V] (one row per request) → one token id per request; a request whose
    row cannot be sampled gets a SamplingFailure, and the others their tokens."""
    out: list = logits.argmax(dim=-1).tolist()
    nan = torch.isnan(logits).any(dim=-1).tolist()  # −inf is legitimate (vocabulary padding)
    for i, req in enumerate(requests):
        if nan[i]:
            out[i] = SamplingFailure("the model's logits are NaN for this request")
        elif not req.sampling.greedy:
            try:
                out[i] = _sample_row(logits[i], req)
            except RuntimeError as e:  # e.g. NaN or inf probabilities
                out[i] = SamplingFailure(f"sampling failed: {str(e).splitlines()[0]}")
    return out


def _sample_row(row: torch.Tensor, req: Request) -> int:
    sp = req.sampling
    row = row / sp.temperature
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
