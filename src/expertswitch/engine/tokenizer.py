"""A checkpoint's tokenizer: transformers' AutoTokenizer over its own files (nothing is
downloaded)."""

from __future__ import annotations

from pathlib import Path

_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str | Path):
    """The checkpoint's tokenizer, or None when it ships no tokenizer files."""
    path = Path(path)
    if not any((path / f).is_file() for f in _FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
