"""Calibration text that ships with Python itself: no download, deterministic.

Three kinds of text, interleaved so that any prefix of the token stream mixes them: prose (the
interpreter's own reference documentation in `pydoc_data`, and numbers written in words), code
(standard-library sources and REPL lines) and additions with their sums — each from the
training side of the family's splits, never from what is evaluated.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from expertswitch.errors import ConfigError


def default_calibration_texts() -> list[str]:
    """Documents of prose, code and math, round-robin interleaved — drawn only from the training
    side of the built-in family's splits (zoo/corpora.py), so that nothing evaluated as held out
    was seen while choosing salient channels or step sizes."""
    from expertswitch.zoo.corpora import code_corpus, math_corpus, prose_corpus, skill_items

    def skill_docs(domain: str) -> list[str]:  # the experts' skills, eight items a document
        items = [it.text for it in skill_items(domain, 320, heldout=False, seed=0)]
        return ["\n\n".join(items[i : i + 8]) for i in range(0, len(items), 8)]

    prose = [d for pair in zip(prose_corpus(max_chars=400_000).train[:40], skill_docs("prose"))
             for d in pair]  # fmt: skip
    code = [d for pair in zip(code_corpus(max_chars=600_000).train[:40], skill_docs("code"))
            for d in pair]  # fmt: skip
    math = math_corpus(n_train_docs=80).train[:80]
    mixed = itertools.chain.from_iterable(itertools.zip_longest(prose, code, math))
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
