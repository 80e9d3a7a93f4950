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


@pytest.mark.parametrize("single", [True, False])
def test_thinking_tokens_are_those_before_the_closing_marker(single):
    """usage's reasoning_tokens (server/reasoning.thinking_counter): with <think> and </think>
    single tokens, the tokens before </think> (an opening <think> not counted, all of them
    when it never closed); where they are not (a byte-level BPE that spells them in pieces),
    the thinking's text tokenized again — equal here, where words tokenize alike alone and
    in the answer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from expertswitch.server.reasoning import thinking_counter

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    text = ["we add two numbers and think about it, ok 5 < 6 / 2 > 1"] * 10
    raw.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))  # fmt: skip
    tok = PreTrainedTokenizerFast(tokenizer_object=raw)
    if single:
        tok.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t in ("<think>", "</think>")])  # fmt: skip
    count = thinking_counter(REASONING_PARSERS["deepseek_r1"], tok)

    def ids(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False)

    assert count(ids("we add two numbers</think>ok 5")) == len(ids("we add two numbers")) > 1
    assert count(ids("<think>we add</think>ok")) == len(ids("we add"))
    assert count(ids("</think>ok 5")) == 0
    assert count(ids("we add two")) == len(ids("we add two"))  # never closed: all of it
    assert count([]) == 0
    if single:
        assert len(ids("</think>")) == 1
        assert count(ids("we</think>add</think>ok")) == len(ids("we"))  # the first closes
    else:
        assert len(ids("</think>")) > 1  # (the text path)
