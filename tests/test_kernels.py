"""Triton kernels against their torch references. Without a GPU they run in Triton's
interpreter (conftest sets TRITON_INTERPRET=1); the interpreter cannot load bf16, so bf16 is
covered by the gpu-marked tests."""

import pytest
import torch

pytest.importorskip("triton")

from expertswitch.kernels.align import align_block_size, sort_routes  # noqa: E402
from expertswitch.kernels.fused_moe import (  # noqa: E402
    _FusedMoE,
    fused_moe,
    fused_moe_reference,
    fused_moe_triton,
)
from expertswitch.kernels.topk_softmax import (  # noqa: E402
    topk_softmax_reference,
    topk_softmax_triton,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 in the interpreter is exact fp32 math, on a GPU tl.dot takes fp32 operands as tf32
# (10-bit mantissa, ~3e-4 relative); fp16 operands with fp32 accumulation ~3e-4 relative
TOL = {torch.float32: 1e-5 if DEVICE == "cpu" else 2e-3, torch.float16: 2e-3}


def weights(e, h, f, activation, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    f_in = 2 * f if activation == "swiglu" else f
    w_in = torch.randn(e, f_in, h, generator=g) / h**0.5
    w_out = torch.randn(e, h, f, generator=g) / f**0.5
    return w_in.to(DEVICE, dtype), w_out.to(DEVICE, dtype)


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def run_both(x, w_in, w_out, idx, w, activation, blocks=(16, 16, 16)):
    ref = fused_moe_reference(x.float(), w_in.float(), w_out.float(), idx, w, activation)
    out = fused_moe_triton(x, w_in, w_out, idx, w, activation, blocks=blocks)
    return out, ref


CASES = {
    # name: (T, H, F, E, k) — sizes deliberately not multiples of the 16-wide blocks
    "one_token": (1, 24, 40, 4, 2),
    "odd_sizes": (37, 40, 24, 5, 2),
    "top1_many_experts": (50, 32, 16, 9, 1),
    "top3": (19, 24, 32, 6, 3),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_moe_matches_reference(case, activation, dtype):
    t, h, f, e, k = CASES[case]
    g = torch.Generator().manual_seed(t)
    x = torch.randn(t, h, generator=g).to(DEVICE, dtype)
    idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).to(DEVICE)
    w = torch.rand(t, k, generator=g).to(DEVICE)
    out, ref = run_both(x, *weights(e, h, f, activation, dtype), idx, w, activation)
    assert out.dtype == dtype and out.shape == (t, h)
    assert rel_err(out, ref) < TOL[dtype]


def test_all_tokens_to_one_expert_and_empty_experts():
    t, h, f, e = 45, 24, 32, 6
    x = torch.randn(t, h, device=DEVICE)
    idx = torch.full((t, 1), 4, device=DEVICE)
    ones = torch.ones(t, 1, device=DEVICE)
    out, ref = run_both(x, *weights(e, h, f, "swiglu", torch.float32), idx, ones, "swiglu")
    assert rel_err(out, ref) < TOL[torch.float32]


def test_dropped_routes_contribute_nothing():
    t, h, f, e = 20, 16, 16, 3
    x = torch.randn(t, h, device=DEVICE)
    idx = torch.randint(0, e, (t, 2), device=DEVICE)
    idx[idx[:, 0] == idx[:, 1], 1] = -1
    idx[::3] = -1  # every third token fully dropped
    w = torch.rand(t, 2, device=DEVICE)
    out, ref = run_both(x, *weights(e, h, f, "swiglu", torch.float32), idx, w, "swiglu")
    assert rel_err(out, ref) < TOL[torch.float32]
    assert torch.count_nonzero(out[::3]) == 0
    none = torch.full((t, 2), -1, device=DEVICE)
    assert (
        torch.count_nonzero(
            fused_moe_triton(x, *weights(e, h, f, "swiglu", torch.float32), none, w, "swiglu")
        )
        == 0
    )


def test_output_rows_all_written():
    """Poisoned inputs in unused padding never leak: every token row is finite and correct."""
    t, h, f, e = 33, 16, 16, 4
    x = torch.randn(t, h, device=DEVICE)
    idx = torch.randint(0, e, (t, 1), device=DEVICE)
    w = torch.rand(t, 1, device=DEVICE)
    out, ref = run_both(x, *weights(e, h, f, "gelu", torch.float32), idx, w, "gelu",
                        blocks=(16, 32, 16))  # fmt: skip
    assert torch.isfinite(out).all() and rel_err(out, ref) < TOL[torch.float32]


def test_align_block_size_invariants():
    idx = torch.tensor([[0, 2], [2, -1], [0, 1], [2, 0]])
    routes, block_expert = align_block_size(idx, 4, block_m=2)
    n_routes = idx.numel()
    valid = routes[routes < n_routes].long()
    assert sorted(valid.tolist()) == sorted((idx.reshape(-1) >= 0).nonzero().flatten().tolist())
    # each block holds routes of its expert only; expert 3 is empty and owns no block
    for b, e in enumerate(block_expert.tolist()):
        block = routes[2 * b : 2 * b + 2]
        assert all(idx.reshape(-1)[r].item() == e for r in block.tolist() if r < n_routes)
    assert block_expert.tolist() == [0, 0, 1, 2, 2]
    order, offsets = sort_routes(idx, 4)
    assert offsets.tolist() == [0, 3, 4, 7, 7]
    assert int((routes == n_routes).sum()) == len(routes) - 7


def test_gradients_match_reference():
    t, h, f, e = 23, 16, 24, 4
    g = torch.Generator().manual_seed(0)
    x = torch.randn(t, h, generator=g).to(DEVICE)
    w_in, w_out = weights(e, h, f, "swiglu", torch.float32)
    idx = torch.stack([torch.randperm(e, generator=g)[:2] for _ in range(t)]).to(DEVICE)
    w = torch.rand(t, 2, generator=g).to(DEVICE)
    grad_out = torch.randn(t, h, generator=g).to(DEVICE)

    def grads(fn):
        leaves = [v.clone().requires_grad_() for v in (x, w_in, w_out, w)]
        fn(leaves).backward(grad_out)
        return [v.grad for v in leaves]

    fused = grads(lambda v: _FusedMoE.apply(v[0], v[1], v[2], v[3], idx, "swiglu"))
    ref = grads(lambda v: fused_moe_reference(v[0], v[1], v[2], idx, v[3], "swiglu"))
    for a, b in zip(fused, ref):
        assert rel_err(a, b) < 1e-5


def test_launcher_checks():
    x = torch.randn(4, 8, device=DEVICE)
    w_in, w_out = weights(2, 8, 16, "swiglu", torch.float32)
    idx = torch.zeros(4, 1, dtype=torch.long, device=DEVICE)
    w = torch.ones(4, 1, device=DEVICE)
    with pytest.raises(ValueError, match="swiglu with ffn 16 needs 32"):
        fused_moe(x, w_in[:, :16], w_out, idx, w, "swiglu")
    with pytest.raises(ValueError, match="dtypes differ"):
        fused_moe_triton(x.half(), w_in, w_out, idx, w)
    with pytest.raises(ValueError, match="contiguous"):
        fused_moe_triton(x.T.contiguous().T, w_in, w_out, idx, w)
    with pytest.raises(ValueError, match="unknown activation"):
        fused_moe(x, w_in, w_out, idx, w, "tanh")


@pytest.mark.parametrize("t, e, k", [(1, 8, 2), (37, 8, 2), (5, 128, 1), (70, 6, 4), (3, 3, 3)])
def test_topk_softmax_matches_reference(t, e, k):
    logits = torch.randn(t, e, generator=torch.Generator().manual_seed(t)).to(DEVICE)
    for renorm in (False, True):
        idx, w, p = topk_softmax_triton(logits, k, renorm)
        idx_r, w_r, p_r = topk_softmax_reference(logits, k, renorm)
        assert torch.equal(idx, idx_r)
        torch.testing.assert_close(w, w_r)
        torch.testing.assert_close(p, p_r)


def test_topk_softmax_ties_pick_lowest_expert_and_half_inputs():
    logits = torch.zeros(4, 8, device=DEVICE, dtype=torch.float16)
    idx, w, _ = topk_softmax_triton(logits, 2, True)
    assert idx.tolist() == [[0, 1]] * 4 and torch.allclose(w, torch.full_like(w, 0.5))


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 16, 256, 1000])
def test_bf16_on_gpu(t):
    """bf16 operands, fp32 accumulation: relative error between 1e-3 and 1e-2 is expected."""
    h, f, e, k = 512, 1024, 8, 2
    x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
    w_in, w_out = weights(e, h, f, "swiglu", torch.bfloat16)
    idx = torch.stack([torch.randperm(e)[:k] for _ in range(t)]).cuda()
    w = torch.rand(t, k, device="cuda")
    out = fused_moe_triton(x, w_in, w_out, idx, w, "swiglu")
    ref = fused_moe_reference(x.double(), w_in.double(), w_out.double(), idx, w.double(), "swiglu")
    assert rel_err(out, ref) < 1e-2
