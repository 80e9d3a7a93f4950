"""Beam search over the engine, as vLLM runs it (its `use_beam_search`, `LLM.beam_search`):
outside the scheduler, one token at a time. Each step asks the engine for one token of every
live beam with its 2·width most likely next tokens (max_tokens 1, logprobs 2·width: the
prefix cache keeps the beams' shared prompt and history), extends every beam by each of them
(and by the sampled token, at a temperature above 0, when it is not among them), and keeps
the `width` best by score = cumulative logprob / length^length_penalty (the length counts the
prompt, not an end-of-sequence token). A candidate that ends with an EOS token is finished
(unless ignore_eos; a model with several EOS ids finishes a beam once, on the likeliest). After
max_tokens steps the finished and the live beams are ranked by the same score and the best
`width` returned — or as soon as no live beam can still beat the `width`-th finished one (a
beam's cumulative logprob only falls, so its best reachable score is known): the same answer,
without running a chat request's default max_tokens (the rest of the context) to its end.

    search = BeamSearch(prompt_ids, BeamSearchParams(beam_width=4, max_tokens=32), eos)
    while not search.done:
        search.advance(engine.generate(search.pending(), expert, search.step_params()))
    search.best()  # [Beam], best first

The engine's `beam_search` runs that loop; the server runs it with its asynchronous engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from expertswitch.engine.request import RequestOutput
from expertswitch.engine.sampling import MAX_LOGPROBS, SamplingParams
from expertswitch.errors import ConfigError

MAX_BEAM_WIDTH = MAX_LOGPROBS // 2  # each step asks for 2·width logprobs
MAX_LENGTH_PENALTY = 16.0  # |length_penalty| bound: length^16 stays finite for any context


@dataclass(frozen=True)
class BeamSearchParams:
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False  # a finished beam's EOS token kept in its tokens
    seed: int | None = None  # at a temperature: step i samples with seed + i

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
        if abs(self.length_penalty) > MAX_LENGTH_PENALTY:
            raise ConfigError(f"length_penalty must be from {-MAX_LENGTH_PENALTY:g} to "
                              f"{MAX_LENGTH_PENALTY:g}, got {self.length_penalty}")  # fmt: skip
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")


@dataclass
class Beam:
    tokens: list[int]  # generated (an EOS token only with include_stop_str_in_output)
    cum_logprob: float = 0.0
    eos: bool = False  # finished on an end-of-sequence token


class BeamSearch:
    def __init__(self, prompt: list[int], params: BeamSearchParams, eos: frozenset[int]):
        self.prompt, self.params, self.eos = list(prompt), params, frozenset(eos)
        self.live: list[Beam] = [Beam([])]
        self.finished: list[Beam] = []  # the `beam_width` best so far, best first
        self.steps = 0

    @property
    def done(self) -> bool:
        return not self.live or self.steps >= self.params.max_tokens or self._settled()

    def pending(self) -> list[list[int]]:
        """The token ids to extend by one token: prompt + each live beam's tokens."""
        return [self.prompt + b.tokens for b in self.live]

    def step_params(self) -> SamplingParams:
        seed = None if self.params.seed is None else self.params.seed + self.steps
        return SamplingParams(temperature=self.params.temperature, max_tokens=1, seed=seed,
                              logprobs=2 * self.params.beam_width, ignore_eos=True)  # fmt: skip

    def score(self, beam: Beam) -> float:
        """cum_logprob / length^length_penalty; the length counts the prompt, and not a last
        EOS token (vLLM's get_beam_search_score)."""
        return self._score(beam.cum_logprob, self._length(beam.tokens))

    def _length(self, tokens: list[int]) -> int:
        n = len(self.prompt) + len(tokens) - (bool(tokens) and tokens[-1] in self.eos)
        return max(n, 1)

    def _score(self, cum: float, length: int) -> float:
        return cum / length**self.params.length_penalty

    def _settled(self) -> bool:
        """No live beam can beat the `beam_width`-th finished one any more: its cumulative
        logprob only falls, so its best reachable score is cum / (the longest it may grow)
        ^penalty for a positive penalty, else its score now."""
        p = self.params
        if len(self.finished) < p.beam_width:
            return False
        worst_kept = self.score(self.finished[-1])
        longest = len(self.prompt) + p.max_tokens
        for b in self.live:
            reach = self._score(b.cum_logprob, longest) if p.length_penalty > 0 else self.score(b)
            if reach >= worst_kept:
                return False
        return True

    def advance(self, outs: list[RequestOutput]) -> None:
        """Extend the live beams with one step's outputs (one per pending() entry, in order)."""
        if len(outs) != len(self.live):
            raise ValueError(f"{len(outs)} outputs for {len(self.live)} beams")
        grown: list[tuple[float, int, int, float]] = []  # (score, beam, token, cum)
        finished = list(self.finished)
        for i, (beam, out) in enumerate(zip(self.live, outs)):
            if out.finish_reason not in ("length", "stop") or not out.logprobs:
                why = out.error or f"its step ended with {out.finish_reason!r}"
                raise ConfigError(f"beam search stopped: {why}")
            lp = out.logprobs[0]
            candidates = dict(lp.top)
            candidates.setdefault(lp.token_id, lp.logprob)  # (sampled outside the top)
            ends = [(lp_, t) for t, lp_ in candidates.items() if t in self.eos]
            if ends and not self.params.ignore_eos:  # finished once, on the likeliest EOS id
                logprob, token = max(ends)
                kept = [token] if self.params.include_stop_str_in_output else []
                finished.append(Beam(beam.tokens + kept, beam.cum_logprob + logprob, True))
            n = len(self.prompt) + len(beam.tokens) + 1
            for token, logprob in candidates.items():
                if token in self.eos and not self.params.ignore_eos:
                    continue
                cum = beam.cum_logprob + logprob
                length = n - 1 if token in self.eos else n  # (ignore_eos: a last EOS not
                grown.append((self._score(cum, length), i, token, cum))  # counted, as vLLM)
        grown.sort(key=lambda c: c[0], reverse=True)  # (stable: ties keep candidate order)
        self.live = [Beam(self.live[i].tokens + [t], cum)
                     for _, i, t, cum in grown[: self.params.beam_width]]  # fmt: skip
        finished.sort(key=self.score, reverse=True)
        self.finished = finished[: self.params.beam_width]  # (the rest can never be returned)
        self.steps += 1

    def best(self) -> list[Beam]:
        """The `beam_width` best of the finished and the live beams, best first."""
        ranked = sorted(self.finished + self.live, key=self.score, reverse=True)
        return ranked[: self.params.beam_width]
