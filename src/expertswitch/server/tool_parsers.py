"""Tool calls read out of a model's answer, for tool_choice "auto" (vLLM's
`--enable-auto-tool-choice --tool-call-parser NAME`): the model decides whether to call, and
writes its calls in its own format, which a parser turns into OpenAI's `tool_calls`.

    hermes       <tool_call>{"name": ..., "arguments": {...}}</tool_call> ...   (Qwen2/2.5/3,
                 Hermes, and most models fine-tuned on Hermes' format)
    llama3_json  {"name": ..., "parameters": {...}}; ...  opening the answer, after
                 <|python_tag|> or not (Llama 3.1-3.3)
    mistral      [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]  or the newer
                 [TOOL_CALLS]name[ARGS]{...}  (Mistral, Mixtral)
    pythonic     [get_weather(city="Paris"), ...]  opening the answer (Llama 3.2, Llama 4)
    phi4_mini_json  functools[{"name": ..., "arguments": {...}}, ...]  (Phi-4-mini)
    qwen3_coder  <tool_call><function=get_weather><parameter=city>Paris</parameter>...
                 </function></tool_call>  (Qwen3-Coder; also named qwen3_xml, as in vLLM):
                 each value is text, typed by the request's schema of that parameter

    parser = TOOL_PARSERS["hermes"]
    content, calls = extract(parser, text)     # a whole answer
    stream = ToolStream(parser)                # an answer as it grows
    content_delta, new_calls = stream.feed(text_so_far, final=False)

hermes, mistral and qwen3_coder read the answer with its special tokens kept (the server
decodes their answers with skip_special_tokens off, as vLLM does: some of those models'
markers are special tokens); llama3_json and pythonic read it as the request decodes it
(<|python_tag|> skipped). What is not a well-formed call stays content — a malformed call
block included — so nothing the model wrote is dropped. Streaming sends text as content until
a call may begin (a partial marker is held back), then each call whole, once it is complete;
the content and calls a stream sends add up to what `extract` finds in the whole answer.
"""

from __future__ import annotations

import ast
import functools
import json
from dataclasses import dataclass


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # the arguments object as JSON text


class ToolParser:
    """One model family's format. `start(text)`: where calls begin (None: not, or not yet
    known); `safe(text)`: how much of a text with no start yet can go out as content;
    `parse(part, final)`: (calls, rest) for `part` = the text from the start — with final
    False only the calls already complete, which stay the first calls of the final parse;
    rest (final) is the text of `part` that is not a call."""

    name = ""
    keeps_special_tokens = False  # the answer is decoded with special tokens kept (markers)

    def start(self, text: str) -> int | None:
        raise NotImplementedError

    def safe(self, text: str) -> int:
        raise NotImplementedError

    def parse(self, part: str, final: bool) -> tuple[list[ToolCall], str]:
        raise NotImplementedError

    def for_tools(self, tools: list[dict] | None) -> ToolParser:
        """This parser for a request with these tools (validated: each {"type": "function",
        "function": {...}}); a format whose values are typed by the schemas keeps them."""
        return self


class _Marked(ToolParser):
    """Calls open with a marker anywhere in the answer; text before it is content."""

    marker = ""

    def start(self, text: str) -> int | None:
        at = text.find(self.marker)
        return None if at < 0 else at

    def safe(self, text: str) -> int:
        return len(text) - partial_suffix(text, self.marker)


class _Opening(ToolParser):
    """Calls only open the answer (after blanks): an answer that opens otherwise is content."""

    openers: tuple[str, ...] = ()

    def _opens(self, text: str) -> bool | None:
        """True: calls open `text`; False: they cannot; None: not known yet."""
        head = text.lstrip()
        if not head:
            return None
        if any(head.startswith(o) for o in self.openers):
            return True
        return None if any(o.startswith(head) for o in self.openers) else False

    def start(self, text: str) -> int | None:
        return len(text) - len(text.lstrip()) if self._opens(text) else None

    def safe(self, text: str) -> int:
        return len(text) if self._opens(text) is False else 0


class Hermes(_Marked):
    name, marker, end = "hermes", "<tool_call>", "</tool_call>"
    keeps_special_tokens = True

    def parse(self, part: str, final: bool) -> tuple[list[ToolCall], str]:
        calls, rest, at = [], [], 0
        while at < len(part):
            begin = part.find(self.marker, at)
            if begin < 0:
                rest.append(part[at:])
                break
            rest.append(part[at:begin])
            close = part.find(self.end, begin)
            if close < 0 and not final:
                break  # (the last call is not complete yet)
            stop = len(part) if close < 0 else close + len(self.end)
            # (an unclosed last call counts when its JSON is whole: the answer may have ended
            # at EOS or max_tokens right after it, as vLLM reads it)
            call = _call(part[begin + len(self.marker) : close if close >= 0 else len(part)])
            if call is None:
                rest.append(part[begin:stop])
            else:
                calls.append(call)
            at = stop
        return calls, "".join(r for r in rest if r.strip())


class Llama3Json(_Opening):
    name, tag = "llama3_json", "<|python_tag|>"
    openers = ("{", tag)

    def parse(self, part: str, final: bool) -> tuple[list[ToolCall], str]:
        at = len(self.tag) if part.startswith(self.tag) else 0
        calls, done = [], at
        while True:
            while at < len(part) and (part[at].isspace() or part[at] == ";"):
                at += 1  # (calls are separated by "; ")
            if at == len(part):
                return calls, ""
            try:
                obj, end = _DECODER.raw_decode(part, at)
            except (ValueError, RecursionError):
                break  # not JSON, or not whole yet
            call = _call_of(obj)
            if call is None:
                break
            calls.append(call)
            at = done = end
        if not calls:
            return [], part
        return calls, part[done:]


class Mistral(_Marked):
    name, marker = "mistral", "[TOOL_CALLS]"
    keeps_special_tokens = True
    args, call_id = "[ARGS]", "[CALL_ID]"

    def parse(self, part: str, final: bool) -> tuple[list[ToolCall], str]:
        if not final:
            return [], ""  # (sent whole, at the end)
        body = part[len(self.marker) :].strip()
        calls: list[ToolCall] = []
        if body[:1] in ("[", "{"):  # [TOOL_CALLS][{"name": ..., "arguments": ...}, ...]
            try:
                obj, end = _DECODER.raw_decode(body)
            except (ValueError, RecursionError):
                return [], part
            calls = [c for c in map(_call_of, obj if isinstance(obj, list) else [obj]) if c]
            if len(calls) != (len(obj) if isinstance(obj, list) else 1):
                return [], part
            return calls, body[end:] if body[end:].strip() else ""
        for piece in body.split(self.marker):  # name[ARGS]{...}[TOOL_CALLS]name[ARGS]{...}
            name, sep, args = piece.partition(self.args)
            name = name.split(self.call_id)[0].strip()
            call = _call_of({"name": name, "arguments": _loads(args)}) if sep else None
            if call is None or not name:
                return [], part
            calls.append(call)
        return calls, ""


class Pythonic(_Opening):
    name, openers = "pythonic", ("[",)

    def parse(self, part: str, final: bool) -> tuple[list[ToolCall], str]:
        if not final:
            return [], ""
        try:
            tree = ast.parse(part.strip(), mode="eval").body
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            return [], part
        if not isinstance(tree, ast.List) or not tree.elts:
            return [], part
        calls = []
        for node in tree.elts:
            if not isinstance(node, ast.Call) or node.args:
                return [], part
            try:
                name = ast.unparse(node.func)
                kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
            except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
                return [], part
            args = None if None in kwargs else json_text(kwargs)  # (None: **kwargs, or a set,
            if args is None or not all(p.isidentifier() for p in name.split(".")):  # bytes...)
                return [], part  # (or a call of something that is not a name)
            calls.append(ToolCall(name, args))
        return calls, ""


class Phi4MiniJson(_Marked):
    """Phi-4-mini's calls: functools[{"name": ..., "arguments": {...}}, ...] (vLLM's
    phi4_mini_json), sent whole at the end. Unlike vLLM's, the text before the list stays
    content and a list nested in the arguments does not end it."""

    name, marker = "phi4_mini_json", "functools"

    def _opens(self, text: str, at: int) -> bool | None:
        """Whether the "functools" at `at` opens the calls (blanks, then "["), None: not
        known yet (the text ends before its next non-blank character)."""
        rest = text[at + len(self.marker) :].lstrip()
        return rest.startswith("[") if rest else None

    def start(self, text: str) -> int | None:
        at = text.find(self.marker)
        while at >= 0:  # (the word in prose — functools.reduce — is content)
            opens = self._opens(text, at)
            if opens is not False:
                return at if opens else None
            at = text.find(self.marker, at + 1)
        return None

    def safe(self, text: str) -> int:
        at = text.find(self.marker)
        while at >= 0:
            if self._opens(text, at) is None:
                return at  # (held back until its next character tells)
            at = text.find(self.marker, at + 1)
        return super().safe(text)

    def parse(self, part: str, final: bool) -> tuple[list[ToolCall], str]:
        if not final:
            return [], ""  # (sent whole, at the end)
        body = part[len(self.marker) :].lstrip()
        if not body.startswith("["):
            return [], part
        try:
            obj, end = _DECODER.raw_decode(body)
        except (ValueError, RecursionError):
            return [], part
        calls = [c for c in map(_call_of, obj) if c] if isinstance(obj, list) else []
        if not calls or len(calls) != len(obj):
            return [], part
        return calls, body[end:] if body[end:].strip() else ""


class Qwen3Coder(ToolParser):
    """Qwen3-Coder's XML calls, each in a <tool_call> block (or a bare <function=...> block,
    which vLLM reads too):

        <tool_call>
        <function=get_weather>
        <parameter=city>
        Paris
        </parameter>
        <parameter=days>
        3
        </parameter>
        </function>
        </tool_call>

    A value is the text between the tags less one newline either side; the request's schema
    of its parameter types it, as vLLM does: string (and enum, ...) as is, integer and number
    parsed (a number with no fraction as an integer), boolean true/false, object and array
    read as JSON (else as a Python literal); "null" is null; an untyped or unknown parameter
    stays text. Unlike vLLM, a value that does not read as its type (a boolean "maybe", an
    integer "three") stays text rather than turning into false, and a call cut short before
    its </function> (max_tokens) stays content rather than being sent with a truncated
    value."""

    name = "qwen3_coder"
    keeps_special_tokens = True
    wrap, unwrap = "<tool_call>", "</tool_call>"
    fn, fn_end, param, param_end = "<function=", "</function>", "<parameter=", "</parameter>"

    def __init__(self, schemas: dict[str, dict] | None = None):
        self.schemas = schemas or {}  # tool name → {parameter: its schema}
        # a block's calls by its text: a stream parses its answer again at every token, and
        # a complete block reads the same every time (typing values is the costly part)
        self._read: dict[str, list[ToolCall] | None] = {}

    def for_tools(self, tools: list[dict] | None) -> ToolParser:
        schemas = {}
        for t in tools or []:  # (checked by the server; any odd part read as untyped)
            fn = t.get("function") if isinstance(t, dict) else None
            fn = fn if isinstance(fn, dict) else {}
            params = fn.get("parameters")
            props = params.get("properties") if isinstance(params, dict) else None
            if isinstance(fn.get("name"), str):
                schemas[fn["name"]] = props if isinstance(props, dict) else {}
        return type(self)(schemas)

    def start(self, text: str, at: int = 0) -> int | None:
        found = [i for i in (text.find(self.wrap, at), text.find(self.fn, at)) if i >= 0]
        return min(found) if found else None

    def safe(self, text: str) -> int:
        return len(text) - max(partial_suffix(text, self.wrap), partial_suffix(text, self.fn))

    def parse(self, part: str, final: bool) -> tuple[list[ToolCall], str]:
        calls, rest, at = [], [], 0
        while at < len(part):
            begin = self.start(part, at)
            if begin is None:
                rest.append(part[at:])
                break
            rest.append(part[at:begin])
            wrapped = part.startswith(self.wrap, begin)
            end = self.unwrap if wrapped else self.fn_end
            close = part.find(end, begin)
            if close < 0 and not final:
                break  # (the last block is not complete yet)
            stop = len(part) if close < 0 else close + len(end)
            if wrapped:  # (an unclosed block at the end: up to the end)
                body = part[begin + len(self.wrap) : close if close >= 0 else len(part)]
            else:
                body = part[begin:stop]
            if body not in self._read:
                if len(self._read) > 256:  # (one answer's blocks, or a shared parser's)
                    self._read.clear()
                self._read[body] = self._functions(body)
            found = self._read[body]
            if found is None:
                rest.append(part[begin:stop])  # (not a well-formed block: content)
            else:
                calls += found
            at = stop
        return calls, "".join(r for r in rest if r.strip())

    def _functions(self, body: str) -> list[ToolCall] | None:
        """The calls of a block's body (<function=...>...</function>, one or more), or None
        when it holds anything else or a function is not closed."""
        calls, at = [], 0
        while body[at:].strip():
            at += len(body[at:]) - len(body[at:].lstrip())
            close = body.find(self.fn_end, at)
            if not body.startswith(self.fn, at) or close < 0:
                return None
            call = self._call(body[at + len(self.fn) : close])
            if call is None:
                return None
            calls.append(call)
            at = close + len(self.fn_end)
        return calls or None

    def _call(self, inner: str) -> ToolCall | None:
        """What follows "<function=": the name, ">", then <parameter=P>VALUE</parameter>
        ... → a ToolCall (a parameter's close tag may be left out before the next parameter
        or the end, as vLLM reads it); None if it is not one."""
        name, sep, params = inner.partition(">")
        name = name.strip()
        if not sep or not name or "<" in name or not _utf8(name):
            return None
        schema = self.schemas.get(name, {})
        args, at = {}, 0
        while params[at:].strip():
            at += len(params[at:]) - len(params[at:].lstrip())
            if not params.startswith(self.param, at):
                return None
            key, sep, value = params[at + len(self.param) :].partition(">")
            if not sep or not key.strip() or "<" in key:
                return None
            nxt = [i for i in (value.find(self.param_end), value.find(self.param)) if i >= 0]
            cut = min(nxt) if nxt else len(value)
            text = value[:cut]
            text = text[1:] if text.startswith("\n") else text
            text = text[:-1] if text.endswith("\n") else text
            args[key.strip()] = _typed(text, schema.get(key.strip()))
            skip = len(self.param_end) if value.startswith(self.param_end, cut) else 0
            at += len(self.param) + len(key) + 1 + cut + skip
        text = json_text(args)
        return None if text is None else ToolCall(name, text)


class Qwen3Xml(Qwen3Coder):
    name = "qwen3_xml"  # (vLLM's second parser of the same format)


_TEXT_TYPES = ("string", "str", "text", "varchar", "char", "enum")


def _typed(text: str, schema):
    """A qwen3_coder value (text) as its parameter's schema types it (see Qwen3Coder)."""
    if text.lower() == "null":
        return None
    kind = schema.get("type") if isinstance(schema, dict) else None
    if kind is None and isinstance(schema, dict):  # anyOf/oneOf (pydantic's Optional[int]):
        branches = schema.get("anyOf") or schema.get("oneOf") or []  # the first typed branch
        kinds = [b.get("type") for b in branches if isinstance(b, dict)]  # that is not null
        kind = next((k for k in kinds if k not in (None, "null")), None)
    if isinstance(kind, list):  # ["integer", "null"]: the first that is not null
        kind = next((k for k in kind if k != "null"), None)
    kind = str(kind).strip().lower() if kind is not None else "string"
    if kind in _TEXT_TYPES:
        return text
    value = None
    if kind.startswith(("int", "uint", "long", "short", "unsigned")):
        try:
            value = int(text.strip())
        except ValueError:
            return text
    elif kind.startswith(("num", "float", "double")):
        try:
            value = float(text.strip())
        except ValueError:
            return text
        if value.is_integer():
            value = int(value)
    elif kind in ("boolean", "bool", "binary"):
        word = text.strip().lower()
        return word == "true" if word in ("true", "false") else text
    else:  # object, array, ...: JSON, else a Python literal, else the text
        value = _loads(text)
        if value is None:
            try:
                value = ast.literal_eval(text.strip())
            except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
                return text
    return value if json_text(value) is not None else text


TOOL_PARSERS: dict[str, ToolParser] = {p.name: p for p in (Hermes(), Llama3Json(), Mistral(),
                                                           Pythonic(), Phi4MiniJson(),
                                                           Qwen3Coder(), Qwen3Xml())}  # fmt: skip


def extract(parser: ToolParser, text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a whole answer: content None when it is blank beside calls."""
    at = parser.start(text)
    if at is None:
        return text, []
    calls, rest = parser.parse(text[at:], final=True)
    if not calls:
        return text, []
    content = text[:at] + rest
    return (content if content.strip() else None), calls


class ToolStream:
    """One streamed answer's content and calls, as they become known (see the module)."""

    def __init__(self, parser: ToolParser):
        self.parser = parser
        self.content = ""  # sent so far
        self.calls: list[ToolCall] = []  # sent so far

    def feed(self, text: str, final: bool) -> tuple[str, list[ToolCall]]:
        """(content to send, new calls) now that the answer reads `text`."""
        if final:
            content, calls = extract(self.parser, text)
            content = content or ""
        else:
            at = self.parser.start(text)
            if at is None:
                content, calls = text[: self.parser.safe(text)], []
            else:
                content, calls = text[:at], self.parser.parse(text[at:], final=False)[0]
        # blank content waits (it may be all there is beside calls: then none is sent; an
        # answer without calls is all content); what was sent is a prefix of what is found
        # later (a start is never before text that went out)
        sent = content.strip() or (final and not calls)
        delta = content[len(self.content) :] if sent else ""
        self.content += delta
        new = calls[len(self.calls) :]
        self.calls += new
        return delta, new


def partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that begins `marker` (and is shorter)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def _not_json(word: str):
    raise ValueError(f"{word} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_not_json)  # (NaN and Infinity are not JSON)


def _loads(text: str):
    try:
        return _DECODER.decode(text)
    except (ValueError, RecursionError):
        return None


def json_text(obj) -> str | None:
    """JSON text of `obj` (non-ASCII as is, as vLLM writes arguments), or None for what JSON
    cannot hold (1e400 read as inf, a set...). A string with a lone surrogate (read from a
    "\\ud800" escape) cannot be sent as UTF-8: the text then escapes it, as JSON allows."""
    try:
        text = json.dumps(obj, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return None
    return text if _utf8(text) else json.dumps(obj, allow_nan=False)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@functools.lru_cache(maxsize=256)  # (a stream reads its complete blocks at every token)
def _call(body: str) -> ToolCall | None:
    return _call_of(_loads(body.strip()))


def _call_of(obj) -> ToolCall | None:
    """{"name": ..., "arguments" (or "parameters"): {...}} → a ToolCall; None if it is not
    one. Arguments given as JSON text are read; missing ones are none ({})."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        args = _loads(args)
    text = json_text(args) if isinstance(args, dict) else None
    ok = text is not None and _utf8(obj["name"])  # (a name is sent as it is)
    return ToolCall(obj["name"], text) if ok else None
