"""Delta compression of fine-tuned experts against their base (ME-Switch and baselines)."""

from expertswitch.compress.driver import CompressOptions, compress_expert
from expertswitch.compress.methods import (
    METHODS,
    BitDeltaConfig,
    MethodConfig,
    MixedConfig,
    RTNConfig,
    compress_delta,
    make_method,
)
from expertswitch.compress.packed import PackedDelta
from expertswitch.compress.reconstruct import reconstruct

__all__ = [
    "METHODS",
    "BitDeltaConfig",
    "CompressOptions",
    "MethodConfig",
    "MixedConfig",
    "PackedDelta",
    "RTNConfig",
    "compress_delta",
    "compress_expert",
    "make_method",
    "reconstruct",
]
