"""The experts an engine serves: each name's archive or PEFT LoRA adapter (io/lora.py), checked
when registered (made for this base, only tensors the model applies per row), with what its
requests need besides weights — its EOS tokens, its vocabulary size and its tokenizer (the
archive's or adapter's own when it ships one)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from expertswitch.engine.tokenizer import load_tokenizer
from expertswitch.errors import ArchiveError, CompatibilityError, ConfigError
from expertswitch.io.archive import open_archive
from expertswitch.io.lora import LoraAdapter, LoraBase, is_lora_dir, open_lora

log = logging.getLogger(__name__)

RESERVED = ("auto", "base", "__base__")  # names that mean "the router" or "no expert"


@dataclass
class Registered:
    path: Path
    eos: frozenset[int]
    vocab: int
    tokenizer: object | None = None  # loaded on first use; False: none of its own or base's
    files: dict[str, Path] = field(default_factory=dict)  # the archive's own, verified
    lora: LoraAdapter | None = None  # a LoRA adapter, as checked when registered


class ExpertRegistry:
    def __init__(self, base_path: Path, fingerprint: str, servable: set[str], vocab: int,
                 eos: frozenset[int], tokenizer, use_tokenizers: bool = True,
                 lora_base: LoraBase | None = None, max_lora_rank: int | None = None,
                 text_name=None):  # fmt: skip
        """lora_base: what LoRA adapters are checked against (None: archives only);
        text_name: the model's name of a tensor an archive stores (Decoder.text_name: an
        image-and-text base's language model is named apart; None for the vision tower's,
        which are not served), None: the same name."""
        self.text_name = text_name or (lambda n: n)
        self.base_path, self.fingerprint = base_path, fingerprint
        self.lora_base, self.max_lora_rank = lora_base, max_lora_rank
        self.servable, self.base_vocab = servable, vocab
        self.base_eos, self.base_tokenizer = eos, tokenizer
        self.use_tokenizers = use_tokenizers
        self.entries: dict[str, Registered] = {}

    def check(self, path: str | Path) -> LoraAdapter | None:
        """What `add` checks of a LoRA adapter at `path` — its factors' shapes, and any whole
        tensor it saved against the base's row by row (an embedding saved beside the adapter
        is a read of the base's whole embedding) — for a caller to run off the engine's
        thread and hand to `add` (`checked`); None for an archive (`add` reads its manifest,
        quickly). Reads only what does not change while the engine runs."""
        if self.lora_base is None or not is_lora_dir(path):
            return None
        return open_lora(path, self.lora_base)

    def check_name(self, name: str) -> None:
        """Refuse a name `add` cannot take: reserved, empty, or registered already."""
        if not isinstance(name, str) or not name or name in RESERVED:
            raise ConfigError(f"{name!r} cannot name an expert: {', '.join(RESERVED)} and the "
                              "empty name are reserved")  # fmt: skip
        if name in self.entries:
            raise ConfigError(f"expert {name!r} is already registered; remove_expert it first")

    def add(self, name: str, path: str | Path, checked: LoraAdapter | None = None) -> Registered:
        """checked: `check(path)`'s adapter, taken unless its files changed since (then
        checked again)."""
        self.check_name(name)
        if self.lora_base is not None and is_lora_dir(path):
            fresh = checked is not None and checked.path == Path(path) and not checked.changed()
            adapter = checked if fresh else open_lora(path, self.lora_base)
            if self.max_lora_rank is not None and adapter.rank > self.max_lora_rank:
                raise ConfigError(f"LoRA adapter {path} has rank {adapter.rank}, above "
                                  f"max_lora_rank {self.max_lora_rank}: raise --max-lora-rank "
                                  "(max_lora_rank) to serve it")  # fmt: skip
            entry = Registered(Path(path), self.base_eos, adapter.vocab or self.base_vocab,
                               files=adapter.files(), lora=adapter)  # fmt: skip
            self.entries[name] = entry
            return entry
        archive = open_archive(path, verify=False)  # checksums: at load time, by the pool
        if archive.base_fingerprint != self.fingerprint:
            raise CompatibilityError(
                f"expert {name!r} ({path}) is a delta against a different base than "
                f"{self.base_path} (made from {archive.manifest['base'].get('path', '?')}); "
                "serve it with the base it was compressed against"
            )
        named, foreign = {}, []  # entries by the model's names; those it cannot apply
        for stored, e in archive.entries.items():
            tensor = self.text_name(stored)
            if tensor is None:  # (an image-and-text base's vision tower: text is served)
                continue
            named[tensor] = e
            if tensor not in self.servable:
                foreign.append(stored)
        if archive.entries and not named:
            log.warning("expert %r (%s) changes only the vision tower of the image-and-text "
                        "base; the engine serves text, so it answers as the base does",
                        name, path)  # fmt: skip
        if foreign:
            raise ArchiveError(
                f"expert {name!r} changes {len(foreign)} tensor(s) the engine cannot apply per "
                f"request, e.g. {foreign[0]} (the MoE layers of an expertswitch_moe "
                "checkpoint, and those of a Mixtral/Qwen3-MoE base saved in transformers 5's "
                "fused layout, are not served from deltas yet); rebuild it with `expertswitch "
                "reconstruct` and serve that instead"
            )
        emb = named.get("model.embed_tokens.weight")
        vocab = self.base_vocab
        if emb is not None:  # the loader checks this against the stored tensor
            shape = emb.meta.get("shape")
            if not (isinstance(shape, list) and len(shape) == 2
                    and all(isinstance(v, int) and v > 0 for v in shape)):  # fmt: skip
                raise ArchiveError(f"expert {name!r} ({path}): the embedding's shape "
                                   f"{shape!r} in the manifest is malformed; the archive is "
                                   "corrupt")  # fmt: skip
            vocab = shape[0]
        files = archive.aux_files()  # only the files the archive lists, each checked
        entry = Registered(Path(path), eos_ids(files) or self.base_eos, vocab, files=files)
        self.entries[name] = entry
        return entry

    def get(self, name: str) -> Registered:
        if name not in self.entries:
            known = ", ".join(sorted(self.entries)) or "none"
            shown = name if len(str(name)) <= 60 else str(name)[:57] + "..."
            raise ConfigError(f"unknown expert {shown!r}: registered experts are {known} "
                              "(or None for the base alone)")  # fmt: skip
        return self.entries[name]

    def remove(self, name: str) -> None:
        self.get(name)
        del self.entries[name]

    def eos(self, name: str | None) -> frozenset[int]:
        return self.base_eos if name is None else self.get(name).eos

    def vocab(self, name: str | None) -> int:
        return self.base_vocab if name is None else self.get(name).vocab

    def tokenizer(self, name: str | None):
        """The expert's own tokenizer when its archive ships one, else the base's."""
        if name is None or not self.use_tokenizers:
            return self.base_tokenizer
        entry = self.get(name)
        if entry.tokenizer is None:
            entry.tokenizer = _own_tokenizer(entry.files) or self.base_tokenizer or False
        return entry.tokenizer or None


def _own_tokenizer(files: dict[str, Path]):
    """The tokenizer among an archive's verified files, loaded from a private copy of just
    those files (a stray tokenizer file in the archive directory is never read)."""
    import shutil
    import tempfile

    if not any(n in files for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        for name, src in files.items():
            shutil.copyfile(src, Path(tmp) / name)
        return load_tokenizer(tmp)


def eos_ids(path: Path | dict[str, Path]) -> frozenset[int]:
    """EOS ids a checkpoint directory (or an archive's verified files, name → path) declares:
    config.json's and generation_config.json's eos_token_id (Llama 3 lists several)."""
    ids: set[int] = set()
    for fname in ("config.json", "generation_config.json"):
        f = path.get(fname) if isinstance(path, dict) else path / fname
        if f is None or not f.is_file():
            continue
        try:
            eos = json.loads(f.read_text(encoding="utf-8")).get("eos_token_id")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            continue
        ids |= {eos} if isinstance(eos, int) else {t for t in eos or [] if isinstance(t, int)}
    return frozenset(ids)
