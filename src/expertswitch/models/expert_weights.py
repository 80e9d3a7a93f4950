"""One expert as the engine holds it: its archive's packed parts, never a dense copy of Δ̂.

    deltas  {tensor name: PackedDelta}   linear weights stored quantized (codes, scales, zeros,
                                         salient indices and columns)
    exact   {tensor name: Tensor}        tensors the expert replaces whole (norms, embeddings,
                                         lm_head, biases, the MoE router, a larger vocabulary)

Every other tensor of the model is the base's. `load_expert` opens and verifies an archive
(checksums, base fingerprint) and keeps only what the archive stores; `to` moves all parts to a
device (the pool's tiers), `nbytes` is what they occupy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from expertswitch.compress.packed import PackedDelta
from expertswitch.errors import ArchiveError, CompatibilityError


@dataclass
class ExpertWeights:
    name: str
    path: Path | None
    deltas: dict[str, PackedDelta] = field(default_factory=dict)
    exact: dict[str, torch.Tensor] = field(default_factory=dict)

    def tensors(self) -> list[torch.Tensor]:
        out = list(self.exact.values())
        for d in self.deltas.values():
            out.extend(d.parts().values())
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def device(self) -> torch.device:
        ts = self.tensors()
        return ts[0].device if ts else torch.device("cpu")

    def map(self, fn) -> ExpertWeights:
        """A copy with `fn` applied to every tensor (device moves, pinning)."""

        def packed(d: PackedDelta) -> PackedDelta:
            parts = {k: fn(v) for k, v in d.parts().items()}
            return PackedDelta.from_parts(d.meta(), parts)

        return ExpertWeights(
            self.name,
            self.path,
            {k: packed(d) for k, d in self.deltas.items()},
            {k: fn(v) for k, v in self.exact.items()},
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ExpertWeights:
        return self.map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> ExpertWeights:
        return self.map(lambda t: t if t.is_pinned() else t.pin_memory())


def load_expert(
    name: str,
    path: str | Path,
    base_fingerprint: str,
    base_shapes: dict[str, tuple[int, ...]],
    dtype: torch.dtype | None = None,
) -> ExpertWeights:
    """Open the archive at `path` (checksums verified), check it was made against the base with
    `base_fingerprint`, and keep its parts. `base_shapes`: the base's tensor shapes, so a tensor
    the model cannot place is refused now rather than ignored. Exact tensors are cast to `dtype`
    (the engine's compute dtype); packed parts keep their stored dtypes."""
    from expertswitch.io.archive import open_archive

    archive = open_archive(path)
    if archive.base_fingerprint != base_fingerprint:
        made = archive.manifest["base"].get("path", "?")
        raise CompatibilityError(
            f"expert {name!r} ({path}) is a delta against a different base: it was made from "
            f"{made}; serve it with the base it was compressed against"
        )
    weights = ExpertWeights(name, Path(path))
    for entry in archive:
        if entry.name not in base_shapes:
            raise ArchiveError(
                f"expert {name!r} ({path}) stores tensor {entry.name}, which the base does not "
                "have; the engine serves experts with the base's architecture only"
            )
        parts = archive.parts(entry.name)
        if entry.kind == "exact":
            value = parts["value"]
            weights.exact[entry.name] = value.to(dtype) if dtype and value.is_floating_point() \
                else value  # fmt: skip
        elif entry.kind == "quantized":
            shape = tuple(entry.meta["shape"])
            if shape != tuple(base_shapes[entry.name]):
                raise ArchiveError(
                    f"expert {name!r}: quantized tensor {entry.name} has shape {list(shape)} but "
                    f"the base's is {list(base_shapes[entry.name])}; the archive is corrupt"
                )
            weights.deltas[entry.name] = PackedDelta.from_parts(entry.meta, parts)
        else:
            raise ArchiveError(f"tensor {entry.name} has unknown kind {entry.kind!r} in {path}")
    return weights
