"""Load a DeepSpeed engine checkpoint of a MoE model into the same model built on
`expertswitch.moe.MoE` (the user swapped the import and keeps their checkpoints).

DeepSpeed's `engine.save_checkpoint(SAVE_DIR)` writes, for tag T (named by SAVE_DIR/latest):

    SAVE_DIR/T/mp_rank_00_model_states.pt                 {"module": everything but experts, …}
    SAVE_DIR/T/layer_{L}_expert_{E}_mp_rank_00_model_states.pt
                                                          expert E (global id) of the L-th MoE
                                                          layer in module order, its keys
                                                          `….deepspeed_moe.experts.deepspeed_experts.{E}.…`

    load_deepspeed_checkpoint(model, "SAVE_DIR")      # or SAVE_DIR/T, or tag="T"

Every tensor the model has must come from the checkpoint and every tensor of the checkpoint
must land in the model: a CheckpointError names what is missing or left over — never a
silent partial load. Files are read with torch.load(weights_only=True): tensors and plain
data only, no code.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from expertswitch.errors import CheckpointError

MODEL_FILE = "mp_rank_00_model_states.pt"


def _tag_dir(path: Path, tag: str | None) -> Path:
    if tag is None and (path / MODEL_FILE).is_file():
        return path
    if tag is None:
        latest = path / "latest"
        if not latest.is_file():
            raise CheckpointError(f"{path} is not a DeepSpeed checkpoint: it has neither "
                                  f"{MODEL_FILE} nor a 'latest' file naming a tag: pass "
                                  "tag=")  # fmt: skip
        try:
            tag = latest.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{latest} cannot be read ({e}): pass tag=") from None
    if not tag or Path(tag).name != tag or tag in (".", ".."):
        raise CheckpointError(f"tag {tag!r} is not a directory name inside {path}")
    root = path / tag
    if not root.is_dir():
        raise CheckpointError(f"{path} has no checkpoint tag {tag!r} (no {root})")
    if not (root / MODEL_FILE).is_file():
        names = sorted(p.name for p in root.glob("*.pt"))
        layout = ("ZeRO-3 partitioned" if any(n.startswith("zero_pp_rank") for n in names)
                  else "model-parallel" if any("mp_rank_01" in n for n in names)
                  else "unknown")  # fmt: skip
        raise CheckpointError(f"{root} has no {MODEL_FILE}: a {layout} layout, which this "
                              "loader does not read; consolidate it with DeepSpeed's "
                              "zero_to_fp32 first")  # fmt: skip
    return root


def _load(file: Path, trusted: bool = False) -> dict:
    if not file.is_file():
        raise CheckpointError(f"the DeepSpeed checkpoint lacks {file}: was it written with "
                              "this model (same MoE layers and expert counts)?")  # fmt: skip
    try:
        state = torch.load(file, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{file} holds objects other than tensors and plain data ({_unsupported(e)}), "
            "e.g. Megatron's args: pass trusted=True to unpickle it, only if you trust the file"
        ) from None
    except Exception as e:  # noqa: BLE001 - damaged bytes fail anywhere in unpickling
        raise CheckpointError(f"{file} cannot be read ({type(e).__name__}: {str(e)[:200]}); "
                              "is the checkpoint complete?") from None  # fmt: skip
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} does not hold a state dict")
    return state


def _unsupported(e: Exception) -> str:
    """The line of torch's weights-only message that names the refused global."""
    lines = [ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln or "global" in ln]
    return lines[0][:200] if lines else str(e)[:200]


def deepspeed_state_dict(path: str | Path, model: nn.Module, tag: str | None = None,
                         trusted: bool = False) -> dict:  # fmt: skip
    """The checkpoint's whole-model state dict, in DeepSpeed's key names (experts merged back
    from their files, by the MoE layers `model` has, in module order)."""
    from expertswitch.moe.layer import MoE

    root = _tag_dir(Path(path), tag)
    main = _load(root / MODEL_FILE, trusted)
    if not isinstance(main.get("module"), dict):
        raise CheckpointError(f"{root / MODEL_FILE} has no 'module' state dict: not a DeepSpeed "
                              "engine checkpoint")  # fmt: skip
    state = dict(main["module"])
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    for layer_id, moe in enumerate(layers):
        for expert in range(moe.num_experts):
            file = root / f"layer_{layer_id}_expert_{expert}_mp_rank_00_model_states.pt"
            state.update(_load(file, trusted))
    odd = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if odd:
        raise CheckpointError(f"the DeepSpeed checkpoint's entries {odd[:4]} are not tensors")
    return state


def load_deepspeed_checkpoint(model: nn.Module, path: str | Path, tag: str | None = None,
                              trusted: bool = False) -> None:  # fmt: skip
    """Load a DeepSpeed engine checkpoint (see the module docstring) into `model`, built with
    expertswitch's MoE where DeepSpeed's stood (ep_size 1: every expert here). trusted: the
    files may hold arbitrary Python objects (Megatron-DeepSpeed saves its args), unpickled
    only when you trust their origin."""
    from expertswitch.moe.layer import MoE, convert_deepspeed_state_dict

    if any(m.ep_size > 1 for m in model.modules() if isinstance(m, MoE)):
        raise CheckpointError("load the DeepSpeed checkpoint into the model at ep_size 1, then "
                              "save_sharded / load_sharded to spread it over ranks")  # fmt: skip
    state = convert_deepspeed_state_dict(deepspeed_state_dict(path, model, tag, trusted))
    want = model.state_dict()
    missing = sorted(set(want) - set(state))
    unmapped = sorted(set(state) - set(want))
    if missing or unmapped:
        raise CheckpointError(
            f"the DeepSpeed checkpoint does not match the model: {len(missing)} model tensors "
            f"missing from it {missing[:6]}, {len(unmapped)} checkpoint tensors with no place "
            f"in the model {unmapped[:6]}"
        )
    bad = [k for k in want if tuple(want[k].shape) != tuple(state[k].shape)]
    if bad:
        k = bad[0]
        raise CheckpointError(f"{len(bad)} tensors differ in shape, e.g. {k}: checkpoint "
                              f"{tuple(state[k].shape)}, model {tuple(want[k].shape)}")  # fmt: skip
    model.load_state_dict(state)
