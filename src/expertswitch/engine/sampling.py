"""`SamplingParams`: per-request decoding parameters (vLLM's names and defaults), validated."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from expertswitch.errors import ConfigError


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 (or < 1e-5) = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or −1 = off
    seed: int | None = None  # a seeded request samples the same tokens whatever its batch
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # per generated token: its logprob and the top-k (0: its own)
    prompt_logprobs: int | None = None  # the same for every prompt token after the first

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if not _is_int(self.max_tokens) or self.max_tokens <= 0:
            raise ConfigError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature < math.inf:
            raise ConfigError(f"temperature must be a finite number ≥ 0, got {self.temperature}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ConfigError(f"top_k must be an integer: −1 or 0 (off) or positive, got "
                              f"{self.top_k!r}")  # fmt: skip
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise ConfigError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ConfigError("stop strings must be non-empty strings")
        if any(not _is_int(t) or t < 0 for t in self.stop_token_ids):
            raise ConfigError("stop_token_ids must be non-negative integers")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and (not _is_int(k) or not 0 <= k <= MAX_LOGPROBS):
                raise ConfigError(f"{name} must be an integer from 0 to {MAX_LOGPROBS}, got "
                                  f"{k!r}")  # fmt: skip

    @property
    def greedy(self) -> bool:
        # vLLM's rule: below 1e-5 the temperature divides logits into overflow; it is greedy
        return self.temperature < _GREEDY_BELOW


_GREEDY_BELOW = 1e-5
MAX_LOGPROBS = 20  # vLLM's default max_logprobs (and OpenAI's top_logprobs limit)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
