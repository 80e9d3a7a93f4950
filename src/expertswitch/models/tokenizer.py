"""A checkpoint's tokenizer: transformers' AutoTokenizer over its own files (nothing is
downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str | Path):
    """The checkpoint's tokenizer, or None when it ships no tokenizer files."""
    path = Path(path)
    if not any((path / f).is_file() for f in _FILES):
        return None
    cfg = path / "config.json"
    if (path / "tokenizer.json").is_file() and cfg.is_file():
        try:
            model_type = json.loads(cfg.read_text()).get("model_type")
        except (OSError, ValueError, AttributeError):
            model_type = None
        if model_type == "expertswitch_moe":
            # AutoTokenizer reads config.json too and warns about a model_type transformers
            # does not know; the tokenizer itself is a plain fast tokenizer
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
