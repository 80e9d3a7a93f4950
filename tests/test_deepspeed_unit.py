"""DeepSpeed's own MoE unit tests (tests/unit/v1/moe/test_moe.py, test_moe_tp.py and
tests/unit/checkpoint/test_moe_checkpoint.py in the DeepSpeed repository), the cases that run in
one process, restated against `expertswitch.moe` with the installed `deepspeed` as the live
oracle on a gloo world of one: a DeepSpeed user swaps `from deepspeed.moe.layer import MoE`
for ours, keeps the model code and the trained checkpoints, and gets the same training.

DeepSpeed's tests run its engine with fp16 on a GPU; here both models train in one torch loop
(torch's AdamW, as the tests' optimizer) so that every weight can be compared after every step.
Expert and tensor parallelism (ep_size > 1) are covered by tests/test_parallel.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from expertswitch.errors import CheckpointError, ConfigError
from expertswitch.moe import MoE, convert_deepspeed_state_dict, load_deepspeed_checkpoint
from expertswitch.moe.gate import topk_gating


# --- DeepSpeed's test models (tests/unit/simple_model.py), over either MoE class ----------
class SimpleMoEModel(nn.Module):
    """DeepSpeed's: two MoE layers given ONE expert module (so with use_residual their
    residual MLPs are one tied module), interleaved with dense layers."""

    def __init__(self, moe_cls, hidden_dim, num_experts=4, use_residual=False, use_rts=True):
        super().__init__()
        self.linear1 = nn.Linear(hidden_dim, hidden_dim)
        expert = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.Linear(hidden_dim, hidden_dim))
        kw = dict(hidden_size=hidden_dim, expert=expert, ep_size=1, use_residual=use_residual,
                  num_experts=num_experts, k=1, use_rts=use_rts)  # fmt: skip
        if moe_cls is MoE and not use_rts:  # DeepSpeed's own (unspecified) choice among ties
            kw["tie_break"] = "torch_topk"
        self.moe_1 = moe_cls(**kw)
        self.linear2 = nn.Linear(hidden_dim, hidden_dim)
        self.moe_2 = moe_cls(**kw)
        self.linear3 = nn.Linear(hidden_dim, hidden_dim)
        self.cross_entropy_loss = nn.CrossEntropyLoss()

    def forward(self, x, y):
        hidden_dim = self.linear1(x)
        output, _, _ = self.moe_1(hidden_dim)
        output = self.linear2(output)
        output, _, _ = self.moe_2(output)
        output = self.linear3(output)
        hidden_dim = hidden_dim + output
        return self.cross_entropy_loss(hidden_dim.mean(1), y)


class SimplePRMoEModel(nn.Module):
    def __init__(self, moe_cls, hidden_dim, num_experts=2, use_residual=False):
        super().__init__()
        self.linear = nn.Linear(hidden_dim, hidden_dim)
        self.linear2 = moe_cls(hidden_size=hidden_dim, expert=nn.Linear(hidden_dim, hidden_dim),
                               ep_size=1, use_residual=use_residual, num_experts=num_experts,
                               k=1)  # fmt: skip
        self.linear3 = moe_cls(hidden_size=hidden_dim, expert=nn.Linear(hidden_dim, hidden_dim),
                               ep_size=1, use_residual=use_residual,
                               num_experts=int(2 * num_experts), k=1)  # fmt: skip
        self.cross_entropy_loss = nn.CrossEntropyLoss()

    def forward(self, x, y):
        hidden_dim = self.linear(x)
        output, _, _ = self.linear2(hidden_dim)
        output, _, _ = self.linear3(output)
        hidden_dim = hidden_dim + output
        return self.cross_entropy_loss(hidden_dim.mean(1), y)


def pair(deepspeed, model_cls, seed=0, **kw):
    """DeepSpeed's model and ours, our weights loaded from DeepSpeed's whole-model state dict
    (keys converted at any depth)."""
    from deepspeed.moe.layer import MoE as DSMoE

    torch.manual_seed(seed)
    ds = model_cls(DSMoE, **kw)
    ours = model_cls(MoE, **kw)
    ours.load_state_dict(convert_deepspeed_state_dict(ds.state_dict()))
    return ds, ours


def sequence_data(total_samples, hidden_dim, seq_len=32, seed=1, dtype=torch.float32):
    """DeepSpeed's sequence_dataloader at micro-batch 1: ([1, S, H] input, [1] label)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(total_samples, seq_len, hidden_dim, generator=g).to(dtype)
    y = torch.randint(0, hidden_dim, (total_samples,), generator=g)
    return [(x[i : i + 1], y[i : i + 1]) for i in range(total_samples)]


def train_both(ds, ours, data, make_opt=torch.optim.AdamW, check_grads=False):
    """One torch loop per model, the same RNG state before each step (the gates' random token
    selection draws the same numbers); returns the losses."""
    opts = [make_opt(m.parameters()) for m in (ds, ours)]
    losses = []
    for step, (x, y) in enumerate(data):
        pair_losses = []
        for m in (ds, ours):
            torch.manual_seed(1000 + step)
            loss = m(x, y)
            loss.backward()
            pair_losses.append(loss.detach())
        if check_grads:
            grads = {n: p.grad for n, p in ds.named_parameters()}
            for n, p in ours.named_parameters():
                g_ds = grads[_ds_name(n)]
                assert (p.grad is None) == (g_ds is None), (step, n)
                if g_ds is not None:
                    torch.testing.assert_close(p.grad, g_ds, rtol=1e-4, atol=1e-6)
        for opt in opts:
            opt.step()
            opt.zero_grad()
        torch.testing.assert_close(pair_losses[1], pair_losses[0], rtol=1e-5, atol=1e-6)
        losses.append(float(pair_losses[0]))
    return losses


def _ds_name(ours_name: str) -> str:
    return ours_name.replace("gate.wg.", "deepspeed_moe.gate.wg.").replace(
        "experts.experts.", "deepspeed_moe.experts.deepspeed_experts.")  # fmt: skip


def assert_same_weights(ds, ours, rtol=1e-5, atol=1e-6):
    want = convert_deepspeed_state_dict(ds.state_dict())
    got = ours.state_dict()
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=rtol, atol=atol, msg=k)


# --- gating functions --------------------------------------------------------------------
def dispatch_mask(g, num_experts):
    """[S, E, C] 0/1 from our routes (DeepSpeed's dispatch_mask)."""
    s, k = g.expert_idx.shape
    out = torch.zeros(s, num_experts, g.capacity, dtype=torch.int64)
    for t in range(s):
        for r in range(k):
            e, loc = int(g.expert_idx[t, r]), int(g.locations[t, r])
            if e >= 0:
                out[t, e, loc] = 1
    return out


def sparse_truth(shape, cap, rows):
    m, n = shape
    truth = torch.zeros(m, n, cap, dtype=torch.int64)
    i, j, k = torch.tensor(rows).t()
    truth[i, j, k] = 1
    return truth


def test_topk_gate_drop_policies_as_deepspeeds_test(deepspeed):
    """TestTopkGate.test, its k = 3 cases: the dispatch masks written in DeepSpeed's test and
    DeepSpeed's live topkgating, for drop_policy 'probs' and 'position'. (Its k = 2 cases call
    DeepSpeed's topkgating function directly; DeepSpeed's MoE layer routes k = 2 by top2gating,
    and so does ours: see the README's table of differences.)"""
    from deepspeed.moe.sharded_moe import topkgating

    logits2 = torch.tensor([[0.5858, 0.4801, 0.6269, 0.5397, 0.9722, 0.7034],
                            [0.5445, 0.6332, 0.4519, 0.6308, 0.0519, 0.6450],
                            [0.4874, 0.8110, 0.7467, 0.8474, 0.0277, 0.3068],
                            [0.8570, 0.6714, 0.5310, 0.3274, 0.4836, 0.9892]])  # fmt: skip
    cases = {
        "probs": [[0, 2, 0], [0, 4, 0], [1, 1, 0], [1, 3, 0], [1, 5, 0], [2, 1, 1], [2, 2, 1],
                  [2, 3, 1], [3, 0, 0], [3, 5, 1]],
        "position": [[0, 2, 0], [0, 4, 0], [0, 5, 0], [1, 1, 0], [1, 3, 0], [1, 5, 1],
                     [2, 1, 1], [2, 2, 1], [2, 3, 1], [3, 0, 0]],
    }  # fmt: skip
    for policy, rows in cases.items():
        g = topk_gating(logits2, 3, 1.0, 1, drop_policy=policy)
        assert g.capacity == 2
        mask = dispatch_mask(g, logits2.shape[1])
        assert torch.equal(mask, sparse_truth(logits2.shape, 2, rows)), policy
        live = topkgating(logits2, 3, 1, min_capacity=1, drop_policy=policy)[2]
        assert torch.equal(mask, live.long()), policy


def test_top2_gate_as_deepspeeds_top2gating(deepspeed):
    """DeepSpeed's MoE layer routes k = 2 by top2gating: ours gives its dispatch mask on the
    logits of DeepSpeed's TestTopkGate (second expert by logit, no sampling)."""
    from deepspeed.moe.sharded_moe import top2gating

    logits = torch.tensor([[0.11, 0.2, 0.1, 0.3], [0.3, 0.4, 0.11, 0.1], [0.11, 0.1, 0.6, 0.5],
                           [0.1, 0.11, 0.7, 0.8]])  # fmt: skip
    for factor in (0.5, 1.0, 2.0):
        g = topk_gating(logits, 2, factor, 1)
        live = top2gating(logits, factor, 1, top2_2nd_expert_sampling=False)[2]
        assert g.capacity == live.shape[-1]
        assert torch.equal(dispatch_mask(g, 4), live.long()), factor


def test_topk_runs_on_tiny_inputs_as_deepspeeds_test(deepspeed):
    """TestTopk at rank 0: top-1, two tokens, dropless, RTS on."""
    from deepspeed.moe.sharded_moe import top1gating

    logits = torch.rand(2, 2)
    g = topk_gating(logits, 1, 1.0, 0, drop_tokens=False, use_rts=True, training=True)
    ds = top1gating(logits=logits, capacity_factor=1, min_capacity=0, used_token=None,
                    noisy_gate_policy=None, drop_tokens=False, use_rts=True)  # fmt: skip
    assert g.capacity == ds[2].shape[-1] and int((g.expert_idx >= 0).sum()) == 2


@pytest.mark.parametrize("case", ["topk_probs", "top1_drop", "topk_position_min", "top1_tp"])
def test_capacity_cases_of_deepspeeds_tests(case):
    """The capacity cases of DeepSpeed's newest test_moe.py: capacity larger than the tokens
    keeps every route; min_capacity stays with 'position'; capacity 6 for s=3, e=4, cf=8."""
    torch.manual_seed(0)
    if case == "topk_probs":  # ceil(8/2 · 2·2) = 16 > 8 tokens
        g = topk_gating(torch.randn(8, 2), 2, 2.0, 0, drop_policy="probs")
        assert g.capacity == 16 and int((g.expert_idx >= 0).sum()) == 16
    elif case == "top1_drop":
        g = topk_gating(torch.randn(8, 2), 1, 4.0, 0, drop_tokens=True, use_rts=False)
        assert g.capacity == 16 and int((g.expert_idx >= 0).sum()) == 8
    elif case == "topk_position_min":
        g = topk_gating(torch.randn(4, 2), 1, 1.0, 8, drop_policy="position")
        assert g.capacity == 8
    else:
        g = topk_gating(torch.randn(3, 4), 1, 8.0, 0, drop_tokens=True, use_rts=False)
        assert g.capacity == 6


# --- whole models trained side by side ----------------------------------------------------
def test_simple_moe_trains_as_deepspeed(deepspeed):
    """TestSimpleMoE: SimpleMoEModel (hidden 16), 50 samples, Adam at lr 1.5e-4."""
    ds, ours = pair(deepspeed, SimpleMoEModel, hidden_dim=16)
    losses = train_both(ds, ours, sequence_data(50, 16),
                        lambda p: torch.optim.Adam(p, lr=0.00015))  # fmt: skip
    assert all(torch.isfinite(torch.tensor(losses)))
    assert_same_weights(ds, ours)


@pytest.mark.parametrize("use_residual", [False, True])
def test_moe_50_steps_weights_equal_deepspeeds(deepspeed, use_residual):
    """TestMoE at one rank: AdamW (weight decay 0.01) for 50 steps; every weight equal to
    DeepSpeed's after every step's gradients. With use_residual the two layers share the one
    residual MLP module the model passed (tied, gradients summed); an expert that gets no
    tokens gets zero gradients (so AdamW still decays it and counts its step)."""
    ds, ours = pair(deepspeed, SimpleMoEModel, hidden_dim=16, use_residual=use_residual)
    if use_residual:
        assert ours.moe_1.mlp is ours.moe_2.mlp and ds.moe_1.mlp is ds.moe_2.mlp
    train_both(ds, ours, sequence_data(50, 16), check_grads=True)
    assert_same_weights(ds, ours)


@pytest.mark.parametrize("use_residual", [False, True])
def test_pr_moe_trains_as_deepspeed(deepspeed, use_residual):
    """TestPRMoE: SimplePRMoEModel (2 then 4 experts), AdamW."""
    ds, ours = pair(deepspeed, SimplePRMoEModel, hidden_dim=16, use_residual=use_residual)
    train_both(ds, ours, sequence_data(50, 16), check_grads=True)
    assert_same_weights(ds, ours)


def test_expert_weight_grad_at_one_rank(deepspeed):
    """TestExpertWeightGradWithZero at one rank: 2 experts, no RTS, hidden 4, Adam at lr 0.1;
    every expert's weight and bias gradients equal DeepSpeed's at every step."""
    ds, ours = pair(deepspeed, SimpleMoEModel, hidden_dim=4, num_experts=2, use_rts=False)
    train_both(ds, ours, sequence_data(2, 4, seed=11), lambda p: torch.optim.Adam(p, lr=0.1),
               check_grads=True)  # fmt: skip
    assert_same_weights(ds, ours)


def test_idle_expert_gets_zero_gradients_not_none(deepspeed):
    """An expert that receives no token: DeepSpeed runs it on its empty capacity buffer, so its
    gradients are zeros; ours too, without running it."""
    ds, ours = pair(deepspeed, SimpleMoEModel, hidden_dim=16, num_experts=16)
    x = torch.randn(1, 4, 16)  # 4 tokens (DeepSpeed's min_capacity), 16 experts: ≥ 12 idle
    for m in (ds, ours):
        torch.manual_seed(5)
        m(x, torch.tensor([3])).backward()
    for e in range(16):
        p = ours.moe_1.experts.experts[e][0].weight
        q = ds.moe_1.deepspeed_moe.experts.deepspeed_experts[e][0].weight
        assert p.grad is not None and q.grad is not None
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
    assert sum(int(ours.moe_1.experts.experts[e][0].weight.grad.abs().sum() == 0)
               for e in range(16)) >= 12  # fmt: skip


def test_fp16(deepspeed):
    """DeepSpeed's tests run in fp16: the same model in fp16 gives DeepSpeed's loss and
    gradients within fp16's precision."""
    ds, ours = pair(deepspeed, SimpleMoEModel, hidden_dim=16)
    ds.half()
    ours.half()
    for x, y in sequence_data(4, 16, dtype=torch.float16):
        losses = []
        for m in (ds, ours):
            torch.manual_seed(7)
            losses.append(m(x, y))
            losses[-1].backward()
        torch.testing.assert_close(losses[1], losses[0], rtol=2e-3, atol=2e-3)
    for n, p in ours.named_parameters():
        q = dict(ds.named_parameters())[_ds_name(n)]
        torch.testing.assert_close(p.grad.float(), q.grad.float(), rtol=2e-2, atol=2e-3, msg=n)


# --- checkpoints --------------------------------------------------------------------------
def ds_engine_checkpoint(deepspeed, model, path, steps=3):
    """A real DeepSpeed engine checkpoint of `model` after a few steps."""
    opt = torch.optim.AdamW(model.parameters())
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, dist_init_required=False,
                                      config={"train_micro_batch_size_per_gpu": 1})  # fmt: skip
    for x, y in sequence_data(steps, 16):
        engine.backward(engine(x, y))
        engine.step()
    engine.save_checkpoint(str(path))
    return engine.module


@pytest.mark.parametrize("use_residual", [False, True])
def test_deepspeed_engine_checkpoint_loads_into_ours(deepspeed, tmp_path, use_residual):
    """test_moe_checkpoint's round trip: DeepSpeed's engine saves SimpleMoEModel (experts in
    their own layer_L_expert_E files), the model built on our MoE loads that directory and
    computes what DeepSpeed's does."""
    from deepspeed.moe.layer import MoE as DSMoE

    torch.manual_seed(0)
    trained = ds_engine_checkpoint(deepspeed, SimpleMoEModel(DSMoE, 16, use_residual=use_residual),
                                   tmp_path / "ck")  # fmt: skip
    assert len(list((tmp_path / "ck").glob("*/layer_*_expert_*_model_states.pt"))) == 8
    ours = SimpleMoEModel(MoE, 16, use_residual=use_residual)
    load_deepspeed_checkpoint(ours, tmp_path / "ck")
    assert_same_weights(trained, ours, rtol=0, atol=0)
    x, y = sequence_data(1, 16, seed=9)[0]
    losses = []
    for m in (trained, ours):  # training-mode routing: DeepSpeed's random draws, matched
        torch.manual_seed(3)
        losses.append(m.train()(x, y))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)


def test_deepspeed_checkpoint_errors_name_the_problem(deepspeed, tmp_path):
    from deepspeed.moe.layer import MoE as DSMoE

    torch.manual_seed(0)
    ds_engine_checkpoint(deepspeed, SimpleMoEModel(DSMoE, 16), tmp_path / "ck", steps=1)
    with pytest.raises(CheckpointError, match="lacks .*layer_0_expert_4"):
        load_deepspeed_checkpoint(SimpleMoEModel(MoE, 16, num_experts=8), tmp_path / "ck")
    with pytest.raises(CheckpointError, match="missing from it"):
        load_deepspeed_checkpoint(SimpleMoEModel(MoE, 16, use_residual=True), tmp_path / "ck")
    with pytest.raises(CheckpointError, match="not a DeepSpeed checkpoint"):
        load_deepspeed_checkpoint(SimpleMoEModel(MoE, 16), tmp_path)
    tag = next((tmp_path / "ck").glob("global_step*"))
    f = tag / "layer_1_expert_2_mp_rank_00_model_states.pt"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_deepspeed_checkpoint(SimpleMoEModel(MoE, 16), tmp_path / "ck")


def test_tie_break_torch_topk_is_deepspeeds_top1_choice(deepspeed):
    """Top-1 without RTS, experts over-full: tie_break='torch_topk' keeps exactly the tokens
    DeepSpeed's top1gating keeps (its torch.topk over the 0/1 mask), slots and weights too;
    the default keeps the earliest tokens."""
    from deepspeed.moe.sharded_moe import top1gating

    overfull = 0
    for seed in range(30):
        g = torch.Generator().manual_seed(seed)
        t, e = (
            int(torch.randint(8, 40, (1,), generator=g)),
            int(torch.randint(2, 6, (1,), generator=g)),
        )
        logits = torch.randn(t, e, generator=g) + torch.randn(e, generator=g) * 2  # skewed
        ds = top1gating(logits, 1.0, 1, drop_tokens=True, use_rts=False)
        ours = topk_gating(logits, 1, 1.0, 1, drop_tokens=True, use_rts=False,
                           tie_break="torch_topk")  # fmt: skip
        assert torch.equal(dispatch_mask(ours, e), ds[2].long()), seed
        combine = torch.zeros(t, e, ours.capacity)
        for i in range(t):
            if ours.expert_idx[i, 0] >= 0:
                combine[i, ours.expert_idx[i, 0], ours.locations[i, 0]] = ours.weights[i, 0]
        torch.testing.assert_close(combine, ds[1].float())
        overfull += int(ds[2].sum()) < t
    assert overfull >= 10  # the cases where the choice matters
    with pytest.raises(ConfigError, match="top-1"):
        MoE(16, nn.Linear(16, 16), num_experts=4, k=2, tie_break="torch_topk")


def test_idle_experts_in_fp16_stay_finite(deepspeed):
    """The zero-gradient anchor of idle experts reads nothing: an fp16 layer with many idle
    experts, one of them holding an inf, still gives finite outputs and zero gradients."""
    moe = MoE(64, nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64)), num_experts=32).half()
    x = torch.randn(4, 64, dtype=torch.float16, requires_grad=True)
    with torch.no_grad():
        torch.manual_seed(0)
        used = set(moe.gate(x.float()).expert_idx.flatten().tolist())
        idle = next(e for e in range(32) if e not in used)
        moe.experts.experts[idle][0].weight[0, 0] = float("inf")
    torch.manual_seed(0)
    out, _, _ = moe(x)
    assert torch.isfinite(out).all()
    out.float().sum().backward()
    grad = moe.experts.experts[idle][0].weight.grad
    assert grad is not None and grad.abs().sum() == 0


def test_deepspeed_checkpoint_layouts_and_tags_are_named(deepspeed, tmp_path):
    from deepspeed.moe.layer import MoE as DSMoE

    torch.manual_seed(0)
    ds_engine_checkpoint(deepspeed, SimpleMoEModel(DSMoE, 16), tmp_path / "ck", steps=1)
    model = SimpleMoEModel(MoE, 16)
    with pytest.raises(CheckpointError, match="no checkpoint tag 'nope'"):
        load_deepspeed_checkpoint(model, tmp_path / "ck", tag="nope")
    with pytest.raises(CheckpointError, match="not a directory name"):
        load_deepspeed_checkpoint(model, tmp_path / "ck", tag="../ck")
    (tmp_path / "ck" / "latest").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(CheckpointError, match="latest"):
        load_deepspeed_checkpoint(model, tmp_path / "ck")
    tag = next(p.name for p in (tmp_path / "ck").iterdir() if p.is_dir())
    main = tmp_path / "ck" / tag / "mp_rank_00_model_states.pt"
    state = torch.load(main, weights_only=True)
    import argparse

    state["args"] = argparse.Namespace(lr=1e-4)  # what Megatron-DeepSpeed saves beside
    torch.save(state, main)
    with pytest.raises(CheckpointError, match="trusted=True"):
        load_deepspeed_checkpoint(model, tmp_path / "ck", tag=tag)
    load_deepspeed_checkpoint(model, tmp_path / "ck", tag=tag, trusted=True)
