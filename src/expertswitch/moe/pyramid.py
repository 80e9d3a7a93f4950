"""Pyramid-MoE layouts (DeepSpeed-MoE §4.1): more experts in later layers, MoE on every other
FFN, optionally Residual-MoE everywhere (PR-MoE).

    PyramidConfig.from_spec(24, "32x10+64x2")   # 350M PR-MoE: 10 MoE layers of 32, 2 of 64
    cfg.layer_experts()  → [None, 32, None, 32, …, None, 64, None, 64]  (None = dense FFN)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from expertswitch.errors import ConfigError

_TERM = re.compile(r"^\s*(\d+)\s*[x×*]\s*(\d+)\s*$")


def parse_expert_spec(spec: str) -> tuple[int, ...]:
    """'32x10 + 64x2' (or ×) → (32,)*10 + (64,)*2."""
    counts: list[int] = []
    for term in spec.split("+"):
        m = _TERM.match(term)
        if not m or int(m[1]) < 1 or int(m[2]) < 1:
            raise ConfigError(f"bad expert spec {spec!r}: write terms like '32x10 + 64x2' "
                              "(experts × layers)")  # fmt: skip
        counts += [int(m[1])] * int(m[2])
    return tuple(counts)


@dataclass(frozen=True)
class PyramidConfig:
    """num_layers transformer layers; MoE FFN on layers first_moe_layer, +moe_every, …; the
    i-th MoE layer has experts[i] experts."""

    num_layers: int
    experts: tuple[int, ...]
    moe_every: int = 2
    first_moe_layer: int = 1
    use_residual: bool = True
    k: int = 1

    def __post_init__(self):
        if self.num_layers < 1 or self.moe_every < 1 or self.first_moe_layer < 0:
            raise ConfigError("num_layers and moe_every must be ≥ 1, first_moe_layer ≥ 0")
        n_moe = len(range(self.first_moe_layer, self.num_layers, self.moe_every))
        if n_moe != len(self.experts):
            raise ConfigError(
                f"{self.num_layers} layers with MoE every {self.moe_every} from layer "
                f"{self.first_moe_layer} give {n_moe} MoE layers, but the spec lists "
                f"{len(self.experts)}"
            )
        if any(self.k > e for e in self.experts):
            raise ConfigError(f"k={self.k} exceeds the experts of some MoE layer")

    @classmethod
    def from_spec(cls, num_layers: int, spec: str, **kw) -> PyramidConfig:
        return cls(num_layers, parse_expert_spec(spec), **kw)

    def layer_experts(self) -> list[int | None]:
        out: list[int | None] = [None] * self.num_layers
        for i, layer in enumerate(range(self.first_moe_layer, self.num_layers, self.moe_every)):
            out[layer] = self.experts[i]
        return out

    def total_experts(self) -> int:
        return sum(self.experts)


# The paper's models (REFERENCES.md): standard MoE-128 and PR-MoE, and the Mixture-of-Students
# student (24 → 21 layers, MoE layers 12 → 10).
PRESETS = {
    "350m-moe-128": lambda: PyramidConfig.from_spec(24, "128x12", use_residual=False),
    "350m-pr-moe": lambda: PyramidConfig.from_spec(24, "32x10+64x2"),
    "1.3b-moe-128": lambda: PyramidConfig.from_spec(24, "128x12", use_residual=False),
    "1.3b-pr-moe": lambda: PyramidConfig.from_spec(24, "64x10+128x2"),
    "350m-pr-moe-mos": lambda: PyramidConfig.from_spec(21, "32x8+64x2"),
    "1.3b-pr-moe-mos": lambda: PyramidConfig.from_spec(21, "64x8+128x2"),
}


def preset(name: str) -> PyramidConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
