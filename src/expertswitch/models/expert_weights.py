"""One expert as the engine holds it: its archive's packed parts, never a dense copy of Δ̂.

    deltas  {tensor name: PackedDelta}   linear weights stored quantized (codes, scales, zeros,
                                         salient indices and columns)
    exact   {tensor name: Tensor}        tensors the expert replaces whole (norms, embeddings,
                                         lm_head, biases, the MoE router, a larger vocabulary)
    lora    {tensor name: LoraPair}      a PEFT LoRA adapter's factors (io/lora.py), served
                                         unmerged like the deltas

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
    # CPU engines that opt in: deltas' codes also in torch's CPU int4 layout (kernels/delta_cpu)
    cpu_int4: dict = field(default_factory=dict)
    # a PEFT LoRA adapter's factors (io/lora.LoraPair): of linear weights by name, and of the
    # embedding's lookup (not of a tied lm_head, which has its own under "lm_head.weight")
    lora: dict = field(default_factory=dict)
    lora_embedding: dict = field(default_factory=dict)

    def tensors(self) -> list[torch.Tensor]:
        out = list(self.exact.values())
        for d in self.deltas.values():
            out.extend(d.parts().values())
        for f in self.cpu_int4.values():
            out.extend(f.tensors())
        for p in [*self.lora.values(), *self.lora_embedding.values()]:
            out += [p.a, p.b]
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
            {k: f.map(fn) for k, f in self.cpu_int4.items()},
            {k: p.map(fn) for k, p in self.lora.items()},
            {k: p.map(fn) for k, p in self.lora_embedding.items()},
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
    text_name=None,
) -> ExpertWeights:
    """Open the archive at `path` (checksums verified), check it was made against the base with
    `base_fingerprint`, and keep its parts. Every tensor must fit the base's shapes
    (`base_shapes`) and every packed delta must be self-consistent (parts' shapes and dtypes
    agree with its meta): checksums protect the parts' bytes, not the manifest, and a kernel
    trusting a wrong shape would read out of bounds. Exact tensors are cast to `dtype` (the
    engine's compute dtype); packed parts keep their stored dtypes. text_name: the model's name
    of a stored tensor (models/decoder.Decoder.text_name: an image-and-text base's language
    model; None for its vision tower's tensors, which are skipped), None: the same name."""
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
        where = f"expert {name!r} ({path}), tensor {entry.name}"
        tensor = text_name(entry.name) if text_name is not None else entry.name
        if tensor is None:
            continue  # (the vision tower of an image-and-text base: text is served)
        if tensor not in base_shapes:
            raise ArchiveError(f"{where}: the base has no such tensor; the engine serves experts "
                               "with the base's architecture only")  # fmt: skip
        parts = archive.parts(entry.name)
        base_shape = tuple(base_shapes[tensor])
        if entry.kind == "exact":
            value = parts.get("value")
            got = None if value is None else list(value.shape)
            if got is None or not fits_base(tuple(got), base_shape, tensor) \
                    or entry.meta.get("shape") != got:  # fmt: skip
                raise ArchiveError(f"{where}: stored shape {got} (manifest: "
                                   f"{entry.meta.get('shape')}) does not fit the base's "
                                   f"{list(base_shape)}; the archive is corrupt")  # fmt: skip
            cast = dtype is not None and value.is_floating_point()
            weights.exact[tensor] = value.to(dtype) if cast else value
        elif entry.kind == "quantized":
            if entry.meta.get("transposed", False) is not False:  # Conv1D layouts: not served
                raise ArchiveError(f"{where}: a transposed (Conv1D) delta; the engine serves "
                                   "Llama-family layouts only: rebuild it with `expertswitch "
                                   "reconstruct`")  # fmt: skip
            weights.deltas[tensor] = _packed(entry.meta, parts, base_shape, where)
        else:
            raise ArchiveError(f"{where}: unknown kind {entry.kind!r}; the archive is corrupt")
    _check_vocabulary(weights, base_shapes, f"expert {name!r} ({path})")
    return weights


def _check_vocabulary(w: ExpertWeights, base_shapes: dict, where: str) -> None:
    """An expert that grew its vocabulary grew both its embedding and (untied) lm_head: a
    sampled token must be one its embedding can look up."""
    rows = {}
    for n in _GROWS:
        if n in w.exact:
            rows[n] = w.exact[n].shape[0]
        elif n in base_shapes:
            rows[n] = base_shapes[n][0]
    if len(set(rows.values())) > 1:
        raise ArchiveError(f"{where}: embedding and lm_head have {rows} rows; an expert's "
                           "vocabulary must be the same in both: the archive is "
                           "corrupt")  # fmt: skip


_GROWS = ("model.embed_tokens.weight", "lm_head.weight")  # an expert may add vocabulary rows


def fits_base(shape: tuple, base: tuple, name: str) -> bool:
    if shape == base:
        return True
    return name in _GROWS and len(shape) == 2 and shape[1] == base[1] and shape[0] > base[0]


def _sorted_below(idx: torch.Tensor, k: int) -> bool:
    if not idx.numel():
        return True
    return int(idx.min()) >= 0 and int(idx.max()) < k and not bool((idx[1:] <= idx[:-1]).any())


def _packed(meta: dict, parts: dict, base_shape: tuple, where: str) -> PackedDelta:
    """PackedDelta.from_parts, after checking that every part has the shape and dtype its
    meta implies (docs/archive.md)."""
    from expertswitch.compress.packing import SUPPORTED_BITS, padded_k, plane_widths

    def bad(what: str) -> ArchiveError:
        return ArchiveError(f"{where}: {what}; the manifest or archive is corrupt: re-run "
                            "`expertswitch compress`")  # fmt: skip

    try:
        shape, bits, group = tuple(meta["shape"]), meta["bits"], meta["group_size"]
        symmetric, scale_exp = meta["symmetric"], meta["scale_exp"]
    except (KeyError, TypeError) as e:
        raise bad(f"its entry lacks {e}") from None
    if shape != base_shape or len(shape) != 2:
        raise bad(f"shape {list(shape)} is not the base's {list(base_shape)}")
    n, k = shape
    ints = (bits, group, scale_exp)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in ints):
        raise bad("bits, group_size and scale_exp must be integers")
    if not isinstance(symmetric, bool):
        raise bad("symmetric must be true or false")
    # groups are whole words of codes (a multiple of 32; BitDelta: the row, group_size = K);
    # 2**scale_exp must be a normal fp32 and times the largest fp16 part (2**16) stay finite
    group_ok = (group % 32 == 0 and 0 < group <= 2**16) or group == k
    if bits not in SUPPORTED_BITS or not group_ok or not -126 <= scale_exp <= 111:
        raise bad(f"bits {bits}, group_size {group} or scale_exp {scale_exp} is out of range")
    groups = -(-k // group)
    want = {f"qweight.{i}": ((n, padded_k(k) * w // 32), torch.int32)
            for i, w in enumerate(plane_widths(bits))}  # fmt: skip
    want["scales"] = ((n, groups), torch.float16)
    if not symmetric:
        want["zeros"] = ((n, groups), torch.uint8)
    idx = parts.get("salient_idx")
    if idx is not None:
        s = idx.shape[-1] if idx.dim() == 1 else -1
        want["salient_idx"] = ((s,), torch.int32)
        want["salient_cols"] = ((n, s), torch.float16)
    if set(parts) != set(want):
        raise bad(f"its parts are {sorted(parts)}, expected {sorted(want)}")
    for key, (shp, dt) in want.items():
        if tuple(parts[key].shape) != shp or parts[key].dtype != dt:
            raise bad(f"part {key} is {str(parts[key].dtype)[6:]} {list(parts[key].shape)}, "
                      f"expected {str(dt)[6:]} {list(shp)}")  # fmt: skip
    if idx is not None and not _sorted_below(idx, k):
        raise bad(f"salient channels must be sorted, distinct and below {k}")
    if idx is not None and meta.get("n_salient", idx.numel()) != idx.numel():
        raise bad("n_salient disagrees with the stored salient channels")
    return PackedDelta.from_parts(meta, parts)
