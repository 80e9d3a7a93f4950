"""A checkpoint's tokenizer (models/tokenizer.py)."""

from expertswitch.models.tokenizer import load_tokenizer

__all__ = ["load_tokenizer"]
