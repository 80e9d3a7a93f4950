"""The GPU paths of the MoE layers, forced on the CPU (kernels.select.force_kernels, Triton's
interpreter), against an independent dense oracle: gradients through the kernel path, NaN and
−inf router rows, weight views, duplicate experts in a token's top-k, and the heuristic's real
tile shapes (not only the 16×16×16 tiles of the unit tests)."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from expertswitch.kernels import moe_config  # noqa: E402
from expertswitch.kernels.fused_moe import (  # noqa: E402
    _FusedMoE,
    fused_moe,
    fused_moe_reference,
    fused_moe_triton,
)
from expertswitch.kernels.moe_config import GemmConfig, MoEPlan  # noqa: E402
from expertswitch.kernels.select import force_kernels  # noqa: E402
from expertswitch.kernels.topk_softmax import (  # noqa: E402
    router_topk_reference,
    router_topk_triton,
    topk_softmax_reference,
    topk_softmax_triton,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-5 if DEVICE == "cpu" else 2e-3  # tf32 on a GPU


def dense_oracle(x, w_in, w_out, idx, w, activation="swiglu", b_in=None, b_out=None):
    """Every expert on every token, then a masked weighted sum — no sorting, no index_add: an
    oracle that shares no code with the kernels or their reference."""
    out = torch.zeros(x.shape[0], w_out.shape[1], dtype=torch.float64, device=x.device)
    for e in range(w_in.shape[0]):
        h = x.double() @ w_in[e].double().T
        if b_in is not None:
            h = h + b_in[e].double()
        if activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            a = F.silu(gate) * up
        else:
            a = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}[activation](h)
        y = a @ w_out[e].double().T
        if b_out is not None:
            y = y + b_out[e].double()
        for r in range(idx.shape[1]):
            out = out + ((idx[:, r] == e).double() * w[:, r].double())[:, None] * y
    return out


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


def mlp_weights(e, h, f, activation="swiglu", seed=0):
    g = torch.Generator().manual_seed(seed)
    f_in = 2 * f if activation == "swiglu" else f
    return (
        (torch.randn(e, f_in, h, generator=g) / h**0.5).to(DEVICE),
        (torch.randn(e, h, f, generator=g) / f**0.5).to(DEVICE),
    )


def routes(t, e, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)] or
                      [torch.zeros(0, k, dtype=torch.long)]).reshape(t, k)  # fmt: skip
    return idx.to(DEVICE), torch.rand(t, k, generator=g).to(DEVICE)


# ---- 1. gradients through the kernel path ------------------------------------------------


def test_mixtral_router_learns_from_the_loss_on_the_kernel_path():
    """With autograd on, the fused top-k kernel (no autograd history) must not be used: on a
    GPU the router got gradient from the aux loss only. Forced kernels = what a GPU runs."""
    from expertswitch.moe.mixtral import MixtralSparseMoE

    torch.manual_seed(0)
    moe = MixtralSparseMoE(32, 48, num_experts=4, top_k=2)
    x = torch.randn(2, 9, 32)

    def grads(forced: bool):
        moe.zero_grad()
        xx = x.clone().requires_grad_()
        if forced:
            with force_kernels():
                out = moe(xx)
        else:
            out = moe(xx)
        out.square().sum().backward()
        return [xx.grad, moe.gate.weight.grad, moe.experts.w_in.grad, moe.experts.w_out.grad]

    ref, kern = grads(False), grads(True)
    assert kern[1] is not None and kern[1].abs().sum() > 0, "the router got no gradient"
    for a, b in zip(kern, ref):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("k", [1, 2])
def test_moe_eval_with_autograd_on_keeps_gate_gradients(k):
    """An eval-mode dropless MoE (fused dropless gating) with gradients enabled, on the kernel
    path: the gate and experts get the same gradients as on the reference path."""
    from expertswitch.moe import MoE

    torch.manual_seed(k)
    moe = MoE.stacked(24, 40, 4, k=k, drop_tokens=False).eval()
    x = torch.randn(13, 24)

    def grads(forced: bool):
        moe.zero_grad()
        with force_kernels() if forced else torch.enable_grad():
            out, aux, _ = moe(x)
        (out.square().sum() + aux).backward()
        return [p.grad.clone() for p in (moe.gate.wg.weight, moe.experts.w_in, moe.experts.w_out)]

    for a, b in zip(grads(True), grads(False)):
        assert rel_err(a, b) < 1e-5
    # infer() under autograd: the reference router, the gate's gradient kept (and equal to
    # forward()'s without the aux loss)
    moe.zero_grad()
    with force_kernels():
        moe.infer(x).square().sum().backward()
    via_infer = moe.gate.wg.weight.grad.clone()
    moe.zero_grad()
    moe(x)[0].square().sum().backward()
    assert via_infer.abs().sum() > 0 and rel_err(via_infer, moe.gate.wg.weight.grad) < 1e-5


@pytest.mark.parametrize("case", ["all dropped", "no tokens", "ids past E"])
def test_kernel_path_backward_with_nothing_or_bad_ids_kept(case):
    """Training through the kernel path: an empty micro-batch, every route dropped, or ids
    outside [0, E) (dropped by the forward) backpropagate as on the reference path."""
    t, h, f, e = 0 if case == "no tokens" else 6, 16, 32, 4
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    w_in, w_out = mlp_weights(e, h, f)
    idx, w = routes(t, e, 2)
    if case == "all dropped":
        idx[:] = -1
    if case == "ids past E":
        idx[1, 0], idx[2, 1] = e, e + 7
    clean = torch.where(idx >= e, -1, idx)

    def grads(kernel: bool):
        leaves = [v.clone().requires_grad_() for v in (x, w_in, w_out, w)]
        ids = idx if kernel else clean
        with force_kernels() if kernel else torch.enable_grad():
            out = fused_moe(leaves[0], leaves[1], leaves[2], ids, leaves[3])
        (out.square().sum() + leaves[0].square().sum()).backward()
        return [v.grad for v in leaves]

    for a, b in zip(grads(True), grads(False)):
        if b is None:
            assert a is None or a.abs().sum() == 0
        else:
            assert rel_err(a, b) < 1e-5 if b.abs().sum() > 0 else a.abs().sum() == 0


def test_strided_inputs_on_the_kernel_path():
    """A view with a strided last dimension works on the kernel path as on the reference."""
    from expertswitch.moe import MoE

    torch.manual_seed(0)
    moe = MoE.stacked(16, 24, 4, k=2, drop_tokens=False).eval()
    x = torch.randn(9, 32)[:, ::2]
    with torch.no_grad():
        ref = moe(x)[0]
        with force_kernels():
            assert rel_err(moe.infer(x), ref) < 1e-5
            assert rel_err(moe(x)[0], ref) < 1e-5


@pytest.mark.parametrize("bias", [False, True])
def test_fused_moe_gradients_match_a_dense_oracle(bias):
    """The kernel forward + its backward against autograd through the dense oracle (the
    backward reuses the reference, so comparing with the reference would test nothing)."""
    t, h, f, e = 23, 16, 24, 4
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    w_in, w_out = mlp_weights(e, h, f)
    b_in = torch.randn(e, 2 * f, generator=torch.Generator().manual_seed(3)).to(DEVICE) / 4
    b_out = torch.randn(e, h, generator=torch.Generator().manual_seed(4)).to(DEVICE) / 4
    idx, w = routes(t, e, 2)
    idx[3, 1] = -1
    grad_out = torch.randn(t, h, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    inputs = (x, w_in, w_out, w) + ((b_in, b_out) if bias else ())

    def grads(fn):
        leaves = [v.clone().double().requires_grad_() for v in inputs]
        fn(leaves).backward(grad_out.double())
        return [v.grad for v in leaves]

    def kernel(v):
        f32 = [a.float() for a in v] + [None] * (6 - len(v))
        return _FusedMoE.apply(*f32, idx, "swiglu", False).double()

    ours = grads(kernel)
    oracle = grads(lambda v: dense_oracle(v[0], v[1], v[2], idx, v[3], "swiglu", *v[4:]))
    for a, b in zip(ours, oracle):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("split", [1, 2])
@pytest.mark.parametrize("route", [True, False])
def test_biases_run_on_the_kernel(split, route, monkeypatch):
    """Biases no longer send a call to the reference (which syncs with the host, so infer() of a
    biased layer could not be captured in a CUDA graph); split K adds b_out once."""
    import expertswitch.kernels.fused_moe as fm
    from expertswitch.moe import MoE

    t, h, f, e = 11, 24, 64, 4
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    w_in, w_out = mlp_weights(e, h, f, "gelu")
    b_in = torch.randn(e, f, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    b_out = torch.randn(e, h, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    idx, w = routes(t, e, 2)
    bm = moe_config.by_route_block(t * 2) if route else 16
    plan = MoEPlan(route, GemmConfig(bm, 16, 16), GemmConfig(bm, 16, 16, split_k=split))
    out = fused_moe_triton(x, w_in, w_out, idx, w, "gelu", plan, b_in=b_in, b_out=b_out)
    assert rel_err(out, dense_oracle(x, w_in, w_out, idx, w, "gelu", b_in, b_out)) < TOL
    with pytest.raises(ValueError, match="b_out must be"):
        fused_moe_triton(x, w_in, w_out, idx, w, "gelu", plan, b_in=b_in, b_out=b_out[:, :-1])
    torch.manual_seed(0)
    moe = MoE.stacked(h, f, e, k=2, activation="gelu", bias=True, drop_tokens=False).eval()
    with torch.no_grad():
        moe.experts.b_in.normal_()
        moe.experts.b_out.normal_()
        ref = moe(x)[0]

    def no_reference(*a, **kw):
        raise AssertionError("the reference (host-synchronising) path ran")

    monkeypatch.setattr(fm, "fused_moe_reference", no_reference)
    with torch.no_grad(), force_kernels():
        assert rel_err(moe.infer(x), ref) < TOL


# ---- 2. NaN and −inf router rows ----------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3])
def test_nan_and_all_minus_inf_rows_pick_real_experts(k):
    """NaN, all −inf and +inf rows take experts 0..k−1 with NaN weights, in the kernel and the
    reference alike; before, the kernel returned expert id E (one past the last)."""
    e = 6
    logits = torch.randn(5, e, generator=torch.Generator().manual_seed(k))
    logits[1, 2] = float("nan")
    logits[3] = float("-inf")
    logits[4, 5] = float("inf")
    logits = logits.to(DEVICE)
    for renorm in (False, True):
        idx, w, _ = topk_softmax_triton(logits, k, renorm)
        idx_r, w_r, _ = topk_softmax_reference(logits, k, renorm)
        assert torch.equal(idx, idx_r)
        assert int(idx.min()) >= 0 and int(idx.max()) < e
        for row in (1, 3, 4):
            assert idx[row].tolist() == list(range(k)) and bool(w[row].isnan().all())
        finite = [0, 2]
        torch.testing.assert_close(w[finite], w_r[finite])
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    x[2, 7] = float("nan")
    wg = torch.randn(e, 16, generator=torch.Generator().manual_seed(1))
    idx, w, _ = router_topk_triton(x.to(DEVICE), wg.to(DEVICE), k, True)
    idx_r, _, _ = router_topk_reference(x, wg, k, True)
    assert torch.equal(idx.cpu(), idx_r) and idx[2].tolist() == list(range(k))


def test_a_nan_token_spoils_only_its_own_output():
    """Mixtral's block on the kernel path with one NaN token: that row is NaN, every other row
    equals the reference (before: an out-of-range expert corrupted other tokens' rows, or
    crashed the interpreter)."""
    from expertswitch.moe.mixtral import MixtralSparseMoE

    torch.manual_seed(0)
    moe = MixtralSparseMoE(32, 48, num_experts=4, top_k=2).eval()
    x = torch.randn(20, 32)
    x[5] = float("nan")
    x[11] = float("-inf")
    with torch.no_grad():
        with force_kernels():
            out = moe(x)
        ref = moe(x)
    bad = torch.zeros(20, dtype=torch.bool)
    bad[[5, 11]] = True
    assert bool(out[bad].isnan().all())
    assert bool(torch.isfinite(out[~bad]).all())
    torch.testing.assert_close(out[~bad], ref[~bad], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", ["aligned", "by_route", "split"])
def test_ids_past_the_last_expert_are_dropped_routes_on_the_kernel(path):
    """A caller's id ≥ E (or < −1) never reads past the weights on the kernel path (it counts
    as dropped; the check would need a host sync); the reference path refuses it clearly."""
    t, h, f, e = 12, 16, 32, 3
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    w_in, w_out = mlp_weights(e, h, f)
    idx, w = routes(t, e, 2)
    bad = idx.clone()
    bad[4, 0], bad[7, 1], bad[9, 0] = e, 40, -5
    clean = bad.clone()
    clean[(bad < 0) | (bad >= e)] = -1
    bm = moe_config.by_route_block(t * 2)
    plan = {
        "aligned": MoEPlan(False, GemmConfig(16, 16, 16), GemmConfig(16, 16, 16)),
        "by_route": MoEPlan(True, GemmConfig(bm, 16, 16), GemmConfig(bm, 16, 16)),
        "split": MoEPlan(False, GemmConfig(16, 16, 16), GemmConfig(16, 16, 16, split_k=2)),
    }[path]
    out = fused_moe_triton(x, w_in, w_out, bad, w, moe_plan=plan)
    assert rel_err(out, dense_oracle(x, w_in, w_out, clean, w)) < TOL
    with pytest.raises(ValueError, match=r"outside \[-1, 3\)"):
        fused_moe(x, w_in, w_out, bad, w, use_triton=False)


# ---- 3. weights that are views ------------------------------------------------------------


@pytest.mark.parametrize("tma", [False, True])
def test_weight_views_not_packed_back_to_back(tma):
    """w_in = big[:, :2F] (each expert's rows followed by others): the TMA descriptor, which
    sees the weights as one [E·rows, K] matrix, must not be used; the pointer path is."""
    t, h, f, e = 10, 32, 16, 3
    big = torch.randn(e, 4 * f, h, generator=torch.Generator().manual_seed(3)).to(DEVICE) / 6
    w_in = big[:, : 2 * f]
    w_out = mlp_weights(e, h, f)[1]
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    idx, w = routes(t, e, 2)
    cfg = GemmConfig(16, 16, 16, tma_w=tma)
    for by_route in (False, True):
        if by_route:
            cfg = replace(cfg, block_m=moe_config.by_route_block(t * 2))
        out = fused_moe_triton(x, w_in, w_out, idx, w, moe_plan=MoEPlan(by_route, cfg, cfg))
        assert rel_err(out, dense_oracle(x, w_in, w_out, idx, w)) < TOL


# ---- 4. a token given the same expert twice -----------------------------------------------


def test_same_expert_twice_in_a_tokens_top_k():
    """Routes are independent: a token sent twice to one expert gets both weighted outputs, on
    every path (the kernels' by-route path groups all of an expert's routes in one tile)."""
    from expertswitch.moe.dispatch import make_dispatch, permute, unpermute

    t, h, f, e = 9, 16, 32, 4
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    w_in, w_out = mlp_weights(e, h, f, "gelu")
    idx, w = routes(t, e, 2)
    idx[:, 1] = idx[:, 0]  # every token: the same expert twice
    idx[4, 1] = -1
    oracle = dense_oracle(x, w_in, w_out, idx, w, "gelu")
    bm = moe_config.by_route_block(t * 2)
    for plan in (
        MoEPlan(False, GemmConfig(16, 16, 16), GemmConfig(16, 16, 16)),
        MoEPlan(True, GemmConfig(bm, 16, 16), GemmConfig(bm, 16, 16, split_k=2)),
    ):
        out = fused_moe_triton(x, w_in, w_out, idx, w, "gelu", moe_plan=plan)
        assert rel_err(out, oracle) < TOL
    assert rel_err(fused_moe_reference(x, w_in, w_out, idx, w, "gelu"), oracle) < 1e-6
    # module experts: the sort-based dispatch of MoE(expert=...)
    d = make_dispatch(idx, w, e)
    rows = permute(x, d)
    ys = torch.cat([F.linear(F.gelu(F.linear(rows[lo:hi], w_in[i])), w_out[i])
                    for i, (lo, hi) in enumerate(zip(d.offsets[:-1], d.offsets[1:]))])  # fmt: skip
    assert rel_err(unpermute(ys, d), oracle) < 1e-6


# ---- 5. the heuristic's real tiles, run -----------------------------------------------------

REAL_TILES = {
    # name: (T, H, F, E, k, expected plan branch: (block_m, block_n, block_k) or by-route, split)
    "decode by-route, split-K 8": (1, 64, 1024, 8, 2, ("by_route", 8)),
    "decode by-route, split-K 2": (2, 64, 256, 8, 2, ("by_route", 2)),
    "decode top-1, split-K 8 reduced in-kernel": (3, 64, 1024, 8, 1, ("by_route", 8)),
    "by-route 64 routes (table)": (32, 48, 80, 8, 2, ("by_route_table", 1)),
    "16x64x128 (≤ 10 routes/expert)": (20, 136, 72, 4, 2, ((16, 64, 128), 1)),
    "32x64x128 (≤ 21 routes/expert)": (30, 72, 136, 4, 2, ((32, 64, 128), 1)),
    "64x64x64 (≤ 42 routes/expert)": (60, 72, 96, 4, 2, ((64, 64, 64), 1)),
    "128x64x64 (≤ 128 routes/expert)": (150, 72, 80, 4, 2, ((128, 64, 64), 1)),
    "128x128x64 grouped (compute-bound)": (300, 136, 80, 2, 1, ((128, 128, 64), 1)),
}


@pytest.mark.parametrize("case", REAL_TILES)
def test_heuristic_tiles_run_in_the_interpreter(case):
    """One shape per branch of heuristic_plan, run with the very tiles (and split-K) it picks;
    sizes not multiples of the tiles, so the masks run too."""
    t, h, f, e, k, (branch, split) = REAL_TILES[case]
    if branch == "by_route_table":  # a tuned by-route entry grown to hold 64 routes
        cfg = GemmConfig(moe_config.by_route_block(t * k), 64, 64)
        plan = MoEPlan(True, cfg, cfg)
        assert plan.up.block_m == 64
    else:
        plan = moe_config.heuristic_plan(t * k, e, h, f)
        if branch == "by_route":
            assert plan.by_route
        else:
            assert not plan.by_route and (plan.up.block_m, plan.up.block_n,
                                          plan.up.block_k) == branch  # fmt: skip
    assert plan.split_for(f) == split
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(t)).to(DEVICE)
    w_in, w_out = mlp_weights(e, h, f, seed=t)
    idx, w = routes(t, e, k, seed=t)
    if t > 4:
        idx[3, 0] = -1
    out = fused_moe_triton(x, w_in, w_out, idx, w, moe_plan=plan)
    assert rel_err(out, dense_oracle(x, w_in, w_out, idx, w)) < TOL


@pytest.mark.parametrize("group_m", [2, 3, 8])
def test_l2_grouped_tile_order_covers_every_tile(group_m):
    """GROUP_M row blocks sweep the columns together; groups of any size, the last one short,
    still compute every (row block, column block) tile once."""
    t, h, f, e = 70, 40, 72, 3
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    w_in, w_out = mlp_weights(e, h, f)
    idx, w = routes(t, e, 2, seed=9)
    cfg = GemmConfig(16, 16, 16, group_m=group_m)
    out = fused_moe_triton(x, w_in, w_out, idx, w, moe_plan=MoEPlan(False, cfg, cfg))
    assert rel_err(out, dense_oracle(x, w_in, w_out, idx, w)) < TOL


def test_plans_fit_the_devices_shared_memory_and_sm_count():
    """A tuned by-route entry grown to 64 rows is trimmed to the shared memory; the decode
    split-K follows the device's SM count (an H100 PCIe has 114, not 132)."""
    limits = moe_config.DeviceLimits()
    assert limits == moe_config.DeviceLimits(132, 227 * 1024 - moe_config.SMEM_MARGIN)
    big = MoEPlan(True, GemmConfig(64, 128, 128, 4, 4), GemmConfig(64, 128, 128, 4, 4))
    assert big.up.shared_bytes(2, 2) > limits.smem
    fitted = moe_config.fit_plan(big, 2, limits)
    assert fitted.up.shared_bytes(2, 2) <= limits.smem
    assert fitted.down.shared_bytes(1, 2) <= limits.smem
    assert fitted.up.block_m == 64 and fitted.up.num_stages >= 2
    few = moe_config.heuristic_plan(8, 8, 256, 14336, moe_config.DeviceLimits(sms=16))
    many = moe_config.heuristic_plan(8, 8, 256, 14336, moe_config.DeviceLimits(sms=132))
    assert few.down.split_k < many.down.split_k


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_grouped_mm_path_matches_the_oracle(activation):
    """A plan may hand large batches to torch._grouped_mm (the tuner picks it by measurement):
    dropped routes, ids past the last expert and biases handled as on our kernels."""
    t, h, f, e = 37, 32, 48, 5
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(12)).to(DEVICE)
    w_in, w_out = mlp_weights(e, h, f, activation, seed=12)
    b_in = torch.randn(e, w_in.shape[1], generator=torch.Generator().manual_seed(13)).to(DEVICE)
    b_out = torch.randn(e, h, generator=torch.Generator().manual_seed(14)).to(DEVICE)
    idx, w = routes(t, e, 2, seed=12)
    idx[4, 1], idx[9, 0] = -1, e + 3
    clean = torch.where(idx >= e, -1, idx)
    cfg = GemmConfig(16, 16, 16)
    plan = MoEPlan(False, cfg, cfg, grouped_mm=True)
    assert MoEPlan.from_json(plan.to_json(64)) == plan
    for biases in ((None, None), (b_in, b_out)):
        out = fused_moe_triton(x, w_in, w_out, idx, w, activation, plan, b_in=biases[0],
                               b_out=biases[1])  # fmt: skip
        assert rel_err(out, dense_oracle(x, w_in, w_out, clean, w, activation, *biases)) < TOL
    with pytest.raises(ValueError, match="not both"):
        MoEPlan(True, cfg, cfg, grouped_mm=True)


@pytest.mark.parametrize("t, splits", [(1, 8), (3, 4), (20, 3), (40, 2)])
def test_split_router_matches_the_reference(t, splits):
    """At decode sizes the router's gate weight is streamed by several programs per row block;
    the last one adds their partial logits up. Counters are left zero for the next call."""
    from expertswitch.kernels import topk_softmax as ts

    e, h = 12, 200
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(t)).to(DEVICE)
    wg = (torch.randn(e, h, generator=torch.Generator().manual_seed(1)) / h**0.5).to(DEVICE)
    for k in (1, 2):
        idx, w, p = router_topk_triton(x, wg, k, k > 1, write_probs=True, splits=splits)
        idx_r, w_r, p_r = router_topk_reference(x, wg, k, k > 1)
        assert torch.equal(idx, idx_r)
        torch.testing.assert_close(w, w_r, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p, p_r, rtol=1e-5, atol=1e-6)
    bufs = ts._COUNTERS[(str(x.device), 0 if DEVICE == "cpu" else
                         torch.cuda.current_stream().cuda_stream)]  # fmt: skip
    assert all(int(b.abs().sum()) == 0 for b in bufs)
    assert ts.router_splits(1, 128, 1024, 2, 64) == 8  # ds128 decode: 256 KB over 8 programs
    assert ts.router_splits(256, 128, 1024, 2, 64) == 1


# ---- on the GPU: what the interpreter (one program at a time) cannot show -------------------


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 3, 16])
def test_in_kernel_reductions_under_real_concurrency_on_gpu(t):
    """The split router and the split-K down matmul finish in whichever program arrives last;
    repeated calls on the GPU (programs truly concurrent) equal the reference every time."""
    from expertswitch.kernels import topk_softmax as ts

    e, h, f = 128, 1024, 4096
    g = torch.Generator(device="cuda").manual_seed(t)
    x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16, generator=g)
    wg = torch.randn(e, h, device="cuda", dtype=torch.bfloat16, generator=g) / 32
    w_in = torch.randn(e, 2 * f, h, device="cuda", dtype=torch.bfloat16, generator=g) / 32
    w_out = torch.randn(e, h, f, device="cuda", dtype=torch.bfloat16, generator=g) / 64
    bm = moe_config.by_route_block(t)
    plan = MoEPlan(True, GemmConfig(bm, 64, 128, 4, 4), GemmConfig(bm, 32, 128, 4, 4, split_k=4))
    assert plan.split_for(f) == 4  # top-1: the in-kernel split-K reduction
    first = None
    for _ in range(50):
        idx, w, _ = router_topk_triton(x, wg, 1, False, True, splits=8)
        out = fused_moe_triton(x, w_in, w_out, idx, w, "swiglu", plan)
        if first is None:  # against the references once ...
            p_r = router_topk_reference(x, wg, 1, False, True)[2]
            torch.testing.assert_close(w, p_r.gather(1, idx), rtol=2e-2, atol=1e-3)
            ref = fused_moe_reference(x.float(), w_in.float(), w_out.float(), idx, w)
            assert rel_err(out, ref) < 1e-2
            first = (idx, out)
        else:  # ... then bit for bit the same every time: the partials add up in one order
            assert torch.equal(idx, first[0]) and torch.equal(out, first[1])
    torch.cuda.synchronize()
    for bufs in ts._COUNTERS.values():
        assert all(int(b.abs().sum()) == 0 for b in bufs)


@pytest.mark.gpu
def test_biased_decode_layer_replays_from_a_cuda_graph_on_gpu():
    """Biases on the kernel, the split router and the in-kernel split-K reduction all inside one
    captured graph (no host synchronisation anywhere)."""
    from expertswitch.kernels.graphs import CapturedCall
    from expertswitch.moe import MoE

    torch.manual_seed(0)
    moe = MoE.stacked(1024, 4096, 128, k=1, bias=True, drop_tokens=False,
                      dtype=torch.bfloat16, device="cuda").eval()  # fmt: skip
    with torch.no_grad():
        moe.experts.b_in.normal_(0, 0.1)
        moe.experts.b_out.normal_(0, 0.1)
    x = torch.randn(2, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        ref = moe(x)[0]
        step = CapturedCall(moe.infer, x)
        for _ in range(5):
            x2 = torch.randn_like(x)
            assert torch.equal(step(x2), moe.infer(x2))
        assert rel_err(step(x), ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("renormalize", [False, True])
def test_qwen3_moe_router_in_bf16_on_gpu(renormalize):
    """Qwen3-30B-A3B's router (128 experts, top-8, norm_topk_prob either way) in bf16 at decode
    and prefill sizes: the Triton router picks experts the reference ranks among its top 8
    (bf16 logits tie often: either of a tie may be picked) with the reference's weights."""
    g = torch.Generator(device="cuda").manual_seed(3)
    wg = torch.randn(128, 2048, device="cuda", dtype=torch.bfloat16, generator=g) / 45
    for t in (1, 64):
        x = torch.randn(t, 2048, device="cuda", dtype=torch.bfloat16, generator=g)
        idx, w, _ = router_topk_triton(x, wg, 8, renormalize, True)
        _, w_r, p_r = router_topk_reference(x, wg, 8, renormalize, True)
        kth = p_r.topk(8, dim=-1).values[:, -1:]
        assert bool((p_r.gather(1, idx) >= kth * (1 - 1e-3)).all())
        torch.testing.assert_close(w.sort(-1).values, w_r.sort(-1).values, rtol=1e-2,
                                   atol=1e-4)  # fmt: skip


@pytest.mark.gpu
def test_grouped_mm_plan_on_gpu():
    t, h, f, e = 4096, 1024, 2048, 8
    x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
    w_in = torch.randn(e, 2 * f, h, device="cuda", dtype=torch.bfloat16) / 32
    w_out = torch.randn(e, h, f, device="cuda", dtype=torch.bfloat16) / 45
    idx = torch.stack([torch.randperm(e, device="cuda")[:2] for _ in range(t)])
    w = torch.rand(t, 2, device="cuda")
    cfg = GemmConfig(128, 128, 64)
    out = fused_moe_triton(x, w_in, w_out, idx, w, "swiglu", MoEPlan(False, cfg, cfg, True))
    ref = fused_moe_reference(x.float(), w_in.float(), w_out.float(), idx, w)
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("forced", [False, True])
def test_top2_second_expert_is_the_largest_remaining_logit(forced):
    """DeepSpeed's top-2 takes the second expert by logit: logits 0 and 1e-8 have the same fp32
    probability, and the fused dropless path must still pick the 1e-8 one, as the general gate
    (and DeepSpeed) do, on the kernel and the reference alike."""
    from expertswitch.moe.gate import TopKGate, dropless_inference_gating, topk_gating

    lg = torch.tensor([[3.0, 0.0, 1e-8, -1.0], [0.0, 1e-8, 2e-8, 5.0], [1.0, 1.0, 1.0, 1.0]])
    general = topk_gating(lg, k=2, drop_tokens=False).expert_idx
    assert general.tolist() == [[0, 2], [3, 2], [0, 1]]
    with force_kernels() if forced else torch.no_grad():
        fast = dropless_inference_gating(lg.to(DEVICE), 2)
        gate = TopKGate(4, 4, k=2, drop_tokens=False).eval()
        with torch.no_grad():
            gate.wg.weight.copy_(torch.eye(4))
        routed, _ = gate.route(lg.to(DEVICE))
    assert fast.expert_idx.tolist() == general.tolist() == routed.tolist()
    torch.testing.assert_close(fast.weights.cpu(), topk_gating(lg, k=2, drop_tokens=False).weights)
    if forced:  # the Triton kernels themselves
        idx, _, _ = topk_softmax_triton(lg.to(DEVICE), 2, True, second_by_logit=True)
        assert idx.tolist() == general.tolist()
        idx, _, _ = topk_softmax_triton(lg.to(DEVICE), 2, True)  # by probability: lowest id
        assert idx.tolist() == [[0, 1], [3, 0], [0, 1]]


@pytest.mark.parametrize("forced", [False, True])
def test_expert_map_runs_only_this_ranks_experts(forced):
    """w_in/w_out hold 3 of 8 experts; global routes go through the map (others add nothing):
    the sum over the shards of the partial outputs is the whole layer's output."""
    t, h, f, e = 14, 16, 24, 8
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(21)).to(DEVICE)
    w_in, w_out = mlp_weights(e, h, f, seed=21)
    idx, w = routes(t, e, 2, seed=21)
    idx[2, 1] = -1
    whole = dense_oracle(x, w_in, w_out, idx, w)
    total = torch.zeros_like(whole)
    for shard in ([0, 1, 2], [3, 4, 5], [6, 7]):
        expert_map = torch.full((e,), -1, dtype=torch.int32)
        expert_map[shard] = torch.arange(len(shard), dtype=torch.int32)
        with force_kernels() if forced else torch.no_grad():
            part = fused_moe(x, w_in[shard], w_out[shard], idx, w, expert_map=expert_map,
                             dropless=True)  # fmt: skip
        total += part.double()
    assert rel_err(total, whole) < TOL
    if not forced:  # the reference path checks the map and the ids against it
        good = torch.tensor([0, 1, 2, -1, -1, -1, -1, -1])
        with pytest.raises(ValueError, match="1-D integer"):
            fused_moe(x, w_in[:3], w_out[:3], idx, w, expert_map=good.float())
        with pytest.raises(ValueError, match=r"outside \[-1, 3\)"):
            fused_moe(x, w_in[:3], w_out[:3], idx, w, expert_map=torch.arange(8))
        with pytest.raises(ValueError, match="expert_idx holds"):
            fused_moe(x, w_in[:3], w_out[:3], idx + 8, w, expert_map=good)
