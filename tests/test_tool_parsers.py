"""Tool calls read out of answers (tool_choice "auto"): each format's calls, content and
malformed calls against hand-written expectations, and streaming — any answer, cut into
pieces anywhere — adding up to what the whole answer parses to, never sending as content text
that turns out to be a call."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from expertswitch.server.tool_parsers import TOOL_PARSERS, ToolStream, extract

W = '{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}'
T = '{"name": "get_time", "arguments": {}}'
WEATHER = ("get_weather", {"city": "Paris", "days": 3})
TIME = ("get_time", {})
QW = ("<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n"
      "</parameter>\n</function>")  # fmt: skip
QT = "<function=get_time>\n</function>"
WEATHER_TEXT = ("get_weather", {"city": "Paris", "days": "3"})

CASES = {
    "hermes": [
        (f"<tool_call>\n{W}\n</tool_call>", None, [WEATHER]),
        (
            f"Let me look.\n<tool_call>\n{W}\n</tool_call>\n<tool_call>\n{T}\n</tool_call>",
            "Let me look.\n",
            [WEATHER, TIME],
        ),
        (f"<tool_call>{W}", None, [WEATHER]),  # unclosed at EOS: whole JSON still counts
        (
            f"<tool_call>{W}</tool_call> and then <tool_call>{{oops</tool_call>",
            " and then <tool_call>{oops</tool_call>",
            [WEATHER],
        ),  # a bad block stays content
        (
            '<tool_call>{"name": "f", "parameters": {"a": [1, null]}}</tool_call>',
            None,
            [("f", {"a": [1, None]})],
        ),
        (
            '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>',
            None,
            [("f", {"a": 1})],
        ),  # arguments given as JSON text
        (
            '<tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>',
            '<tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>',
            [],
        ),
        (
            '<tool_call>{"name": "f", "arguments": {"x": 1e400}}</tool_call>',
            '<tool_call>{"name": "f", "arguments": {"x": 1e400}}</tool_call>',
            [],
        ),
        (
            '<tool_call>{"arguments": {}}</tool_call>',
            '<tool_call>{"arguments": {}}</tool_call>',
            [],
        ),
        ("No tools needed: 2 + 2 = 4. <tool", "No tools needed: 2 + 2 = 4. <tool", []),
        # a lone surrogate (a \ud800 escape) cannot go out as UTF-8: escaped in arguments,
        # not a call in a name
        (
            '<tool_call>{"name": "f", "arguments": {"a": "\\ud800 é"}}</tool_call>',
            None,
            [("f", {"a": "\ud800 é"})],
        ),
        (
            '<tool_call>{"name": "\\ud800", "arguments": {}}</tool_call>',
            '<tool_call>{"name": "\\ud800", "arguments": {}}</tool_call>',
            [],
        ),
    ],
    "llama3_json": [
        ('{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}', None, [WEATHER]),
        (f"<|python_tag|>{W}; {T}", None, [WEATHER, TIME]),
        (f"  \n{W}", None, [WEATHER]),
        (f"{W} that was it", " that was it", [WEATHER]),
        (f"Sure. {W}", f"Sure. {W}", []),  # calls only open the answer
        ('{"a": 1}', '{"a": 1}', []),
        ("{not json", "{not json", []),
    ],
    "mistral": [
        (f"[TOOL_CALLS][{W}, {T}]", None, [WEATHER, TIME]),
        (f"Checking.[TOOL_CALLS] [{W}]", "Checking.", [WEATHER]),
        (
            '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "days": 3}[TOOL_CALLS]get_time[ARGS]{}',
            None,
            [WEATHER, TIME],
        ),
        ("[TOOL_CALLS]get_time[CALL_ID]a1b2c3d4e[ARGS]{}", None, [TIME]),
        ("[TOOL_CALLS][{oops}]", "[TOOL_CALLS][{oops}]", []),
        ("[TOOL_CALLS]get_time[ARGS]{", "[TOOL_CALLS]get_time[ARGS]{", []),
        (f'[TOOL_CALLS][{W}, {{"x": 1}}]', f'[TOOL_CALLS][{W}, {{"x": 1}}]', []),
    ],
    "phi4_mini_json": [
        (f"functools[{W}, {T}]", None, [WEATHER, TIME]),
        (f"Let me check. functools [{W}]", "Let me check. ", [WEATHER]),
        (
            'functools[{"name": "f", "arguments": {"a": [[1], [2]]}}]',
            None,
            [("f", {"a": [[1], [2]]})],
        ),  # (a nested list does not end it)  # fmt: skip
        (f"functools[{W}] done", " done", [WEATHER]),
        ("functools[{oops}]", "functools[{oops}]", []),
        (f'functools[{W}, {{"x": 1}}]', f'functools[{W}, {{"x": 1}}]', []),
        ("functools are handy", "functools are handy", []),
        (
            f"Use functools.reduce here.\nfunctools[{T}]",
            "Use functools.reduce here.\n",
            [TIME],
        ),  # (the word in prose is not the call)  # fmt: skip
        ("functools[]", "functools[]", []),
    ],
    "qwen3_coder": [  # (untyped here: every value is text; typed below)
        (f"<tool_call>\n{QW}\n</tool_call>", None, [WEATHER_TEXT]),
        (
            f"Let me look.\n<tool_call>\n{QW}\n</tool_call>\n<tool_call>\n{QT}\n</tool_call>",
            "Let me look.\n",
            [WEATHER_TEXT, TIME],
        ),  # fmt: skip
        (f"<tool_call>\n{QW}\n{QT}\n</tool_call>", None, [WEATHER_TEXT, TIME]),  # two in one
        (f"{QW}\n{QT}", None, [WEATHER_TEXT, TIME]),  # bare functions, as vLLM reads them
        (f"<tool_call>\n{QW}", None, [WEATHER_TEXT]),  # unclosed block at EOS: the function is
        (  # a function cut short (max_tokens) stays content: its last value may be cut
            "<tool_call>\n<function=get_weather>\n<parameter=city>\nPar",
            "<tool_call>\n<function=get_weather>\n<parameter=city>\nPar",
            [],
        ),
        (  # close tags left out before the next parameter and the end (vLLM reads them)
            "<function=f><parameter=a>x<parameter=b>\ny\n</function>",
            None,
            [("f", {"a": "x", "b": "y"})],
        ),
        (  # a value keeps its inner newlines and blanks, and other text's markup
            "<function=f>\n<parameter=code>\n\ndef f():\n    return '<b>'\n\n</parameter>\n"
            "</function>",
            None,
            [("f", {"code": "\ndef f():\n    return '<b>'\n"})],
        ),
        (
            "<tool_call>\n<function=>\n</function>\n</tool_call>",
            "<tool_call>\n<function=>\n</function>\n</tool_call>",
            [],
        ),  # no name  # fmt: skip
        (
            "<tool_call>{oops}</tool_call> then",
            "<tool_call>{oops}</tool_call> then",
            [],
        ),  # fmt: skip
        (
            f"<tool_call>\n{QT}\n</tool_call> and <tool_call>junk</tool_call>",
            " and <tool_call>junk</tool_call>",
            [TIME],
        ),  # fmt: skip
        ("No call: <tool", "No call: <tool", []),
        (
            "<function=f>stray<parameter=a>1</parameter></function>",
            "<function=f>stray<parameter=a>1</parameter></function>",
            [],
        ),  # fmt: skip
    ],
    "pythonic": [
        ('[get_weather(city="Paris", days=3), get_time()]', None, [WEATHER, TIME]),
        (
            "[f(a=[1, -2.5], b={'k': None}, c=True)]",
            None,
            [("f", {"a": [1, -2.5], "b": {"k": None}, "c": True})],
        ),
        ("[tools.search(q='x')]", None, [("tools.search", {"q": "x"})]),
        ("[f(1)]", "[f(1)]", []),  # positional arguments have no names
        ("[f(a=x)]", "[f(a=x)]", []),  # not a literal
        ("[f(a={1, 2})]", "[f(a={1, 2})]", []),  # a set is not JSON
        ("[f(a=1e999)]", "[f(a=1e999)]", []),
        ("[f(**k)]", "[f(**k)]", []),
        ("[f(a='\\ud800')]", None, [("f", {"a": "\ud800"})]),
        ("[1, 2]", "[1, 2]", []),
        ("[see here](http://x)", "[see here](http://x)", []),
        ("The answer is [f(a=1)]", "The answer is [f(a=1)]", []),
    ],
}


def _read(calls):
    return [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize("name,text,content,calls",
                         [(n, *c) for n, cases in CASES.items() for c in cases])  # fmt: skip
def test_each_format_reads_its_calls(name, text, content, calls):
    got_content, got_calls = extract(TOOL_PARSERS[name], text)
    assert got_content == content
    assert _read(got_calls) == calls
    for c in got_calls:  # arguments: strict JSON text (no NaN or Infinity), sendable as UTF-8
        json.loads(c.arguments, parse_constant=_not_json)
        c.arguments.encode("utf-8")
        c.name.encode("utf-8")


def _not_json(word):
    raise AssertionError(f"{word} in arguments")


def stream(name: str, text: str, cuts: list[int]):
    """Feed `text` in the pieces `cuts` makes: (the content sent, the calls sent)."""
    s, content, calls = ToolStream(TOOL_PARSERS[name]), "", []
    for n in [*sorted(cuts), None]:
        delta, new = s.feed(text if n is None else text[:n], final=n is None)
        content += delta
        calls += new
    return content, calls


PIECES = {  # whole calls, and the pieces of calls (cut anywhere, or broken)
    "hermes": [
        f"<tool_call>\n{W}\n</tool_call>",
        f"<tool_call>{T}",
        "<tool_call>",
        "</tool_call>",
        f"\n{W}\n",
        T,
        "<tool",
        "_call>",
        "{oops",
        "\n",
    ],
    "llama3_json": [W, T, "; ", "<|python_tag|>", "<|py", "{", "}", " "],
    "mistral": [
        f"[TOOL_CALLS][{W}]",
        "[TOOL_CALLS]get_time[ARGS]{}",
        "[TOOL_CALLS]",
        "[TOOL_",
        f"[{W}]",
        "get_time[ARGS]{}",
        "[ARGS]",
        "{",
        " ",
    ],
    "phi4_mini_json": [
        f"functools[{W}]",
        "functools",
        "[",
        "]",
        W,
        T,
        ", ",
        "func",
        " ",
        "functools.reduce",
        "\n",
    ],
    "qwen3_coder": [
        f"<tool_call>\n{QW}\n</tool_call>",
        f"<tool_call>{QT}",
        QW,
        QT,
        "<tool_call>",
        "</tool_call>",
        "<function=f>",
        "</function>",
        "<parameter=a>\n1\n</parameter>",
        "<parameter=",
        "<tool",
        "<func",
        "\n",
    ],
    "pythonic": [
        '[get_weather(city="Paris", days=3)]',
        "[get_time(), get_time()]",
        "[",
        "]",
        'get_weather(city="Paris", days=3)',
        "get_time()",
        ", ",
        "(",
        " ",
    ],
}


@st.composite
def answers(draw):
    name = draw(st.sampled_from(sorted(PIECES)))
    words = st.sampled_from(["Sure.", "ok", " ", "\n", "a<b", "[x]", "{y}", "tool"])
    pieces = st.sampled_from(PIECES[name])
    parts = draw(st.lists(st.one_of(pieces, pieces, words), max_size=10))
    text = "".join(parts)
    every = draw(st.booleans())  # a token per character, or a few long tokens
    cuts = list(range(len(text))) if every else draw(st.lists(st.integers(0, len(text)),
                                                              max_size=8))  # fmt: skip
    return name, text, cuts


@settings(max_examples=600, deadline=None)
@given(answers())
def test_a_stream_adds_up_to_the_whole_answer(case):
    name, text, cuts = case
    content, calls = stream(name, text, cuts)
    want_content, want_calls = extract(TOOL_PARSERS[name], text)
    assert content == (want_content or "")
    assert calls == want_calls


def test_a_stream_sends_content_early_and_each_call_once_complete():
    text = f"Let me look.\n<tool_call>\n{W}\n</tool_call>\n<tool_call>\n{T}\n</tool_call>"
    s = ToolStream(TOOL_PARSERS["hermes"])
    assert s.feed("Let me look.\n<tool", False) == ("Let me look.\n", [])  # "<tool" held
    first = text.index("</tool_call>") + len("</tool_call>")
    delta, new = s.feed(text[: first - 1], False)
    assert (delta, new) == ("", [])  # not closed yet
    delta, new = s.feed(text[:first], False)
    assert delta == "" and _read(new) == [WEATHER]  # sent as soon as it is whole
    delta, new = s.feed(text, True)
    assert delta == "" and _read(new) == [TIME]
    plain = ToolStream(TOOL_PARSERS["llama3_json"])
    assert plain.feed("  ", False) == ("", [])  # blank: not known yet
    assert plain.feed("  Hi", False) == ("  Hi", [])  # not a call: content at once


def test_mistral_calls_get_ids_its_chat_templates_accept():
    """Mistral's templates refuse a later turn whose call ids are not 9 letters or digits."""
    from expertswitch.server.serving import Target, _call_json, _Choice, _Job
    from expertswitch.server.tool_parsers import ToolCall

    def ids(parser):
        job = _Job("chat", Target(None, "base"), [], None, [], [], [], False,
                   parser=TOOL_PARSERS[parser], id="chatcmpl-" + "ab" * 16,
                   short_call_ids=parser == "mistral")  # fmt: skip
        return [_call_json(job, _Choice("r", i, 0), k, ToolCall("f", "{}"))["id"]
                for i in range(3) for k in range(3)]  # fmt: skip

    mistral = ids("mistral")
    assert len(set(mistral)) == 9 and all(len(x) == 9 and x.isalnum() for x in mistral)
    assert len(set(ids("hermes"))) == 9


def test_an_answer_cut_short_keeps_length():
    """Calls read from an answer that max_tokens cut: finish_reason stays "length" (the
    client must know the answer may be missing calls); one that ended by itself:
    "tool_calls"; errors and aborts stay."""
    from expertswitch.server.serving import _called

    assert [_called(f) for f in ("stop", "length", "abort", "error")] == [
        "tool_calls", "length", "abort", "error"]  # fmt: skip


def test_qwen3_coder_values_are_typed_by_the_tools_schemas():
    """qwen3_coder's values are text; the request's schema of each parameter types them, as
    vLLM does, except that a value that does not read as its type stays text (vLLM turns a
    boolean "maybe" into false) — and so does a parameter no schema names."""
    props = {"n": {"type": "integer"}, "x": {"type": "number"}, "ok": {"type": "boolean"},
             "tags": {"type": "array"}, "opt": {"type": ["integer", "null"]},
             "obj": {"type": "object"}, "s": {"type": "string"}, "e": {"enum": ["a"]},
             "maybe": {"anyOf": [{"type": "null"}, {"type": "integer"}]}}  # fmt: skip
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": props}}}]  # fmt: skip
    parser = TOOL_PARSERS["qwen3_coder"].for_tools(tools)
    assert parser is not TOOL_PARSERS["qwen3_coder"] and not TOOL_PARSERS["qwen3_coder"].schemas

    def call(**values):
        body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in values.items())
        _, calls = extract(parser, f"<tool_call>\n<function=f>\n{body}</function>\n</tool_call>")
        return json.loads(calls[0].arguments)

    assert call(n="42", x="2.5", ok="True", tags='["a", 1]', opt="7", obj="{'k': None}",
                s="007", e="a", other="12") == {
        "n": 42, "x": 2.5, "ok": True, "tags": ["a", 1], "opt": 7, "obj": {"k": None},
        "s": "007", "e": "a", "other": "12"}  # fmt: skip
    assert call(x="3.0", ok="false", n="null", s="null", maybe="4") == {
        "x": 3, "ok": False, "n": None, "s": None, "maybe": 4}  # fmt: skip
    odd = [{"type": "function", "function": {"name": "f", "parameters": "x"}}, "junk",
           {"type": "function", "function": {"name": ["f"]}}]  # fmt: skip
    loose = TOOL_PARSERS["qwen3_coder"].for_tools(odd)  # (odd tools: untyped, no error)
    assert json.loads(extract(loose, "<function=f><parameter=n>5</parameter></function>")[1][0]
                      .arguments) == {"n": "5"}  # fmt: skip
    assert call(n="three", x="nan", ok="maybe", tags="[1, 2", obj="1e999") == {
        "n": "three", "x": "nan", "ok": "maybe", "tags": "[1, 2", "obj": "1e999"}  # fmt: skip
    _, calls = extract(parser, "<function=g>\n<parameter=n>\n5\n</parameter>\n</function>")
    assert json.loads(calls[0].arguments) == {"n": "5"}  # another tool's: no schema, text
    assert TOOL_PARSERS["qwen3_xml"].for_tools(tools).name == "qwen3_xml"


def test_a_stream_reads_each_complete_block_once(monkeypatch):
    """A stream parses its answer again at every token; a complete qwen3_coder block (whose
    values typing makes costly) is read once, however many tokens follow it — the quadratic
    cost of re-reading them measured 9.7 s for 100 calls fed 4 characters at a time."""
    from expertswitch.server.tool_parsers import Qwen3Coder

    parser = TOOL_PARSERS["qwen3_coder"].for_tools([])
    reads = []
    real = Qwen3Coder._functions
    monkeypatch.setattr(Qwen3Coder, "_functions", lambda self, body: reads.append(body)
                        or real(self, body))  # fmt: skip
    text = "".join(f"<tool_call>\n<function=f>\n<parameter=a>\n{i}\n</parameter>\n</function>\n"
                   "</tool_call>\n" for i in range(30))  # fmt: skip
    content, calls = "", []
    stream = ToolStream(parser)
    for n in [*range(1, len(text), 3), None]:
        delta, new = stream.feed(text if n is None else text[:n], final=n is None)
        content, calls = content + delta, calls + new
    assert [json.loads(c.arguments)["a"] for c in calls] == [str(i) for i in range(30)]
    assert len(reads) == len(set(reads)) == 30
