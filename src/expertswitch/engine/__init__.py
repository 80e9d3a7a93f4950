"""Serving engine: requests, scheduler, paged KV cache, runner, sampler, expert pool.

from expertswitch.engine import Engine, SamplingParams
"""

from expertswitch.engine.beam import BeamSearchParams
from expertswitch.engine.config import EngineConfig
from expertswitch.engine.engine import Engine
from expertswitch.engine.guided import StructuredOutputsParams
from expertswitch.engine.request import RequestOutput
from expertswitch.engine.sampling import SamplingParams

__all__ = [
    "BeamSearchParams",
    "Engine",
    "EngineConfig",
    "RequestOutput",
    "SamplingParams",
    "StructuredOutputsParams",
]
