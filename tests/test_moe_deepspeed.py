"""DeepSpeed's MoE layer as the oracle (CPU, gloo world of 1), with DeepSpeed's defaults on
(random token selection, second-expert sampling, drop_policy 'probs'): the same weights, inputs
and seed give the same routing, capacity, counts, aux loss, outputs and gradients — in training,
and in eval with deterministic_eval=False; our deterministic eval equals DeepSpeed's with its
random parts switched off."""

import pytest
import torch
from torch import nn

from expertswitch.moe import MoE, convert_deepspeed_state_dict

H, F, E, T = 16, 24, 4, 40


def expert_module():
    return nn.Sequential(nn.Linear(H, F), nn.GELU(), nn.Linear(F, H))


def pair(deepspeed, seed=0, **kw):
    """A DeepSpeed MoE with distinct random experts and ours with the same weights."""
    from deepspeed.moe.layer import MoE as DSMoE

    torch.manual_seed(seed)
    ours_only = {key: kw.pop(key) for key in ("deterministic_eval", "drop_policy") if key in kw}
    ds = DSMoE(hidden_size=H, expert=expert_module(), num_experts=E, **kw)
    with torch.no_grad():
        for p in ds.parameters():
            p.normal_(0, 0.5)
    ours = MoE(hidden_size=H, expert=expert_module(), num_experts=E, **kw, **ours_only)
    ours.load_state_dict(convert_deepspeed_state_dict(ds.state_dict()))
    return ds.eval(), ours.eval()


def ds_routes(ds, x):
    """DeepSpeed's routing: (indices [S, k], −1 = dropped; capacity; l_aux; counts)."""
    l_aux, cap, _, idx, _, _, counts = ds.deepspeed_moe.gate(x.reshape(-1, H), None, True)
    return idx.T.long(), int(cap), l_aux, counts


def ds_gate(ds, x):
    """Everything DeepSpeed's gate decides: indices, locations and weights [S, k] (−1, 0, 0
    where dropped), capacity, l_aux, counts."""
    l_aux, cap, _, idx, loc, gates, counts = ds.deepspeed_moe.gate(x.reshape(-1, H), None, True)
    idx = idx.T.long()
    return idx, torch.where(idx >= 0, loc.T.long(), -1), gates.T, int(cap), l_aux, counts


def same_gate(ds, ours, x, seed):
    """Both gates on x from the same RNG state: identical decisions."""
    torch.manual_seed(seed)
    idx, loc, gates, cap, aux, counts = ds_gate(ds, x)
    torch.manual_seed(seed)
    g = ours.gate(x.reshape(-1, H))
    assert g.capacity == cap and torch.equal(g.exp_counts, counts)
    assert torch.equal(g.expert_idx, idx)
    assert torch.equal(g.locations, loc)
    torch.testing.assert_close(g.weights, gates, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g.l_aux, aux, rtol=1e-6, atol=1e-7)
    return g


def check_same(ds, ours, x, routing=True):
    out_ds, aux_ds, counts_ds = ds(x)
    out, aux, counts = ours(x)
    torch.testing.assert_close(out, out_ds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux, aux_ds, rtol=1e-6, atol=1e-7)
    assert torch.equal(counts, counts_ds)
    if routing:
        idx, cap, _, _ = ds_routes(ds, x)
        gate = ours.gate(x.reshape(-1, H))
        assert torch.equal(gate.expert_idx, idx) and gate.capacity == cap


@pytest.mark.parametrize("k", [1, 2])
def test_same_routing_and_outputs_when_nothing_is_dropped(deepspeed, k):
    ds, ours = pair(deepspeed, k=k, eval_capacity_factor=float(E), top2_2nd_expert_sampling=False)
    check_same(ds, ours, torch.randn(2, T // 2, H))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_dropless(deepspeed, k):
    ds, ours = pair(deepspeed, k=k, drop_tokens=False, top2_2nd_expert_sampling=False)
    check_same(ds, ours, torch.randn(T, H))


def test_residual_moe(deepspeed):
    ds, ours = pair(deepspeed, k=1, use_residual=True, eval_capacity_factor=float(E))
    check_same(ds, ours, torch.randn(3, 7, H))


@pytest.mark.parametrize("k, factor", [(1, 0.5), (2, 0.4), (3, 0.5)])
def test_same_number_kept_per_expert_when_dropping(deepspeed, k, factor):
    ds, ours = pair(deepspeed, seed=k, k=k, eval_capacity_factor=factor, min_capacity=1,
                    top2_2nd_expert_sampling=False)  # fmt: skip
    x = torch.randn(T, H)
    idx, cap, aux, counts = ds_routes(ds, x)
    gate = ours.gate(x)
    assert gate.capacity == cap
    assert torch.equal(gate.exp_counts, counts)
    torch.testing.assert_close(gate.l_aux, aux)
    kept_ds = torch.bincount(idx[idx >= 0], minlength=E)
    kept = torch.bincount(gate.expert_idx[gate.expert_idx >= 0], minlength=E)
    assert torch.equal(kept, kept_ds) and int(kept.max()) == cap  # something was dropped
    if k == 2:  # DeepSpeed's top-2 also drops by position: the very same routes
        assert torch.equal(gate.expert_idx, idx)


def test_training_mode_gradients_match(deepspeed):
    ds, ours = pair(deepspeed, k=2, capacity_factor=float(E), top2_2nd_expert_sampling=False)
    ds.train()
    ours.train()
    x = torch.randn(T, H)
    x_ds, x_us = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ds, aux_ds, _ = ds(x_ds)
    out, aux, _ = ours(x_us)
    (out_ds.square().sum() + aux_ds).backward()
    (out.square().sum() + aux).backward()
    torch.testing.assert_close(x_us.grad, x_ds.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        ours.gate.wg.weight.grad, ds.deepspeed_moe.gate.wg.weight.grad, rtol=1e-4, atol=1e-5
    )


def test_fewer_tokens_than_min_capacity(deepspeed):
    """DeepSpeed's top-1 asserts tokens ≥ min_capacity; ours routes them."""
    ds, ours = pair(deepspeed, k=1, drop_tokens=False, min_capacity=4)
    x = torch.randn(2, H)
    with pytest.raises(AssertionError):
        ds(x)
    out, _, counts = ours(x)
    assert out.shape == (2, H) and int(counts.sum()) == 2


DEFAULT_CASES = {  # DeepSpeed's defaults on (use_rts, top2_2nd_expert_sampling), dropping
    "top1": dict(k=1, capacity_factor=0.8, eval_capacity_factor=0.8),
    "top1 RSample": dict(k=1, noisy_gate_policy="RSample", capacity_factor=0.8),
    "top1 Jitter": dict(k=1, noisy_gate_policy="Jitter", capacity_factor=0.5),
    "top1 dropless": dict(k=1, drop_tokens=False),
    "top2": dict(k=2, capacity_factor=0.6, eval_capacity_factor=0.6),
    "top2 Jitter": dict(k=2, noisy_gate_policy="Jitter", capacity_factor=0.6),
    "top2 dropless": dict(k=2, drop_tokens=False),
    "top3 probs": dict(k=3, capacity_factor=0.5, eval_capacity_factor=0.5),
}


@pytest.mark.parametrize("case", DEFAULT_CASES)
def test_training_routes_exactly_as_deepspeed_with_its_defaults(deepspeed, case):
    """Same seed → DeepSpeed's gate and ours draw the same noise and RTS priorities and keep the
    very same routes, slots and weights; the layers' outputs and gradients agree."""
    kw = dict(DEFAULT_CASES[case], min_capacity=1)
    ds, ours = pair(deepspeed, seed=len(case), **kw)
    ds.train()
    ours.train()
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(7))
    for seed in range(3):
        g = same_gate(ds, ours, x, seed)
        if kw.get("drop_tokens", True) and "RSample" not in case:
            assert bool((g.expert_idx < 0).any())  # the capacity did drop routes
    x_ds, x_us = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(11)
    out_ds, aux_ds, counts_ds = ds(x_ds)
    torch.manual_seed(11)
    out, aux, counts = ours(x_us)
    torch.testing.assert_close(out, out_ds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux, aux_ds, rtol=1e-6, atol=1e-7)
    assert torch.equal(counts, counts_ds)
    (out_ds.square().sum() + aux_ds).backward()
    (out.square().sum() + aux).backward()
    torch.testing.assert_close(x_us.grad, x_ds.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.gate.wg.weight.grad, ds.deepspeed_moe.gate.wg.weight.grad,
                               rtol=1e-4, atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("case", ["top1", "top2", "top3 probs", "top1 dropless"])
def test_eval_as_deepspeed_when_asked_deterministic_by_default(deepspeed, case):
    """deterministic_eval=False: DeepSpeed's eval (RTS, second-expert sampling) draw for draw.
    Default: no random draws at eval; the routes are DeepSpeed's with them switched off."""
    kw = dict(DEFAULT_CASES[case], min_capacity=1)
    ds, ours = pair(deepspeed, seed=3, deterministic_eval=False, **kw)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(8))
    for seed in range(2):
        same_gate(ds, ours, x, seed)
    ds_off, det = pair(deepspeed, seed=3, use_rts=False, top2_2nd_expert_sampling=False, **kw)
    ours_default = pair(deepspeed, seed=3, **kw)[1]
    ours_default.load_state_dict(det.state_dict())
    torch.manual_seed(0)
    state = torch.get_rng_state()
    g = ours_default.gate(x)
    assert torch.equal(torch.get_rng_state(), state)  # nothing random was drawn
    idx, _, _, cap, _, _ = ds_gate(ds_off, x)
    assert g.capacity == cap
    if DEFAULT_CASES[case]["k"] == 1:  # without RTS DeepSpeed keeps torch.topk's pick among
        kept, kept_ds = g.expert_idx[g.expert_idx >= 0], idx[idx >= 0]  # tied tokens; ours:
        assert torch.equal(torch.bincount(kept, minlength=E),  # the earliest
                           torch.bincount(kept_ds, minlength=E))  # fmt: skip
    else:
        assert torch.equal(g.expert_idx, idx)


@pytest.mark.parametrize("policy", ["probs", "position"])
def test_topk_drop_policies_match_deepspeed(deepspeed, policy):
    """k > 2: DeepSpeed's topkgating with either drop policy keeps the same routes."""
    from deepspeed.moe.sharded_moe import topkgating

    lg = torch.randn(64, 6, generator=torch.Generator().manual_seed(4))
    from expertswitch.moe.gate import topk_gating

    for k, factor in ((3, 0.5), (4, 0.4)):
        ds = topkgating(lg.clone(), k, factor, 1, drop_policy=policy, sparse_routes=True)
        _, cap, _, idx, loc, gates, counts = ds
        idx = idx.T.long()
        g = topk_gating(lg, k=k, capacity_factor=factor, min_capacity=1, drop_policy=policy)
        kept = g.expert_idx >= 0
        assert g.capacity == int(cap) and torch.equal(g.exp_counts, counts)
        assert bool((~kept).any())
        # DeepSpeed lists a token's routes best first too: compare route by route
        assert torch.equal(g.expert_idx, idx)
        assert torch.equal(g.locations[kept], loc.T.long()[kept])
        torch.testing.assert_close(g.weights, gates.T)


def test_capacity_equals_deepspeed_over_a_sweep(deepspeed):
    """86,016 (tokens, experts, k, capacity factor) combinations, DeepSpeed's own _capacity."""
    from deepspeed.moe.sharded_moe import _capacity

    from expertswitch.moe.gate import capacity_for

    factors = (0.1, 0.3, 0.5, 1.0, 1.1, 1.2, 1.25)
    experts = (1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 32, 64)
    bad = []
    for e in experts:
        for t in range(1, 257):
            shape = torch.empty(t, e)
            for k in range(1, 5):
                for f in factors:
                    ds = int(_capacity(shape, torch.tensor(f * k), torch.tensor(0)))
                    if capacity_for(t, e, k, f, 0) != ds:
                        bad.append((t, e, k, f))
    assert not bad, f"{len(bad)} combinations differ, e.g. {bad[:5]}"


def test_dropless_top2_eval_picks_the_second_expert_by_logit(deepspeed):
    """Eval, dropless, top-2 (our fused path): logits 0 and 1e-8 tie in fp32 probability;
    DeepSpeed's second choice is the larger logit, and so is ours."""
    ds, ours = pair(deepspeed, k=2, drop_tokens=False, top2_2nd_expert_sampling=False)
    ds = ds.eval()
    hidden = torch.zeros(2, H)
    hidden[0, :4] = torch.tensor([3.0, 0.0, 1e-8, -1.0])
    hidden[1, :4] = torch.tensor([0.0, 1e-8, 2e-8, 5.0])
    with torch.no_grad():
        for m in (ds.deepspeed_moe.gate.wg, ours.gate.wg):
            m.weight.zero_()
            m.weight[:, :4].copy_(torch.eye(E))
    check_same(ds, ours, hidden, routing=False)
    assert ours(hidden)[2].tolist() == [1, 0, 2, 1]
