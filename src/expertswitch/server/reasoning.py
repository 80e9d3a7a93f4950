"""A reasoning model's thinking, split from its answer (vLLM's `--reasoning-parser NAME`): the
text between <think> and </think> goes to the message's `reasoning_content` (and vLLM's newer
`reasoning`), the rest to `content` — where a tool-call parser then reads calls.

    deepseek_r1  the answer starts inside the thinking (R1's template writes <think> into the
                 prompt, or the answer opens with it): everything before </think> is
                 reasoning; no </think> (cut short while thinking): all of it is
    qwen3        the same reading (Qwen3 opens its answer with <think>, Qwen3-Thinking-2507's
                 template writes it into the prompt, as current vLLM reads both)

A prompt that closed the thinking already (Qwen3's enable_thinking false writes an empty
<think></think> into it) leaves the answer nothing to split: the server then reads it all as
content (serving.py).

    parser = REASONING_PARSERS["qwen3"]
    reasoning, content = split(parser, text)          # a whole answer (content may be None)
    stream = ReasoningStream(parser)
    reasoning_delta, content_so_far = stream.feed(text_so_far, final=False)

Streaming sends reasoning as it comes, holding back what may be the start of </think> (or of
an opening <think>, which is cut); the reasoning a stream sends adds up to what `split` finds
in the whole answer.
"""

from __future__ import annotations

from dataclasses import dataclass

from expertswitch.server.tool_parsers import partial_suffix

START, END = "<think>", "</think>"


@dataclass(frozen=True)
class ReasoningParser:
    name: str  # (both read <think>...</think> alike; the name is what users pass, as in vLLM)


REASONING_PARSERS = {p.name: p for p in (ReasoningParser("deepseek_r1"),
                                         ReasoningParser("qwen3"))}  # fmt: skip


def split(parser: ReasoningParser, text: str) -> tuple[str | None, str | None]:
    """(reasoning, content) of a whole answer; content None when it never closed its thinking
    or has nothing after it."""
    body = _after_start(text)
    end = body.find(END)
    if end < 0:
        return body, None  # (cut short while thinking, or never closed)
    content = body[end + len(END) :]
    return body[:end], content or None


def thinking_counter(parser: ReasoningParser, tok):
    """A function of an answer's token ids → its thinking's token count (OpenAI's
    reasoning_tokens): the tokens before the one that closes the thinking, less an opening
    <think> the answer wrote; all of them when it never closed (as `split` reads the text).
    Where </think> is not one token of `tok`, the thinking's text is tokenized again (a count
    close to, not always equal to, the tokens generated)."""
    start, end = _token_id(tok, START), _token_id(tok, END)
    if end is not None:

        def count(ids: list[int]) -> int:
            first = 1 if ids and start is not None and ids[0] == start else 0
            return ids.index(end, first) - first if end in ids[first:] else len(ids) - first

        return count

    def count_text(ids: list[int]) -> int:
        thought = split(parser, tok.decode(ids))[0]
        return len(tok.encode(thought, add_special_tokens=False)) if thought else 0

    return count_text


def _token_id(tok, text: str) -> int | None:
    """The id of `text` when it is one token of `tok`, else None."""
    i = tok.convert_tokens_to_ids(text)
    if not isinstance(i, int) or i == tok.unk_token_id or tok.convert_ids_to_tokens(i) != text:
        return None
    return i


class ReasoningStream:
    """One streamed answer's reasoning, and its content so far (see the module)."""

    def __init__(self, parser: ReasoningParser):
        self.parser = parser
        self.sent = 0  # reasoning characters sent

    def feed(self, text: str, final: bool) -> tuple[str, str | None]:
        """(reasoning to send, the content so far: None while the answer is still thinking,
        or may still open with <think>)."""
        if final:
            reasoning, content = split(self.parser, text)
            reasoning = reasoning or ""
        else:
            head = text.lstrip()
            if not head.startswith(START) and START.startswith(head):
                return "", None  # (it may yet open with <think>, which is cut)
            body = _after_start(text)
            end = body.find(END)
            if end < 0:
                reasoning, content = body[: len(body) - partial_suffix(body, END)], None
            else:
                reasoning, content = body[:end], body[end + len(END) :]
        delta = reasoning[self.sent :]
        self.sent += len(delta)
        return delta, content


def _after_start(text: str) -> str:
    """The answer without the <think> that opens it, if one does (with blanks before it)."""
    head = text.lstrip()
    return head[len(START) :] if head.startswith(START) else text
