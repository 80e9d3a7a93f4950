"""A checkpoint's tokenizer (models/tokenizer.py), and the token sequences of bad_words."""

from expertswitch.models.tokenizer import load_tokenizer

__all__ = ["bad_word_ids", "load_tokenizer"]


def bad_word_ids(tok, words: list[str]) -> list[list[int]]:
    """Each bad word's token ids as it starts a text and, when that is one more spelling of
    the same length, after a space ("▁word" / "Ġword") — vLLM's rule, so that the word is
    banned at the start of the answer and inside it."""
    out = []
    for word in words:
        word = word.lstrip()
        alone = tok.encode(word, add_special_tokens=False)
        spaced = tok.encode(" " + word, add_special_tokens=False)
        if alone:
            out.append(alone)
        if spaced and (not alone or (spaced[0] != alone[0] and len(spaced) == len(alone))):
            out.append(spaced)
    return out
