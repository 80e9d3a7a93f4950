"""A checkpoint's tokenizer (models/tokenizer.py), the token sequences of bad_words, and the
decoding of an answer's tokens as it grows."""

import functools

from expertswitch.models.tokenizer import load_tokenizer

__all__ = ["bad_word_ids", "decode_ids", "load_tokenizer"]


def decode_ids(tok, ids: list[int], skip_special_tokens: bool) -> str:
    """`tok.decode(ids, skip_special_tokens=...)` for a list of ints. The engine decodes a
    request's whole output at every token (exact for any tokenizer); transformers' `decode`
    first walks the list converting each element (`to_py_obj`), about half the cost of
    decoding a 64-token answer, then calls `_decode`. A tokenizer class whose `decode` is
    transformers' own is called at `_decode` directly, with what `decode` passes it (both
    in transformers 4.x and 5); any other (an overridden `decode`) through `decode`."""
    if _plain_decode(type(tok)):
        return tok._decode(ids, skip_special_tokens=skip_special_tokens)
    return tok.decode(ids, skip_special_tokens=skip_special_tokens)


@functools.cache
def _plain_decode(cls: type) -> bool:
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    return (getattr(cls, "decode", None) is PreTrainedTokenizerBase.decode
            and callable(getattr(cls, "_decode", None)))  # fmt: skip


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
