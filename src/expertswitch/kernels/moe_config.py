"""Launch configurations of the fused MoE kernels, by shape and batch.

A `MoEPlan` says how one fused_moe call runs:

    by_route   small batches: no alignment pass; program r serves the expert of route r when r is
               that expert's first route, taking every route of the expert as its rows (so each
               touched expert's weights are read once and the routing needs no sort)
    grouped_mm large batches may run on torch._grouped_mm (CUTLASS grouped GEMMs, rows
               permuted once) where the tuner measured it faster than ours
    up, down   GemmConfig of the first (w_in, activation fused) and second (w_out) matmul;
               the second may split K (split_k programs per tile write fp32 partial sums that
               the combine launch adds up): at decode sizes the down projection has too few
               output tiles to keep 132 SMs streaming (ds128: H = 1024 → 32 tiles of 32)

Tuned plans live in kernels/configs/<device>.json, written by benchmarks/tune_moe.py on the GPU:

    {"device": "NVIDIA H100 80GB HBM3",
     "shapes": {"E8_H4096_F14336_bfloat16": [{"max_routes": 2, "by_route": true,
                                               "up": {...GemmConfig}, "down": {...}}, ...]}}

A call with R = T·k routes takes the entry whose max_routes is nearest to R on a log scale, if
within a factor NEAR of it; sizes, shapes or devices the table does not cover get
`heuristic_plan` (a plan tuned for 16 tokens is no plan for 4096). Every plan is trimmed to
the device's shared memory (`fit_plan`); the heuristic reads the device's SM count.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, replace
from functools import cache, lru_cache
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"
BY_ROUTE_MAX = 64  # the by-route path holds all routes in one BLOCK_M tile
NEAR = 4.0
SMS = 132  # streaming multiprocessors of an H100 SXM (the default target; PCIe has 114)
SMEM = 227 * 1024  # shared memory one H100 block may use
SMEM_MARGIN = 1024  # kept free of the pipeline's estimate (Triton's own scratch)


@dataclass(frozen=True)
class DeviceLimits:
    """What the heuristic sizes launches by: streaming multiprocessors, and the shared memory
    one block may use (less a margin Triton keeps for itself)."""

    sms: int = SMS
    smem: int = SMEM - SMEM_MARGIN


@cache
def device_limits(device) -> DeviceLimits:
    """The GPU's own limits (an H100 PCIe has 114 SMs, not 132); an H100's off the GPU, which
    is what the CPU-side compile checks target."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return DeviceLimits()
    props = torch.cuda.get_device_properties(device)
    smem = getattr(props, "shared_memory_per_block_optin", 0) or SMEM
    return DeviceLimits(props.multi_processor_count, smem - SMEM_MARGIN)


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1
    tma_w: bool = False  # weight tiles by TMA (Hopper); pointer loads where TMA cannot run
    group_m: int = 1  # L2 swizzle: GROUP_M row blocks sweep the columns together (vLLM's
    #                   GROUP_SIZE_M), so their x rows stay in L2 while W tiles stream

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name}={v}: blocks are powers of two ≥ 16 (tl.dot's minimum)")
        if self.num_warps not in (1, 2, 4, 8, 16) or self.num_stages < 1:
            raise ValueError(f"num_warps={self.num_warps}, num_stages={self.num_stages}")
        if self.split_k < 1 or self.split_k & (self.split_k - 1):
            raise ValueError(f"split_k={self.split_k}: a power of two ≥ 1")
        if self.group_m < 1:
            raise ValueError(f"group_m={self.group_m}: at least 1")

    def shared_bytes(self, n_acc: int, elt: int) -> int:
        """Shared memory the pipelined main loop needs: num_stages copies of one A tile and
        n_acc weight tiles (2 for SwiGLU's gate and up rows)."""
        tiles = self.block_m * self.block_k + n_acc * self.block_k * self.block_n
        return self.num_stages * tiles * elt

    def fit_shared(self, n_acc: int, elt: int, smem: int) -> GemmConfig:
        """This config with fewer pipeline stages, or narrower K tiles, until it fits smem."""
        cfg = self
        while cfg.shared_bytes(n_acc, elt) > smem and cfg.num_stages > 2:
            cfg = replace(cfg, num_stages=cfg.num_stages - 1)
        while cfg.shared_bytes(n_acc, elt) > smem and cfg.block_k > 16:
            cfg = replace(cfg, block_k=cfg.block_k // 2)
        return cfg


@dataclass(frozen=True)
class MoEPlan:
    by_route: bool
    up: GemmConfig
    down: GemmConfig
    grouped_mm: bool = False  # large batches: torch._grouped_mm (CUTLASS) instead of our
    #                           GEMMs, where the tuner measured it faster (up/down unused)

    def __post_init__(self):
        if self.by_route and self.grouped_mm:
            raise ValueError("a plan runs by route or through torch._grouped_mm, not both")
        if self.by_route and self.up.block_m != self.down.block_m:
            raise ValueError("a by-route plan uses one block_m (all routes) for both matmuls")
        if self.up.split_k != 1:
            raise ValueError("the first matmul cannot split K: its activation is not linear")

    def to_json(self, max_routes: int) -> dict:
        return {"max_routes": max_routes, "by_route": self.by_route, "up": asdict(self.up),
                "down": asdict(self.down), "grouped_mm": self.grouped_mm}  # fmt: skip

    @classmethod
    def from_json(cls, d: dict) -> MoEPlan:
        return cls(d["by_route"], GemmConfig(**d["up"]), GemmConfig(**d["down"]),
                   bool(d.get("grouped_mm", False)))  # fmt: skip

    def split_for(self, ffn: int) -> int:
        """The down matmul's K split that this ffn allows (each split a whole number of
        BLOCK_K tiles; 1 when it does not divide)."""
        s = self.down.split_k
        while s > 1 and ffn % (s * self.down.block_k):
            s //= 2
        return s


def shape_key(num_experts: int, hidden: int, ffn: int, dtype_name: str) -> str:
    return f"E{num_experts}_H{hidden}_F{ffn}_{dtype_name}"


def device_file(device_name: str) -> Path:
    return CONFIG_DIR / (re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_") + ".json")


@cache
def _table(device_name: str) -> dict:
    path = device_file(device_name)
    return json.loads(path.read_text())["shapes"] if path.exists() else {}


def by_route_block(n_routes: int) -> int:
    return max(16, 1 << (max(n_routes, 1) - 1).bit_length())


def heuristic_plan(
    n_routes: int, num_experts: int, hidden: int, ffn: int, limits: DeviceLimits = DeviceLimits()
) -> MoEPlan:
    """Untuned defaults. Decode sizes: the by-route path, and the down matmul splits K until
    ~2 programs per SM stream weights. While the GEMMs are memory-bound (few routes per expert)
    one M block should hold all of an expert's routes, so its weights stream once: block_m
    from the mean routes per expert with headroom for imbalance (1.5×), up to 128. Compute-bound
    sizes: 128×128 tiles, grouped 8 row blocks at a time for L2 reuse of x."""
    if n_routes <= min(16, num_experts):
        bm = by_route_block(n_routes)
        down = GemmConfig(bm, 32, 128, 4, 4)
        tiles = min(n_routes, num_experts) * -(-hidden // down.block_n)
        split = 1
        while (
            tiles * split < 2 * limits.sms and split < 8 and ffn % (2 * split * down.block_k) == 0
        ):
            split *= 2
        return MoEPlan(True, GemmConfig(bm, 64, 128, 4, 4), replace(down, split_k=split))
    per_expert = n_routes / num_experts
    if per_expert <= 128:
        bm = min(128, by_route_block(math.ceil(1.5 * per_expert)))
        if bm <= 32:
            cfg = GemmConfig(bm, 64, 128, 4, 4)
        else:
            cfg = GemmConfig(bm, 64, 64, 4 if bm <= 64 else 8, 3)
    else:
        cfg = GemmConfig(128, 128, 64, 8, 3, group_m=8)
    return MoEPlan(False, cfg, cfg)


def fit_plan(plan: MoEPlan, elt: int, limits: DeviceLimits) -> MoEPlan:
    """The plan with each matmul's pipeline trimmed to the device's shared memory (a table's
    by-route block_m, grown to hold every route, can outgrow it)."""
    return replace(plan, up=plan.up.fit_shared(2, elt, limits.smem),
                   down=plan.down.fit_shared(1, elt, limits.smem))  # fmt: skip


@lru_cache(maxsize=4096)
def plan_for(
    n_routes: int,
    num_experts: int,
    hidden: int,
    ffn: int,
    dtype_name: str,
    device_name: str,
    limits: DeviceLimits = DeviceLimits(),
) -> MoEPlan:
    elt = 4 if dtype_name == "float32" else 2
    entries = _table(device_name).get(shape_key(num_experts, hidden, ffn, dtype_name))
    if not entries:
        return fit_plan(heuristic_plan(n_routes, num_experts, hidden, ffn, limits), elt, limits)
    r = max(n_routes, 1)
    entry = min(entries, key=lambda e: abs(math.log(e["max_routes"] / r)))
    if not 1 / NEAR <= entry["max_routes"] / r <= NEAR:
        return fit_plan(heuristic_plan(n_routes, num_experts, hidden, ffn, limits), elt, limits)
    plan = MoEPlan.from_json(entry)
    if plan.by_route:  # a table entry sized for fewer routes must still hold them all
        if n_routes > BY_ROUTE_MAX:
            return fit_plan(heuristic_plan(n_routes, num_experts, hidden, ffn, limits), elt,
                            limits)  # fmt: skip
        bm = max(plan.up.block_m, by_route_block(n_routes))
        plan = MoEPlan(True, replace(plan.up, block_m=bm), replace(plan.down, block_m=bm))
    return fit_plan(plan, elt, limits)
