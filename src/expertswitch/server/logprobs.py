"""Logprobs in OpenAI's two shapes, from the engine's `Logprob` records.

    completions  {"tokens": [...], "token_logprobs": [...], "top_logprobs": [{text: lp}, ...],
                  "text_offset": [...]}  (with echo, the prompt's tokens come first; the first
                  prompt token has no logprob: null)
    chat         {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token",
                  "logprob", "bytes"}, ...]}, ...]}

    prompt_logprobs  vLLM's: per prompt token (the first: null) {token id: {"logprob", "rank",
                  "decoded_token"}} for the prompt's token and the k most likely

As vLLM does, a completion's top_logprobs always holds the chosen token, so it may have k + 1
entries. Token texts are the tokenizer's decode of the single id (a partial UTF-8 character
decodes to U+FFFD; `bytes` in the chat shape is the UTF-8 of that text).
"""

from __future__ import annotations

from expertswitch.engine.request import Logprob


class LogprobFormatter:
    def __init__(self, tokenizer, k: int | None = None, as_ids: bool = False):
        """k: the most likely tokens shown per position (None: all the records hold; they
        may hold more when the prompt's were asked for more). as_ids: tokens named
        "token_id:N" (vLLM's return_tokens_as_token_ids), offsets and bytes of that name."""
        self.tok = tokenizer
        self.k = k
        self.as_ids = as_ids
        self._texts: dict[int, str] = {}

    def text(self, token_id: int) -> str:
        t = self._texts.get(token_id)
        if t is None:  # a fast tokenizer's decode does not mutate it: safe off its thread
            t = f"token_id:{token_id}" if self.as_ids else self.tok.decode([token_id])
            self._texts[token_id] = t
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
            top = {self.text(i): v for i, v in lp.top[: self.k]}
            top.setdefault(text, lp.logprob)
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops,
                "text_offset": offsets}  # fmt: skip

    def chat(self, entries: list[Logprob]) -> dict:
        def one(tid: int, value: float) -> dict:
            text = self.text(tid)
            return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

        return {"content": [{**one(lp.token_id, lp.logprob),
                             "top_logprobs": [one(i, v) for i, v in lp.top[: self.k]]}
                            for lp in entries]}  # fmt: skip

    def prompt(self, token_ids: list[int], entries: list[Logprob | None], k: int) -> list:
        """vLLM's prompt_logprobs of a prompt: null for the first token (nothing scores it),
        then {token id: {"logprob", "rank", "decoded_token"}} — the prompt's token and the k
        most likely."""
        out: list = []
        for tid, lp in zip(token_ids, entries):
            if lp is None:
                out.append(None)
                continue
            top = {str(i): {"logprob": v, "rank": r + 1, "decoded_token": self.text(i)}
                   for r, (i, v) in enumerate(lp.top[:k])}  # fmt: skip
            top.setdefault(str(tid), {"logprob": lp.logprob, "rank": lp.rank,
                                      "decoded_token": self.text(tid)})  # fmt: skip
            out.append(top)
        return out
