"""A reasoning model's thinking split from its answer (--reasoning-parser): each parser against
hand-written answers, and streaming — any answer, cut anywhere — adding up to the split of the
whole answer, its content only ever growing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from expertswitch.server.reasoning import REASONING_PARSERS, ReasoningStream, split

CASES = {
    "deepseek_r1": [
        ("I should add.</think>\n\n5", "I should add.", "\n\n5"),
        ("<think>\nhmm\n</think>ok", "\nhmm\n", "ok"),
        ("  <think>x</think>", "x", None),
        ("still thinking when cut", "still thinking when cut", None),
        ("</think>answer", "", "answer"),
        ("<thi", "<thi", None),
        ("a</think>b</think>c", "a", "b</think>c"),  # the first end closes the thinking
    ],
    "qwen3": [
        ("<think>\nhmm\n</think>\n\nok", "\nhmm\n", "\n\nok"),
        ("\n<think>cut short", "cut short", None),
        ("thinking</think>answer", "thinking", "answer"),  # <think> in the prompt (2507)
    ],
}


@pytest.mark.parametrize("name,text,reasoning,content",
                         [(n, *c) for n, cases in CASES.items() for c in cases])  # fmt: skip
def test_each_parser_splits_the_thinking(name, text, reasoning, content):
    assert split(REASONING_PARSERS[name], text) == (reasoning, content)


@st.composite
def answers(draw):
    name = draw(st.sampled_from(sorted(REASONING_PARSERS)))
    pieces = st.sampled_from(["<think>", "</think>", "<thi", "nk>", "</th", "ink>", "<", "/"])
    words = st.sampled_from(["x", " ", "\n", "think", "ok."])
    text = "".join(draw(st.lists(st.one_of(pieces, words), max_size=12)))
    every = draw(st.booleans())
    cuts = list(range(len(text))) if every else sorted(draw(st.lists(st.integers(0, len(text)),
                                                                     max_size=6)))  # fmt: skip
    return name, text, cuts


@settings(max_examples=500, deadline=None)
@given(answers())
def test_a_stream_adds_up_to_the_whole_answer(case):
    name, text, cuts = case
    s = ReasoningStream(REASONING_PARSERS[name])
    sent, contents = "", []
    for n in [*cuts, None]:
        delta, content = s.feed(text if n is None else text[:n], final=n is None)
        sent += delta
        contents.append(content)
    want_reasoning, want_content = split(REASONING_PARSERS[name], text)
    assert sent == (want_reasoning or "")
    assert contents[-1] == want_content
    seen = [c for c in contents[:-1] if c is not None]
    for a, b in zip(seen, seen[1:] + [want_content or ""]):
        assert b.startswith(a)  # what content went out is never taken back
