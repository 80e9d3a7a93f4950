"""`SamplingParams`: per-request decoding parameters (vLLM's names and defaults), validated."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from expertswitch.engine.guided import StructuredOutputsParams
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
    # stop strings, and the token that stopped the answer (EOS or a stop_token_ids entry),
    # are cut from its text unless this is set (vLLM's rule)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True  # the text leaves out special tokens (vLLM's default)
    logprobs: int | None = None  # per generated token: its logprob and the top-k (0: its own)
    prompt_logprobs: int | None = None  # the same for every prompt token after the first
    # logits adjustments, as vLLM applies them before temperature: logit_bias (token id →
    # added to its logit), min_tokens (EOS and stop_token_ids banned until that many tokens),
    # then the penalties: repetition (HF's: a seen token's logit divided by it when positive,
    # multiplied when negative; prompt and output), presence and frequency (OpenAI's: minus
    # presence once and frequency per occurrence, output tokens only); min_p after temperature
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None  # only these may be sampled (vLLM's)
    # words banned as token sequences (vLLM's): a word's last token is banned wherever the
    # answer so far ends with its other tokens; each word is spelled as it starts a text and
    # after a space (other spellings, "Cat" for "cat", are other words).
    # The engine tokenizes them with the request's tokenizer into bad_words_token_ids (which
    # can also be given directly, as token id sequences)
    bad_words: list[str] | None = None
    bad_words_token_ids: list[list[int]] | None = None
    min_tokens: int = 0
    min_p: float = 0.0
    # the answer held to a JSON schema, any JSON object or one of given strings (vLLM's
    # structured_outputs; engine/guided.py): a StructuredOutputsParams or its fields as a dict
    structured_outputs: StructuredOutputsParams | dict | None = None

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
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ConfigError("stop strings must be non-empty strings")
        if any(not _is_int(t) or t < 0 for t in self.stop_token_ids):
            raise ConfigError("stop_token_ids must be non-negative integers")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_number(v) or not -2 <= v <= 2:
                raise ConfigError(f"{name} must be a number in [-2, 2], got {v!r}")
        if not _is_number(self.repetition_penalty) or not 0 < self.repetition_penalty <= 100:
            raise ConfigError(f"repetition_penalty must be a number in (0, 100] (1: off), got "
                              f"{self.repetition_penalty!r}")  # fmt: skip
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise ConfigError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ConfigError(f"min_tokens must be an integer from 0 to max_tokens "
                              f"({self.max_tokens}), got {self.min_tokens!r}")  # fmt: skip
        bias = self.logit_bias or {}
        if not isinstance(bias, dict) or any(
            not _is_int(t) or t < 0 or not _is_number(b) or not -100 <= b <= 100
            for t, b in bias.items()
        ):
            raise ConfigError("logit_bias maps token ids (non-negative integers) to biases in "
                              "[-100, 100]")  # fmt: skip
        self.logit_bias = dict(bias) or None
        so = self.structured_outputs
        if isinstance(so, dict):
            try:
                so = StructuredOutputsParams(**so)
            except TypeError:
                raise ConfigError("structured_outputs takes json, json_object or choice; got "
                                  f"{sorted(so)}") from None  # fmt: skip
        if so is not None and not isinstance(so, StructuredOutputsParams):
            raise ConfigError("structured_outputs must be a StructuredOutputsParams (or a dict "
                              "of its fields)")  # fmt: skip
        self.structured_outputs = so
        if self.allowed_token_ids is not None:
            ids = self.allowed_token_ids
            if not isinstance(ids, (list, tuple)) or not ids \
                    or not all(_is_int(t) and t >= 0 for t in ids):  # fmt: skip
                raise ConfigError("allowed_token_ids must be a non-empty list of non-negative "
                                  "integer token ids")  # fmt: skip
            self.allowed_token_ids = sorted(set(ids))
        if self.bad_words is not None:
            words = self.bad_words
            if not isinstance(words, (list, tuple)) or not all(
                isinstance(w, str) and w.strip() for w in words
            ):
                raise ConfigError("bad_words must be a list of non-empty strings")
            self.bad_words = list(words) or None
        if self.bad_words_token_ids is not None:
            seqs = self.bad_words_token_ids
            if not isinstance(seqs, (list, tuple)) or not all(
                isinstance(q, (list, tuple)) and q and all(_is_int(t) and t >= 0 for t in q)
                for q in seqs
            ):
                raise ConfigError("bad_words_token_ids must be a list of non-empty lists of "
                                  "non-negative integer token ids")  # fmt: skip
            self.bad_words_token_ids = [list(q) for q in seqs] or None
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and (not _is_int(k) or not 0 <= k <= MAX_LOGPROBS):
                raise ConfigError(f"{name} must be an integer from 0 to {MAX_LOGPROBS}, got "
                                  f"{k!r}")  # fmt: skip

    @property
    def adjusts_logits(self) -> bool:
        """Whether any logits adjustment is on (the sampler skips rows without one)."""
        return bool(self.logit_bias or self.allowed_token_ids or self.min_tokens
                    or self.bad_words or self.bad_words_token_ids
                    or self.presence_penalty
                    or self.frequency_penalty or self.repetition_penalty != 1
                    or self.structured_outputs is not None)  # fmt: skip

    @property
    def greedy(self) -> bool:
        # vLLM's rule: below 1e-5 the temperature divides logits into overflow; it is greedy
        return self.temperature < _GREEDY_BELOW


_GREEDY_BELOW = 1e-5
MAX_LOGPROBS = 20  # vLLM's default max_logprobs (and OpenAI's top_logprobs limit)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
