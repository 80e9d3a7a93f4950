import pytest
import torch
from torch import nn

from expertswitch.errors import CheckpointError, ConfigError
from expertswitch.moe import MixtralSparseMoE, MoE, PyramidConfig, parse_expert_spec, preset
from expertswitch.moe.experts import StackedExperts


def test_mixtral_block_matches_transformers():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(0)
    cfg = MixtralConfig(hidden_size=32, intermediate_size=48, num_local_experts=6,
                        num_experts_per_tok=2)  # fmt: skip
    hf = MixtralSparseMoeBlock(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3)
    ours = MixtralSparseMoE.from_config(cfg)
    ours.load_hf_state_dict(hf.state_dict())
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        ref = hf(x)
        ref = ref[0] if isinstance(ref, tuple) else ref
        torch.testing.assert_close(ours(x), ref, rtol=1e-5, atol=1e-5)


def test_mixtral_loads_per_expert_checkpoint_layout():
    """The on-disk layout (block_sparse_moe.experts.{e}.w1/w3/w2) gives the same block."""
    torch.manual_seed(0)
    a = MixtralSparseMoE(16, 24, num_experts=3, top_k=2)
    f = 24
    state = {"block_sparse_moe.gate.weight": a.gate.weight.detach()}
    for e in range(3):
        w_in = a.experts.w_in[e].detach()
        state[f"block_sparse_moe.experts.{e}.w1.weight"] = w_in[:f]
        state[f"block_sparse_moe.experts.{e}.w3.weight"] = w_in[f:]
        state[f"block_sparse_moe.experts.{e}.w2.weight"] = a.experts.w_out[e].detach()
    b = MixtralSparseMoE(16, 24, num_experts=3, top_k=2)
    b.load_hf_state_dict(state, prefix="block_sparse_moe.")
    x = torch.randn(5, 16)
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x))
    del state["block_sparse_moe.experts.2.w2.weight"]
    with pytest.raises(CheckpointError, match="experts.2.w2.weight is missing"):
        b.load_hf_state_dict(state, prefix="block_sparse_moe.")


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_stacked_equals_module_experts(activation):
    """The grouped path over stacked weights computes what a module per expert computes."""
    torch.manual_seed(0)
    stacked = MoE.stacked(16, 24, 5, k=2, activation=activation, drop_tokens=False,
                          top2_2nd_expert_sampling=False).eval()  # fmt: skip

    class Expert(nn.Module):
        def __init__(self):
            super().__init__()
            f_in = 48 if activation == "swiglu" else 24
            self.up = nn.Linear(16, f_in, bias=False)
            self.down = nn.Linear(24, 16, bias=False)

        def forward(self, x):
            from expertswitch.kernels.grouped_mlp import activate

            return self.down(activate(self.up(x), activation))

    modular = MoE(16, Expert(), num_experts=5, k=2, drop_tokens=False,
                  top2_2nd_expert_sampling=False).eval()  # fmt: skip
    modular.gate.load_state_dict(stacked.gate.state_dict())
    with torch.no_grad():
        for e, ex in enumerate(modular.experts.experts):
            ex.up.weight.copy_(stacked.experts.w_in[e])
            ex.down.weight.copy_(stacked.experts.w_out[e])
    x = torch.randn(3, 11, 16)
    a, aux_a, counts_a = stacked(x)
    b, aux_b, counts_b = modular(x)
    torch.testing.assert_close(a, b)
    assert torch.equal(counts_a, counts_b)


def test_stacked_residual_and_gradients():
    torch.manual_seed(0)
    moe = MoE.stacked(16, 24, 4, k=1, use_residual=True, capacity_factor=2.0)
    x = torch.randn(20, 16, requires_grad=True)
    out, aux, _ = moe(x)
    (out.square().mean() + 0.01 * aux).backward()
    for name, p in moe.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert moe.experts.w_in.grad.abs().sum() > 0 and moe.coefficient.weight.grad.abs().sum() > 0


def test_dropped_tokens_give_zero_expert_output():
    moe = MoE.stacked(8, 16, 2, k=1, eval_capacity_factor=0.25, min_capacity=1).eval()
    with torch.no_grad():
        moe.gate.wg.weight.zero_()
        moe.gate.wg.weight[0] = 1.0  # x·1 decides; make every token prefer expert 0
    x = torch.rand(16, 8) + 0.1
    out, _, counts = moe(x)
    assert int(counts[0]) == 16
    nonzero_rows = (out.abs().sum(-1) > 0).sum()
    assert int(nonzero_rows) == moe.gate(x).capacity == 2


@pytest.mark.parametrize("k, residual", [(1, False), (2, True), (3, False)])
def test_infer_equals_forward_in_eval(k, residual):
    """The lean inference path routes and computes exactly what forward() does."""
    torch.manual_seed(k)
    moe = MoE.stacked(16, 24, 6, k=k, use_residual=residual, drop_tokens=False,
                      top2_2nd_expert_sampling=False).eval()  # fmt: skip
    x = torch.randn(2, 7, 16)
    with torch.no_grad():
        torch.testing.assert_close(moe.infer(x), moe(x)[0], rtol=0, atol=0)
    modular = MoE(16, nn.Linear(16, 16), num_experts=3, k=1, drop_tokens=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(modular.infer(x), modular(x)[0])
    with pytest.raises(ConfigError, match="dropless path"):
        MoE.stacked(16, 24, 4).eval().infer(x)
    with pytest.raises(ConfigError, match="eval"):
        moe.train().infer(x)


def test_mixtral_keeps_logits_only_with_autograd():
    torch.manual_seed(0)
    moe = MixtralSparseMoE(16, 24, num_experts=4, top_k=2)
    x = torch.randn(6, 16)
    with_grad = moe(x)
    assert moe.last_router_logits is not None and moe.last_router_logits.shape == (6, 4)
    with torch.no_grad():
        fast = moe(x)
    assert moe.last_router_logits is None
    torch.testing.assert_close(fast, with_grad.detach())


def test_layer_input_errors():
    moe = MoE.stacked(8, 16, 2)
    with pytest.raises(ConfigError, match="hidden size 8"):
        moe(torch.randn(3, 9))
    with pytest.raises(ConfigError, match="ep_size=2"):
        MoE(8, nn.Linear(8, 8), num_experts=4, ep_size=2)
    with pytest.raises(ConfigError, match="exactly one"):
        MoE(8, num_experts=4)
    with pytest.raises(ConfigError, match="activation"):
        StackedExperts(2, 8, 16, activation="tanh")


def test_pyramid_layouts():
    cfg = preset("350m-pr-moe")
    layout = cfg.layer_experts()
    assert len(layout) == 24 and layout[0] is None and layout[1] == 32
    assert [n for n in layout if n] == [32] * 10 + [64] * 2
    assert cfg.use_residual and cfg.total_experts() == 448
    student = preset("350m-pr-moe-mos")
    assert len(student.layer_experts()) == 21 and student.experts == (32,) * 8 + (64,) * 2
    assert parse_expert_spec("64×10 + 128×2") == (64,) * 10 + (128,) * 2
    with pytest.raises(ConfigError, match="give 12 MoE layers, but the spec lists 11"):
        PyramidConfig.from_spec(24, "32x9+64x2")
    with pytest.raises(ConfigError, match="bad expert spec"):
        parse_expert_spec("32 experts")
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("gpt-4")
