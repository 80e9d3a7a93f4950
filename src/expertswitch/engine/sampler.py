"""Next-token choice for a whole step at once: logits adjustments on the rows that ask for them,
then greedy (argmax) or temperature → min_p → top-k → top-p → a draw, batched over the rows
(one softmax, one cumulative sum and one host transfer for the step, as vLLM batches its
sampler; a loop over rows made several small kernels and one host synchronisation per request
and step).

The draw inverts each row's cumulative distribution at one uniform number from the request's
own generator (on the host: one scalar per request), so a seeded request gets the same tokens in
any batch."""

from __future__ import annotations

import math

import torch

from expertswitch.engine.request import Logprob, Request


class SamplingFailure(str):
    """In place of a token: why this request's sampling failed (its logits were not finite)."""


_BANNED = (
    "every token is banned for this request (allowed_token_ids, bad_words, logit_bias, "
    "min_tokens, stop_token_ids and structured outputs)"
)
_NAN = "the model's logits are NaN for this request"
_NO_DRAW = "sampling failed: the filtered probabilities are not finite or sum to zero"


def sample(logits: torch.Tensor, requests: list[Request],
           eos: list[frozenset[int]] | None = None) -> list[int | SamplingFailure]:  # fmt: skip
    """logits fp32 [B, V] (one row per request) → one token id per request; a request whose
    row cannot be sampled gets a SamplingFailure, and the others their tokens. eos: each
    request's EOS ids (min_tokens bans them; needed when a request sets it). Adjustments work
    on copies of the rows that ask for them: `logits` (whose logprobs are reported) is left as
    the model gave it."""
    dev = logits.device
    tokens = logits.argmax(dim=-1)  # [B]
    # [B]: 0 ok, 1 NaN, 2 banned, 3 no draw. argmax takes NaN for the largest value, so a row
    # holds a NaN exactly when its argmax is one: B reads instead of a pass over [B, V]
    why = logits.gather(1, tokens.unsqueeze(1)).squeeze(1).isnan().to(torch.int8)
    adjusted = [i for i, r in enumerate(requests) if r.sampling.adjusts_logits]
    part = None
    if adjusted:  # a copy of those rows, adjusted one by one (rare: penalties, bias)
        idx = torch.tensor(adjusted, device=dev)
        part = logits.index_select(0, idx)
        adjust_rows(part, [requests[i] for i in adjusted],
                    [eos[i] for i in adjusted] if eos else None)  # fmt: skip
        banned = torch.isneginf(part).all(dim=-1)
        _mark(why, idx, banned, 2)
        tokens.index_copy_(0, idx, part.argmax(dim=-1))
    drawn = [i for i, r in enumerate(requests) if not r.sampling.greedy]
    if drawn:
        idx = torch.tensor(drawn, device=dev)
        rows = logits.index_select(0, idx)
        if part is not None:  # the adjusted rows among them, as adjusted
            where = {i: k for k, i in enumerate(adjusted)}
            both = [(j, where[i]) for j, i in enumerate(drawn) if i in where]
            if both:
                dst, src = (torch.tensor(c, device=dev) for c in zip(*both))
                rows.index_copy_(0, dst, part.index_select(0, src))
        probs = filtered_probs(rows, [requests[i].sampling for i in drawn])
        ok = torch.isfinite(probs).all(dim=-1) & (probs.sum(dim=-1) > 0)
        u = uniforms([requests[i].generator for i in drawn])
        tokens.index_copy_(0, idx, draw(probs, u))
        _mark(why, idx, ~ok, 3)
    host = torch.stack([tokens, why.long()]).tolist()  # the step's one host transfer
    reasons = (None, _NAN, _BANNED, _NO_DRAW)
    return [t if not w else SamplingFailure(reasons[w]) for t, w in zip(*host)]


def _mark(why: torch.Tensor, idx: torch.Tensor, bad: torch.Tensor, code: int) -> None:
    """why[idx] = code where `bad` and no earlier reason."""
    prior = why.index_select(0, idx)
    why.index_copy_(0, idx, torch.where(bad & (prior == 0), code, prior).to(why.dtype))


def filtered_probs(x: torch.Tensor, params: list) -> torch.Tensor:
    """logits [N, V] and each row's SamplingParams → [N, V] probabilities to draw from (not
    renormalised after top-p: the draw does not need it): temperature, then min_p (tokens below
    min_p × the top token's probability dropped), then top-k (ties with the k-th kept), then
    top-p (the smallest prefix, most likely first, whose mass reaches top_p)."""
    n, v = x.shape
    dev = x.device

    def column(values) -> torch.Tensor:
        return torch.tensor(values, dtype=x.dtype, device=dev).unsqueeze(1)  # [N, 1]

    x = x / column([p.temperature for p in params])
    if any(p.min_p > 0 for p in params):
        probs = torch.softmax(x, dim=-1)
        top = probs.max(dim=-1, keepdim=True).values
        x = x.masked_fill(probs < column([p.min_p for p in params]) * top, float("-inf"))
    ks = [p.top_k if 0 < p.top_k < v else 0 for p in params]
    if any(ks):
        vals = torch.topk(x, max(ks), dim=-1).values  # [N, k_max], descending
        at = torch.tensor([max(k, 1) - 1 for k in ks], device=dev).unsqueeze(1)
        kth = vals.gather(1, at)
        kth = kth.masked_fill(column(ks) == 0, float("-inf"))  # rows without top-k keep all
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if any(p.top_p < 1.0 for p in params):  # rows without top-p keep all (inf: a float
        # cumulative sum reaches 1.0 before the last tokens, so 1.0 itself would cut them)
        probs = _top_p(probs, column([p.top_p if p.top_p < 1.0 else math.inf for p in params]))
    return probs


TOP_P_CANDIDATES = 1024  # most likely tokens sorted first; a full sort only where they fall short


def _top_p(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep each row's smallest most-likely-first prefix whose mass reaches top_p [N, 1]. The
    kept prefix lies inside the TOP_P_CANDIDATES most likely tokens whenever their mass reaches
    top_p (an LM's distribution, almost always), so only the other rows sort all V (on 2 CPU
    cores a full sort of 32 rows of 32K costs ~70 ms, their top 1024 a few)."""
    n, v = probs.shape
    k = min(v, TOP_P_CANDIDATES)
    vals, order = torch.topk(probs, k, dim=-1)  # sorted, most likely first
    keep = torch.cumsum(vals, dim=-1) - vals < top_p  # [N, k]
    out = torch.zeros_like(probs).scatter_(1, order, vals * keep)
    if k < v:
        short = (vals.sum(dim=-1, keepdim=True) < top_p).squeeze(1)  # prefix may run past k
        if bool(short.any()):  # (a host synchronisation, only with top_p on and k < V)
            rows = short.nonzero().squeeze(1)
            sorted_p, full = torch.sort(probs.index_select(0, rows), dim=-1, descending=True)
            kept = torch.cumsum(sorted_p, dim=-1) - sorted_p < top_p.index_select(0, rows)
            redo = torch.zeros_like(sorted_p).scatter_(1, full, sorted_p * kept)
            out.index_copy_(0, rows, redo)
    return out


def uniforms(generators: list) -> torch.Tensor:
    """[N] float64 uniform numbers in [0, 1) on the host, one from each request's generator (a
    CPU generator, or None: torch's global one); 53 random bits, where float32's 24 could not
    reach a token of probability below ~6e-8."""
    return torch.tensor([float(torch.rand((), generator=g, dtype=torch.float64))
                         for g in generators], dtype=torch.float64)  # fmt: skip


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """[N] token ids, row i drawn with probabilities ∝ probs[i] (non-negative, not necessarily
    normalised) at u[i] ∈ [0, 1): the first token whose cumulative mass passes u · total.
    The sum runs in float64: in float32, once it passes ~0.5 a token below ~3e-8 adds nothing
    and could never be drawn (total variation 2e-4 at V = 32K, 1e-3 at 152K; float64: 5e-13).
    Never a token of probability 0, even where u · total rounds up to the total."""
    cdf = torch.cumsum(probs, dim=-1, dtype=torch.float64)  # [N, V]
    target = u.to(probs.device, non_blocking=True).unsqueeze(1) * cdf[:, -1:]
    pick = torch.searchsorted(cdf, target, right=True).squeeze(1)
    last = (probs > 0).cumsum(dim=-1).argmax(dim=-1)  # the last token with mass
    return torch.minimum(pick, last)


def bad_word_bans(req: Request) -> list[int]:
    """The tokens bad_words bans at this step (vLLM's rule): each word's last token where the
    answer so far ends with its other tokens (a one-token word: always)."""
    out = req.output_token_ids
    bans = []
    for *head, last in req.sampling.bad_words_token_ids or ():
        if len(head) <= len(out) and out[len(out) - len(head) :] == head:
            bans.append(last)
    return bans


def adjust_rows(rows: torch.Tensor, reqs: list[Request], eos: list[frozenset[int]] | None) -> None:
    """`adjust_logits` for every row at once, in place (rows [R, V], row k: reqs[k]): each
    adjustment is one scatter or one masked update over the rows that ask for it, not a few
    small kernels per request."""
    dev, vocab = rows.device, rows.shape[1]

    def pairs(per_row):  # [(row, [token ids])] -> (row index tensor, token index tensor)
        r = [k for k, ids in per_row for _ in ids]
        t = [i for _, ids in per_row for i in ids]
        return torch.tensor(r, device=dev, dtype=torch.long), torch.tensor(
            t, device=dev, dtype=torch.long
        )

    allowed = [(k, r.sampling.allowed_token_ids) for k, r in enumerate(reqs)
               if r.sampling.allowed_token_ids]  # fmt: skip
    if allowed:  # every other token banned (a ban: the order among adjustments is moot)
        keep = torch.zeros(len(allowed), vocab, dtype=torch.bool, device=dev)
        r, t = pairs([(i, ids) for i, (_, ids) in enumerate(allowed)])
        keep[r, t] = True
        which = torch.tensor([k for k, _ in allowed], device=dev)
        rows[which] = rows[which].masked_fill(~keep, float("-inf"))
    bad = [(k, bad_word_bans(r)) for k, r in enumerate(reqs) if r.sampling.bad_words_token_ids]
    if any(ids for _, ids in bad):
        rows[pairs(bad)] = float("-inf")
    bias = [(k, r.sampling.logit_bias) for k, r in enumerate(reqs) if r.sampling.logit_bias]
    if bias:
        r, t = pairs([(k, list(b)) for k, b in bias])
        vals = torch.tensor([v for _, b in bias for v in b.values()], device=dev,
                            dtype=rows.dtype)  # fmt: skip
        rows.index_put_((r, t), vals, accumulate=True)
    early = []
    for k, req in enumerate(reqs):
        sp = req.sampling
        if len(req.output_token_ids) < sp.min_tokens:
            banned = set(sp.stop_token_ids) | (set() if sp.ignore_eos or eos is None else eos[k])
            early.append((k, sorted(t for t in banned if t < vocab)))
    if any(ids for _, ids in early):
        rows[pairs(early)] = float("-inf")
    rep = [(k, sorted(set(r.all_token_ids))) for k, r in enumerate(reqs)
           if r.sampling.repetition_penalty != 1]  # fmt: skip
    if rep:  # on the seen tokens only (sparse: a pass over [R, V] costs more on a CPU)
        r, t = pairs(rep)
        p = torch.tensor([reqs[k].sampling.repetition_penalty for k, ids in rep for _ in ids],
                         device=dev)  # fmt: skip
        vals = rows[r, t].float()  # (fp32 arithmetic, as with adjust_logits' Python floats)
        rows[r, t] = torch.where(vals > 0, vals / p, vals * p).to(rows.dtype)
    pen = [(k, r.output_token_ids) for k, r in enumerate(reqs) if (r.sampling.frequency_penalty
           or r.sampling.presence_penalty) and r.output_token_ids]  # fmt: skip
    if pen:
        r, t = pairs(pen)
        key, counts = torch.unique(r * vocab + t, return_counts=True)
        r, t = key // vocab, key % vocab
        freq, pres = (torch.tensor([getattr(req.sampling, f) for req in reqs], device=dev)[r]
                      for f in ("frequency_penalty", "presence_penalty"))  # fmt: skip
        rows[r, t] = (rows[r, t].float() - (freq * counts + pres)).to(rows.dtype)
    guided = [k for k, r in enumerate(reqs) if r.guide is not None]
    for k in guided:  # last: no bias brings back a token the constraint bans
        try:
            reqs[k].guide.mask(rows[k])
        except Exception:  # noqa: BLE001 - this request fails alone (every token banned)
            rows[k] = float("-inf")


def adjust_logits(row: torch.Tensor, req: Request, eos: frozenset[int]) -> None:
    """In place, in vLLM's order: allowed_token_ids, bad_words, logit_bias, min_tokens, then the
    repetition, frequency and presence penalties (sampling.py has their definitions); a
    structured output's ban last.
    One row at a time: the definition `adjust_rows` (what the sampler runs) is tested
    against."""
    sp, dev = req.sampling, row.device
    if sp.allowed_token_ids:
        keep = torch.zeros_like(row, dtype=torch.bool)
        keep[torch.tensor(sp.allowed_token_ids, device=dev)] = True
        row.masked_fill_(~keep, float("-inf"))
    for t in bad_word_bans(req):
        row[t] = float("-inf")
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
    if req.guide is not None:  # last: no bias brings back a token the constraint bans
        req.guide.mask(row)


def logprobs_of(logits: torch.Tensor, tokens: list[int], k: int) -> list[Logprob]:
    """logits fp32 [N, V] and the token chosen after each row → each token's log-probability
    under the row's distribution and the row's top-k tokens."""
    lsm = torch.log_softmax(logits, dim=-1)  # [N, V]
    chosen = lsm.gather(1, torch.tensor(tokens, device=lsm.device)[:, None])  # [N, 1]
    ranks = ((lsm > chosen).sum(-1) + 1).tolist()  # (vLLM's rank: 1 + the tokens above it)
    top_v, top_i = lsm.topk(k, dim=-1) if k else (lsm[:, :0], lsm[:, :0].long())
    rows = zip(tokens, chosen[:, 0].tolist(), top_i.tolist(), top_v.tolist(), ranks)
    return [Logprob(t, lp, list(zip(ids, vals)), r) for t, lp, ids, vals, r in rows]
