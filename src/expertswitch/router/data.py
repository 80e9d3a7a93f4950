"""Labelled queries for training and evaluating a router.

From the zoo's corpora (the default): short queries cut from each domain's train or held-out
split — a few lines of code, a word problem, a paragraph of documentation. A style-shifted set
checks generalisation: HumanEval prompts (code never trained on), word problems of a template
held out of training, and questions phrased as chat. Or a user's JSONL file: one
{"text": ..., "expert": ...} object per line.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from expertswitch.errors import ConfigError
from expertswitch.zoo.corpora import math_problems, skill_items, word_problems

_CODE_HINT = re.compile(r"[=(:\[]")


def _code_chunks(docs: list[str], n: int, rng: random.Random) -> list[str]:
    out, tries = [], 0
    while len(out) < n and tries < 50 * n and docs:
        tries += 1
        lines = [ln for ln in rng.choice(docs).split("\n") if ln.strip()]
        if len(lines) < 4:
            continue
        k = rng.randint(2, 8)
        start = rng.randrange(0, max(1, len(lines) - k))
        chunk = "\n".join(lines[start : start + k])
        if not _CODE_HINT.search(chunk):
            continue  # lines of a docstring alone are prose, not code
        out.append(chunk)
    return out


_DEF = re.compile(r"^\s*(async\s+)?def \w+\(.*$|^\s*class \w+.*:$")


def _function_headers(docs: list[str], n: int, rng: random.Random) -> list[str]:
    """A def/class line with the docstring and lines after it, as code is usually asked
    about (HumanEval prompts look like this): without these, a signature drowned in its
    docstring reads as prose to an embedding model."""
    heads = []
    for doc in docs:
        lines = doc.split("\n")
        heads += ["\n".join(lines[i : i + rng.randint(3, 10)]) for i, ln in enumerate(lines)
                  if _DEF.match(ln)]  # fmt: skip
    rng.shuffle(heads)
    return heads[:n]


def _prose_chunks(docs: list[str], n: int, rng: random.Random) -> list[str]:
    paras = [p.strip() for d in docs for p in d.split("\n\n")
             if len(p.strip()) > 80 and not p.startswith((" ", "\t"))]  # fmt: skip
    paras = [p for p in paras if sum(c.isalpha() or c.isspace() for c in p) / len(p) > 0.85]
    rng.shuffle(paras)
    return [p[:600] for p in paras[:n]]


def _question(prompt: str) -> str:
    return prompt.removeprefix("Q: ").split("\nA:")[0].strip()


def domain_queries(corpora, split: str, n_per_domain: int, seed: int = 0):
    """(texts, labels) cut from the corpora's `split` ("train" or "heldout")."""
    rng = random.Random(f"router:{split}:{seed}")
    docs = {d: getattr(c, split) for d, c in corpora.items()}
    texts, labels = [], []
    for d in sorted(docs):
        third = n_per_domain // 3
        heldout = split == "heldout"
        if d == "code":  # code, function headers and REPL lines (the code expert's skill)
            qs = _code_chunks(docs[d], n_per_domain - 2 * third, rng)
            qs += _function_headers(docs[d], third, rng)
            qs += [it.prompt for it in skill_items(d, third, heldout, seed + 17)]
        elif d == "math":  # additions (the skill) and word problems
            half = n_per_domain // 2
            qs = [_question(p.prompt) for p in
                  math_problems(n_per_domain - half, heldout, seed + 17)]  # fmt: skip
            qs += [_question(p.prompt) for p in word_problems(half, heldout, seed + 17)]
        else:  # documentation and numbers to write in words (the skill)
            qs = _prose_chunks(docs[d], n_per_domain - third, rng)
            qs += [it.prompt for it in skill_items(d, third, heldout, seed + 17)]
        if split == "train":  # a quarter of the queries wrapped in a chat phrasing
            qs = [rng.choice(_TRAIN_CHAT[d]).format(x=q) if i % 4 == 0 else q
                  for i, q in enumerate(qs)]  # fmt: skip
        texts += qs
        labels += [d] * len(qs)
    return texts, labels


_PROSE_CHAT = (
    "Can you explain {t} in Python?",
    "What does the language reference say about {t}?",
    "I'm reading about {t} and I'm confused. Could you describe it in plain words?",
)
# Chat phrasings seen in training (the style-shift set uses the different ones above), so a
# router meant for chat traffic has seen questions at all.
_TRAIN_CHAT = {
    "code": ("What does this code do?\n{x}", "Fix the bug in:\n{x}", "Refactor this:\n{x}"),
    "math": ("Solve: {x}", "{x} Show your work.", "Can you work this out? {x}"),
    "prose": ("Summarize this passage: {x}", "Explain in simpler words: {x}",
              "Tell me more about this: {x}"),
}  # fmt: skip
_MATH_CHAT = ("Please help me with this: {q}", "Quick question: {q}", "{q} Explain briefly.")


def style_shift_queries(corpora, n_per_domain: int, seed: int = 0):
    """(queries, labels): HumanEval prompts; held-out-template word problems and chat-phrased
    problems; chat questions about documented language topics. Some are chat message lists."""
    rng = random.Random(f"router:shift:{seed}")
    code = list(corpora["code"].extra.get("humaneval", []))[:n_per_domain]
    unseen = math_problems(n_per_domain, True, seed, unseen_template=True)
    maths = []
    for i, p in enumerate(unseen):
        q = _question(p.prompt)
        maths.append(
            q if i % 2 else [{"role": "user", "content": rng.choice(_MATH_CHAT).format(q=q)}]
        )
    topics = _doc_topics()
    prose = [[{"role": "system", "content": "You are a helpful assistant."},
              {"role": "user", "content": rng.choice(_PROSE_CHAT).format(t=t)}]
             for t in rng.sample(topics, min(n_per_domain, len(topics)))]  # fmt: skip
    queries = code + maths + prose
    labels = ["code"] * len(code) + ["math"] * len(maths) + ["prose"] * len(prose)
    return queries, labels


def _doc_topics() -> list[str]:
    """The language reference's section titles ('the "while" statement', 'lambdas')."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return ['the "with" statement', "assignment statements", "the import system"]
    titles = []
    for key in sorted(topics):
        first = topics[key].strip().split("\n")[0].strip()
        if 3 < len(first) < 60 and not first.startswith(("*", "=")):
            titles.append(first[0].lower() + first[1:])
    return sorted(set(titles))


def read_jsonl(path: str | Path) -> tuple[list[str], list[str]]:
    """{"text": ..., "expert": ...} per line → (texts, labels), with errors naming the line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"router data file {p} does not exist")
    raw = p.read_bytes()
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"{p}:{line}: not UTF-8 (byte {e.start}); re-encode the file as UTF-8"
        ) from None
    texts, labels = [], []
    for i, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            text, expert = obj["text"], obj["expert"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConfigError(f'{p}:{i}: expected {{"text": ..., "expert": ...}}') from None
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"{p}:{i}: empty text; remove the line or give it text")
        if not isinstance(expert, str) or not expert:
            raise ConfigError(f"{p}:{i}: 'expert' must be a non-empty name")
        texts.append(text)
        labels.append(expert)
    if not texts:
        raise ConfigError(f"{p} holds no examples")
    return texts, labels
