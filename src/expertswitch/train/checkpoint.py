"""Checkpoints of a training run, and their export to Hugging Face format.

    RUN/checkpoints/step-00000400/state.pt     model, optimiser, scheduler, RNG, trainer state
    RUN/checkpoints/step-00000400/meta.json    step, and for expert-parallel runs the world
                                               size (written last)
    expert parallel: state-rank00003.pt per rank (each holds its experts and their optimiser
    state); resuming needs the same world size and ep_size (export-checkpoint, then
    model.init_from, to change them)

Each checkpoint is written into a hidden temporary directory and renamed into place, so a run
killed at any moment leaves only complete checkpoints (it loses at most one interval); the
oldest are deleted only after a newer one is in place. The data position is the step itself
(train/data.py), so nothing else is needed to resume.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from expertswitch.errors import CheckpointError
from expertswitch.utils.fs import atomic_directory

_NAME = re.compile(r"^step-(\d{8})$")
STATE_FILE = "state.pt"
META_FILE = "meta.json"


class LayoutMismatch(CheckpointError):
    """A checkpoint written by another number of expert-parallel ranks: never skipped."""


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def rank_file(rank: int) -> str:
    return f"state-rank{rank:05d}.pt"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every complete checkpoint (meta.json is written last), oldest
    first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        m = _NAME.match(d.name)
        if m and (d / META_FILE).is_file():
            out.append((int(m[1]), d))
    return sorted(out)


def _prune(run_dir: Path, keep: int) -> None:
    for _, old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def save_sharded_checkpoint(run_dir: Path, step: int, state: dict, keep: int) -> Path:
    """Every rank's `state` into one checkpoint directory (a collective: all ranks call it);
    rank 0 makes the temporary directory, renames it into place once every rank has written,
    and nothing is renamed when any rank failed (a CheckpointError on all of them)."""
    import contextlib

    import torch.distributed as dist

    from expertswitch.parallel.comm import collective

    rank, world = dist.get_rank(), dist.get_world_size()
    target = checkpoint_dir(run_dir) / f"step-{step:08d}"
    with contextlib.ExitStack() as stack:
        where = [str(stack.enter_context(atomic_directory(target))) if rank == 0 else None]
        collective("checkpoint directory broadcast", None, dist.broadcast_object_list, where, 0)
        problem = ""
        try:
            torch.save(state, Path(where[0]) / rank_file(rank))
        except OSError as e:
            problem = f"rank {rank} could not write its checkpoint shard: {e.strerror or e}"
        problems: list = [None] * world
        collective("checkpoint status gather", None, dist.all_gather_object, problems, problem)
        failed = [p for p in problems if p]
        if failed:
            raise CheckpointError("; ".join(failed) + " (the checkpoint was not kept)")
        if rank == 0:
            meta = {"step": step, "format": 1, "world_size": world, "sharded": True}
            (Path(where[0]) / META_FILE).write_text(json.dumps(meta) + "\n")
    collective("checkpoint barrier", None, dist.barrier)
    if rank == 0:
        _prune(run_dir, keep)
    return target


def save_checkpoint(run_dir: Path, step: int, state: dict, keep: int) -> Path:
    """Write `state` (tensors, numbers, strings; torch.load(weights_only=True) reads it back)
    as the checkpoint of `step`, then delete all but the newest `keep`."""
    root = checkpoint_dir(run_dir)
    target = root / f"step-{step:08d}"
    with atomic_directory(target) as tmp:
        torch.save(state, tmp / STATE_FILE)
        (tmp / META_FILE).write_text(json.dumps({"step": step, "format": 1}) + "\n")
    _prune(run_dir, keep)
    return target


def load_checkpoint(path: Path, map_location="cpu", rank: int | None = None,
                    world: int = 1) -> dict:  # fmt: skip
    """One checkpoint's state (rank: that rank's shard of an expert-parallel checkpoint)."""
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} has no readable meta.json ({e}); delete it "
                              "to resume from the one before") from None  # fmt: skip
    sharded = isinstance(meta, dict) and meta.get("sharded", False)
    if sharded != (rank is not None) or (sharded and meta.get("world_size") != world):
        have = f"{meta.get('world_size')} expert-parallel ranks" if sharded else "one process"
        raise LayoutMismatch(f"checkpoint {path} was written by {have}; resume it with the "
                              "same world size and ep_size (or export-checkpoint it and start "
                              "a new run from it with model.init_from)")  # fmt: skip
    name = rank_file(rank) if sharded else STATE_FILE
    try:
        state = torch.load(path / name, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - damaged bytes fail anywhere in unpickling
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); "
                              "delete it to resume from the one before") from None  # fmt: skip
    if not isinstance(state, dict) or not isinstance(meta, dict) \
            or state.get("step") != meta.get("step"):  # fmt: skip
        raise CheckpointError(f"checkpoint {path} is inconsistent (state and meta.json "
                              "name different steps); delete it to resume from the one "
                              "before")  # fmt: skip
    return state


def latest_state(run_dir: Path, log=print, sharded: bool = False) -> dict | None:
    """The newest checkpoint that reads back; an unreadable one is skipped with a warning (a
    disk error must not cost the whole run). None when there is none. sharded: a collective;
    a checkpoint counts only when every rank reads its shard."""
    if not sharded:
        for _, path in reversed(list_checkpoints(run_dir)):
            try:
                return load_checkpoint(path)
            except LayoutMismatch:
                raise
            except CheckpointError as e:
                log(f"warning: {e}")
        return None
    import torch.distributed as dist

    from expertswitch.parallel.comm import collective

    rank, world = dist.get_rank(), dist.get_world_size()
    found: list = [None]
    if rank == 0:  # every rank must try the same checkpoints
        found = [[str(p) for _, p in reversed(list_checkpoints(run_dir))]]
    collective("checkpoint list broadcast", None, dist.broadcast_object_list, found, 0)
    for path in found[0]:
        state, problem = None, ("", False)
        try:
            state = load_checkpoint(Path(path), rank=rank, world=world)
        except CheckpointError as e:
            problem = (str(e), isinstance(e, LayoutMismatch))
        problems: list = [None] * world
        collective("checkpoint status gather", None, dist.all_gather_object, problems, problem)
        if not any(p[0] for p in problems):
            return state
        mismatch = [p[0] for p in problems if p[1]]
        if mismatch:
            raise LayoutMismatch(mismatch[0])
        problems = [p[0] for p in problems]
        log("warning: " + "; ".join(p for p in problems if p))
    return None


def clear_partial(run_dir: Path) -> None:
    """Remove temporary directories a killed run left behind (names start with '.')."""
    root = checkpoint_dir(run_dir)
    if root.is_dir():
        for d in root.iterdir():
            if d.name.startswith(".step-") and d.is_dir():
                shutil.rmtree(d, ignore_errors=True)


def export_model(model, tokenizer, out: Path, dtype: torch.dtype | None = None) -> Path:
    """The model as an HF checkpoint (config.json, model.safetensors, tokenizer) at `out`,
    replaced atomically."""
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp, dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out)


def _is_model_dir(d: Path) -> bool:
    return (d / "config.json").is_file() and (d / "model.safetensors").is_file()


def export_checkpoint(ckpt: str | Path, out: str | Path, dtype: torch.dtype | None = None,
                      overwrite: bool = False) -> Path:  # fmt: skip
    """A run's checkpoint directory (RUN/checkpoints/step-N) → an HF checkpoint at `out` (an
    existing non-empty `out` only with overwrite, and only if it holds a model checkpoint)."""
    from expertswitch.models.causal_lm import CausalLM
    from expertswitch.utils.fs import check_output_dir
    from expertswitch.zoo.tokenizer import load_tokenizer

    ckpt = Path(ckpt)
    run_dir = ckpt.parent.parent
    if not (run_dir / "run.json").is_file() or not (ckpt / META_FILE).is_file():
        raise CheckpointError(f"{ckpt} is not a checkpoint of an `expertswitch train` run "
                              "(RUN/checkpoints/step-N with RUN/run.json)")  # fmt: skip
    check_output_dir(out, {"checkpoint": ckpt, "run": run_dir}, overwrite, _is_model_dir,
                     "model checkpoint")  # fmt: skip
    try:
        meta = json.loads((ckpt / META_FILE).read_text())
        run = json.loads((run_dir / "run.json").read_text())
        if isinstance(meta, dict) and meta.get("sharded"):  # ranks 0 … ep−1 hold all experts
            world = meta.get("world_size")
            first = load_checkpoint(ckpt, rank=0, world=world)
            shards = [first] + [load_checkpoint(ckpt, rank=r, world=world)
                                for r in range(1, first["ep_size"])]  # fmt: skip
            weights = {k: torch.cat([s["model"][k] for s in shards]) if ".experts." in k else v
                       for k, v in first["model"].items()}  # fmt: skip
            state = first
        else:
            state = load_checkpoint(ckpt)
            weights = state["model"]
        model = CausalLM.from_config(state["hf_config"])
        model.load_state_dict(weights)
        data_dir = Path(run["data"]["dir"]) if run["data"].get("dir") else run_dir / "data"
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged checkpoint fails anywhere: say where
        raise CheckpointError(f"{ckpt} cannot be exported ({type(e).__name__}: "
                              f"{str(e)[:300]}); is it damaged?") from None  # fmt: skip
    tok = load_tokenizer(data_dir) if (data_dir / "tokenizer.json").is_file() else None
    return export_model(model, tok, Path(out), dtype)
