"""The base's tokenizer (transformers' AutoTokenizer over the checkpoint's own files; nothing is
downloaded) and the text of a growing output."""

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


class Detokenizer:
    """Text of output ids, special tokens left out. Decodes the whole output each time: exact
    for any tokenizer (byte-level merges, SentencePiece spaces) and cheap at serving lengths."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
