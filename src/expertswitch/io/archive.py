"""The expert archive: a directory holding

    expert.json         manifest: format and version, method and its parameters, base
                        fingerprint, one entry per stored tensor (its meta and its parts), a
                        sha256 and shape/dtype per part, sizes, a sha256 and size per copied
                        file, and `seal`: the sha256 of all of the above
    delta.safetensors   the parts (packed codes, scales, zeros, salient indices and columns,
                        exact tensors), named "<tensor>::<part>"
    config.json, ...    the expert's config and tokenizer files, so a reconstruction is complete

An archive is exactly what was written or it does not open: the seal covers every byte of the
manifest's meaning (a changed scale_exp, a removed tensor entry), the parts' checksums cover the
delta file, the files' checksums cover what a reconstruction copies — and only the files the
manifest lists are ever copied. (Checksums catch corruption and edits; they are not signatures:
someone who rewrites the whole archive consistently makes another valid archive.)

This module knows parts and checksums, not quantization: what a tensor's parts mean is
compress/packed.py's business. The layout of the parts is specified in docs/archive.md.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from expertswitch.errors import ArchiveError
from expertswitch.utils.fs import atomic_directory

FORMAT = "expertswitch-delta"
FORMAT_VERSION = 2  # 2: sealed manifest, checksummed files, whole-tensor base fingerprint
MANIFEST = "expert.json"
DELTA_FILE = "delta.safetensors"
SEP = "::"


_HEADER_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                  "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
                  "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}  # fmt: skip


def part_key(tensor: str, part: str) -> str:
    return f"{tensor}{SEP}{part}"


def checksum(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def file_checksum(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def manifest_seal(manifest: dict) -> str:
    """sha256 of the manifest's content (all but `seal`), independent of its formatting."""
    body = {k: v for k, v in manifest.items() if k != "seal"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sealed(manifest: dict) -> dict:
    return {**manifest, "seal": manifest_seal(manifest)}


def is_archive(path: Path) -> bool:
    """`path` holds an archive and nothing else (what --overwrite may replace): a manifest of
    this format, the delta file and the files it lists."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return False
    files = manifest.get("files")
    own = {MANIFEST, DELTA_FILE, *(files if isinstance(files, dict) else AUX_NAMES)}
    return all(p.name in own for p in path.iterdir())


# what a version-1 archive (no file list) may hold besides its manifest and delta
AUX_NAMES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
             "chat_template.jinja", "vocab.json", "merges.txt")  # fmt: skip


@dataclass
class ArchiveEntry:
    """One stored tensor: `kind` ("quantized" or "exact"), its meta and its part names."""

    name: str
    kind: str
    meta: dict
    parts: list[str]


def write_archive(
    out_dir: str | Path,
    manifest: dict | Callable[[list[ArchiveEntry]], dict],
    entries: Iterable[tuple[ArchiveEntry, dict[str, torch.Tensor]]],
    files: dict[str, Path],
    overwrite: bool = False,
) -> Path:
    """Write atomically: everything goes to a temporary sibling directory that is renamed into
    place at the end, so a failure leaves no half-written archive (and an old one intact).

    `entries` may be a generator: each tensor's parts are written as they come and dropped, so
    peak memory is one tensor's parts. `manifest` may be a function of the entries written
    (their meta, no tensors), called once they are all in."""
    from expertswitch.io.stream_writer import StreamingSafetensorsWriter
    from expertswitch.utils.fs import check_output_dir

    out = check_output_dir(out_dir, {}, overwrite, is_archive, "expert archive")
    for name in files:
        _check_file_name(name, out)
    with atomic_directory(out) as tmp:
        records, parts_meta, written = {}, {}, []
        writer = StreamingSafetensorsWriter(tmp / DELTA_FILE)
        try:
            for entry, parts in entries:
                t = None
                records[entry.name] = {"kind": entry.kind, **entry.meta, "parts": sorted(parts)}
                for part in sorted(parts):
                    key = part_key(entry.name, part)
                    t = parts[part].detach().contiguous().cpu()
                    writer.add(key, t)
                    parts_meta[key] = {
                        "shape": list(t.shape),
                        "dtype": str(t.dtype).removeprefix("torch."),
                        "sha256": checksum(t),
                    }
                written.append(ArchiveEntry(entry.name, entry.kind, entry.meta, sorted(parts)))
                del entry, parts, t  # written: not held while the next tensor is produced
            writer.finish({"format": FORMAT})
        except BaseException:
            writer.abort()
            raise
        copied = {}
        for name, src in files.items():
            shutil.copyfile(src, tmp / name)
            copied[name] = {"bytes": (tmp / name).stat().st_size,
                            "sha256": file_checksum(tmp / name)}  # fmt: skip
        full = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **(manifest(written) if callable(manifest) else manifest),
            "delta_file": {"name": DELTA_FILE, "bytes": (tmp / DELTA_FILE).stat().st_size},
            "tensors": records,
            "parts": parts_meta,
            "files": copied,
        }
        text = json.dumps(sealed(full), indent=1) + "\n"
        (tmp / MANIFEST).write_text(text, encoding="utf-8")
    return out


class Archive:
    """An opened, verified archive. `entries` by tensor name; `parts(name)` reads its tensors."""

    def __init__(self, path: str | Path, verify: bool = True):
        self.path = Path(path)
        self.manifest = _read_manifest(self.path)
        delta = self.path / DELTA_FILE
        expected = self.manifest["delta_file"]["bytes"]
        if not delta.is_file():
            raise ArchiveError(f"archive {self.path} has no {DELTA_FILE}: it is incomplete")
        actual = delta.stat().st_size
        if actual != expected:
            raise ArchiveError(
                f"{delta} is {actual} bytes but the manifest records {expected}: the archive is "
                "truncated or was modified; copy it again or re-run `expertswitch compress`"
            )
        try:
            self._file = safe_open(str(delta), framework="pt")
        except (SafetensorError, OSError) as e:
            raise ArchiveError(f"{delta} is corrupt ({e}); re-run expertswitch compress") from None
        stored = set(self._file.keys())
        listed = set(self.manifest["parts"])
        if stored != listed:
            odd = sorted(stored ^ listed)[0]
            raise ArchiveError(f"{delta} and its manifest disagree on the parts stored (e.g. "
                               f"{odd}): the archive is corrupt; re-run `expertswitch "
                               "compress`")  # fmt: skip
        for key in sorted(stored):  # the checksums cover the bytes; these, their meaning
            rec = self.manifest["parts"][key]
            sl = self._file.get_slice(key)
            header = (_HEADER_DTYPES.get(sl.get_dtype()), list(sl.get_shape()))
            if header != (rec.get("dtype"), rec.get("shape")):
                raise ArchiveError(f"part {key} of {self.path} is stored as {header[0]} "
                                   f"{header[1]} but the manifest records {rec.get('dtype')} "
                                   f"{rec.get('shape')}: the archive is corrupt; re-run "
                                   "`expertswitch compress`")  # fmt: skip
        self.entries = {
            name: _entry(name, rec, self.path) for name, rec in self.manifest["tensors"].items()
        }
        for e in self.entries.values():
            missing = [p for p in e.parts if part_key(e.name, p) not in listed]
            if missing:
                raise ArchiveError(f"{self.path / MANIFEST}: tensor {e.name} names part "
                                   f"{missing[0]!r}, which is not stored; the archive is "
                                   "corrupt: re-run `expertswitch compress`")  # fmt: skip
        if verify:
            self.verify()

    @property
    def base_fingerprint(self) -> str:
        return self.manifest["base"]["fingerprint"]

    def _read_part(self, key: str) -> torch.Tensor:
        try:
            return self._file.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ArchiveError(f"part {key} of {self.path} cannot be read ({e})") from None

    def verify(self) -> None:
        """Check every part against its recorded sha256 (raises ArchiveError on the first)."""
        for key, rec in self.manifest["parts"].items():
            if checksum(self._read_part(key)) != rec["sha256"]:
                raise ArchiveError(
                    f"checksum mismatch for {key} in {self.path}: the archive is corrupt; "
                    "copy it again or re-run `expertswitch compress`"
                )

    def parts(self, name: str) -> dict[str, torch.Tensor]:
        entry = self.entries[name]
        return {p: self._read_part(part_key(name, p)) for p in entry.parts}

    def __iter__(self) -> Iterator[ArchiveEntry]:
        return iter(self.entries.values())

    def aux_files(self) -> dict[str, Path]:
        """The files the archive owns besides its weights (config, tokenizer), each checked
        against its recorded size and sha256; a stray file in the directory is not one."""
        out = {}
        for name, rec in self.manifest["files"].items():
            path = self.path / name
            if not path.is_file() or path.stat().st_size != rec["bytes"] \
                    or file_checksum(path) != rec["sha256"]:  # fmt: skip
                raise ArchiveError(f"{path} is missing or differs from what the archive "
                                   "recorded: the archive is corrupt or was modified; copy it "
                                   "again or re-run `expertswitch compress`")  # fmt: skip
            out[name] = path
        return out


def _entry(name: str, rec, path: Path) -> ArchiveEntry:
    parts = rec.get("parts") if isinstance(rec, dict) else None
    kind = rec.get("kind") if isinstance(rec, dict) else None
    if not isinstance(kind, str) or not isinstance(parts, list) \
            or not all(isinstance(p, str) for p in parts):  # fmt: skip
        raise ArchiveError(
            f"{path / MANIFEST}: the entry of tensor {name} lacks a valid 'kind' or 'parts'; the "
            "manifest is corrupt: re-run `expertswitch compress`"
        )
    return ArchiveEntry(name, kind, _meta_of(rec), parts)


def _meta_of(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k not in ("kind", "parts")}


def _read_manifest(path: Path) -> dict:
    if not path.is_dir():
        raise ArchiveError(f"expert archive {path} does not exist (expected a directory)")
    mf = path / MANIFEST
    if not mf.is_file() and (path / "adapter_config.json").is_file():
        raise ArchiveError(f"{path} is a PEFT adapter (adapter_config.json), not an expert "
                           "archive: merge it into its base (peft's merge_and_unload, then "
                           "save_pretrained) and compress that checkpoint with expertswitch "
                           "compress --base BASE --expert MERGED --out ARCHIVE")  # fmt: skip
    if not mf.is_file():
        raise ArchiveError(
            f"{path} is not an expert archive: no {MANIFEST} (make one with expertswitch compress)"
        )
    try:
        manifest = json.loads(mf.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArchiveError(f"{mf} is corrupt ({e}); re-run `expertswitch compress`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArchiveError(f"{mf} is not an {FORMAT} manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArchiveError(
            f"{path} has archive format version {version}; this expertswitch reads version "
            f"{FORMAT_VERSION}: " + ("re-compress the expert with this version"
                                     if isinstance(version, int) and version < FORMAT_VERSION
                                     else "upgrade expertswitch or re-compress the expert")
        )  # fmt: skip
    if manifest.get("seal") != manifest_seal(manifest):
        raise ArchiveError(f"{mf} does not match its own checksum: the manifest was modified or "
                           "is corrupt; copy the archive again or re-run `expertswitch "
                           "compress`")  # fmt: skip
    for key in ("base", "tensors", "parts", "delta_file", "files"):
        if not isinstance(manifest.get(key), dict):
            raise ArchiveError(f"{mf} lacks a valid {key!r} section; the manifest is corrupt: "
                               "re-run `expertswitch compress`")  # fmt: skip
    size = manifest["delta_file"].get("bytes")
    valid = (
        isinstance(manifest["base"].get("fingerprint"), str)
        and isinstance(size, int) and not isinstance(size, bool)
        and all(isinstance(r, dict) and isinstance(r.get("sha256"), str)
                for r in manifest["parts"].values())
    )  # fmt: skip
    valid = valid and all(
        isinstance(r, dict) and isinstance(r.get("sha256"), str)
        and isinstance(r.get("bytes"), int) and not isinstance(r.get("bytes"), bool)
        for r in manifest["files"].values()
    )  # fmt: skip
    if not valid:
        raise ArchiveError(f"{mf} has a malformed base fingerprint, file size or checksum; "
                           "the manifest is corrupt: re-run `expertswitch compress`")  # fmt: skip
    for name in manifest["files"]:
        _check_file_name(name, path)
    return manifest


def _check_file_name(name: str, where: Path) -> None:
    """A copied file is a plain name in the archive directory: nothing that reaches outside
    it, nor the archive's own files."""
    if not isinstance(name, str) or not name or name != Path(name).name or name in (
            ".", "..", MANIFEST, DELTA_FILE) or "\\" in name:  # fmt: skip
        raise ArchiveError(f"{where}: {name!r} cannot name a file of an archive; the manifest "
                           "is corrupt")  # fmt: skip


def open_archive(path: str | Path, verify: bool = True) -> Archive:
    return Archive(path, verify=verify)
