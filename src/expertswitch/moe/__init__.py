"""Token-level Mixture-of-Experts (DeepSpeed-MoE): gating, the MoE layer, Residual and
Pyramid MoE, the Mixtral block."""

from expertswitch.moe.deepspeed_checkpoint import load_deepspeed_checkpoint
from expertswitch.moe.experts import DenseMLP, ModuleExperts, StackedExperts
from expertswitch.moe.gate import GateOutput, TopKGate, topk_gating
from expertswitch.moe.layer import MoE, convert_deepspeed_state_dict
from expertswitch.moe.mixtral import MixtralSparseMoE
from expertswitch.moe.pyramid import PyramidConfig, parse_expert_spec, preset

__all__ = [
    "DenseMLP",
    "GateOutput",
    "MixtralSparseMoE",
    "ModuleExperts",
    "MoE",
    "PyramidConfig",
    "StackedExperts",
    "TopKGate",
    "convert_deepspeed_state_dict",
    "load_deepspeed_checkpoint",
    "parse_expert_spec",
    "preset",
    "topk_gating",
]
