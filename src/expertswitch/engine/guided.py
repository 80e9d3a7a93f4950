"""Structured outputs (vLLM's `structured_outputs` / `guided_json` / `guided_choice`, OpenAI's
`response_format`): the answer is made to be one of given strings, any JSON object, or JSON
that a schema describes, by banning at every step the tokens that could not continue it.

How: the constraint is a character-level automaton (`Grammar`: a pushdown machine for JSON,
driven by the schema; a prefix set for choices) whose states are hashable tuples. Each
tokenizer's vocabulary is held once as a character trie of the text every token adds
(`TokenIndex`); the tokens allowed in a state are the trie's words the automaton can read from
it, found by one walk that prunes at the first character it refuses, and memoised per state
(inside a JSON string, or between values, states repeat from step to step). A request's
`Guide` holds its state and advances it by the text of each token it samples; EOS is allowed
exactly where the answer may end, and the request stops by itself once nothing may follow
(a closed JSON object, a whole choice).

The JSON schema subset: `type` (one or a list), `enum`, `const`, `properties` (generated in
their order; `required` ones always, the others may be left out), `additionalProperties` (an
object without `properties` takes any keys), `items`, `minItems`, `maxItems`, `minLength`,
`maxLength`, `anyOf`/`oneOf` whose branches start with different characters (pydantic's
`Optional[X]`, `Union[int, str]`), object branches of an `anyOf`/`oneOf` as a tagged union
when each starts with the same required key holding its own strings (pydantic's discriminated
unions; vLLM's tool calls, `{"name": {"enum": ["add"]}, "parameters": ...}`), `$ref` into
`$defs`/`definitions` (recursion included), a one-element `allOf`, `minimum`, `maximum`,
`exclusiveMinimum` and `exclusiveMaximum` (numbers or draft 4's booleans: pydantic's
`Field(ge=0, lt=1)`; every prefix of a bounded number can still end inside the bounds, and
such numbers are written without an exponent), a string's `pattern` and `format` (date,
time, date-time, uuid, email, ipv4, ipv6, hostname, uri, duration; "password" is any
string): engine/regex.py
(such strings are written without \\u escapes), `uniqueItems` for items that are strings,
numbers, booleans or null (pydantic's set[X]: an item equal to an earlier one, as JSON schema
compares them, is refused where it would end, an enum value or literal already used before it
starts; a string or bounded number whose every continuation repeats an earlier item, such as
a maxLength-1 string with every letter used, ends the request with an error); annotations
(`title`, `description`, `default`, ...) are ignored. Any other keyword (`multipleOf`,
another format, ...) is refused with an error naming it: the answer would not be held to it.
Tokens whose text is not whole characters (a lone byte of a UTF-8 sequence) are never allowed
under a constraint. An answer starts with its value (no blanks first), and a request whose
answer nothing can extend stops there, even before min_tokens or with ignore_eos. Keys and
enum strings are written as themselves (`"café"`, not `"caf\\u00e9"`). Whitespace between
JSON tokens runs to at most `whitespace` characters (default 2; vLLM's
`disable_any_whitespace` is 0): a model that never
saw JSON otherwise fills its answer with blank lines (measured on the tiny family: 16 allowed
blanks gave 9 of 12 answers cut at max_tokens).
"""

from __future__ import annotations

import itertools
import json
import math
import re
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch

from expertswitch.engine.regex import FORMATS, Regex, format_regex
from expertswitch.errors import ConfigError

WHITESPACE = 2  # consecutive blank characters allowed between JSON tokens by default
_WS = " \t\n\r"
_DIGITS = "0123456789"
_HEX = "0123456789abcdefABCDEF"
_ESCAPES = '"\\/bfnrt'
_ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment",
                "readOnly", "writeOnly", "deprecated", "$defs", "definitions"}  # fmt: skip
_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
_BOUNDS = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}
BOUND_DIGITS = 100  # characters a number's bound may take (repr of a float: at most 24)
BOUNDED_DIGITS = 400  # characters a bounded number may take
_FREE_FORMATS = ("password",)  # formats every string has (a hint for forms)
_UNESCAPE = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r",
             "t": "\t"}  # fmt: skip


def _json_type(v) -> set[str]:
    """The JSON schema types a Python value (from JSON) has."""
    if isinstance(v, bool):
        return {"boolean"}
    if isinstance(v, int):
        return {"integer", "number"}
    if isinstance(v, float):
        return {"number"} | ({"integer"} if v.is_integer() else set())
    return {str: {"string"}, type(None): {"null"}, list: {"array"},
            dict: {"object"}}.get(type(v), set())  # fmt: skip


_FIRST = {"object": "{", "array": "[", "string": '"', "number": "-" + _DIGITS,
          "integer": "-" + _DIGITS, "boolean": "tf", "null": "n"}  # fmt: skip


@dataclass
class StructuredOutputsParams:
    """What the answer must be (vLLM's StructuredOutputsParams): exactly one of
    json (a JSON schema, as a dict or its text), json_object (any JSON object) or choice (one of
    these strings). regex and grammar are named so that asking for them gets a clear error."""

    json: dict | str | None = None
    json_object: bool = False
    choice: list[str] | None = None
    regex: str | None = None
    grammar: str | None = None
    whitespace: int = WHITESPACE  # blank characters in a row between JSON tokens
    disable_any_whitespace: bool = False  # vLLM's name for whitespace=0
    # vLLM's other keys: accepted where they change nothing here (no fallback backend; only
    # declared properties are generated anyway), refused where they would
    disable_fallback: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    structural_tag: str | None = None
    # a reasoning model thinks first: the answer is free until it writes this text (e.g.
    # "</think>"), and held to the constraint from there (vLLM applies structured outputs
    # after the reasoning parser's end of thinking the same way)
    reasoning_end: str | None = None
    grammar_: Grammar | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        for name in ("regex", "grammar", "structural_tag", "whitespace_pattern"):
            if getattr(self, name) is not None:
                raise ConfigError(f"structured output by {name} is not supported: use json (a "
                                  "JSON schema), json_object or choice (and whitespace: the "
                                  "blanks allowed in a row)")  # fmt: skip
        for name in ("json_object", "disable_any_whitespace", "disable_fallback",
                     "disable_additional_properties"):  # fmt: skip
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        given = [n for n in ("json", "json_object", "choice")
                 if getattr(self, n) not in (None, False)]  # fmt: skip
        if len(given) != 1:
            raise ConfigError("structured outputs take exactly one of json (a JSON schema), "
                              f"json_object or choice; got {given or 'none'}")  # fmt: skip
        end = self.reasoning_end
        if end is not None and (not isinstance(end, str) or not end):
            raise ConfigError(f"reasoning_end must be a non-empty string, got {end!r}")
        if self.disable_any_whitespace:
            self.whitespace = 0
        ws = self.whitespace
        if not isinstance(ws, int) or isinstance(ws, bool) or not 0 <= ws <= 64:
            raise ConfigError(f"whitespace must be an integer from 0 to 64, got {ws!r}")
        if self.choice is not None:
            if (not isinstance(self.choice, (list, tuple)) or not self.choice
                    or not all(isinstance(c, str) and c for c in self.choice)):  # fmt: skip
                raise ConfigError("choice must be a non-empty list of non-empty strings")
            _check_choices(self.choice, "choice")
            self.choice = list(self.choice)
            self.grammar_ = _compiled(("choice", tuple(sorted(set(self.choice)))))
        elif self.json_object:
            self.grammar_ = _compiled(("json", json.dumps({"type": "object"}), ws))
        else:
            schema = self.json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except ValueError as e:
                    raise ConfigError(f"the JSON schema is not valid JSON: {e}") from None
            if not isinstance(schema, dict):
                raise ConfigError("a JSON schema is an object (a dict), e.g. "
                                  '{"type": "object", "properties": {...}}')  # fmt: skip
            self.json = schema
            try:  # (key order kept: properties come in it; no NaN / Infinity, not JSON)
                text = json.dumps(schema, allow_nan=False)
            except (TypeError, ValueError, RecursionError) as e:
                raise ConfigError(f"the JSON schema cannot be written as JSON: {e}") from None
            self.grammar_ = _compiled(("json", text, ws), schema)


MAX_CHOICES = 4096  # choices (or enum values) in one constraint: each step filters them


def _check_choices(values: list, what: str) -> None:
    if len(values) > MAX_CHOICES:
        raise ConfigError(f"{what} has {len(values)} values; at most {MAX_CHOICES} are "
                          "supported (each generated character filters them)")  # fmt: skip


_GRAMMARS: dict[tuple, Grammar] = {}  # the last few compiled (a server sees one schema often)
_GRAMMARS_LOCK = threading.Lock()


def _compiled(key: tuple, schema: dict | None = None) -> Grammar:
    """The Grammar of ("choice", texts) or ("json", schema text, whitespace), compiled once."""
    with _GRAMMARS_LOCK:
        g = _GRAMMARS.pop(key, None)
    if g is None:
        if key[0] == "choice":
            g = Grammar.choices(list(key[1]))
        else:
            g = Grammar.schema(json.loads(key[1]) if schema is None else schema, key[2])
    with _GRAMMARS_LOCK:
        _GRAMMARS[key] = g  # most recent last
        while len(_GRAMMARS) > 32:
            del _GRAMMARS[next(iter(_GRAMMARS))]
    return g


# ---- the automaton ---------------------------------------------------------------------------
# A state is (stack, blanks): stack a tuple of frames (tuples), the innermost last; blanks the
# whitespace characters just read. Frames:
#   ("V", node)                     a value of schema node `node` is expected
#   ("S", node, esc, n[, states])   inside a string: esc 0, -1 after "\", k>0 hex digits to go;
#                                   n characters so far (counted only under min/maxLength or
#                                   a pattern); under a pattern its NFA's live states
#   ("N", node, phase[, text])      inside a number (phases below); under bounds also the
#                                   number's text so far
#   ("L", rest)                     inside true / false / null: the characters still to come
#   ("C", candidates, prefix)       one of exact texts (enum, const, declared keys, choices)
#   ("O", node, phase, at, value)   an object: phase "open" | "key" | "colon" | "value" |
#                                   "next"; `at` the next declared property; `value` the node
#                                   of the value being read
#   ("A", node, phase, count)       an array: phase "open" | "item" | "value" | "next"
#   ("A", node, phase, count, seen, item)  an array of uniqueItems: also the values of its
#                                   items so far (`_item_key`) and the text of the item being
#                                   read (its last character too, while it is on top)
# A "C" frame inside an object stands for a key: its candidates are `"name"` texts and the
# object's next value node is found from which one was read.
_NUM_NEXT = {  # phase -> {character class: next phase}
    "start": {"minus": "sign", "zero": "zero", "digit19": "int"},
    "sign": {"zero": "zero", "digit19": "int"},
    "zero": {"point": "dot", "exp": "e"},
    "int": {"digit": "int", "point": "dot", "exp": "e"},
    "dot": {"digit": "frac"},
    "frac": {"digit": "frac", "exp": "e"},
    "e": {"sign": "esign", "digit": "exp"},
    "esign": {"digit": "exp"},
    "exp": {"digit": "exp"},
}
_NUM_END = {"zero", "int", "frac", "exp"}


@dataclass(frozen=True)
class _Node:
    types: frozenset | None = None  # None: any JSON value
    choices: tuple | None = None  # exact texts (enum / const)
    alts: tuple | None = None  # anyOf branches (node ids), told apart by their first character
    props: tuple = ()  # ((json text of the key, node id, required), ...)
    free_keys: bool = True  # an object without declared properties: any keys
    extra: int = 0  # the node of free keys' values
    items: int = 0  # the node of array items
    min_items: int = 0
    max_items: int | None = None
    min_len: int = 0
    max_len: int | None = None
    # a tagged union of objects (anyOf / oneOf whose branches start with the same required
    # key holding distinct strings: pydantic's discriminated unions, vLLM's tool calls):
    # ((the tag's JSON text, the branch's node id), ...); once the tag is read, the object
    # goes on as that branch
    tags: tuple | None = None
    # a number's bounds: (low, low exclusive, high, high exclusive), None ends unbounded
    bounds: tuple | None = None
    pattern: Regex | None = None  # a string's pattern or format
    # uniqueItems: True; and, when the items can take only some values (enum, const,
    # booleans, null), those values' `_item_key`s, so that no item may start once all are used
    unique: bool = False
    unique_pool: frozenset | None = None


def _fits(x: Fraction, bounds: tuple) -> bool:
    lo, lo_x, hi, hi_x = bounds
    return (lo is None or x > lo or (x == lo and not lo_x)) and \
        (hi is None or x < hi or (x == hi and not hi_x))  # fmt: skip


def _meets(a: Fraction, b: Fraction | None, bounds: tuple, integer: bool) -> bool:
    """Whether some number x with a ≤ x < b (b None: no end; integers only with `integer`)
    is within `bounds`."""
    lo, lo_x, hi, hi_x = bounds
    low, strict = a, False  # the least candidate: low itself, or just above it if strict
    if lo is not None and (lo > a or (lo == a and lo_x)):
        low, strict = lo, lo_x
    if integer:  # the least integer above low (or at it, when low is one and not strict)
        n = math.floor(low)
        low, strict = Fraction(n + 1 if strict or n < low else n), False
    if b is not None and not low < b:
        return False
    if hi is None:
        return True
    return low < hi if strict or hi_x else low <= hi


def _reachable(text: str, bounds: tuple, integer: bool) -> bool:
    """Whether a JSON number that starts with `text` (no exponent) can end within bounds."""
    lo, lo_x, hi, hi_x = bounds
    if text.startswith("-"):  # x = −(what follows): the bounds mirrored
        text = text[1:]
        bounds = (None if hi is None else -hi, hi_x, None if lo is None else -lo, lo_x)
        if text == "":
            return _meets(Fraction(0), None, bounds, integer)
    elif text == "":
        return _meets(Fraction(0), None, bounds, integer) or _reachable("-", bounds, integer)
    if "." in text:
        whole, frac = text.split(".")
        base = Fraction(int(whole)) + Fraction(int(frac or 0), 10 ** len(frac))
        return _meets(base, base + Fraction(1, 10 ** len(frac)), bounds, integer)
    d = int(text)
    if d == 0:  # 0, or 0.…
        return _meets(Fraction(0), Fraction(1), bounds, integer)
    top = bounds[2]
    if top is None:  # (no upper end: a long enough number passes any lower one)
        return True
    k = 0
    while d * 10**k <= top:  # d followed by k more digits (then perhaps a fraction)
        if _meets(Fraction(d * 10**k), Fraction((d + 1) * 10**k), bounds, integer):
            return True
        k += 1
    return False


_DECODER = json.JSONDecoder()


_NUMBER = re.compile(r"(-?)([0-9]+)(?:\.([0-9]+))?(?:[eE]([+-]?[0-9]+))?")


def _item_key(text: str):
    """The JSON value an array item's text starts with, as uniqueItems compares values: by
    type, and numbers by exact value (1, 1.0 and 10e-1 are one value: their significant
    digits and decimal exponent, never expanded, so 1e999999999 costs what its text does);
    the text may run on past the value (a number is known to end at the character after
    it)."""
    number = _NUMBER.match(text)
    if number is None:
        value, _ = _DECODER.raw_decode(text)
        return ("string", value) if isinstance(value, str) else ("literal", value)
    sign, whole, frac, exp = number.groups()
    frac = frac or ""
    digits = (whole + frac).lstrip("0")
    if not digits:
        return ("number", 0)
    kept = digits.rstrip("0")
    return ("number", sign, kept, _exact_int(exp or "0") - len(frac) + len(digits) - len(kept))


def _exact_int(text: str) -> int:
    """int(text) for a signed run of digits of any length (int() refuses strings past 4300
    digits: a model may write an exponent that long)."""
    digits = text.lstrip("+-").lstrip("0") or "0"
    value = 0
    for i in range(0, len(digits), 4000):
        chunk = digits[i : i + 4000]
        value = value * 10 ** len(chunk) + int(chunk)
    return -value if text.startswith("-") else value


class Grammar:
    """A compiled constraint: nodes (0 is any JSON value) and the root's first frame."""

    def __init__(self, whitespace: int = WHITESPACE):
        self.whitespace = whitespace
        self.nodes: list[_Node] = [_Node()]
        self.root: tuple = ()
        self.serial = next(_SERIALS)  # its masks' key in _MASKS (ids of freed objects recur)

    def __getstate__(self):  # (sampling parameters travel to other ranks pickled)
        return {"nodes": self.nodes, "root": self.root, "whitespace": self.whitespace}

    def __setstate__(self, state):
        self.__init__(state["whitespace"])
        self.nodes, self.root = state["nodes"], state["root"]

    @classmethod
    def choices(cls, texts: list[str]) -> Grammar:
        g = cls()
        g.root = (("C", tuple(sorted(set(texts))), ""),)
        return g

    @classmethod
    def schema(cls, schema: dict, whitespace: int = WHITESPACE) -> Grammar:
        g = cls(whitespace)
        try:
            compiler = _Compiler(g, schema)
            g.root = (("V", compiler.node(schema, "#")),)
            compiler.check_progress()
        except RecursionError:
            raise ConfigError("the JSON schema is nested too deeply") from None
        except (TypeError, AttributeError) as e:  # a keyword's value of the wrong kind
            raise ConfigError(f"the JSON schema is malformed: {e}") from None
        return g

    # one character --------------------------------------------------------------------------
    def step(self, state: tuple, ch: str) -> tuple | None:
        """The state after reading `ch`, or None if `ch` cannot come here."""
        stack, blanks = state
        if not stack:
            return None
        top = stack[-1]
        kind = top[0]
        if len(stack) > 1 and len(stack[-2]) == 6 and stack[-2][2] == "value":
            arr = stack[-2]  # an item of a uniqueItems array: its text grows by ch
            stack = stack[:-2] + (arr[:5] + (arr[5] + ch,), top)
        if ch in _WS and kind in "VOA":  # (an O or A frame on top is between tokens)
            if blanks >= self.whitespace or len(stack) == 1 and kind == "V":
                return None  # (and the answer starts with its value, as clients expect)
            return stack, blanks + 1
        if kind == "V":
            return self._value(stack[:-1], top[1], ch)
        if kind == "S":
            return self._string(stack, top, ch)
        if kind == "N":
            return self._number(stack, top, ch)
        if kind == "L":
            if ch != top[1][0]:
                return None
            if len(top[1]) == 1:
                return self._done(stack[:-1])
            return stack[:-1] + (("L", top[1][1:]),), 0
        if kind == "C":
            return self._choice(stack, top, ch)
        if kind == "O":
            return self._object(stack, top, ch)
        return self._array(stack, top, ch)

    def _value(self, below: tuple, nid: int, ch: str) -> tuple | None:
        node = self.nodes[nid]
        if node.alts is not None:
            for alt in node.alts:
                nxt = self._value(below, alt, ch)
                if nxt is not None:
                    return nxt
            return None
        seen = below[-1][4] if below and len(below[-1]) == 6 else ()  # (a unique item)
        if node.choices is not None:
            cands = node.choices
            if seen:  # (values already used cannot start)
                cands = tuple(c for c in cands if _item_key(c) not in seen)
                if not cands:
                    return None
            return self._choice(below + (("C", cands, ""),), ("C", cands, ""), ch)
        types = node.types
        ok = (lambda t: True) if types is None else types.__contains__
        if ch == "{" and ok("object"):
            return below + (("O", nid, "open", 0, 0),), 0
        if ch == "[" and ok("array"):
            if node.unique:
                return below + (("A", nid, "open", 0, frozenset(), ""),), 0
            return below + (("A", nid, "open", 0),), 0
        if ch == '"' and ok("string"):
            if node.pattern is not None:
                return below + (("S", nid, 0, 0, node.pattern.initial()),), 0
            return below + (("S", nid, 0, 0),), 0
        if (ch == "-" or ch in _DIGITS) and (ok("number") or ok("integer")):
            top = ("N", nid, "start") if node.bounds is None else ("N", nid, "start", "")
            return self._number(below + (top,), top, ch)
        for word, t in (("true", "boolean"), ("false", "boolean"), ("null", "null")):
            if ch == word[0] and ok(t) and _item_key(word) not in seen:
                return below + (("L", word[1:]),), 0
        return None

    def _done(self, stack: tuple) -> tuple:
        """A value just ended: its container moves on."""
        if not stack:
            return (), 0
        top = stack[-1]
        if top[0] == "O":
            if top[2] == "colon":  # a free key's string: its ":" comes next
                return stack, 0
            return stack[:-1] + (("O", top[1], "next", top[3], 0),), 0
        node = self.nodes[top[1]]
        rest = ()
        if node.unique:  # the item just read must differ from every earlier one
            key = _item_key(top[5])
            if key in top[4]:
                return None
            rest = (top[4] | {key}, "")
        if node.max_items is None and node.min_items == 0 and not node.unique:
            return stack[:-1] + (("A", top[1], "next", 0),), 0  # uncounted: states repeat
        cap = max(node.min_items, node.max_items or 0)  # counts past it change nothing
        return stack[:-1] + (("A", top[1], "next", min(top[3] + 1, cap), *rest),), 0

    def _string(self, stack: tuple, top: tuple, ch: str) -> tuple | None:
        node = self.nodes[top[1]]
        if node.pattern is not None:
            return self._matched(stack, top, node, ch)
        _, nid, esc, n = top
        counted = node.min_len > 0 or node.max_len is not None
        below = stack[:-1]
        if esc == 0:
            if ch == '"':
                return self._done(below) if n >= node.min_len else None
            if ord(ch) < 0x20 or (counted and node.max_len is not None and n >= node.max_len):
                return None  # (an escape is one more character too: refused at its "\")
            if ch == "\\":
                return below + (("S", nid, -1, n),), 0
            return below + (("S", nid, 0, n + counted),), 0
        if esc == -1:
            if ch == "u":
                return below + (("S", nid, 4, n),), 0
            if ch not in _ESCAPES:
                return None
            return below + (("S", nid, 0, n + counted),), 0
        if ch not in _HEX:
            return None
        return below + (("S", nid, esc - 1, n + (esc == 1 and counted)),), 0

    def _matched(self, stack: tuple, top: tuple, node: _Node, ch: str) -> tuple | None:
        """A character of a string held to a pattern (its decoded character read by the
        NFA; no \\u escapes); allowed only while a match of an allowed length can end."""
        _, nid, esc, n, states = top
        rx, below = node.pattern, stack[:-1]
        if esc == 0:
            if ch == '"':
                ok = n >= node.min_len and rx.accepts(states)
                return self._done(below) if ok else None
            if ord(ch) < 0x20:
                return None
            if ch == "\\":  # (only if some escape can go on)
                if any(self._fits_on(rx, states, c, n, node) for c in _UNESCAPE.values()):
                    return below + (("S", nid, -1, n, states),), 0
                return None
            c = ch
        else:
            c = _UNESCAPE.get(ch)
            if c is None:
                return None
        nxt = self._fits_on(rx, states, c, n, node)
        counted = node.min_len > 0 or node.max_len is not None  # (else states repeat)
        return None if nxt is None else (below + (("S", nid, 0, n + counted, nxt),), 0)

    @staticmethod
    def _fits_on(rx: Regex, states: frozenset, c: str, n: int, node: _Node):
        nxt = rx.step(states, c)
        return nxt if rx.can_end(nxt, n + 1, node.min_len, node.max_len) else None

    def _number(self, stack: tuple, top: tuple, ch: str) -> tuple | None:
        nid, phase = top[1], top[2]
        node = self.nodes[nid]
        integer = node.types is not None and "integer" in node.types and "number" not in node.types
        lead = phase in ("start", "sign")
        if ch in _DIGITS:
            cls = ("zero" if ch == "0" else "digit19") if lead else "digit"
        elif ch in "eE":
            cls = "exp"
        elif ch in "+-":
            cls = "sign" if phase == "e" else "minus" if ch == "-" else None
        else:
            cls = "point" if ch == "." else None
        nxt = _NUM_NEXT[phase].get(cls)
        bounds = node.bounds
        if nxt is not None and not (integer and nxt in ("dot", "e")):
            if bounds is None:
                return stack[:-1] + (("N", nid, nxt),), 0
            text = top[3] + ch  # (no exponent under bounds: every bounded number has a form
            # without one; at most BOUNDED_DIGITS characters, which bounds of at most
            # BOUND_DIGITS leave room for)
            if nxt != "e" and len(text) <= BOUNDED_DIGITS and _reachable(text, bounds, integer):
                return stack[:-1] + (("N", nid, nxt, text),), 0
        if phase in _NUM_END and stack[:-1] and (bounds is None or _fits(Fraction(top[3]),
                                                                         bounds)):  # fmt: skip
            done = self._done(stack[:-1])  # the number ended: ch is the next's
            return None if done is None else self.step(done, ch)
        return None

    def _choice(self, stack: tuple, top: tuple, ch: str) -> tuple | None:
        _, cands, prefix = top
        text = prefix + ch
        left = tuple(c for c in cands if c.startswith(text))
        key = len(stack) >= 2 and stack[-2][0] == "O" and stack[-2][2] in ("open", "key")
        if left:
            if key and text in left:  # a whole key (keys end with their quote)
                obj = stack[-2]
                at, value = self._key(obj[1], text)
                return stack[:-2] + (("O", obj[1], "colon", at, value),), 0
            if text in left and len(left) == 1:  # nothing longer can follow
                below = stack[:-1]
                obj = below[-1] if below else None
                if obj is not None and obj[0] == "O" and self.nodes[obj[1]].tags:
                    branch = dict(self.nodes[obj[1]].tags)[text]  # a union's tag: its branch
                    below = below[:-1] + (("O", branch, "value", 1, 0),)
                return self._done(below)
            return stack[:-1] + (("C", left, text),), 0
        if prefix in cands and stack[:-1] and not key:
            done = self._done(stack[:-1])  # e.g. 1 of enum [1, 12], then ","
            return None if done is None else self.step(done, ch)
        return None

    def _key(self, nid: int, text: str) -> tuple[int, int]:
        for i, (key, value, _) in enumerate(self.nodes[nid].props):
            if key == text:
                return i + 1, value
        raise AssertionError(text)

    def _keys(self, node: _Node, at: int) -> tuple:
        """The declared keys that may come next: from `at` up to the first required one."""
        out = []
        for key, _, required in node.props[at:]:
            out.append(key)
            if required:
                break
        return tuple(out)

    def _may_close(self, node: _Node, at: int) -> bool:
        return not any(req for _, _, req in node.props[at:])

    def _object(self, stack: tuple, top: tuple, ch: str) -> tuple | None:
        _, nid, phase, at, value = top
        node = self.nodes[nid]
        below = stack[:-1]
        if phase in ("open", "key"):
            if ch == "}" and phase == "open" and self._may_close(node, at):
                return self._done(below)
            if ch != '"':
                return None
            if node.free_keys:
                return below + (("O", nid, "colon", at, node.extra), ("S", 0, 0, 0)), 0
            keys = self._keys(node, at)
            return (below + (top, ("C", keys, '"')), 0) if keys else None
        if phase == "colon":
            if ch != ":":
                return None
            return below + (("O", nid, "value", at, value), ("V", value)), 0
        if phase == "next":
            if ch == "}" and self._may_close(node, at):
                return self._done(below)
            if ch == "," and (node.free_keys or self._keys(node, at)):
                return below + (("O", nid, "key", at, 0),), 0
        return None

    def _array(self, stack: tuple, top: tuple, ch: str) -> tuple | None:
        nid, phase, count, seen = top[1], top[2], top[3], top[4:5]
        node = self.nodes[nid]
        below = stack[:-1]
        if phase == "open" and ch == "]" and node.min_items == 0:
            return self._done(below)
        if phase in ("open", "item"):
            if phase == "open" and node.max_items == 0:
                return None
            item = (*seen, ch) if seen else ()  # (a unique item's text starts here)
            return self._value(below + (("A", nid, "value", count, *item),), node.items, ch)
        if phase == "next":
            if ch == "]" and count >= node.min_items:
                return self._done(below)
            if ch == "," and (node.max_items is None or count < node.max_items):
                pool = node.unique_pool  # (with every allowed value used, no more items)
                if pool is not None and pool <= seen[0]:
                    return None
                return below + (("A", nid, "item", count, *seen, *("",) * bool(seen)),), 0
        return None

    # where an answer may end -----------------------------------------------------------------
    def accepts(self, state: tuple) -> bool:
        """The text read so far is a whole answer."""
        stack, _ = state
        if not stack:
            return True
        if len(stack) != 1:
            return False
        top = stack[0]
        if top[0] == "N":
            return top[2] in _NUM_END and (
                len(top) == 3 or _fits(Fraction(top[3]), self.nodes[top[1]].bounds)
            )
        return top[0] == "C" and top[2] in top[1]

    def initial(self) -> tuple:
        return self.root, 0

    def read(self, state: tuple, text: str) -> tuple | None:
        for ch in text:
            state = self.step(state, ch)
            if state is None:
                return None
        return state

    def allowed(self, index: TokenIndex, state: tuple) -> list[int]:
        """The ids of the tokens whose text can be read from `state`, ascending."""
        return (~self.banned(index, state)).nonzero().flatten().tolist()

    def banned(self, index: TokenIndex, state: tuple) -> torch.Tensor:
        """bool [vocab] on the host: True for the tokens `state` cannot read (memoised per
        state: inside a string or between values, states repeat step after step)."""
        key = (self.serial, index.serial, state)
        hit = _MASKS.get(key)
        if hit is not None:
            return hit
        banned = torch.ones(index.vocab_size, dtype=torch.bool)
        top = state[0][-1] if state[0] else None
        trie = index.trie
        if top is not None and top[0] == "S" and top[2] == 0 and len(top) == 4:
            # inside a string (free of a pattern): every token without a quote, backslash or
            # control character stays in it (as long as it fits a maxLength); only the others
            # are walked
            node = self.nodes[top[1]]
            fit = len(index.plain_ids)
            if node.min_len > 0 or node.max_len is not None:
                room = (node.max_len - top[3]) if node.max_len is not None else 1 << 30
                fit = int(torch.searchsorted(index.plain_len, room, right=True))
            banned[index.plain_ids[:fit]] = False
            trie = index.other_trie
        ids: list[int] = []
        todo = [(trie, state)]
        while todo:
            tnode, st = todo.pop()
            for ch, child in tnode[1].items():
                nxt = self.step(st, ch)
                if nxt is None:
                    continue
                ids.extend(child[0])
                if child[1]:
                    todo.append((child, nxt))
        if ids:
            banned[torch.tensor(ids, dtype=torch.long)] = False
        stack = state[0]
        if not (len(stack) > 1 and len(stack[-2]) == 6 and stack[-2][2] == "value"):
            _MASKS.put(key, banned)  # (an item of a uniqueItems array: its state never repeats)
        return banned

    def stuck(self, index: TokenIndex, state: tuple) -> bool:
        """No token can continue `state` (a whole answer that nothing may extend)."""
        return not state[0] or bool(self.banned(index, state).all())


class _MaskCache:
    """Banned-token masks of every grammar and vocabulary, least recently used dropped first
    past a byte budget (states that never repeat, such as a long array's items under
    maxItems, cannot grow it without bound)."""

    def __init__(self, budget_bytes: int):
        self.budget, self.used = budget_bytes, 0
        self._lock = threading.Lock()
        self._masks: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def get(self, key: tuple) -> torch.Tensor | None:
        with self._lock:
            mask = self._masks.get(key)
            if mask is not None:
                self._masks.move_to_end(key)
            return mask

    def put(self, key: tuple, mask: torch.Tensor) -> None:
        with self._lock:
            if key in self._masks:
                return
            self._masks[key] = mask
            self.used += mask.numel()
            while self.used > self.budget and len(self._masks) > 1:
                _, old = self._masks.popitem(last=False)
                self.used -= old.numel()


_SERIALS = itertools.count()
_MASKS = _MaskCache(256 * 2**20)  # bool masks: one byte per vocabulary entry


class _Compiler:
    """A JSON schema → Grammar nodes (refusing keywords the automaton would not enforce)."""

    def __init__(self, grammar: Grammar, doc: dict):
        self.g, self.doc = grammar, doc
        self.refs: dict[str, int] = {}

    def add(self, node: _Node) -> int:
        self.g.nodes.append(node)
        return len(self.g.nodes) - 1

    def node(self, s, where: str) -> int:
        if s is True or s == {}:
            return 0
        if not isinstance(s, dict):
            raise ConfigError(f"JSON schema at {where}: a schema is an object, got {s!r}")
        if "$ref" in s:
            if set(s) - _ANNOTATIONS - {"$ref"}:
                raise ConfigError(f"JSON schema at {where}: keywords beside $ref are not "
                                  f"supported ({sorted(set(s) - _ANNOTATIONS - {'$ref'})[0]!r}); "
                                  "move them into the referenced schema")  # fmt: skip
            return self.ref(s["$ref"], where)
        if "allOf" in s:
            parts = s["allOf"]
            if not isinstance(parts, list) or len(parts) != 1:
                raise ConfigError(f"JSON schema at {where}: allOf with more than one schema is "
                                  "not supported")  # fmt: skip
            rest = {k: v for k, v in s.items() if k != "allOf"}
            if set(rest) - _ANNOTATIONS:
                raise ConfigError(f"JSON schema at {where}: allOf beside other keywords is "
                                  "not supported")  # fmt: skip
            return self.node(parts[0], where + "/allOf/0")
        known = _ANNOTATIONS | {"type", "enum", "const", "properties", "required",
                                "additionalProperties", "items", "minItems", "maxItems",
                                "minLength", "maxLength", "anyOf", "oneOf",
                                "discriminator", "pattern", "format", "uniqueItems",
                                *_BOUNDS}  # fmt: skip
        unknown = sorted(set(s) - known)
        if unknown:
            raise ConfigError(f"JSON schema at {where}: keyword {unknown[0]!r} is not supported "
                              "by structured outputs (the answer would not be held to it); "
                              "remove it")  # fmt: skip
        branches = s.get("anyOf", s.get("oneOf"))
        if branches is not None:
            return self.alts(s, branches, where)
        if "const" in s or "enum" in s:
            return self.choices(s, where)
        types = s.get("type")
        if types is not None:
            types = [types] if isinstance(types, str) else types
            if not isinstance(types, list) or not types or any(t not in _TYPES for t in types):
                raise ConfigError(f"JSON schema at {where}: type must be one of {_TYPES} or a "
                                  f"list of them, got {s['type']!r}")  # fmt: skip
            types = frozenset(types)
        nid = self.add(_Node())  # a placeholder: properties may refer back to it
        self.g.nodes[nid] = self.shape(s, types, where)
        return nid

    def choices(self, s: dict, where: str) -> int:
        """enum / const: the values' JSON texts (those of the declared type, if one is)."""
        values = [s["const"]] if "const" in s else s["enum"]
        if not isinstance(values, list) or not values:
            raise ConfigError(f"JSON schema at {where}: enum must be a non-empty list")
        _check_choices(values, f"JSON schema at {where}: enum")
        other = set(s) - _ANNOTATIONS - {"enum", "const", "type"}
        if other or ("enum" in s and "const" in s):
            raise ConfigError(f"JSON schema at {where}: enum / const beside "
                              f"{sorted(other)[0] if other else 'each other'!r} is not "
                              "supported: list only the allowed values")  # fmt: skip
        if "type" in s:
            types = [s["type"]] if isinstance(s["type"], str) else s["type"]
            values = [v for v in values if _json_type(v) & set(types)]
            if not values:
                raise ConfigError(f"JSON schema at {where}: no enum value is of type "
                                  f"{s['type']!r}")  # fmt: skip
        try:
            texts = {json.dumps(v, ensure_ascii=False, allow_nan=False) for v in values}
        except (TypeError, ValueError) as e:
            raise ConfigError(f"JSON schema at {where}: an enum value is not JSON: {e}") from None
        return self.add(_Node(choices=tuple(sorted(texts))))

    def check_progress(self) -> None:
        """Refuse references that reach themselves without reading a character (A = $ref A,
        or A = anyOf[A, ...]): the automaton would chase them forever."""
        for start in range(len(self.g.nodes)):
            todo, seen = [start], set()
            while todo:
                nid = todo.pop()
                for nxt in self.g.nodes[nid].alts or ():
                    if nxt == start:
                        raise ConfigError("the JSON schema refers to itself without any JSON "
                                          "in between ($ref or anyOf reaching back to where it "
                                          "started)")  # fmt: skip
                    if nxt not in seen:
                        seen.add(nxt)
                        todo.append(nxt)

    def shape(self, s: dict, types, where: str) -> _Node:
        def count(key):
            v = s.get(key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise ConfigError(f"JSON schema at {where}: {key} must be a non-negative integer")
            return v

        props, free, extra = (), True, 0
        if "properties" in s:
            declared = s["properties"]
            required = s.get("required", [])
            if not isinstance(declared, dict) or not isinstance(required, list):
                raise ConfigError(f"JSON schema at {where}: properties must be an object and "
                                  "required a list")  # fmt: skip
            if not all(isinstance(r, str) for r in required):
                raise ConfigError(f"JSON schema at {where}: required lists property names")
            missing = [r for r in required if r not in declared]
            if missing:
                raise ConfigError(f"JSON schema at {where}: required property {missing[0]!r} "
                                  "is not among its properties")  # fmt: skip
            props = tuple((json.dumps(k, ensure_ascii=False),
                           self.node(v, f"{where}/properties/{k}"), k in required)
                          for k, v in declared.items())  # fmt: skip
            free = False
        elif "required" in s and s["required"]:
            raise ConfigError(f"JSON schema at {where}: required without properties")
        more = s.get("additionalProperties")
        if free and isinstance(more, dict):
            extra = self.node(more, where + "/additionalProperties")
        elif free and more is False:
            props, free = (), False  # only {}
        items = self.node(s["items"], where + "/items") if "items" in s else 0
        lo, hi = count("minItems") or 0, count("maxItems")
        lo_s, hi_s = count("minLength") or 0, count("maxLength")
        if (hi is not None and hi < lo) or (hi_s is not None and hi_s < lo_s):
            raise ConfigError(f"JSON schema at {where}: a maximum below its minimum")
        rx = self.pattern(s, where)
        if rx is not None and not rx.can_end(rx.initial(), 0, lo_s, hi_s):
            raise ConfigError(f"JSON schema at {where}: no string of its minLength / maxLength "
                              "matches its pattern or format")  # fmt: skip
        unique, pool = self.unique(s, types, items, lo, hi, where)
        return _Node(types=types, props=props, free_keys=free, extra=extra, items=items,
                     min_items=lo, max_items=hi, min_len=lo_s, max_len=hi_s,
                     bounds=self.bounds(s, types, where), pattern=rx, unique=unique,
                     unique_pool=pool)  # fmt: skip

    def unique(self, s: dict, types, items: int, least: int, most: int | None,
               where: str) -> tuple[bool, frozenset | None]:  # fmt: skip
        """uniqueItems: (True, the keys of the values its items may take when they are
        finitely many) for arrays of strings, numbers, booleans and null (enums of them too;
        pydantic's set[X] and frozenset[X]); objects or arrays as items are refused, as is a
        minItems above the number of values the items may take. Nothing to hold where the
        node is no array or holds at most one item."""
        flag = s.get("uniqueItems", False)
        if not isinstance(flag, bool):
            raise ConfigError(f"JSON schema at {where}: uniqueItems must be true or false")
        if not flag or (types is not None and "array" not in types) or most in (0, 1):
            return False, None
        texts = self.scalar_texts(items, set())
        if texts is False:
            raise ConfigError(f"JSON schema at {where}: uniqueItems is supported for items "
                              "that are strings, numbers, booleans or null (and enums of "
                              "them), not objects, arrays or any JSON: the answer would not "
                              "be held to it; remove it or narrow its items")  # fmt: skip
        pool = None if texts is None else frozenset(_item_key(t) for t in texts)
        if pool is not None and least > len(pool):
            raise ConfigError(f"JSON schema at {where}: minItems {least} with uniqueItems, but "
                              f"its items take only {len(pool)} values")  # fmt: skip
        return True, pool

    def scalar_texts(self, nid: int, busy: set):
        """For an item node: False unless every value it takes is a string, number, boolean
        or null; else the texts it takes when finitely many (enum / const, booleans, null),
        None when not."""
        if nid in busy:
            return False
        node = self.g.nodes[nid]
        if node.alts is not None:
            parts = [self.scalar_texts(a, busy | {nid}) for a in node.alts]
            if any(p is False for p in parts):
                return False
            return None if any(p is None for p in parts) else tuple(t for p in parts for t in p)
        if node.choices is not None:
            if any(t[0] in "{[" for t in node.choices):
                return False
            return node.choices
        if node.types is None or node.types & {"object", "array"}:
            return False
        if node.types <= {"boolean", "null"}:
            words = {"boolean": ("true", "false"), "null": ("null",)}
            return tuple(w for t in sorted(node.types) for w in words[t])
        return None

    def pattern(self, s: dict, where: str) -> Regex | None:
        """A string's pattern, or its format's (engine/regex.py); None without either."""
        if "pattern" in s and "format" in s:
            raise ConfigError(f"JSON schema at {where}: pattern beside format is not "
                              "supported: keep one")  # fmt: skip
        if "pattern" in s:
            if not isinstance(s["pattern"], str):
                raise ConfigError(f"JSON schema at {where}: pattern must be a string")
            return Regex(s["pattern"], f"JSON schema at {where}: pattern")
        if "format" not in s or s["format"] in _FREE_FORMATS:
            return None
        rx = format_regex(s["format"])
        if rx is None:
            raise ConfigError(f"JSON schema at {where}: format {s['format']!r} is not "
                              "supported by structured outputs (the answer would not be held "
                              f"to it): use one of {', '.join(FORMATS)}, a pattern, or remove "
                              "it")  # fmt: skip
        return rx

    def bounds(self, s: dict, types, where: str) -> tuple | None:
        """(low, low exclusive, high, high exclusive) of a number's minimum / maximum /
        exclusiveMinimum / exclusiveMaximum (2019+ numbers, or draft 4's booleans beside
        minimum / maximum); None without any. A range no number (integer) fits is refused."""
        if not _BOUNDS & set(s):
            return None

        def number(key):
            v = s.get(key)
            if v is None:
                return None
            if isinstance(v, bool) or not isinstance(v, int | float) or v != v \
                    or v in (float("inf"), float("-inf")):  # fmt: skip
                raise ConfigError(f"JSON schema at {where}: {key} must be a number, got {v!r}")
            if len(repr(v)) > BOUND_DIGITS:
                raise ConfigError(f"JSON schema at {where}: {key} {v!r} has too many digits "
                                  f"for structured outputs (at most {BOUND_DIGITS})")  # fmt: skip
            # (a float as written: 0.1 is 1/10, not the binary value nearest to it)
            return Fraction(repr(v) if isinstance(v, float) else v)

        ends = []
        for inclusive, exclusive, low in (("minimum", "exclusiveMinimum", True),
                                          ("maximum", "exclusiveMaximum", False)):  # fmt: skip
            end, flag = number(inclusive), False
            if isinstance(s.get(exclusive), bool):  # draft 4: the inclusive one made strict
                if s[exclusive] and end is None:
                    raise ConfigError(f"JSON schema at {where}: {exclusive}: true needs "
                                      f"{inclusive}")  # fmt: skip
                flag = s[exclusive]
            elif s.get(exclusive) is not None:  # both given: the tighter one holds
                x = number(exclusive)
                if end is None or x == end or (x > end) == low:
                    end, flag = x, True
            ends += [end, flag]
        bounds = tuple(ends)
        integer = types is not None and "integer" in types and "number" not in types
        lo, _, hi, _ = bounds
        if lo is not None and hi is not None and not _meets(lo, None, bounds, integer):
            kind = "integer" if integer else "number"
            raise ConfigError(f"JSON schema at {where}: no {kind} lies within its minimum and "
                              "maximum")  # fmt: skip
        return bounds

    def alts(self, s: dict, branches, where: str) -> int:
        if not isinstance(branches, list) or not branches:
            raise ConfigError(f"JSON schema at {where}: anyOf / oneOf must be a non-empty list")
        if set(s) - _ANNOTATIONS - {"anyOf", "oneOf", "discriminator"}:  # (pydantic names the
            # tag of a discriminated union; the union is found from the branches themselves)
            raise ConfigError(f"JSON schema at {where}: anyOf / oneOf beside other keywords is "
                              "not supported; move them into each branch")  # fmt: skip
        ids = [self.node(b, f"{where}/anyOf/{i}") for i, b in enumerate(branches)]
        plain = (_Node(types=frozenset({"integer"})), _Node(types=frozenset({"number"})))
        numeric = [i for i in ids if self.g.nodes[i] in plain]
        if len(numeric) > 1 and "anyOf" in s:  # Union[int, float]: one node takes both (not
            # under oneOf, where a value both branches take matches neither)
            union = frozenset().union(*(self.g.nodes[i].types for i in numeric))
            ids = [i for i in ids if i not in numeric] + [self.add(_Node(types=union))]
        objects = [i for i in ids if self.first(i, set()) == {"{"}]
        if len(objects) > 1:
            union = self.tagged(objects)
            if union is not None:
                ids = [i for i in ids if i not in objects] + [union]
        seen: set[str] = set()
        for i in ids:
            first = self.first(i, set())
            if first & seen:
                raise ConfigError(f"JSON schema at {where}: anyOf / oneOf branches must start "
                                  "differently (e.g. a string and null, an object and an "
                                  "array); these overlap")  # fmt: skip
            seen |= first
        return self.add(_Node(alts=tuple(ids)))

    def tagged(self, ids: list[int]) -> int | None:
        """A tagged union of object branches (each's first declared property the same
        required key, its value a const / enum of strings no other branch has), or None."""

        def resolve(i):  # through $ref's one-branch nodes
            while self.g.nodes[i].alts is not None and len(self.g.nodes[i].alts) == 1:
                i = self.g.nodes[i].alts[0]
            return i

        key, tags = None, []
        for b in map(resolve, ids):
            node = self.g.nodes[b]
            if node.types != frozenset({"object"}) or not node.props or not node.props[0][2]:
                return None
            k, value, _ = node.props[0]
            texts = self.g.nodes[resolve(value)].choices
            if texts is None or not all(t.startswith('"') for t in texts) or key not in (None, k):
                return None
            key = k
            # a union among the branches (anyOf[anyOf[A, B], C], a $ref to a oneOf): its own
            # branches, not itself (it declares the tag alone)
            tags += list(node.tags) if node.tags else [(t, b) for t in texts]
        if len({t for t, _ in tags}) != len(tags):
            return None
        names = self.add(_Node(choices=tuple(sorted(t for t, _ in tags))))
        return self.add(_Node(types=frozenset({"object"}), props=((key, names, True),),
                              free_keys=False, tags=tuple(tags)))  # fmt: skip

    def first(self, nid: int, busy: set) -> set[str]:
        """The characters a value of node `nid` can start with."""
        node = self.g.nodes[nid]
        if nid in busy:
            return set()
        busy.add(nid)
        if node.alts is not None:
            return set().union(*(self.first(a, busy) for a in node.alts))
        if node.choices is not None:
            return {c[0] for c in node.choices}
        types = node.types or _TYPES
        return set("".join(_FIRST[t] for t in types))

    def ref(self, ref, where: str) -> int:
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise ConfigError(f"JSON schema at {where}: only local $ref ('#/$defs/Name', '#') "
                              f"is supported, got {ref!r}")  # fmt: skip
        if ref in self.refs:
            return self.refs[ref]
        target: Any = self.doc
        for part in ref[2:].split("/") if ref != "#" else ():
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
                continue
            if not isinstance(target, dict) or part not in target:
                raise ConfigError(f"JSON schema at {where}: $ref {ref!r} points nowhere")
            target = target[part]
        # a placeholder while the target compiles (a recursive reference reads it): the
        # target's declared types, so that an anyOf can tell it from its other branches
        types = target.get("type") if isinstance(target, dict) else None
        plain = isinstance(types, (str, list)) and not {"enum", "const", "anyOf", "oneOf",
                                                        "$ref", "allOf"} & set(target)  # fmt: skip
        types = frozenset([types] if isinstance(types, str) else types) if plain else None
        nid = self.add(_Node(types=types))
        self.refs[ref] = nid
        inner = self.node(target, ref)
        self.g.nodes[nid] = _Node(alts=(inner,))
        return nid


# ---- the vocabulary --------------------------------------------------------------------------
class TokenIndex:
    """A tokenizer's vocabulary as character tries of the text each token adds to an answer
    (special tokens and tokens that are not whole characters left out). A trie node is
    (ids ending here, {character: child}). `trie` holds every token; `other_trie` only those
    with a quote, a backslash or a control character, and `plain_ids` (by `plain_len`, their
    length in characters) the rest: what a JSON string can take without looking."""

    def __init__(self, tok, vocab_size: int):
        self.vocab_size = vocab_size
        self.serial = next(_SERIALS)
        self.trie: tuple = ([], {})
        self.other_trie: tuple = ([], {})
        self.text: dict[int, str] = {}
        special = set(getattr(tok, "all_special_ids", []) or [])
        size = min(vocab_size, len(tok))
        anchor_ids = tok.encode("a", add_special_tokens=False)[-1:]
        # decoded as the engine decodes answers (skip_special_tokens), so that a token that
        # would vanish from the text (an added special token) is never allowed
        opts = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}
        anchor = tok.decode(anchor_ids, **opts)
        plain: list[tuple[int, int]] = []
        for i in range(size):
            if i in special:
                continue
            # after another token, so a word-initial space (SentencePiece's ▁) is kept
            text = tok.decode(anchor_ids + [i], **opts)[len(anchor) :]
            if not text or "\ufffd" in text:
                continue
            self.text[i] = text
            tries = [self.trie]
            if any(ch in '"\\' or ord(ch) < 0x20 for ch in text):
                tries.append(self.other_trie)
            else:
                plain.append((len(text), i))
            for node in tries:
                for ch in text:
                    node = node[1].setdefault(ch, ([], {}))
                node[0].append(i)
        plain.sort()
        self.plain_len = torch.tensor([n for n, _ in plain], dtype=torch.long)
        self.plain_ids = torch.tensor([i for _, i in plain], dtype=torch.long)


_INDEXES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {size: index}
_INDEX_LOCK = threading.Lock()


def token_index(tok, vocab_size: int) -> TokenIndex:
    """The TokenIndex of a tokenizer (built once; forgotten with the tokenizer)."""
    with _INDEX_LOCK:
        per = _INDEXES.setdefault(tok, {})
        if vocab_size not in per:
            per[vocab_size] = TokenIndex(tok, vocab_size)
        return per[vocab_size]


class ThinkFirst:
    """A Guide's answer with thinking before it: free until the token texts read make `end`
    — except tokens that would make it and go on with what cannot start the answer, which are
    banned — and never complete; then the inner guide reads the rest of that token's text
    (its leading blanks dropped) and holds every token after (no blanks before the answer,
    as at the start of any held answer). The end must be text the tokens show: an end token
    registered as special (left out of answers' text) is never seen."""

    def __init__(self, inner: Guide, end: str):
        self.inner, self.end = inner, end
        self.thinking = True
        self._tail = ""  # the thinking's last characters: where `end` may be forming

    @property
    def complete(self) -> bool:
        return not self.thinking and self.inner.complete

    def mask(self, row: torch.Tensor) -> None:
        if not self.thinking:
            self.inner.mask(row)
            return
        bad = [t for t in self._closers() if self._read(self._text(t)) is None]
        if bad:
            row[torch.tensor(bad, dtype=torch.long, device=row.device)] = float("-inf")

    def advance(self, token: int) -> bool:
        if not self.thinking:
            return self.inner.advance(token)
        if token in self.inner.stop_ids:
            return True
        text = self._text(token)
        read = self._read(text)
        if read is None:
            return False  # (masked: it ends the thinking with what cannot start the answer)
        if read is False:  # still thinking
            self._tail = text[-(len(self.end) - 1) :] if len(self.end) > 1 else ""
            return True
        self.thinking, self.inner.state = False, read
        return True

    def _text(self, token: int) -> str:
        """The thinking's last characters and the text `token` adds."""
        return self._tail + self.inner.index.text.get(token, "")

    def _read(self, text: str):
        """False: `text` (`_text` of a token) does not end the thinking; else the inner state
        after what it holds past the end (None: that cannot start the answer)."""
        at = text.find(self.end)
        if at < 0:
            return False
        rest = text[at + len(self.end) :].lstrip()
        return self.inner.grammar.read(self.inner.state, rest) if rest else self.inner.state

    def _closers(self) -> list[int]:
        """The tokens that may end the thinking now: those that hold the whole end, and
        those that finish the part of it the thinking's last characters began."""
        by_start = _end_tokens(self.inner.index, self.end)
        out = list(by_start[self.end])
        for j in range(1, len(self.end)):
            if self._tail.endswith(self.end[:j]):
                out += by_start[self.end[j:]]
        return out


def _end_tokens(index: TokenIndex, end: str) -> dict[str, list[int]]:
    """{end: tokens whose text holds it, each proper suffix of end: tokens whose text starts
    with it} (kept on the index, once per end)."""
    cache = index.__dict__.setdefault("_end_tokens", {})
    if end not in cache:
        parts = {end: [t for t, text in index.text.items() if end in text]}
        for j in range(1, len(end)):
            parts[end[j:]] = [t for t, text in index.text.items() if text.startswith(end[j:])]
        cache[end] = parts
    return cache[end]


class Guide:
    """One request's place in its constraint."""

    def __init__(self, grammar: Grammar, index: TokenIndex, stop_ids: frozenset[int]):
        self.grammar, self.index, self.stop_ids = grammar, index, stop_ids
        self.state = grammar.initial()

    @property
    def complete(self) -> bool:
        """A whole answer nothing may extend (a closed object, a last choice, an integer 0 at
        the top): the request stops."""
        return self.grammar.accepts(self.state) and self.grammar.stuck(self.index, self.state)

    def banned(self) -> torch.Tensor:
        """bool [vocab] on the host: the tokens this request may not sample now."""
        banned = self.grammar.banned(self.index, self.state)
        stops = sorted(t for t in self.stop_ids if t < len(banned))
        if stops and self.grammar.accepts(self.state):  # it may end here
            banned = banned.clone()
            banned[torch.tensor(stops, dtype=torch.long)] = False
        return banned

    def advance(self, token: int) -> bool:
        """Read a sampled token (False if it breaks the constraint: it was not allowed)."""
        if token in self.stop_ids:
            return True
        text = self.index.text.get(token)
        nxt = None if text is None else self.grammar.read(self.state, text)
        if nxt is None:
            return False
        self.state = nxt
        return True

    def mask(self, row: torch.Tensor) -> None:
        """In place: every token this state does not allow gets -inf."""
        banned = self.banned()
        n = min(len(banned), row.numel())  # (a padded lm_head: its extra rows stay banned)
        if n < row.numel():
            row[n:] = float("-inf")
        row[:n].masked_fill_(banned[:n].to(row.device, non_blocking=True), float("-inf"))
