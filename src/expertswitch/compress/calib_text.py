"""Calibration text that ships with Python itself: no download, deterministic.

Three kinds of text, interleaved so that any prefix of the token stream mixes them:
prose (the interpreter's own reference documentation in `pydoc_data`), code (standard-library
sources) and procedurally generated arithmetic word problems with their answers.
"""

from __future__ import annotations

import importlib.util
import itertools
import random
from pathlib import Path

from expertswitch.errors import ConfigError

_CODE_MODULES = (
    "textwrap", "heapq", "bisect", "fractions", "statistics", "string", "calendar", "difflib",
    "shlex", "json.decoder", "argparse", "dataclasses", "functools", "queue", "csv", "ipaddress",
)  # fmt: skip


def _prose() -> list[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data; code and math still remain
        return []
    return [topics[key] for key in sorted(topics)]


def _code() -> list[str]:
    docs = []
    for name in _CODE_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin and spec.origin.endswith(".py"):
            docs.append(Path(spec.origin).read_text(encoding="utf-8"))
    return docs


def _arithmetic(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    templates = (
        "Q: {a} apples are shared equally among {b} baskets, and {c} more are added to each "
        "basket. How many apples are in one basket?\nA: {a} / {b} + {c} = {ans1}",
        "Q: A train travels {a} km per hour for {b} hours. How far does it go?\n"
        "A: {a} * {b} = {ans2}",
        "Q: What is {a} + {b} * {c}?\nA: {b} * {c} = {bc}, {a} + {bc} = {ans3}",
    )
    out = []
    for _ in range(n):
        b = rng.randint(2, 12)
        a = b * rng.randint(2, 40)
        c = rng.randint(1, 99)
        t = rng.choice(templates)
        out.append(t.format(a=a, b=b, c=c, ans1=a // b + c, ans2=a * b, bc=b * c, ans3=a + b * c))
    return out


def default_calibration_texts() -> list[str]:
    """Documents of prose, code and math, round-robin interleaved."""
    sources = [_prose(), _code(), ["\n\n".join(_arithmetic(40, seed=i)) for i in range(50)]]
    mixed = itertools.chain.from_iterable(itertools.zip_longest(*sources))
    return [doc for doc in mixed if doc]


def load_calibration_file(path: str | Path) -> list[str]:
    """A user's calibration text: plain UTF-8 text (documents split on blank lines) or JSONL
    with a "text" field per line."""
    import json

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"calibration file {p} does not exist")
    try:
        raw = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"calibration file {p} is not UTF-8 text (byte {e.start}); re-encode it as UTF-8"
        ) from None
    if p.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                docs.append(str(json.loads(line)["text"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ConfigError(
                    f'{p}:{i}: expected a JSON object with a "text" field per line'
                ) from None
    else:
        docs = [d for d in raw.split("\n\n") if d.strip()]
    if not docs:
        raise ConfigError(f"calibration file {p} holds no text")
    return docs
