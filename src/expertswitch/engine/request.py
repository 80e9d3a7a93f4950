"""A request's life: waiting → running (prefill, then one token per decode step) → finished;
a preempted request goes back to waiting and recomputes its prompt + generated tokens."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch

from expertswitch.engine.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)  # identity: the scheduler finds requests in its queues by `is`
class Request:
    request_id: str
    prompt_token_ids: list[int]
    expert: str | None
    sampling: SamplingParams
    prompt: str | None = None
    output_token_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    blocks: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose keys/values are in the cache
    num_new: int = 0  # tokens this step computes (from num_cached on): set by the scheduler
    num_registered: int = 0  # leading blocks registered in the prefix cache (kv_cache.py)
    block_hashes: list[bytes] = field(default_factory=list)  # of its full blocks, so far
    num_cached_tokens: int | None = None  # prompt tokens found in the prefix cache at admission
    lookup: tuple[int, int] | None = None  # (tokens, found in the cache) until its prefill ran
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None
    text: str | None = None  # None without a tokenizer
    stop_reason: str | int | None = None
    stop_floor: int = 0  # stop strings count only where they end past this many characters
    preemptions: int = 0
    generator: torch.Generator | None = None
    emitted: int = 0  # output tokens already reported by step()
    logprobs: list[Logprob] = field(default_factory=list)  # one per output token, if asked
    prompt_logprobs: list[Logprob | None] | None = None  # one per prompt token, if asked
    guide: Any = None  # its place in its structured output (engine/guided.py Guide), if any
    priority: int = 0  # under the priority policy: lower first (vLLM's)
    arrival: int = 0  # its place in the order requests were submitted (set by the engine)
    cache_salt: str | None = None  # its prefix-cache blocks are shared only under this salt
    rope_short: bool = False  # LongRoPE: its cached keys were rotated with the short factors

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def finish(self, reason: str, error: str | None = None) -> None:
        self.status, self.finish_reason, self.error = Status.FINISHED, reason, error


@dataclass
class Logprob:
    """A token's log-probability under the model (before temperature, top-k and top-p, as
    vLLM reports it) and the `k` most likely tokens at that position."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first
    rank: int = 1  # the token's place among all tokens, most likely first (1 + those above)


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    expert: str | None
    finished: bool
    finish_reason: str | None
    new_token_ids: list[int] = field(default_factory=list)
    error: str | None = None
    stop_reason: str | int | None = None
    prompt: str | None = None  # the prompt's text, when it was given as text
    new_logprobs: list[Logprob] = field(default_factory=list)  # of new_token_ids, if asked
    prompt_logprobs: list[Logprob | None] | None = None  # if asked (first token: None)
    logprobs: list[Logprob] | None = None  # of all token_ids: on the final output, if asked
    num_cached_tokens: int = 0  # prompt tokens whose keys/values came from the prefix cache
    cumulative_logprob: float | None = None  # a beam's (engine/beam.py)

    @classmethod
    def of(cls, r: Request, new: list[int]) -> RequestOutput:
        lps = r.logprobs[len(r.logprobs) - len(new) :] if r.sampling.logprobs is not None else []
        plps = r.prompt_logprobs  # (a prompt stopped part-way through its prefill: none)
        if plps is not None and len(plps) < len(r.prompt_token_ids):
            plps = None
        return cls(r.request_id, r.prompt_token_ids, list(r.output_token_ids), r.text, r.expert,
                   r.finished, r.finish_reason, new, r.error, r.stop_reason, r.prompt, lps,
                   plps,
                   list(r.logprobs) if r.finished and r.sampling.logprobs is not None
                   else None, r.num_cached_tokens or 0)  # fmt: skip
