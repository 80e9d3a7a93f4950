"""Read a Hugging Face checkpoint directory tensor by tensor.

Single-file (`model.safetensors`) and sharded (`model.safetensors.index.json` + shards) layouts.
Tensors are read one at a time through safetensors' memory map, so compressing a 7B pair holds
one tensor of each model in RAM, never two whole models.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from expertswitch.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.bin")
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
# Files besides the weights that make a checkpoint usable: carried into archives and outputs.
AUX_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "tokenizer.model", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
    "vocab.json", "merges.txt",
)  # fmt: skip


class Checkpoint:
    """A checkpoint directory: `config` (dict), tensor names, shapes, dtypes and lazy reads."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config = _read_config(self.path)
        self._file_of = _tensor_files(self.path)
        self._handles: dict[Path, object] = {}

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self._file_of)} tensors)"

    def names(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def _handle(self, name: str):
        file = self._file_of[name]
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="pt")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(
                    f"{file} is not a readable safetensors file ({e}); it may be truncated or "
                    "corrupt: re-download or re-save the checkpoint"
                ) from None
        return self._handles[file]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        code = self._handle(name).get_slice(name).get_dtype()
        if code not in _DTYPES:
            raise CheckpointError(f"tensor {name} in {self.path} has unsupported dtype {code}")
        return _DTYPES[code]

    def get(self, name: str) -> torch.Tensor:
        if name not in self._file_of:
            raise CheckpointError(f"tensor {name} is not in checkpoint {self.path}")
        try:
            return self._handle(name).get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(
                f"could not read tensor {name} from {self._file_of[name]} ({e}); the file may "
                "be truncated or corrupt"
            ) from None

    def numel(self) -> int:
        return sum(_prod(self.shape(n)) for n in self._file_of)

    def fingerprint(self) -> str:
        """Identity of this checkpoint's weights: sha256 over every tensor's name, dtype, shape
        and all of its bytes (tensor by tensor, so a re-sharded copy has the same one). Any
        change — one middle row, a norm, a few embedding rows — gives another fingerprint.
        Hashing reads the whole checkpoint once (~10 s for 14 GB); the result is cached under
        the cache directory, keyed by the path and each weight file's size and mtime."""
        stamp = self._file_stamp()
        cached = _FINGERPRINTS.get(stamp)
        if cached is None:
            cached = _read_cached_fingerprint(stamp)
        if cached is None:
            h = hashlib.sha256()
            for name in sorted(self._file_of):
                h.update(f"{name}|{self.dtype(name)}|{self.shape(name)}\n".encode())
                h.update(_tensor_bytes(self.get(name)))
            cached = FINGERPRINT_SCHEME + h.hexdigest()
            _write_cached_fingerprint(stamp, cached)
        _FINGERPRINTS[stamp] = cached
        return cached

    def _file_stamp(self) -> str:
        files = sorted(set(self._file_of.values()))
        parts = [str(self.path.resolve())]
        for f in files:  # ctime and inode: what a copy that keeps mtimes (cp -p) cannot keep
            st = f.stat()
            parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:"
                         f"{st.st_ino}:{st.st_dev}")  # fmt: skip
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    def aux_files(self) -> dict[str, Path]:
        return {f: self.path / f for f in AUX_FILES if (self.path / f).is_file()}


FINGERPRINT_SCHEME = "sha256-tensors:"
_FINGERPRINTS: dict[str, str] = {}  # file stamp → fingerprint, for this process


def _fingerprint_cache(stamp: str) -> Path:
    from expertswitch.utils.fs import cache_dir

    return cache_dir() / "fingerprints" / f"{stamp}.txt"


def _read_cached_fingerprint(stamp: str) -> str | None:
    try:
        text = _fingerprint_cache(stamp).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text if text.startswith(FINGERPRINT_SCHEME) and len(text) == len(
        FINGERPRINT_SCHEME) + 64 else None  # fmt: skip


def _write_cached_fingerprint(stamp: str, value: str) -> None:
    """Best effort (a read-only cache only costs a re-hash next time)."""
    path = _fingerprint_cache(stamp)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(value + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _read_config(path: Path) -> dict:
    if not path.exists():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file; pass the checkpoint's directory")
    cfg = path / "config.json"
    if not cfg.is_file() and (path / "adapter_config.json").is_file():
        raise CheckpointError(f"{path} is a PEFT adapter (adapter_config.json), not a whole "
                              "checkpoint: merge it into its base first (peft's "
                              "merge_and_unload, then save_pretrained) and pass that "
                              "directory")  # fmt: skip
    if not cfg.is_file():
        raise CheckpointError(
            f"{path} has no config.json: pass a Hugging Face checkpoint directory "
            "(as written by save_pretrained)"
        )
    try:
        return json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg} is not valid JSON ({e})") from None


def _tensor_files(path: Path) -> dict[str, Path]:
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from None
        missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if missing:
            raise CheckpointError(
                f"{path} is missing shard(s) {', '.join(missing)} listed in {INDEX_FILE}; "
                "copy or download the complete checkpoint"
            )
        return {name: path / f for name, f in weight_map.items()}
    single = path / SINGLE_FILE
    files = [single] if single.is_file() else sorted(path.glob("*.safetensors"))
    if not files:
        pickles = [f for f in _PICKLE_FILES if (path / f).exists()]
        if pickles:
            raise CheckpointError(
                f"{path} holds a PyTorch pickle checkpoint ({pickles[0]}); expertswitch reads "
                "safetensors only: load it with transformers and save_pretrained(dir, "
                "safe_serialization=True)"
            )
        raise CheckpointError(f"{path} contains no *.safetensors weights")
    out: dict[str, Path] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                out.update((k, f) for k in h.keys())  # noqa: SIM118 (safe_open is no dict)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(
                f"{f} is not a readable safetensors file ({e}); it may be truncated or corrupt"
            ) from None
    return out


def open_checkpoint(path: str | Path) -> Checkpoint:
    return Checkpoint(path)


# Image-and-text checkpoints (models/config.MULTIMODAL) keep their language model under a
# prefix: transformers 4.x's hub layout ("language_model.model.layers.0…", which transformers 5
# still writes) or 4.52+'s module tree ("model.language_model.layers.0…")
_TEXT_PREFIXES = ("language_model.model.", "model.language_model.")
_TEXT_HEADS = ("language_model.lm_head.weight", "lm_head.weight")


_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                    "model.multi_modal_projector.")  # fmt: skip


def text_name(stored: str) -> str | None:
    """The text model's name of an image-and-text checkpoint's tensor (either layout, so
    also of a PEFT adapter's module path, which follows transformers' module tree), None for
    the vision tower's and projector's; a name already a text model's (an adapter trained on
    the language model alone), or unknown, is itself (and refused where it fits nothing)."""
    if stored in _TEXT_HEADS:
        return "lm_head.weight"
    for p in _TEXT_PREFIXES:
        if stored.startswith(p):
            return "model." + stored[len(p) :]
    return None if stored.startswith(_VISION_PREFIXES) else stored


def layout_free(name: str) -> str:
    """A tensor's name alike in transformers' two layouts of an image-and-text model (4.x's
    checkpoint keys, which transformers 5 still saves, and the module tree a loaded model
    names its layers by): the language model's as a text model's, the vision tower's and
    projector's without a leading "model."; any other name as it is."""
    text = text_name(name)
    return name.removeprefix("model.") if text is None else text


class TextView:
    """The language model of an image-and-text checkpoint as a text checkpoint: its config
    (models/config.text_config) and its tensors under a text model's names; what the decoder
    reads of a Checkpoint."""

    def __init__(self, ckpt: Checkpoint):
        from expertswitch.models.config import text_config

        self.inner, self.path = ckpt, ckpt.path
        self.config = text_config(ckpt.config)
        self.raw: dict[str, str] = {}  # text name → stored name (the vision tower's left out)
        for stored in ckpt.names():
            name = text_name(stored)
            if name is None:
                continue
            if name in self.raw:
                raise CheckpointError(f"tensors {self.raw[name]} and {stored} are both the "
                                      f"language model's {name}: the checkpoint mixes two "
                                      "layouts; re-save it with transformers")  # fmt: skip
            self.raw[name] = stored

    def __repr__(self) -> str:
        return f"TextView({self.inner!r}, {len(self.raw)} language-model tensors)"

    def names(self) -> list[str]:
        return list(self.raw)

    def __contains__(self, name: str) -> bool:
        return name in self.raw

    def _stored(self, name: str) -> str:
        if name not in self.raw:
            raise CheckpointError(f"tensor {name} is not in the language model of {self.path}")
        return self.raw[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.inner.shape(self._stored(name))

    def dtype(self, name: str) -> torch.dtype:
        return self.inner.dtype(self._stored(name))

    def get(self, name: str) -> torch.Tensor:
        return self.inner.get(self._stored(name))


def text_view(ckpt: Checkpoint) -> Checkpoint | TextView:
    """`ckpt` as the text model the engine serves: itself, or its language model (TextView)
    when it is an image-and-text checkpoint."""
    from expertswitch.models.config import MULTIMODAL

    return TextView(ckpt) if ckpt.config.get("model_type") in MULTIMODAL else ckpt


# Config keys that fix the shapes of the shared weights or how they are applied; an expert may
# differ only elsewhere (vocab_size may grow with added tokens: embeddings and lm_head are
# then stored exactly). A key missing on either side is not compared here; the served
# behaviour read from both configs (_BEHAVIOUR, with transformers' defaults) is.
_ARCH_KEYS = (
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "num_local_experts", "num_experts", "moe_intermediate_size",
    "num_experts_per_tok", "norm_topk_prob", "mlp_only_layers", "decoder_sparse_step",
    "shared_expert_intermediate_size", "qkv_bias", "rope_theta", "rope_scaling",
    "rope_parameters", "original_max_position_embeddings", "partial_rotary_factor",
    "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
    "rope_local_base_freq",
)  # fmt: skip


# ModelConfig fields the engine serves an expert with from its base's config (the archive
# keeps none of the expert's): null soft caps (off) against numbers, or an activation changed
_BEHAVIOUR = ("hidden_act", "attn_softcap", "final_softcap", "attn_scale", "norm_offset",
              "embed_scale", "sandwich_norms", "qkv_bias", "o_bias", "mlp_bias", "local_rope",
              "local_layers")  # fmt: skip


def _rope_of(cfg) -> dict:
    """The RoPE parameters as served, less the context length (which may differ)."""
    return {k: v for k, v in cfg.rope.items() if k != "max_position_embeddings"}


def _check_behaviour(base: Checkpoint, expert: Checkpoint) -> None:
    from expertswitch.errors import CompatibilityError, ConfigError
    from expertswitch.models.config import MULTIMODAL, SUPPORTED, ModelConfig

    if base.config.get("model_type") not in (*SUPPORTED, *MULTIMODAL):
        return  # (a family the engine does not serve: compressed and rebuilt only)
    try:
        b = ModelConfig.from_dict(base.config)
        e = ModelConfig.from_dict({**expert.config, "vocab_size": b.vocab_size})
    except ConfigError as err:
        raise CompatibilityError(f"{expert.path}'s config.json cannot be read as a fine-tune "
                                 f"of {base.path}'s: {err}") from None  # fmt: skip
    # (the RoPE read from either key style: 4.x's rope_theta against 5's rope_parameters)
    for field, mine, theirs in [*((f, getattr(b, f), getattr(e, f)) for f in _BEHAVIOUR),
                                ("rope", _rope_of(b), _rope_of(e))]:  # fmt: skip
        if mine != theirs:
            raise CompatibilityError(
                f"base and expert are served differently: {field} is {mine!r} in {base.path} "
                f"but {theirs!r} in {expert.path}; an expert is served with its base's "
                "settings, so they must agree"
            )


def check_compatible(base: Checkpoint, expert: Checkpoint) -> None:
    """Raise CompatibilityError unless `expert` is a fine-tune of `base`'s architecture."""
    from expertswitch.errors import CompatibilityError

    for key in _ARCH_KEYS:
        b, e = base.config.get(key), expert.config.get(key)
        if b is not None and e is not None and b != e:
            raise CompatibilityError(
                f"base and expert have different architectures: {key} is {b} in {base.path} but "
                f"{e} in {expert.path}; an expert must be a fine-tune of this base"
            )
    _check_behaviour(base, expert)
    only_base = sorted(set(base.names()) - set(expert.names()))
    if only_base:
        raise CompatibilityError(
            f"expert {expert.path} lacks {len(only_base)} tensor(s) of the base, e.g. "
            f"{only_base[0]}; an expert must be a fine-tune of this base"
        )
    for name in expert.names():
        if name not in base:
            continue
        bs, es = base.shape(name), expert.shape(name)
        if bs == es:
            continue
        grew_vocab = len(bs) == 2 and bs[1:] == es[1:] and es[0] > bs[0]
        if not grew_vocab:
            raise CompatibilityError(
                f"tensor {name} has shape {list(es)} in expert {expert.path} but {list(bs)} in "
                f"base {base.path}; an expert must be a fine-tune of this base"
            )
