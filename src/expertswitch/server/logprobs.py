"""Logprobs in OpenAI's two shapes, from the engine's `Logprob` records.

    completions  {"tokens": [...], "token_logprobs": [...], "top_logprobs": [{text: lp}, ...],
                  "text_offset": [...]}  (with echo, the prompt's tokens come first; the first
                  prompt token has no logprob: null)
    chat         {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token",
                  "logprob", "bytes"}, ...]}, ...]}

As vLLM does, a completion's top_logprobs always holds the chosen token, so it may have k + 1
entries. Token texts are the tokenizer's decode of the single id (a partial UTF-8 character
decodes to U+FFFD; `bytes` in the chat shape is the UTF-8 of that text).
"""

from __future__ import annotations

from expertswitch.engine.request import Logprob


class LogprobFormatter:
    def __init__(self, tokenizer):
        self.tok = tokenizer
        self._texts: dict[int, str] = {}

    def text(self, token_id: int) -> str:
        t = self._texts.get(token_id)
        if t is None:  # a fast tokenizer's decode does not mutate it: safe off its thread
            t = self._texts[token_id] = self.tok.decode([token_id])
        return t

    def completion(self, entries: list[tuple[int, Logprob | None]], offset: int) -> dict:
        """entries: (token id, its Logprob or None) in text order; offset: where the first
        token's text starts in the choice's text."""
        tokens, lps, tops, offsets = [], [], [], []
        for tid, lp in entries:
            text = self.text(tid)
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
            if lp is None:
                lps.append(None)
                tops.append(None)
                continue
            lps.append(lp.logprob)
            top = {self.text(i): v for i, v in lp.top}
            top.setdefault(text, lp.logprob)
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops,
                "text_offset": offsets}  # fmt: skip

    def chat(self, entries: list[Logprob]) -> dict:
        def one(tid: int, value: float) -> dict:
            text = self.text(tid)
            return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

        return {"content": [{**one(lp.token_id, lp.logprob),
                             "top_logprobs": [one(i, v) for i, v in lp.top]}
                            for lp in entries]}  # fmt: skip
