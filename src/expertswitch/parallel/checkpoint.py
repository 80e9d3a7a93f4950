"""Checkpoints of expert-parallel models, one file per expert, reloadable at another ep_size.

    save_sharded(model, "ckpt/")      # on every rank (collective); each expert written once
    load_sharded(model, "ckpt/")      # on every rank of the new world: each rank reads exactly
                                      # its own experts, whatever ep_size saved them

Layout:

    ckpt/moe_checkpoint.json                 manifest: format, MoE layers (experts, kind), the
                                             sha256 of every file
    ckpt/dense.safetensors                   every parameter and buffer outside the experts
    ckpt/experts/<layer>/<expert>.safetensors one expert's tensors (module experts: its own
                                             state-dict keys; stacked: w_in, w_out, b_in, b_out)

Every file is checked against the manifest's digest before it is read, so a truncated, corrupt
or mixed-up checkpoint is refused with a CheckpointError that names the file; a model whose MoE
layers differ from the checkpoint's is refused naming the layer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from expertswitch.errors import CheckpointError
from expertswitch.io.archive import file_checksum
from expertswitch.parallel.comm import collective

MANIFEST = "moe_checkpoint.json"
FORMAT = "expertswitch-moe-sharded"
VERSION = 1


ROOT = "@root"  # the model itself is a MoE layer ("@" is in no attribute name)


def _moe_layers(model: nn.Module) -> dict[str, nn.Module]:
    """MoE layers by module name (ROOT for the model itself)."""
    from expertswitch.moe.layer import MoE

    return {(name or ROOT): m for name, m in model.named_modules() if isinstance(m, MoE)}


def _kind(layer) -> str:
    from expertswitch.moe.experts import StackedExperts

    return "stacked" if isinstance(layer.experts, StackedExperts) else "modules"


def _expert_tensors(layer, i: int) -> dict[str, torch.Tensor]:
    """Local expert i's tensors, as saved."""
    ex = layer.experts
    if _kind(layer) == "stacked":
        names = ("w_in", "w_out", "b_in", "b_out")
        return {n: getattr(ex, n)[i].detach() for n in names if getattr(ex, n) is not None}
    return {k: v.detach() for k, v in ex.experts[i].state_dict().items()}


def _expert_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the experts (kept out of dense.safetensors)."""
    out = set()
    for name, layer in _moe_layers(model).items():
        prefix = "" if name == ROOT else name + "."
        out |= {prefix + "experts." + k for k in layer.experts.state_dict()}
    return out


def _write(tensors: dict[str, torch.Tensor], path: Path) -> str:
    """Write atomically (a temporary file renamed into place); the sha256 of what was written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    # copies: tied weights (an embedding shared with the head) share memory, which safetensors
    # refuses; each key gets its own tensor, and loading fills both ties
    save_file({k: v.detach().cpu().clone() for k, v in tensors.items()}, str(tmp))
    digest = file_checksum(tmp)
    os.replace(tmp, path)
    return digest


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def save_sharded(model: nn.Module, directory: str | os.PathLike, overwrite: bool = False) -> Path:
    """Save model's experts one file each (written by one replica) and everything else once.
    Collective: every rank calls it. Refuses a directory that already holds a checkpoint unless
    overwrite=True (which replaces files, never deletes anything else)."""
    root = Path(directory)
    rank, world = _rank_world()
    layers = _moe_layers(model)
    if not layers:
        raise CheckpointError("the model has no MoE layer: save it with save_pretrained or "
                              "safetensors instead")  # fmt: skip
    problem = None  # decided on rank 0, raised on every rank (no rank left waiting)
    if rank == 0 and not overwrite:
        if (root / MANIFEST).exists():
            problem = (f"{root} already holds a MoE checkpoint: pass overwrite=True to replace "
                       "it, or choose another directory")  # fmt: skip
        elif root.is_dir() and any(root.iterdir()):
            problem = (f"{root} is not empty: choose an empty or new directory, or pass "
                       "overwrite=True (same-named files are replaced, none deleted)")  # fmt: skip
    _raise_on_all(problem)
    digests: dict[str, str] = {}
    try:
        for name, layer in layers.items():
            groups = layer.groups
            writer = rank == 0 if groups is None else rank == groups.expert_dp_ranks[0]
            if not writer:
                continue
            for i in range(layer.num_local_experts):
                g = layer.first_local_expert + i
                rel = f"experts/{name}/{g}.safetensors"
                digests[rel] = _write(_expert_tensors(layer, i), root / rel)
        if rank == 0:
            expert_keys = _expert_keys(model)
            dense = {k: v for k, v in model.state_dict().items() if k not in expert_keys}
            digests["dense.safetensors"] = _write(dense, root / "dense.safetensors")
        error = None
    except (OSError, RuntimeError, ValueError) as e:  # e.g. a full disk on one rank
        error = f"rank {rank} could not write its part: {type(e).__name__}: {e}"
    everyone = [(digests, error)]
    if world > 1:
        everyone = [None] * world
        collective("checkpoint save (all_gather_object)", None, dist.all_gather_object,
                   everyone, (digests, error))  # fmt: skip
    errors = [e for _, e in everyone if e]
    if errors:
        raise CheckpointError("; ".join(errors) + " — the checkpoint is incomplete")
    files = {k: v for d, _ in everyone for k, v in d.items()}
    wanted = [f"experts/{n}/{g}.safetensors" for n, m in layers.items()
              for g in range(m.num_experts)]  # fmt: skip
    missing = [rel for rel in wanted if rel not in files]
    if missing:  # every rank has every digest: all raise alike
        raise CheckpointError(f"no rank wrote {missing[:3]}: the model's expert-parallel "
                              "groups do not cover every expert")  # fmt: skip
    if rank == 0:
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "layers": {
                n: {"num_experts": m.num_experts, "kind": _kind(m), "saved_ep_size": m.ep_size}
                for n, m in layers.items()
            },  # fmt: skip
            "files": dict(sorted(files.items())),
        }
        tmp = root / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, root / MANIFEST)
    _barrier()
    return root


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        collective("checkpoint barrier", None, dist.barrier)


def _raise_on_all(problem: str | None) -> None:
    """Rank 0's verdict on every rank: the same CheckpointError everywhere, or none."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [problem]
        collective("checkpoint save (broadcast)", None, dist.broadcast_object_list, box, src=0)
        problem = box[0]
    if problem:
        raise CheckpointError(problem)


def read_manifest(directory: str | os.PathLike) -> dict:
    root = Path(directory)
    path = root / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{root} is not a MoE checkpoint: {MANIFEST} is missing (save one "
                              "with expertswitch.parallel.save_sharded)")  # fmt: skip
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt ({e}): save the checkpoint again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an expertswitch MoE checkpoint manifest")
    if manifest.get("version") != VERSION:
        raise CheckpointError(f"{path} has format version {manifest.get('version')!r}; this "
                              f"expertswitch reads version {VERSION}")  # fmt: skip
    layers, files = manifest.get("layers"), manifest.get("files")
    if not isinstance(layers, dict) or not isinstance(files, dict):
        raise CheckpointError(f"{path} lacks its layers or files table: save it again")
    for name, spec in layers.items():
        if not (isinstance(spec, dict) and isinstance(spec.get("num_experts"), int)
                and spec.get("kind") in ("modules", "stacked")):  # fmt: skip
            raise CheckpointError(f"{path}: layer {name!r} has a malformed entry {spec!r}")
    return manifest


def _load_checked(root: Path, rel: str, manifest: dict) -> dict[str, torch.Tensor]:
    digest = manifest["files"].get(rel)
    path = root / rel
    if not isinstance(digest, str):
        raise CheckpointError(f"{root}: the manifest lists no {rel}; the checkpoint is "
                              "incomplete or from another model")  # fmt: skip
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete (copy every "
                              "file under experts/ too)")  # fmt: skip
    if file_checksum(path) != digest:
        raise CheckpointError(f"{path} does not match the manifest's sha256: the file is "
                              "truncated, corrupt or from another save")  # fmt: skip
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} cannot be read as safetensors: {e}") from None


def _copy(dst: torch.Tensor, src: torch.Tensor, where: str) -> None:
    if dst.shape != src.shape:
        raise CheckpointError(f"{where}: the checkpoint holds shape {tuple(src.shape)}, the "
                              f"model {tuple(dst.shape)} — a model of another size")  # fmt: skip
    with torch.no_grad():
        dst.copy_(src.to(dst.dtype))


def load_sharded(model: nn.Module, directory: str | os.PathLike) -> None:
    """Load a save_sharded checkpoint into model, at any ep_size: every rank reads the dense
    file and exactly its own experts' files (digests checked first)."""
    root = Path(directory)
    manifest = read_manifest(root)
    layers = _moe_layers(model)
    saved = manifest["layers"]
    if set(saved) != set(layers):
        raise CheckpointError(f"{root} has MoE layers {sorted(saved)}, the model "
                              f"{sorted(layers)}: a checkpoint of another model")  # fmt: skip
    for name, layer in layers.items():
        spec = saved[name]
        if spec["num_experts"] != layer.num_experts or spec["kind"] != _kind(layer):
            raise CheckpointError(
                f"layer {name!r}: the checkpoint has {spec['num_experts']} {spec['kind']} "
                f"experts, the model {layer.num_experts} {_kind(layer)}"
            )
    dense = _load_checked(root, "dense.safetensors", manifest)
    expert_keys = _expert_keys(model)
    own = {k: v for k, v in model.state_dict().items() if k not in expert_keys}
    if set(dense) != set(own):
        extra, missing = sorted(set(dense) - set(own)), sorted(set(own) - set(dense))
        raise CheckpointError(f"{root}/dense.safetensors does not fit the model (unexpected "
                              f"{extra[:3]}, missing {missing[:3]})")  # fmt: skip
    for key, value in own.items():
        _copy(value, dense[key], key)
    for name, layer in layers.items():
        for i in range(layer.num_local_experts):
            g = layer.first_local_expert + i
            rel = f"experts/{name}/{g}.safetensors"
            tensors = _load_checked(root, rel, manifest)
            mine = _expert_tensors(layer, i)
            if set(tensors) != set(mine):
                raise CheckpointError(f"{root}/{rel} holds {sorted(tensors)[:4]}, the model's "
                                      f"expert {sorted(mine)[:4]}")  # fmt: skip
            if _kind(layer) == "stacked":
                for n in mine:
                    _copy(getattr(layer.experts, n)[i], tensors[n], rel + ":" + n)
            else:
                for k, v in layer.experts.experts[i].state_dict().items():
                    _copy(v, tensors[k], rel + ":" + k)
