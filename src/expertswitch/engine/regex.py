r"""JSON schema `pattern` and `format` for structured outputs (engine/guided.py): a regular
expression compiled to an NFA read one character at a time, so that a string value is held to
it while it is written.

The subset (ECMA-262 syntax, as JSON schema defines `pattern`): literals and escapes (`\.`,
`\n`, `\t`, `\uXXXX`, `\xHH`, ...), `.` (any character but a line terminator), classes
`[a-z0-9_]` and `[^...]` with `\d`, `\w`, `\s` inside, `\d \w \s \D \W \S`, groups `(...)`
and `(?:...)`, `|`, the quantifiers `* + ? {n} {n,} {n,m}` (lazy ones read alike: the same
strings match), the anchors `^` and `$` wherever they stand (`^a|b$` is ECMA's `(^a)|(b$)`).
A pattern matches anywhere in the string, as JSON schema says, unless anchored; a pattern
that needs control characters only `\u` escapes write (strings held to a pattern use none)
matches nothing. Anything else (backreferences, lookarounds, `\b`, counts past MAX_COUNT,
NFAs past MAX_STATES) is a ConfigError naming it.

`format`: date, time, date-time (RFC 3339, with its offset; only what Python and pydantic
read: each month's own days, no leap second, no year 0000), uuid, email (a plain
local@domain.tld subset), ipv4, ipv6 (groups, "::" compression; no IPv4 tail or zone),
hostname, uri (scheme:rest, no blanks), duration (RFC 3339's ISO 8601 durations, numbers of
up to 6 digits) — each as the pattern of the values it allows (FORMATS), a subset of what the
format allows. Every date, time, date-time, uuid, ipv4, ipv6 and duration value is one a
pydantic model's field takes (tested); email and uri are looser than pydantic's EmailStr
(email-validator refuses special-use names such as a@x.test) and AnyUrl.

A state is the frozenset of NFA positions still alive (from which the end can be reached);
a character that leaves none is refused, so a string never reaches a dead end. With
minLength / maxLength beside the pattern, a character is allowed only while a match of an
allowed length can still be reached.
"""

from __future__ import annotations

from collections import deque
from functools import cache

from expertswitch.errors import ConfigError

MAX_STATES = 4096  # an NFA past this (e.g. (a?){2000}) is refused: each character's step
# walks the live states, for every token the mask tries
MAX_COUNT = 1000  # the largest {n,m}

_ANY = (True, ())  # every character (a negated empty set)
_LINE_END = (True, ((10, 10), (13, 13), (0x2028, 0x2029)))  # "."
_DIGIT = ((48, 57),)
_WORD = ((48, 57), (65, 90), (95, 95), (97, 122))
_SPACE = ((9, 13), (32, 32), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A),
          (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000),
          (0xFEFF, 0xFEFF))  # fmt: skip
_CLASSES = {"d": _DIGIT, "w": _WORD, "s": _SPACE}
_CONTROL = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "0": "\0"}

_OCTET = "(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
# RFC 3339 as Python and pydantic read it: no leap second (:60), no year 0000, each month's own
# days (February's 29th in leap years only)
_TIME = "([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\\.[0-9]+)?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"
_YEAR = "([0-9]{3}[1-9]|[0-9]{2}[1-9]0|[0-9][1-9]00|[1-9]000)"
_LEAP = "([0-9]{2}(0[48]|[2468][048]|[13579][26])|(0[48]|[2468][048]|[13579][26])00)"
_DATE = (
    f"({_YEAR}-((0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])|(0[469]|11)-(0[1-9]|[12][0-9]|30)"
    f"|02-(0[1-9]|1[0-9]|2[0-8]))|{_LEAP}-02-29)"
)
_LABEL = "[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_MAIL_LABEL = "[A-Za-z0-9]{1,10}(-[A-Za-z0-9]{1,10}){0,2}"
_HEX4 = "[0-9a-fA-F]{1,4}"
# ipv6: eight groups, or "::" standing for one or more zero groups between L groups and R
# (L + R <= 7), each form its own alternative (no embedded IPv4 tail, no zone)
_IPV6 = "|".join([f"({_HEX4}:){{7}}{_HEX4}"] + [
    ("" if left == 0 else f"({_HEX4}:){{{left - 1}}}{_HEX4}") + "::"
    + ("" if left == 7 else f"({_HEX4}(:{_HEX4}){{0,{6 - left}}})?")
    for left in range(8)])  # fmt: skip
# duration: RFC 3339's ISO 8601 durations (JSON schema's format), each number at most 6 digits
# (pydantic's timedelta holds any such: under 10^9 days)
_N = "[0-9]{1,6}"
_DUR_TIME = f"T({_N}H({_N}M({_N}S)?)?|{_N}M({_N}S)?|{_N}S)"
_DUR_DATE = f"({_N}D|{_N}M({_N}D)?|{_N}Y({_N}M({_N}D)?)?)({_DUR_TIME})?"
FORMATS = {  # format → the pattern its values are written in (anchored)
    "date": f"^{_DATE}$",
    "time": f"^{_TIME}$",
    "date-time": f"^{_DATE}T{_TIME}$",
    "uuid": "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$",
    # (RFC 5321's dot-atom, dots only between atoms; a local part of at most 64 characters,
    # up to four domain labels of letters and digits joined by single hyphens, a top-level
    # name of 2-63 letters: at most 250 characters in all)
    "email": f"^[A-Za-z0-9_%+-]{{1,32}}(\\.[A-Za-z0-9_%+-]{{1,15}}){{0,2}}@{_MAIL_LABEL}"
    f"(\\.{_MAIL_LABEL}){{0,2}}\\.[A-Za-z]{{2,63}}$",
    "ipv4": f"^({_OCTET}\\.){{3}}{_OCTET}$",
    "ipv6": f"^({_IPV6})$",
    "duration": f"^P({_DUR_DATE}|{_DUR_TIME}|{_N}W)$",
    "hostname": f"^{_LABEL}(\\.{_LABEL})*$",
    "uri": "^[A-Za-z][A-Za-z0-9+.-]*:[^\\s]+$",
}


# control characters a JSON string writes only as \u escapes, which strings held to a pattern
# do not use (\b \t \n \f \r have short escapes)
_UNWRITABLE = ((0, 7), (11, 11), (14, 31))


def _writable(charset: tuple) -> tuple | None:
    """The charset without _UNWRITABLE (a negated one: those added to what it excludes);
    None when nothing is left."""
    negated, ranges = charset
    if negated:
        return (True, tuple(ranges) + _UNWRITABLE)
    out = []
    for lo, hi in ranges:
        pieces = [(lo, hi)]
        for a, b in _UNWRITABLE:  # each piece minus [a, b]
            pieces = [part for x, y in pieces
                      for part in ([(x, y)] if b < x or a > y else
                                   [(x, a - 1)] * (x < a) + [(b + 1, y)] * (y > b))]  # fmt: skip
        out += pieces
    return (False, tuple(out)) if out else None


def _contains(charset: tuple, ch: str) -> bool:
    negated, ranges = charset
    c = ord(ch)
    return any(lo <= c <= hi for lo, hi in ranges) != negated


class _Parser:
    """Pattern text → AST: ("set", charset) | ("cat", [..]) | ("alt", [..]) |
    ("rep", node, lo, hi)."""

    def __init__(self, text: str, what: str):
        self.text, self.i, self.what = text, 0, what

    def fail(self, why: str):
        raise ConfigError(f"{self.what}: {why} (at character {self.i} of {self.text!r}); "
                          "structured outputs take a pattern of literals, classes, groups, | "
                          "and quantifiers")  # fmt: skip

    def peek(self) -> str | None:
        return self.text[self.i] if self.i < len(self.text) else None

    def take(self) -> str:
        ch = self.peek()
        if ch is None:
            self.fail("the pattern ends too early")
        self.i += 1
        return ch

    def parse(self):
        node = self.alternation()
        if self.peek() is not None:
            self.fail(f"unexpected {self.peek()!r}")
        return node

    def alternation(self):
        branches = [self.concat()]
        while self.peek() == "|":
            self.i += 1
            branches.append(self.concat())
        return branches[0] if len(branches) == 1 else ("alt", branches)

    def concat(self):
        parts = []
        while self.peek() not in (None, "|", ")"):
            parts.append(self.repeat(self.atom()))
        return ("cat", parts)

    def repeat(self, node):
        while True:
            ch = self.peek()
            if ch in ("*", "+", "?"):
                self.i += 1
                lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[ch]
            elif ch == "{" and (counted := self._counted()) is not None:
                lo, hi = counted
            else:
                return node
            if self.peek() == "?":  # lazy: the same strings match
                self.i += 1
            elif self.peek() == "+":
                self.fail("possessive quantifiers are not supported")
            node = ("rep", node, lo, hi)

    def _counted(self):
        """{n}, {n,} or {n,m} at self.i, read: (lo, hi); else None (a literal "{")."""
        end = self.text.find("}", self.i)
        if end < 0:
            return None
        body = self.text[self.i + 1 : end]
        lo, comma, hi = body.partition(",")
        digits = "0123456789"
        if not lo or any(c not in digits for c in lo + hi):
            return None
        if len(lo) > 4 or len(hi) > 4 or int(lo) > MAX_COUNT or (hi and int(hi) > MAX_COUNT):
            self.fail(f"{{{body}}}: repetition counts go up to {MAX_COUNT}")
        lo_n, hi_n = int(lo), (int(hi) if hi else None) if comma else int(lo)
        if hi_n is not None and hi_n < lo_n:
            self.fail(f"{{{body}}} has its maximum below its minimum")
        self.i = end + 1
        return lo_n, hi_n

    def atom(self):
        ch = self.take()
        if ch == "(":
            if self.text.startswith("?:", self.i):
                self.i += 2
            elif self.peek() == "?":
                self.fail("lookarounds and named groups are not supported")
            node = self.alternation()
            if self.take() != ")":
                self.fail("a group is not closed")
            return node
        if ch == "[":
            return ("set", self.klass())
        if ch == ".":
            return ("set", _LINE_END)
        if ch == "\\":
            return ("set", self.escape(in_class=False))
        if ch in "^$":  # anchors: at the string's start, at its end
            return ("bol",) if ch == "^" else ("eol",)
        if ch in "*+?":
            self.fail(f"{ch} follows nothing")
        if ch == ")":
            self.fail("unbalanced )")
        return ("set", (False, ((ord(ch), ord(ch)),)))

    def escape(self, in_class: bool) -> tuple:
        ch = self.take()
        if ch.lower() in _CLASSES:
            if ch.isupper() and in_class:
                self.fail(f"\\{ch} inside a class is not supported")
            return (ch.isupper(), _CLASSES[ch.lower()])
        if ch in _CONTROL:
            c = _CONTROL[ch]
        elif ch in "ux":
            n = 4 if ch == "u" else 2
            digits = self.text[self.i : self.i + n]
            if len(digits) != n or any(d not in "0123456789abcdefABCDEF" for d in digits):
                self.fail(f"\\{ch} needs {n} hex digits")
            self.i += n
            c = chr(int(digits, 16))
        elif ch.isalnum():
            self.fail(f"\\{ch} (a backreference, word boundary or unknown escape) is not "
                      "supported")  # fmt: skip
        else:
            c = ch  # \. \\ \/ \- \[ ...: the character itself
        return (False, ((ord(c), ord(c)),))

    def klass(self) -> tuple:
        negated = self.peek() == "^"
        if negated:
            self.i += 1
        ranges: list[tuple[int, int]] = []
        first = True
        while True:
            ch = self.take()
            if ch == "]" and not first:
                break
            first = False
            if ch == "\\":
                neg, rs = self.escape(in_class=True)
                if len(rs) != 1 or rs[0][0] != rs[0][1]:  # \d, \w, \s
                    ranges += rs
                    continue
                lo = rs[0][0]
            else:
                lo = ord(ch)
            if self.peek() == "-" and self.text[self.i + 1 : self.i + 2] not in ("]", ""):
                self.i += 1
                ch2 = self.take()
                hi = self.escape(in_class=True)[1][0][0] if ch2 == "\\" else ord(ch2)
                if hi < lo:
                    self.fail("a class range runs backwards")
                ranges.append((lo, hi))
            else:
                ranges.append((lo, lo))
        return (negated, tuple(ranges))


class Regex:
    """An NFA: per state, its character moves [(charset, target)], its empty moves and its
    anchored ones [("^" or "$", target)] (open only before the first character, or after
    the last); `start` starts, `accept` ends. `dist[s]`: the fewest characters from s to the
    end once a character has been read (None: dead)."""

    def __init__(self, pattern: str, what: str = "pattern"):
        self.pattern = pattern
        self.moves: list[list] = []
        self.empty: list[list[int]] = []
        self.anchored: list[list[tuple[str, int]]] = []
        ast = _Parser(pattern, what).parse()
        anywhere = ("rep", ("set", _ANY), 0, None)  # (JSON schema: found anywhere; ^ and $
        start, end = self._build(("cat", [anywhere, ast, anywhere]), what)  # pin it)
        self.start, self.accept = start, end
        self.at_end = self._at_end()
        self.dist = self._distances()
        self._steps: dict = {}  # (states, character) → states (memoised, capped)
        self._later: dict = {}  # (states, k) → states k characters on
        if not self.initial():
            raise ConfigError(f"{what} {pattern!r} matches no string")

    def __getstate__(self):  # (pickled with the grammar; the cache is rebuilt)
        return {"pattern": self.pattern}

    def __setstate__(self, state):
        self.__init__(state["pattern"])

    def _state(self) -> int:
        self.moves.append([])
        self.empty.append([])
        self.anchored.append([])
        if len(self.moves) > MAX_STATES:
            raise ConfigError(f"pattern {self.pattern!r} is too large for structured outputs "
                              "(its repetitions expand too far)")  # fmt: skip
        return len(self.moves) - 1

    def _build(self, node, what) -> tuple[int, int]:
        kind = node[0]
        if kind in ("bol", "eol"):
            a, b = self._state(), self._state()
            self.anchored[a].append(("^" if kind == "bol" else "$", b))
            return a, b
        if kind == "set":
            a, b = self._state(), self._state()
            charset = _writable(node[1])
            if charset is not None:  # (else no character can be written: no move)
                self.moves[a].append((charset, b))
            return a, b
        if kind == "cat":
            a = b = self._state()
            for part in node[1]:
                s, e = self._build(part, what)
                self.empty[b].append(s)
                b = e
            return a, b
        if kind == "alt":
            a, b = self._state(), self._state()
            for branch in node[1]:
                s, e = self._build(branch, what)
                self.empty[a].append(s)
                self.empty[e].append(b)
            return a, b
        _, inner, lo, hi = node  # rep
        a = b = self._state()
        for _ in range(lo):
            s, e = self._build(inner, what)
            self.empty[b].append(s)
            b = e
        if hi is None:
            s, e = self._build(inner, what)
            self.empty[b].append(s)
            self.empty[e].append(s)  # again
            end = self._state()
            self.empty[b].append(end)
            self.empty[e].append(end)
            return a, end
        end = self._state()
        self.empty[b].append(end)
        for _ in range(hi - lo):
            s, e = self._build(inner, what)
            self.empty[b].append(s)
            self.empty[e].append(end)
            b = e
        return a, end

    def _at_end(self) -> frozenset:
        """The states from which the end is reached reading nothing more (by empty and "$"
        moves)."""
        back: list[list[int]] = [[] for _ in self.moves]
        for s in range(len(self.moves)):
            for t in self.empty[s] + [t for kind, t in self.anchored[s] if kind == "$"]:
                back[t].append(s)
        out, todo = {self.accept}, [self.accept]
        while todo:
            for s in back[todo.pop()]:
                if s not in out:
                    out.add(s)
                    todo.append(s)
        return frozenset(out)

    def _distances(self) -> list[int | None]:
        """Fewest characters from each state to the end once a character has been read
        (0-1 BFS on the reversed moves: a "^" move is closed then, a "$" move open only into
        a state that ends reading nothing)."""
        back: list[list[tuple[int, int]]] = [[] for _ in self.moves]
        for s, moves in enumerate(self.moves):
            for _, t in moves:
                back[t].append((s, 1))
        for s, targets in enumerate(self.empty):
            for t in targets:
                back[t].append((s, 0))
        for s, moves in enumerate(self.anchored):
            for kind, t in moves:
                if kind == "$" and t in self.at_end:
                    back[t].append((s, 0))
        dist: list[int | None] = [None] * len(self.moves)
        dist[self.accept] = 0
        todo = deque([self.accept])
        while todo:
            t = todo.popleft()
            for s, w in back[t]:
                d = dist[t] + w
                if dist[s] is None or d < dist[s]:
                    dist[s] = d
                    (todo.appendleft if w == 0 else todo.append)(s)
        return dist

    def _closure(self, states, first: bool = False) -> frozenset:
        """The live states reached by empty moves (and, before the first character, "^"
        moves); a dead state on the way to a "^" is passed through, not kept."""
        seen, out, todo = set(), set(), list(states)
        while todo:
            s = todo.pop()
            if s in seen:
                continue
            seen.add(s)
            if self.dist[s] is not None:
                out.add(s)
            todo.extend(self.empty[s])
            if first:
                todo.extend(t for kind, t in self.anchored[s] if kind == "^")
        return frozenset(out)

    def initial(self) -> frozenset:
        return self._closure([self.start], first=True)

    def step(self, states: frozenset, ch: str) -> frozenset:
        key = (states, ch)
        out = self._steps.get(key)
        if out is None:
            if len(self._steps) > 1 << 16:
                self._steps.clear()
            out = self._closure([t for s in states for cs, t in self.moves[s]
                                 if _contains(cs, ch)])  # fmt: skip
            self._steps[key] = out
        return out

    def accepts(self, states: frozenset) -> bool:
        """Whether the string may end here (the end reached by empty and "$" moves)."""
        return not self.at_end.isdisjoint(states)

    def can_end(self, states: frozenset, n: int, min_len: int, max_len: int | None) -> bool:
        """Whether, n characters in, a match of min_len..max_len characters can still end."""
        if not states:
            return False
        room = None if max_len is None else max_len - n
        need = min_len - n
        if need <= 0:
            return room is None or min(self.dist[s] for s in states) <= room
        later = self._after(states, need)  # (every longer match passes through these)
        if not later:
            return False
        return room is None or min(self.dist[s] for s in later) <= room - need

    def _after(self, states: frozenset, k: int) -> frozenset:
        """The live states exactly k characters (any) later. The sets met along the way
        repeat after at most 2^states steps, in practice a few: a repeat makes a huge k
        (a minLength of 10^9) a lookup in the cycle found."""
        key = (states, k)
        out = self._later.get(key)
        if out is None:
            seen, path, out = {states: 0}, [states], states
            for i in range(1, k + 1):
                out = self._closure([t for s in out for _, t in self.moves[s]])
                if out in seen:  # a cycle from seen[out] of length i − seen[out]
                    j = seen[out]
                    out = path[j + (k - j) % (i - j)]
                    break
                seen[out] = i
                path.append(out)
            if len(self._later) > 1 << 12:
                self._later.clear()
            self._later[key] = out
        return out


def format_regex(name) -> Regex | None:
    """The Regex of a JSON schema format, None for one not in FORMATS."""
    pattern = FORMATS.get(name) if isinstance(name, str) else None
    return None if pattern is None else _format(pattern)


@cache
def _format(pattern: str) -> Regex:
    return Regex(pattern, "format")
