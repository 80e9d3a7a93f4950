"""Compression methods: one config dataclass per method, each registered with its handler
(STYLE.md §6). A handler is a pure function (delta [N, K] fp32, LayerCalib | None, config) →
PackedDelta; `compress_delta` dispatches and handles stacked expert tensors [E, N, K].

- `mixed`    ME-Switch: salient input channels in fp16, the rest k-bit in groups with
             activation-aware clipping, optional step-size tuning by layer-wise distillation.
- `rtn`      plain round-to-nearest k-bit groups (min/max range, no salient channels).
- `bitdelta` BitDelta: α·sign(Δ), one α per matrix (init mean|Δ|), distilled on calibration
             inputs to minimise the layer's output error (closed form, see `_bitdelta`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from expertswitch.compress.calibration import LayerCalib
from expertswitch.compress.packed import PackedDelta
from expertswitch.compress.packing import SUPPORTED_BITS, padded_k
from expertswitch.compress.quant import dequantize_groups, quantize_groups, quantize_with_scales
from expertswitch.compress.salient import salient_count, salient_scores, select_salient
from expertswitch.compress.tune import tune_scales
from expertswitch.errors import ConfigError

METHODS: dict[str, type[MethodConfig]] = {}
_HANDLERS: dict[type, Callable[[torch.Tensor, LayerCalib | None, MethodConfig], PackedDelta]] = {}


@dataclass(frozen=True)
class MethodConfig:
    name: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name:
            METHODS[cls.name] = cls

    @property
    def needs_calibration(self) -> bool:
        return False

    def to_dict(self) -> dict:
        return {"method": self.name, **dataclasses.asdict(self)}


def register_handler(config_type: type[MethodConfig]):
    def deco(fn):
        _HANDLERS[config_type] = fn
        return fn

    return deco


def _check_bits_group(bits: int, group_size: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ConfigError(f"bits={bits} is not supported: choose one of {SUPPORTED_BITS}")
    if group_size <= 0 or group_size % 32:
        raise ConfigError(
            f"group_size={group_size} must be a positive multiple of 32 (a packed word of codes "
            "must not straddle two groups); 128 is the usual choice"
        )


def _resolve_symmetric(cfg) -> None:
    """symmetric=None: symmetric at 1 bit, asymmetric above. An integer zero point at 1 bit
    leaves the levels {0, s} or {−s, 0}; symmetric ±s/2 is 2 dB better on Gaussian deltas."""
    if cfg.symmetric is None:
        object.__setattr__(cfg, "symmetric", cfg.bits == 1)


@dataclass(frozen=True)
class MixedConfig(MethodConfig):
    """ME-Switch mixed precision. salient < 1 is a fraction of input channels, ≥ 1 a count."""

    name: ClassVar[str] = "mixed"
    bits: int = 2
    group_size: int = 128
    salient: float = 0.01
    symmetric: bool | None = None
    clip_steps: int = 16
    tune_steps: int = 0
    tune_lr: float = 1e-2
    # model-level distillation of the step sizes against the expert's logits (compress/
    # distill.py); 0 = off
    distill_steps: int = 0
    # lowest clip ratio searched (None: by bits, 0.12 at 2 bits). The search minimises output
    # MSE, which at 2 bits clips the delta's largest entries hard; on the tiny family (400
    # items) a floor of 0.5 kept 0.95 of the math expert's answer-token margin against 0.76,
    # at the same perplexity (issue 3 note)
    clip_floor: float | None = None

    def __post_init__(self):
        _check_bits_group(self.bits, self.group_size)
        _resolve_symmetric(self)
        if self.salient < 0:
            raise ConfigError(f"salient={self.salient} must be ≥ 0 (a fraction < 1 or a count)")
        if self.clip_floor is not None and not 0 < self.clip_floor <= 1:
            raise ConfigError(f"clip_floor={self.clip_floor} must lie in (0, 1]")
        if self.clip_steps < 1 or self.tune_steps < 0 or self.tune_lr <= 0:
            raise ConfigError("clip_steps must be ≥ 1, tune_steps ≥ 0 and tune_lr > 0")
        if not isinstance(self.distill_steps, int) or self.distill_steps < 0:
            raise ConfigError(f"distill_steps must be an integer ≥ 0, got {self.distill_steps}")

    @property
    def needs_calibration(self) -> bool:
        return True


@dataclass(frozen=True)
class RTNConfig(MethodConfig):
    name: ClassVar[str] = "rtn"
    bits: int = 2
    group_size: int = 128
    symmetric: bool | None = None

    def __post_init__(self):
        _check_bits_group(self.bits, self.group_size)
        _resolve_symmetric(self)


@dataclass(frozen=True)
class BitDeltaConfig(MethodConfig):
    name: ClassVar[str] = "bitdelta"
    distill: bool = True

    @property
    def bits(self) -> int:
        return 1

    @property
    def needs_calibration(self) -> bool:
        return self.distill


def method_fields(name: str) -> set[str]:
    """The parameters method `name` takes."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}: choose one of {sorted(METHODS)}")
    return {f.name for f in dataclasses.fields(METHODS[name])}


def make_method(name: str, **kwargs) -> MethodConfig:
    """Config of method `name` from keyword arguments; arguments the method does not take and
    None values are ignored, so a CLI can pass all its flags."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}: choose one of {sorted(METHODS)}")
    cls = METHODS[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in kwargs.items() if k in fields and v is not None})


def compress_delta(
    delta: torch.Tensor, calib: LayerCalib | list[LayerCalib | None] | None, config: MethodConfig
) -> PackedDelta:
    """Compress delta [N, K] or stacked [E, N, K] (calib then one per expert, or shared)."""
    handler = _HANDLERS[type(config)]
    if delta.dim() == 2:
        return handler(delta.float(), calib, config)
    if delta.dim() != 3:
        raise ConfigError(f"cannot compress a delta of shape {tuple(delta.shape)}")
    per = calib if isinstance(calib, list) else [calib] * delta.shape[0]
    return PackedDelta.stack([handler(d.float(), c, config) for d, c in zip(delta, per)])


@register_handler(MixedConfig)
def _mixed(delta: torch.Tensor, calib: LayerCalib | None, cfg: MixedConfig) -> PackedDelta:
    n, k = delta.shape
    ones = torch.ones(k, device=delta.device)
    imp = calib.mean_sq.to(delta.device) if calib is not None else ones
    n_sal = salient_count(cfg.salient, k)
    args = (cfg.bits, cfg.group_size, cfg.symmetric)
    # scoring needs the ranking of column errors, not the best grid: 4 clip ratios halve the
    # cost of this pass (24 s → 17 s for a 14336×4096 delta on 2 CPU cores)
    scores = (salient_scores(delta, imp, *args, min(cfg.clip_steps, 4), cfg.clip_floor)
              if n_sal else None)  # fmt: skip
    idx = select_salient(scores, n_sal) if n_sal else torch.zeros(0, dtype=torch.long)
    idx = idx.to(delta.device)
    keep = torch.ones(k, device=delta.device)
    keep[idx] = 0.0
    body = delta * keep  # salient columns zeroed: their outliers must not widen the step sizes
    gq = quantize_groups(body, *args, importance=imp * keep, clip_steps=cfg.clip_steps,
                         clip_floor=cfg.clip_floor)  # fmt: skip
    if cfg.tune_steps and calib is not None and calib.sample is not None:
        scales, _, _ = tune_scales(
            body,
            gq.scales,
            gq.zeros,
            calib.sample,
            cfg.bits,
            cfg.group_size,
            cfg.tune_steps,
            cfg.tune_lr,
            keep,
        )
        gq.scales = scales
        gq.codes = quantize_with_scales(body, scales, gq.zeros, cfg.bits, cfg.group_size)
    approx = dequantize_groups(gq.codes, gq.scales, gq.zeros, cfg.bits, cfg.group_size, k)
    resid = delta[:, idx] - approx[:, idx]  # [N, S]
    return PackedDelta.build(
        (n, k), gq.codes, gq.scales, gq.zeros, *args, salient_idx=idx, salient_resid=resid
    )


@register_handler(RTNConfig)
def _rtn(delta: torch.Tensor, calib: LayerCalib | None, cfg: RTNConfig) -> PackedDelta:
    gq = quantize_groups(delta, cfg.bits, cfg.group_size, cfg.symmetric, clip_steps=1)
    return PackedDelta.build(
        tuple(delta.shape), gq.codes, gq.scales, gq.zeros, cfg.bits, cfg.group_size, cfg.symmetric
    )


def bitdelta_alpha(delta: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
    """BitDelta's scale: mean|Δ| (its initialisation), or, given calibration inputs x [R, K],
    the α minimising ‖x·Δᵀ − α·x·sign(Δ)ᵀ‖² — the optimum its scale distillation descends to
    for one layer: α* = ⟨xΔᵀ, x·signᵀ⟩ / ‖x·signᵀ‖²."""
    alpha = delta.abs().mean()
    if x is None:
        return alpha
    x = x.to(delta.device).float()
    sign = torch.where(delta > 0, 1.0, -1.0)
    y, yb = x @ delta.T, x @ sign.T  # [R, N]
    denom = yb.square().sum()
    return (y * yb).sum() / denom if denom > 0 else alpha


@register_handler(BitDeltaConfig)
def _bitdelta(delta: torch.Tensor, calib: LayerCalib | None, cfg: BitDeltaConfig) -> PackedDelta:
    n, k = delta.shape
    x = calib.sample if (cfg.distill and calib is not None) else None
    alpha = bitdelta_alpha(delta, x).clamp_min(0.0)
    codes = torch.nn.functional.pad((delta > 0).to(torch.uint8), (0, padded_k(k) - k))
    # one group spanning the row; symmetric 1-bit levels are ±scale/2, so scale = 2α
    scales = torch.full((n, 1), 2.0 * alpha.item(), device=delta.device)
    return PackedDelta.build((n, k), codes, scales, None, 1, k, True)
