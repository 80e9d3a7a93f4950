"""DeepSpeed's MoE layer as the oracle (CPU, gloo world of 1): same weights and inputs, no noise,
RTS off, no second-expert sampling → same routing, capacity, counts, aux loss and outputs."""

import socket

import pytest
import torch
from torch import nn

from expertswitch.moe import MoE, convert_deepspeed_state_dict

H, F, E, T = 16, 24, 4, 40


@pytest.fixture(scope="module")
def deepspeed():
    ds = pytest.importorskip("deepspeed")
    import os

    import torch.distributed as dist

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0",
                          WORLD_SIZE="1", LOCAL_RANK="0")  # fmt: skip
        ds.init_distributed(dist_backend="gloo", verbose=False)
    return ds


def expert_module():
    return nn.Sequential(nn.Linear(H, F), nn.GELU(), nn.Linear(F, H))


def pair(deepspeed, seed=0, **kw):
    """A DeepSpeed MoE with distinct random experts and ours with the same weights."""
    from deepspeed.moe.layer import MoE as DSMoE

    torch.manual_seed(seed)
    kw.setdefault("use_rts", False)
    ds = DSMoE(hidden_size=H, expert=expert_module(), num_experts=E, **kw)
    with torch.no_grad():
        for p in ds.parameters():
            p.normal_(0, 0.5)
    ours = MoE(hidden_size=H, expert=expert_module(), num_experts=E, **kw)
    ours.load_state_dict(convert_deepspeed_state_dict(ds.state_dict()))
    return ds.eval(), ours.eval()


def ds_routes(ds, x):
    """DeepSpeed's routing: (indices [S, k], −1 = dropped; capacity; l_aux; counts)."""
    l_aux, cap, _, idx, _, _, counts = ds.deepspeed_moe.gate(x.reshape(-1, H), None, True)
    return idx.T.long(), int(cap), l_aux, counts


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
