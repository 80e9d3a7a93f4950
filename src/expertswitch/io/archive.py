"""The expert archive: a directory holding

    expert.json         manifest: format and version, method and its parameters, base
                        fingerprint, one entry per stored tensor (its meta and its parts), a
                        sha256 and shape/dtype per part, sizes
    delta.safetensors   the parts (packed codes, scales, zeros, salient indices and columns,
                        exact tensors), named "<tensor>::<part>"
    config.json, ...    the expert's config and tokenizer files, so a reconstruction is complete

This module knows parts and checksums, not quantization: what a tensor's parts mean is
compress/packed.py's business. The layout of the parts is specified in docs/archive.md.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from expertswitch.errors import ArchiveError
from expertswitch.utils.fs import atomic_directory

FORMAT = "expertswitch-delta"
FORMAT_VERSION = 1
MANIFEST = "expert.json"
DELTA_FILE = "delta.safetensors"
SEP = "::"


def part_key(tensor: str, part: str) -> str:
    return f"{tensor}{SEP}{part}"


def checksum(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


@dataclass
class ArchiveEntry:
    """One stored tensor: `kind` ("quantized" or "exact"), its meta and its part names."""

    name: str
    kind: str
    meta: dict
    parts: list[str]


def write_archive(
    out_dir: str | Path,
    manifest: dict,
    entries: list[tuple[ArchiveEntry, dict[str, torch.Tensor]]],
    files: dict[str, Path],
    overwrite: bool = False,
) -> Path:
    """Write atomically: everything goes to a temporary sibling directory that is renamed into
    place at the end, so a failure leaves no half-written archive (and an old one intact)."""
    out = Path(out_dir)
    if out.exists() and not overwrite and any(out.iterdir()):
        raise ArchiveError(f"{out} exists and is not empty; choose another --out or remove it")
    with atomic_directory(out) as tmp:
        tensors: dict[str, torch.Tensor] = {}
        records, parts_meta = {}, {}
        for entry, parts in entries:
            records[entry.name] = {"kind": entry.kind, **entry.meta, "parts": sorted(parts)}
            for part, t in parts.items():
                key = part_key(entry.name, part)
                t = t.detach().contiguous().cpu()
                tensors[key] = t
                parts_meta[key] = {
                    "shape": list(t.shape),
                    "dtype": str(t.dtype).removeprefix("torch."),
                    "sha256": checksum(t),
                }
        save_file(tensors, str(tmp / DELTA_FILE), metadata={"format": FORMAT})
        full = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **manifest,
            "delta_file": {"name": DELTA_FILE, "bytes": (tmp / DELTA_FILE).stat().st_size},
            "tensors": records,
            "parts": parts_meta,
        }
        (tmp / MANIFEST).write_text(json.dumps(full, indent=1) + "\n", encoding="utf-8")
        for name, src in files.items():
            shutil.copyfile(src, tmp / name)
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
        self.entries = {
            name: _entry(name, rec, self.path) for name, rec in self.manifest["tensors"].items()
        }
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
        return {p.name: p for p in self.path.iterdir() if p.name not in (MANIFEST, DELTA_FILE)}


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
            f"{FORMAT_VERSION}: upgrade expertswitch or re-compress the expert"
        )
    for key in ("base", "tensors", "parts", "delta_file"):
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
    if not valid:
        raise ArchiveError(f"{mf} has a malformed base fingerprint, file size or part checksum; "
                           "the manifest is corrupt: re-run `expertswitch compress`")  # fmt: skip
    return manifest


def open_archive(path: str | Path, verify: bool = True) -> Archive:
    return Archive(path, verify=verify)
