"""Base checkpoint + expert archive → the expert as a plain Hugging Face checkpoint."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from expertswitch.compress.packed import PackedDelta
from expertswitch.errors import ArchiveError, CompatibilityError
from expertswitch.io.archive import Archive, open_archive
from expertswitch.io.checkpoint import (
    AUX_FILES,
    INDEX_FILE,
    SINGLE_FILE,
    Checkpoint,
    open_checkpoint,
)
from expertswitch.utils.fs import atomic_directory, check_output_dir

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def check_base(archive: Archive, base: Checkpoint) -> None:
    """Raise CompatibilityError when `base` is not the checkpoint the archive was made against."""
    found = base.fingerprint()
    if found != archive.base_fingerprint:
        made = archive.manifest["base"].get("path", "?")
        raise CompatibilityError(
            f"archive {archive.path} is a delta against a different base: it was made from "
            f"{made} (fingerprint {archive.base_fingerprint[:24]}…) but {base.path} has "
            f"fingerprint {found[:24]}…; pass the base the expert was compressed against"
        )


def expert_tensor(archive: Archive, base: Checkpoint, name: str, device: str = "cpu",
                  dtype: torch.dtype | None = None):  # fmt: skip
    """The expert's tensor `name`: base + dequantized delta, the stored exact value, or the
    base's own when the expert left it unchanged; floating tensors in `dtype` when given
    (else each in its own dtype)."""
    entry = archive.entries.get(name)
    if entry is None:
        return _cast(base.get(name), dtype)
    parts = archive.parts(name)
    if entry.kind == "exact":
        return _cast(parts["value"], dtype)
    if entry.kind != "quantized":
        raise ArchiveError(f"tensor {name} has unknown kind {entry.kind!r} in {archive.path}")
    delta = PackedDelta.from_parts(entry.meta, parts).dequantize(device)
    if entry.meta.get("transposed") is True:  # Conv1D [in, out] / Llama 4 [E, in, out]
        delta = delta.transpose(-1, -2)
    elif entry.meta.get("transposed") not in (None, False):
        raise ArchiveError(f"tensor {name} in {archive.path} has a malformed 'transposed' flag")
    if tuple(delta.shape) != base.shape(name):
        raise ArchiveError(f"tensor {name} in {archive.path} rebuilds to shape "
                           f"{tuple(delta.shape)} but the base's is {base.shape(name)}: the "
                           "archive does not belong to this base or is corrupt")  # fmt: skip
    dtype = dtype or _DTYPES.get(entry.meta["dtype"], torch.float32)
    return (base.get(name).to(device).float() + delta).to(dtype).cpu()


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def reconstruct(
    base_dir: str | Path,
    archive_dir: str | Path,
    out_dir: str | Path,
    device: str = "cpu",
    progress: bool = True,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the expert as a safetensors checkpoint (sharded above `max_shard_bytes`).

    dtype: write every floating tensor in this dtype (default: each tensor's own). A bf16
    expert rebuilt in bf16 rounds base + Δ̂ to 8 mantissa bits, which loses much of a small
    delta; float32 keeps it (and is what a server applying Δ̂ to the base computes)."""
    from tqdm.auto import tqdm

    out = check_output_dir(out_dir, {"--base": base_dir, "--delta": archive_dir}, overwrite,
                           is_reconstruction, "reconstruction")  # fmt: skip
    archive = open_archive(archive_dir)
    base = open_checkpoint(base_dir)
    check_base(archive, base)
    names = base.names() + [n for n in archive.entries if n not in base]
    with atomic_directory(out) as tmp:
        shards: list[dict[str, torch.Tensor]] = [{}]
        files: list[str] = []
        shard_names: list[list[str]] = []  # tensor names per written shard
        size = total = 0

        def flush():
            files.append(f"model-{len(files) + 1:05d}.safetensors")
            save_file(shards[-1], str(tmp / files[-1]), metadata={"format": "pt"})
            shard_names.append(list(shards[-1]))
            shards[-1] = {}

        for name in tqdm(names, desc="reconstructing", unit="tensor", disable=not progress):
            t = expert_tensor(archive, base, name, device, dtype).contiguous()
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                flush()
                size = 0
            shards[-1][name] = t
            size += nbytes
            total += nbytes
        flush()
        _finish_layout(tmp, files, shard_names, total)
        aux = archive.aux_files()  # the expert's own files, verified; the base's tokenizer
        if not any(n in aux for n in _TOKENIZER_FILES):  # only when the expert has none
            aux.update({n: p for n, p in base.aux_files().items() if n in _TOKENIZER_FILES})
        aux = {**{n: p for n, p in base.aux_files().items() if n not in _TOKENIZER_FILES
                  and n not in aux}, **aux}  # fmt: skip
        for fname, src in aux.items():
            shutil.copyfile(src, tmp / fname)
        if dtype is not None:
            _set_config_dtype(tmp / "config.json", dtype)
        provenance = {"archive": str(Path(archive_dir).resolve()),
                      "archive_seal": archive.manifest["seal"],
                      "base": str(Path(base_dir).resolve()),
                      "base_fingerprint": archive.base_fingerprint}  # fmt: skip
        (tmp / MARKER).write_text(json.dumps(provenance, indent=1) + "\n", encoding="utf-8")
    return out


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                    "vocab.json", "merges.txt")  # fmt: skip
MARKER = "expertswitch-reconstruction.json"  # what it was rebuilt from; lets --overwrite act


def is_reconstruction(path: Path) -> bool:
    """`path` holds a reconstruction and nothing else: the marker, weights, and the files a
    checkpoint carries."""
    path = Path(path)
    if not (path / MARKER).is_file():
        return False
    own = {MARKER, SINGLE_FILE, INDEX_FILE, *AUX_FILES}
    return all(p.name in own or (p.name.startswith("model-") and p.suffix == ".safetensors")
               for p in path.iterdir())  # fmt: skip


def _set_config_dtype(path: Path, dtype: torch.dtype) -> None:
    """Say the weights' dtype in config.json (transformers 5 reads "dtype", 4 "torch_dtype")."""
    if not path.is_file():
        return
    cfg = json.loads(path.read_text(encoding="utf-8"))
    name = str(dtype).removeprefix("torch.")
    for key in ("dtype", "torch_dtype"):
        if key in cfg or key == "dtype":
            cfg[key] = name
    path.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")


def _finish_layout(tmp: Path, files: list[str], names: list[list[str]], total: int) -> None:
    """One shard → model.safetensors; several → model-0000i-of-0000N + index."""
    if len(files) == 1:
        os.replace(tmp / files[0], tmp / SINGLE_FILE)
        return
    finals = [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    for f, final in zip(files, finals):
        os.replace(tmp / f, tmp / final)
    weight_map = {n: final for final, shard in zip(finals, names) for n in shard}
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
