"""Beam search over the engine, as vLLM runs it (its `use_beam_search`, `LLM.beam_search`):
outside the scheduler, one token at a time. Each step asks the engine for one token of every
live beam with its 2·width most likely next tokens (max_tokens 1, logprobs 2·width: the
prefix cache keeps the beams' shared prompt and history), extends every beam by each of them
(and by the sampled token, at a temperature above 0, when it is not among them), and keeps
the `width` best by score = cumulative logprob / length^length_penalty (the length counts the
prompt, not an end-of-sequence token). A candidate that ends with an EOS token is finished
(unless ignore_eos). After max_tokens steps the finished and the live beams are ranked by the
same score and the best `width` returned.

    search = BeamSearch(prompt_ids, BeamSearchParams(beam_width=4, max_tokens=32), eos)
    while not search.done:
        search.advance(engine.generate(search.pending(), expert, search.step_params()))
    search.best()  # [Beam], best first

The engine's `beam_search` runs that loop; the server runs it with its asynchronous engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from expertswitch.engine.request import RequestOutput
from expertswitch.engine.sampling import MAX_LOGPROBS, SamplingParams
from expertswitch.errors import ConfigError

MAX_BEAM_WIDTH = MAX_LOGPROBS // 2  # each step asks for 2·width logprobs


@dataclass(frozen=True)
class BeamSearchParams:
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False  # a finished beam's EOS token kept in its tokens

    def __post_init__(self):
        w, n = self.beam_width, self.max_tokens
        if isinstance(w, bool) or not isinstance(w, int) or not 1 <= w <= MAX_BEAM_WIDTH:
            raise ConfigError(
                f"the beam width (n) must be from 1 to {MAX_BEAM_WIDTH} (each "
                f"step asks for 2·n logprobs, at most {MAX_LOGPROBS}), got {w!r}"
            )
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"max_tokens must be a positive integer, got {n!r}")
        for name in ("temperature", "length_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"{name} must be a finite number, got {v!r}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be ≥ 0, got {self.temperature}")


@dataclass
class Beam:
    tokens: list[int]  # generated (an EOS token only with include_stop_str_in_output)
    cum_logprob: float = 0.0
    eos: bool = False  # finished on an end-of-sequence token
    logprobs: list[float] = field(default_factory=list)  # of each generated token


class BeamSearch:
    def __init__(self, prompt: list[int], params: BeamSearchParams, eos: frozenset[int]):
        self.prompt, self.params, self.eos = list(prompt), params, frozenset(eos)
        self.live: list[Beam] = [Beam([])]
        self.finished: list[Beam] = []
        self.steps = 0

    @property
    def done(self) -> bool:
        return not self.live or self.steps >= self.params.max_tokens

    def pending(self) -> list[list[int]]:
        """The token ids to extend by one token: prompt + each live beam's tokens."""
        return [self.prompt + b.tokens for b in self.live]

    def step_params(self) -> SamplingParams:
        return SamplingParams(temperature=self.params.temperature, max_tokens=1,
                              logprobs=2 * self.params.beam_width, ignore_eos=True)  # fmt: skip

    def score(self, beam: Beam) -> float:
        """cum_logprob / length^length_penalty; the length counts the prompt, and not a last
        EOS token (vLLM's get_beam_search_score)."""
        n = len(self.prompt) + len(beam.tokens)
        n -= bool(beam.tokens) and beam.tokens[-1] in self.eos
        return beam.cum_logprob / max(n, 1) ** self.params.length_penalty

    def advance(self, outs: list[RequestOutput]) -> None:
        """Extend the live beams with one step's outputs (one per pending() entry, in order)."""
        if len(outs) != len(self.live):
            raise ValueError(f"{len(outs)} outputs for {len(self.live)} beams")
        grown: list[Beam] = []
        for beam, out in zip(self.live, outs):
            if out.finish_reason == "error":
                raise ConfigError(f"beam search stopped: {out.error}")
            if not out.logprobs:
                continue
            lp = out.logprobs[0]
            candidates = dict(lp.top)
            candidates.setdefault(lp.token_id, lp.logprob)  # (sampled outside the top)
            for token, logprob in candidates.items():
                cum = beam.cum_logprob + logprob
                lps = [*beam.logprobs, logprob]
                if token in self.eos and not self.params.ignore_eos:
                    kept = [token] if self.params.include_stop_str_in_output else []
                    self.finished.append(Beam(beam.tokens + kept, cum, True, lps))
                else:
                    grown.append(Beam(beam.tokens + [token], cum, False, lps))
        grown.sort(key=self.score, reverse=True)  # (stable: ties keep the candidates' order)
        self.live = grown[: self.params.beam_width]
        self.steps += 1

    def best(self) -> list[Beam]:
        """The `beam_width` best of the finished and the live beams, best first."""
        ranked = sorted(self.finished + self.live, key=self.score, reverse=True)
        return ranked[: self.params.beam_width]
