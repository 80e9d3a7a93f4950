import math

import pytest
import torch

from expertswitch.errors import ConfigError
from expertswitch.moe.gate import TopKGate, capacity_for, topk_gating


def logits(t, e, seed=0):
    return torch.randn(t, e, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_counts_sum_to_tokens_times_k_and_dropless_keeps_all(k):
    g = topk_gating(logits(50, 6), k=k, drop_tokens=False)
    assert int(g.exp_counts.sum()) == 50 * k
    assert bool((g.expert_idx >= 0).all())
    assert g.capacity == int(g.exp_counts.max())
    # no token routed twice to one expert
    assert all(len(set(row.tolist())) == k for row in g.expert_idx)
    if k > 1:
        torch.testing.assert_close(g.weights.sum(-1), torch.ones(50))


def test_top1_weight_is_the_probability():
    lg = logits(20, 4)
    g = topk_gating(lg, k=1, drop_tokens=False)
    p = lg.softmax(-1)
    torch.testing.assert_close(g.weights[:, 0], p.max(-1).values)
    assert torch.equal(g.expert_idx[:, 0], p.argmax(-1))


@pytest.mark.parametrize(
    "k, factor, policy", [(1, 1.0, "probs"), (2, 0.5, "probs"), (3, 0.7, "position"),
                          (3, 0.7, "probs")]
)  # fmt: skip
def test_which_routes_an_over_full_expert_keeps(k, factor, policy):
    """k = 1: the earliest tokens; k = 2: first choices, then second choices, earliest first;
    k > 2: the highest probabilities ('probs') or the earliest tokens ('position')."""
    lg = logits(64, 4, seed=k)
    g = topk_gating(lg, k=k, capacity_factor=factor, min_capacity=1, drop_policy=policy)
    cap = capacity_for(64, 4, k, factor, 1)
    assert g.capacity == cap == max(math.ceil(64 / 4 * k * factor), 1)
    kept = torch.bincount(g.expert_idx[g.expert_idx >= 0], minlength=4)
    assert torch.equal(kept, g.exp_counts.clamp(max=cap))
    full = topk_gating(lg, k=k, drop_tokens=False).expert_idx
    probs = lg.softmax(-1)
    dropped_somewhere = False
    for e in range(4):
        tok, rank = (full == e).nonzero(as_tuple=True)  # routes to e, token-major
        keep = g.expert_idx[tok, rank] >= 0
        if keep.all() or not keep.any():
            continue
        dropped_somewhere = True
        if k == 3 and policy == "probs":
            p = probs[tok, e]
            assert p[keep].min() >= p[~keep].max()
        else:
            order = rank * 64 + tok if k == 2 else tok
            assert order[keep].max() < order[~keep].min()
    assert dropped_somewhere
    # slots: unique per expert, below capacity, in token order (k = 2: choice rank first)
    for e in range(4):
        tok, rank = (g.expert_idx == e).nonzero(as_tuple=True)
        order = (rank * 64 + tok) if k == 2 else tok
        slots = g.locations[tok, rank]
        assert torch.equal(slots[order.argsort()], torch.arange(tok.numel()))


def test_capacity_rounds_in_float32_as_deepspeed():
    """12.5 · 1.2 is 15.000000596 in float32 (DeepSpeed: capacity 16), 14.999999999999998 in
    float64 (15)."""
    assert capacity_for(50, 4, 1, 1.2, 0) == 16
    assert capacity_for(50, 4, 1, 1.2, 20) == 20
    assert capacity_for(64, 4, 2, 0.5, 1) == 16


def test_dropped_second_choice_renormalises_first():
    lg = logits(40, 2, seed=3)
    g = topk_gating(lg, k=2, capacity_factor=0.5, min_capacity=0)
    one_left = (g.expert_idx >= 0).sum(-1) == 1
    assert one_left.any()
    torch.testing.assert_close(g.weights[one_left].sum(-1), torch.ones(int(one_left.sum())))


def test_rts_keeps_same_number_but_not_always_the_first():
    lg = torch.zeros(200, 2)
    lg[:, 0] = 5.0  # all tokens want expert 0
    torch.manual_seed(0)
    g = topk_gating(lg, k=1, capacity_factor=0.25, min_capacity=1, use_rts=True, training=True)
    kept = (g.expert_idx[:, 0] >= 0).nonzero().flatten()
    assert kept.numel() == g.capacity == 25
    assert int(kept.max()) > 25  # not just the first 25 tokens
    assert torch.equal(g.locations[kept, 0], torch.arange(25))  # slots in token order
    positional = topk_gating(lg, k=1, capacity_factor=0.25, min_capacity=1)
    assert torch.equal((positional.expert_idx[:, 0] >= 0).nonzero().flatten(), torch.arange(25))
    # eval is deterministic unless asked for DeepSpeed's eval (RTS there too)
    kw = dict(k=1, capacity_factor=0.25, min_capacity=1, use_rts=True)
    assert torch.equal(topk_gating(lg, **kw).expert_idx, positional.expert_idx)
    ds_eval = topk_gating(lg, **kw, deterministic_eval=False).expert_idx
    assert int((ds_eval >= 0).sum()) == 25 and not torch.equal(ds_eval, positional.expert_idx)


def test_rts_is_top1_only_as_in_deepspeed():
    """DeepSpeed's top-2 and top-k never use random token selection, in training either."""
    lg = logits(64, 4, seed=5)
    for k in (2, 3):
        plain = topk_gating(lg, k=k, capacity_factor=0.5, min_capacity=1, training=True)
        torch.manual_seed(3)
        rts = topk_gating(lg, k=k, capacity_factor=0.5, min_capacity=1, use_rts=True,
                          training=True)  # fmt: skip
        assert torch.equal(rts.expert_idx, plain.expert_idx)


def test_second_expert_sampling_in_training_and_deepspeed_eval():
    lg = logits(200, 8, seed=6)
    greedy = topk_gating(lg, k=2, drop_tokens=False).expert_idx
    for kw in ({"training": True}, {"deterministic_eval": False}):
        torch.manual_seed(0)
        sampled = topk_gating(lg, k=2, drop_tokens=False, second_expert_sampling=True, **kw)
        assert torch.equal(sampled.expert_idx[:, 0], greedy[:, 0])
        assert not torch.equal(sampled.expert_idx[:, 1], greedy[:, 1])
    det = topk_gating(lg, k=2, drop_tokens=False, second_expert_sampling=True)
    assert torch.equal(det.expert_idx, greedy)


def test_aux_loss_definitions():
    lg = logits(30, 5)
    p = lg.softmax(-1)
    first = torch.nn.functional.one_hot(p.argmax(-1), 5).float()
    expected = 5 * (p.mean(0) * first.mean(0)).sum()
    for k in (1, 2):
        torch.testing.assert_close(topk_gating(lg, k=k, drop_tokens=False).l_aux, expected)
    top3 = torch.nn.functional.one_hot(p.topk(3).indices, 5).sum(1).float()
    expected3 = 5 * (p.mean(0) * top3.mean(0)).sum() / 3
    torch.testing.assert_close(topk_gating(lg, k=3, drop_tokens=False).l_aux, expected3)
    z = torch.logsumexp(lg, -1).square().mean()
    torch.testing.assert_close(topk_gating(lg, k=1).z_loss, z)


def test_fewer_tokens_than_min_capacity_and_empty_batch():
    g = topk_gating(logits(1, 8), k=2, min_capacity=4, drop_tokens=False)
    assert g.capacity == 1 and bool((g.expert_idx >= 0).all())
    g = topk_gating(logits(2, 8), k=1, min_capacity=4)  # DeepSpeed asserts here
    assert g.capacity == 4 and bool((g.expert_idx >= 0).all())
    g = topk_gating(torch.zeros(0, 8), k=2)
    assert g.expert_idx.shape == (0, 2) and int(g.exp_counts.sum()) == 0


def test_noise_only_in_training():
    gate = TopKGate(16, 4, k=1, noisy_gate_policy="RSample", drop_tokens=False)
    x = torch.randn(64, 16)
    gate.eval()
    assert torch.equal(gate(x).expert_idx, gate(x).expert_idx)
    gate.train()
    torch.manual_seed(1)
    a = gate(x).expert_idx
    b = gate(x).expert_idx
    assert not torch.equal(a, b)
    jitter = TopKGate(16, 4, k=2, noisy_gate_policy="Jitter", drop_tokens=False).train()
    assert jitter(x).expert_idx.shape == (64, 2)


def test_bad_configs():
    with pytest.raises(ConfigError, match="k=5"):
        topk_gating(logits(3, 4), k=5)
    with pytest.raises(ConfigError, match="noisy_gate_policy"):
        TopKGate(8, 4, noisy_gate_policy="Gaussian")
    with pytest.raises(ConfigError, match="tokens, experts"):
        topk_gating(torch.zeros(2, 3, 4))
    with pytest.raises(ConfigError, match="drop_policy"):
        topk_gating(logits(3, 4), k=3, drop_policy="random")
    with pytest.raises(ConfigError, match="drop_policy"):
        TopKGate(8, 4, k=3, drop_policy="tokens")


@pytest.mark.parametrize("k", [1, 2, 3])
def test_inference_fast_path_equals_general_gating(k):
    from expertswitch.moe.gate import dropless_inference_gating

    lg = logits(33, 7, seed=k)
    fast = dropless_inference_gating(lg, k)
    ref = topk_gating(lg, k=k, drop_tokens=False)
    assert torch.equal(fast.expert_idx, ref.expert_idx)
    assert torch.equal(fast.exp_counts, ref.exp_counts) and fast.capacity == ref.capacity
    torch.testing.assert_close(fast.weights, ref.weights)
    torch.testing.assert_close(fast.l_aux, ref.l_aux)
