"""Write a safetensors file one tensor at a time, holding none of them.

safetensors puts its JSON header (names, dtypes, shapes, byte offsets) before the data, so
`save_file` needs every tensor at once: writing an archive that way holds all of its parts, and
the serialisation makes a second copy (peak ≈ 2× the archive). Here each tensor's bytes go to a
spool file as it is produced; `finish` writes the header and then copies the spool after it in
1 MiB blocks. Peak memory: one tensor.

The layout is safetensors' own: 8-byte little-endian header length, the header (JSON, padded
with spaces to a multiple of 8), then the tensors' bytes back to back in the order written.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import torch

_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
    **{getattr(torch, n): c for n, c in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"))
       if hasattr(torch, n)},
}  # fmt: skip


class StreamingSafetensorsWriter:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._spool_path = self.path.with_name(self.path.name + ".spool")
        self._spool = open(self._spool_path, "wb")  # noqa: SIM115 — closed in finish/abort
        self._header: dict[str, dict] = {}
        self._offset = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        if name in self._header or name == "__metadata__":
            raise ValueError(f"tensor name {name!r} is written twice or reserved")
        if t.dtype not in _CODES:
            raise ValueError(f"safetensors cannot hold dtype {t.dtype} ({name})")
        data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
        self._spool.write(data)
        self._header[name] = {"dtype": _CODES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [self._offset, self._offset + len(data)]}  # fmt: skip
        self._offset += len(data)

    def finish(self, metadata: dict[str, str] | None = None) -> Path:
        self._spool.close()
        header = dict(self._header)
        if metadata:
            header["__metadata__"] = dict(metadata)
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        with open(self.path, "wb") as out, open(self._spool_path, "rb") as spool:
            out.write(struct.pack("<Q", len(raw)))
            out.write(raw)
            shutil.copyfileobj(spool, out, 1 << 20)
        os.remove(self._spool_path)
        return self.path

    def abort(self) -> None:
        self._spool.close()
        if self._spool_path.exists():
            os.remove(self._spool_path)
