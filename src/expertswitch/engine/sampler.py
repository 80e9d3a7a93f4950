"""Next-token choice per request: greedy (argmax) or temperature → top-k → top-p → sample, each
request with its own generator, so a seeded request gets the same tokens in any batch."""

from __future__ import annotations

import torch

from expertswitch.engine.request import Request


def sample(logits: torch.Tensor, requests: list[Request]) -> list[int]:
    """logits fp32 [B, V] (one row per request) → one token id per request."""
    out = logits.argmax(dim=-1).tolist()
    for i, req in enumerate(requests):
        sp = req.sampling
        if sp.greedy:
            continue
        row = logits[i] / sp.temperature
        if sp.top_k > 0 and sp.top_k < row.numel():
            kth = torch.topk(row, sp.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if sp.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            # keep the smallest prefix whose mass reaches top_p (the first token always stays)
            drop = torch.cumsum(sorted_p, 0) - sorted_p >= sp.top_p
            sorted_p[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        gen = req.generator
        token = torch.multinomial(probs.cpu() if gen is not None else probs, 1, generator=gen)
        out[i] = int(token)
    return out
