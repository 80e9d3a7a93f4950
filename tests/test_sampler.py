"""The batched sampler (engine/sampler.py) against a per-row reference: the distribution it
draws from (temperature, min_p, top-k, top-p) equals the reference's row by row for any mix of
parameters in one batch, through top-p's candidates and its full-sort fallback; the inverse-CDF
draw picks tokens with those probabilities, tiny ones included; a seeded request gets the same
token whatever its batch and its neighbours' parameters; a bad row fails alone; adjusted rows
are sampled as adjusted while the model's logits stay untouched."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from expertswitch.engine import sampler
from expertswitch.engine.request import Request
from expertswitch.engine.sampler import SamplingFailure, draw, filtered_probs, sample, uniforms
from expertswitch.engine.sampling import SamplingParams


def reference_probs(row: torch.Tensor, sp: SamplingParams) -> torch.Tensor:
    """One row at a time, the obvious way (the engine's sampler before it was batched)."""
    row = row / sp.temperature
    if sp.min_p > 0:
        probs = torch.softmax(row, dim=-1)
        row = row.masked_fill(probs < sp.min_p * probs.max(), float("-inf"))
    if 0 < sp.top_k < row.numel():
        kth = torch.topk(row, sp.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    probs = torch.softmax(row, dim=-1)
    if sp.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        drop = torch.cumsum(sorted_p, 0) - sorted_p >= sp.top_p
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return probs


PARAMS = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.3, 0.7, 1.0, 1.8]),
    top_p=st.sampled_from([1.0, 0.95, 0.6, 0.1]),
    top_k=st.sampled_from([0, -1, 1, 3, 17, 40, 100]),
    min_p=st.sampled_from([0.0, 0.05, 0.3]),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(PARAMS, min_size=1, max_size=6), st.integers(0, 2**31 - 1),
       st.sampled_from([4, 1024]))  # fmt: skip
def test_filtered_probs_equal_the_per_row_reference(params, seed, candidates):
    """The same support exactly (a token kept or dropped alike) and the same values; 4 top-p
    candidates of 300 tokens sends most rows to the full sort, 1024 none."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(params), 300, generator=g) * 3
    saved, sampler.TOP_P_CANDIDATES = sampler.TOP_P_CANDIDATES, candidates
    try:
        got = filtered_probs(x.clone(), params)
    finally:
        sampler.TOP_P_CANDIDATES = saved
    for i, sp in enumerate(params):
        want = reference_probs(x[i], sp)
        assert torch.equal(got[i] > 0, want > 0), sp
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-12)


def test_top_k_keeps_ties_with_the_kth():
    x = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.5], [0.0, 1.0, 2.0, 3.0, 4.0]])
    p = filtered_probs(x, [SamplingParams(top_k=2), SamplingParams(top_k=0)])
    assert (p[0] > 0).tolist() == [True, False, True, True, False]
    assert (p[1] > 0).all()


def _req(seed=None, **sp) -> Request:
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return Request("r", [1], None, SamplingParams(**sp), generator=g)


def _close_to(counts: torch.Tensor, p: torch.Tensor) -> None:
    n = float(counts.sum())
    for c, pi in zip(counts.tolist(), p.tolist()):
        if pi == 0:
            assert c == 0  # probability 0: never
        else:
            assert abs(c - n * pi) < 4 * math.sqrt(n * pi * (1 - pi)), (c, pi)


def test_draws_follow_the_probabilities():
    p = torch.tensor([0.5, 0.25, 0.0, 0.15, 0.1, 0.0])  # zero mass inside and at the end
    n = 8000
    u = uniforms([torch.Generator().manual_seed(i) for i in range(n)])
    _close_to(torch.bincount(draw(p.expand(n, 6) * 3.0, u), minlength=6).double(), p)
    # a token of probability 1e-9 after 0.6 of mass is reachable (a float32 sum drops it)
    tiny = torch.tensor([[0.6, 1e-9, 0.4]])
    c = tiny[0].double().cumsum(0)
    assert draw(tiny, ((c[0] + c[1]) / 2 / c[2]).reshape(1)).tolist() == [1]
    # u at the edges: the first token with mass, and never the zero-mass tail
    edges = draw(torch.tensor([[0.0, 0.3, 0.7, 0.0]] * 3), torch.tensor([0.0, 0.9999999, 1.0]))
    assert edges.tolist() == [1, 2, 2]
    # through sample(): the same frequencies from logits, each request its own generator
    logits = torch.log(p).expand(3000, 6).contiguous()
    reqs = [_req(seed=10_000 + i, temperature=1.0) for i in range(3000)]
    _close_to(torch.bincount(torch.tensor(sample(logits, reqs)), minlength=6).double(), p)


def test_top_p_beyond_the_candidates_sorts_those_rows_in_full(monkeypatch):
    """A flat row whose top_p prefix runs past the candidates, beside a peaked one."""
    monkeypatch.setattr(sampler, "TOP_P_CANDIDATES", 4)
    g = torch.Generator().manual_seed(3)
    x = torch.stack([torch.randn(40, generator=g) * 0.1, torch.randn(40, generator=g) * 5])
    params = [SamplingParams(top_p=0.9), SamplingParams(top_p=0.5)]
    got = filtered_probs(x.clone(), params)
    assert int((got[0] > 0).sum()) > 4
    for i, sp in enumerate(params):
        torch.testing.assert_close(got[i], reference_probs(x[i], sp), rtol=0, atol=1e-6)


def test_a_seeded_request_draws_the_same_token_in_any_batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 64, generator=g)
    sp = {"temperature": 0.9, "top_p": 0.9, "top_k": 20}
    alone = [sample(logits[i : i + 1], [_req(seed=i, **sp)])[0] for i in range(6)]
    together = sample(logits, [_req(seed=i, **sp) for i in range(6)])
    assert together == alone
    # beside rows with other parameters (top_p 1 and < 1, top_k, min_p) in one batch
    others = [{"temperature": 1.0, "top_p": 1.0}, {"temperature": 0.6, "top_p": 0.5},
              {"temperature": 1.2, "top_k": 3, "min_p": 0.1}]  # fmt: skip
    big = torch.randn(4, 50_000, generator=g)
    mine = {"temperature": 1.0}  # no top-p: its row keeps all 50K tokens, tail included
    for seed in range(20):
        solo = sample(big[:1], [_req(seed=seed, **mine)])[0]
        crowd = sample(big, [_req(seed=seed, **mine), *(_req(seed=9, **o) for o in others)])
        assert crowd[0] == solo
    # and beside greedy rows, in another order
    order = [4, 1, 5]
    mixed = sample(torch.cat([logits[order], logits[:2]]),
                   [*(_req(seed=i, **sp) for i in order), _req(temperature=0.0),
                    _req(temperature=0.0)])  # fmt: skip
    assert mixed[:3] == [alone[i] for i in order]
    assert mixed[3:] == logits[:2].argmax(dim=-1).tolist()


def test_bad_rows_fail_alone_and_adjusted_rows_are_drawn_as_adjusted():
    logits = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
    logits[1, 3] = float("nan")
    logits[2, 7] = float("inf")  # a drawn row: inf / inf in its softmax
    before = logits.clone()
    reqs = [
        _req(seed=0, temperature=1.0, logit_bias={9: 100.0}),  # drawn, forced to 9
        _req(seed=1, temperature=1.0),
        _req(seed=2, temperature=1.0),
        _req(temperature=0.0, logit_bias={t: -100.0 for t in range(32)} | {5: 0.0}),
        _req(seed=4, temperature=1.0, top_k=1),
    ]
    got = sample(logits, reqs)
    assert got[0] == 9
    assert isinstance(got[1], SamplingFailure) and "NaN" in got[1]
    for at in (0, 17, 31):  # a greedy row with one NaN anywhere fails too
        row = logits[4:5].clone()
        row[0, at] = float("nan")
        assert "NaN" in sample(row, [_req(temperature=0.0)])[0]
    assert isinstance(got[2], SamplingFailure) and "not finite" in got[2]
    assert got[3] == 5
    assert got[4] == int(logits[4].argmax())
    assert torch.equal(logits.nan_to_num(), before.nan_to_num())  # the model's logits intact


@pytest.mark.parametrize("n_rows", [1, 3])
def test_an_all_banned_drawn_row_fails(n_rows):
    logits = torch.randn(n_rows, 8, generator=torch.Generator().manual_seed(2))
    reqs = [_req(seed=i, temperature=1.0) for i in range(n_rows)]
    reqs[0] = _req(seed=0, temperature=1.0, min_tokens=1, stop_token_ids=list(range(8)))
    got = sample(logits, reqs)
    assert isinstance(got[0], SamplingFailure) and "banned" in got[0]
    assert all(isinstance(t, int) for t in got[1:])


@pytest.mark.gpu
def test_on_a_gpu_the_sampler_draws_as_on_the_host():
    """CUDA logits: the same filtered distributions as on the CPU, and a seeded request draws
    the same token (its uniform comes from its host generator), except in a row or two where
    the devices' float sums put a token on the other side of the top-p line or u on the other
    side of a token boundary."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(64, 32000, generator=g) * 4
    params = [SamplingParams(temperature=0.8, top_p=(1.0, 0.9, 0.5)[i % 3], top_k=(0, 50)[i % 2])
              for i in range(64)]  # fmt: skip
    host = filtered_probs(logits.clone(), params)
    device = filtered_probs(logits.cuda(), params).cpu()
    tv = (device / device.sum(-1, keepdim=True) - host / host.sum(-1, keepdim=True)).abs()
    assert int((tv.sum(-1) > 1e-4).sum()) <= 2  # total variation per row

    def reqs():
        return [Request("r", [1], None, sp, generator=torch.Generator().manual_seed(i))
                for i, sp in enumerate(params)]  # fmt: skip

    same = sum(a == b for a, b in zip(sample(logits.cuda(), reqs()), sample(logits, reqs())))
    assert same >= 62
