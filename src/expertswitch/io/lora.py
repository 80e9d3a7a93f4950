"""PEFT LoRA adapters served as experts, beside compressed archives (vLLM's `--lora-modules`).

An adapter directory, as PEFT's `save_pretrained` writes it (`adapter_config.json` and
`adapter_model.safetensors`, or `adapter_model.bin`), changes a linear layer's weight by
ΔW = s·B·A with A [r, K], B [N, r] and s = lora_alpha / r (lora_alpha / √r with use_rslora;
`rank_pattern` and `alpha_pattern` per module), an embedding by ΔE = s·(B·A)ᵀ from
`lora_embedding_A` [r, V] and `lora_embedding_B` [H, r], and may replace whole tensors
(`modules_to_save`: norms, embeddings, lm_head; biases with `bias="all"`). The engine serves it
unmerged: a row of the adapter's requests gets y += s·(x·Aᵀ)·Bᵀ (models/layers.add_lora) and
the base stays shared, as vLLM, S-LoRA and Punica do.

`open_lora` reads the directory's config and tensor headers and checks them against the base
(every factor's shapes against the layer it targets, the copies of the base's embedding or
lm_head that PEFT saves beside an adapted embedding against the base's own values), so an
adapter made for another model is refused when it is registered; `load_lora` reads the values.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from expertswitch.errors import CheckpointError, CompatibilityError
from expertswitch.models.expert_weights import fits_base

ADAPTER_CONFIG = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."  # PEFT's prefix on every saved name
LM_HEAD = "lm_head.weight"
EMBED = "model.embed_tokens.weight"
# files of the fine-tune's own tokenizer, when it saved one beside the adapter (added tokens)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                   "vocab.json", "merges.txt")  # fmt: skip

_LINEAR = re.compile(r"(?P<mod>.+)\.lora_(?P<ab>A|B)(?:\.[\w-]+)?\.weight")
_EMBEDDING = re.compile(r"(?P<mod>.+)\.lora_embedding_(?P<ab>A|B)(?:\.[\w-]+)?")
_BASE_COPY = re.compile(r"(?P<mod>.+)\.base_layer\.weight")
_BASE_BIAS = re.compile(r"(?P<mod>.+)\.base_layer\.bias")
# config options that change what the factors mean; an adapter using one is refused
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora)",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D layers)",
    "lora_bias": "a bias on lora_B (lora_bias)",
    "layer_replication": "layer_replication",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "kasa_config": "KaSA (kasa_config)",
    "arrow_config": "Arrow routing (arrow_config)",
}
# initialisations whose saved factors belong to a modified base (W − B₀·A₀, or a quantized W),
# which PEFT rebuilds when it loads them, unless they were saved converted
_REBASED = ("pissa", "corda", "olora", "loftq")
# the factors' dtypes served (float8 and the like: PEFT computes in a wider type)
_FLOATS = {torch.float16, torch.bfloat16, torch.float32, torch.float64}
_HEADER_FLOATS = {"F16", "BF16", "F32", "F64"}


def is_lora_dir(path: str | Path) -> bool:
    """A PEFT adapter directory (an expertswitch archive has expert.json instead)."""
    p = Path(path)
    return (p / ADAPTER_CONFIG).is_file() and not (p / "expert.json").is_file()


@dataclass
class LoraPair:
    """One layer's LoRA factors in the engine's dtype, the scale folded into `b`."""

    a: torch.Tensor  # linear: A [r, K]; embedding: Aᵀ [V, r] (looked up by token id)
    b: torch.Tensor  # s·B [N, r] (embedding: [H, r])

    @property
    def rank(self) -> int:
        return self.b.shape[1]

    def map(self, fn) -> LoraPair:
        return LoraPair(fn(self.a), fn(self.b))


@dataclass
class LoraBase:
    """What an adapter is checked against: the base's tensor shapes, the linear layers the
    engine applies LoRA to (name → [N, K]; "lm_head.weight" also when the base ties it to the
    embedding), the names an adapter may replace whole, and the base's own tensors."""

    path: Path
    shapes: dict[str, tuple[int, ...]]
    targets: dict[str, tuple[int, int]]
    servable: set[str]
    tied: bool
    read: object  # name → the base's tensor (CPU)
    # an adapter's module path → the model's name of its weight (Decoder.text_name: an
    # image-and-text base's language model; None for its vision tower's)
    text_name: object = None

    @classmethod
    def of(cls, model, path: str | Path) -> LoraBase:
        """For a models/decoder.Decoder loaded from `path` (tensors read from its checkpoint
        when a check needs them)."""
        from expertswitch.io.checkpoint import open_checkpoint, text_view

        def read(name: str) -> torch.Tensor:
            return text_view(open_checkpoint(path)).get(name)

        return cls(Path(path), dict(model.shapes), model.lora_targets(), model.servable_names(),
                   model.lm_head.name == model.embed.name, read,
                   model.text_name if model.multimodal else None)  # fmt: skip


@dataclass
class _Factors:
    a: str  # keys in the weights file
    b: str
    scale: float


@dataclass
class LoraAdapter:
    """An adapter directory, checked (its tensors not yet read)."""

    path: Path
    weights: Path
    linear: dict[str, _Factors]  # target tensor name → its factors
    embedding: dict[str, _Factors]
    exact: dict[str, str]  # tensor name → key: whole replacements
    vocab: int | None  # the adapter's vocabulary when it grew the base's
    rank: int
    stamp: tuple = ()  # the files' sizes and modification times when checked

    def changed(self) -> bool:
        """Whether its files changed since it was checked (the check no longer holds)."""
        return _stamp(self.path / ADAPTER_CONFIG, self.weights) != self.stamp

    def files(self) -> dict[str, Path]:
        """The fine-tune's own tokenizer files saved beside the adapter."""
        return {n: self.path / n for n in TOKENIZER_FILES if (self.path / n).is_file()}


class _Tensors:
    """The adapter's weights file: names, shapes and reads, each failure a CheckpointError."""

    def __init__(self, path: Path):
        self.path = path
        try:
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                self._st = safe_open(str(path), framework="pt")
                self._all = None
                slices = {k: self._st.get_slice(k) for k in self._st.keys()}  # noqa: SIM118
                self.shapes = {k: tuple(v.get_shape()) for k, v in slices.items()}
                self.floats = {k: v.get_dtype() in _HEADER_FLOATS for k, v in slices.items()}
            else:  # weights_only: tensors and containers, never code
                self._all = torch.load(path, map_location="cpu", weights_only=True)
                if not isinstance(self._all, dict) or not all(
                    isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in self._all.items()
                ):
                    raise ValueError("not a dict of named tensors")
                self.shapes = {k: tuple(v.shape) for k, v in self._all.items()}
                self.floats = {k: v.dtype in _FLOATS for k, v in self._all.items()}
        except Exception as e:  # noqa: BLE001 - any unreadable file: one clear error
            raise CheckpointError(f"{path} is not a readable adapter weights file ({e}); it "
                                  "may be truncated or corrupt: save the adapter again "
                                  "(save_pretrained)") from None  # fmt: skip

    def get(self, key: str) -> torch.Tensor:
        try:
            t = self._all[key] if self._all is not None else self._st.get_tensor(key)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(
                f"tensor {key} of {self.path} cannot be read ({e}); the "
                "file is corrupt: save the adapter again"
            ) from None
        if t.dtype not in _FLOATS:
            raise CheckpointError(f"tensor {key} of {self.path} is {t.dtype}; adapters are "
                                  "served from float16, bfloat16, float32 or float64 tensors: "
                                  "save it "
                                  "again in one of those")  # fmt: skip
        return t

    def get_as(self, key: str, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
        """The tensor in `dtype` (times `scale`, in fp32), refused unless every value is
        finite there (a value fp16 cannot hold would be inf in every row it touches)."""
        t = self.get(key)
        t = (t.float() * scale if scale != 1.0 else t).to(dtype)
        if not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"tensor {key} of {self.path} holds values that are not "
                                  f"finite in {str(dtype)[6:]}: the adapter is corrupt, or "
                                  "too large for this dtype; serve it in float32 or save it "
                                  "again")  # fmt: skip
        return t


def _stamp(*files: Path) -> tuple:
    out = []
    for f in files:
        try:
            st = f.stat()
        except OSError:
            return ()
        out.append((st.st_size, st.st_mtime_ns))
    return tuple(out)


def _positive(v) -> bool:
    """A finite positive number (JSON's ints may exceed any float: not a number here)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(float(v)) and v > 0
    except OverflowError:
        return False


def _config(path: Path) -> dict:
    f = path / ADAPTER_CONFIG
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{f} is not readable JSON ({e}): save the adapter again") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{f} is not a JSON object: save the adapter again")
    kind = cfg.get("peft_type")
    if kind != "LORA":
        raise CheckpointError(f"{path} is a {kind!r} PEFT adapter; the engine serves LoRA "
                              "adapters (peft_type LORA) and expertswitch archives: merge it "
                              "into its base (peft's merge_and_unload) and compress "
                              "that")  # fmt: skip
    for key, what in _UNSUPPORTED.items():
        if cfg.get(key):
            raise CheckpointError(f"{path}: {what} is not served; merge the adapter into its "
                                  "base (peft's merge_and_unload, then save_pretrained) and "
                                  "compress or serve that checkpoint")  # fmt: skip
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_REBASED):
        fix = ("merge it into the base it was trained with (peft's merge_and_unload) and "
               "compress that" if init.lower().startswith("loftq") else
               "save the adapter converted (save_pretrained(..., path_initial_model_for_"
               "weight_conversion=...)) to serve it over the original base")  # fmt: skip
        raise CheckpointError(f"{path}: init_lora_weights {init!r} saves factors of a modified "
                              f"base, not of the one it is served with; {fix}")  # fmt: skip
    for key in ("r", "lora_alpha"):
        if not _positive(cfg.get(key)):
            raise CheckpointError(f"{f}: {key} must be a positive number, not {cfg.get(key)!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        pat = cfg.get(key) or {}
        ok = isinstance(pat, dict) and all(
            isinstance(k, str) and _positive(v) for k, v in pat.items()
        )  # fmt: skip
        if not ok:
            raise CheckpointError(f"{f}: {key} must map module names to positive numbers")
        for k in pat:
            try:
                re.compile(rf"(.*\.)?({k})$")  # (as _pattern matches it)
            except re.error as e:
                raise CheckpointError(f"{f}: {key} key {k!r} is not a pattern ({e})") from None
    if not isinstance(cfg.get("use_rslora", False), bool):
        raise CheckpointError(f"{f}: use_rslora must be true or false")
    return cfg


def _pattern(patterns: dict, module: str, default):
    """PEFT's per-module override: the first key equal to the module's name or matching the
    end of it as a regular expression."""
    for key, v in patterns.items():
        if key == module or re.match(rf"(.*\.)?({key})$", module):
            return v
    return default


def _text_key(stored: str, text_name) -> str | None:
    """An adapter's tensor key (less PEFT's prefix) under the model's names: itself, or on an
    image-and-text base the language model's (None: the vision tower's or projector's)."""
    if text_name is None:
        return stored
    if stored.startswith("language_model.lm_head."):
        return stored.removeprefix("language_model.")
    return text_name(stored)


def open_lora(path: str | Path, base: LoraBase) -> LoraAdapter:
    """The adapter at `path`, checked against `base`: the factors' shapes against the layers
    they change, and every whole tensor against the base's own, row by row — rows equal to
    the base's are not held, other rows replace the base's (as PEFT loads them), and a copy
    PEFT saved of the frozen base that differs in most rows is another base's (refused)."""
    path = Path(path)
    cfg = _config(path)
    files = [path / n for n in WEIGHT_FILES if (path / n).is_file()]
    if not files:
        raise CheckpointError(f"{path} has {ADAPTER_CONFIG} but no {' or '.join(WEIGHT_FILES)}: "
                              "the adapter is incomplete; save it again")  # fmt: skip
    tensors = _Tensors(files[0])
    where = f"LoRA adapter {path}"
    made = cfg.get("base_model_name_or_path")
    other = f" (it was trained on {made})" if isinstance(made, str) and made else ""

    def wrong_base(what: str) -> CompatibilityError:
        return CompatibilityError(f"{where}{other} does not fit the base {base.path}: {what}; "
                                  "serve it with the base it was trained on")  # fmt: skip

    stamp = _stamp(path / ADAPTER_CONFIG, tensors.path)
    bad = [k for k, ok in tensors.floats.items() if not ok]
    if bad:
        raise CheckpointError(f"{where}: tensor {bad[0]} is not float16, bfloat16, float32 "
                              "or float64; save the adapter again in one of those")  # fmt: skip
    parts: dict[tuple[str, str], dict[str, str]] = {}  # (kind, module) → {"A": key, "B": key}
    whole: dict[str, tuple[str, bool]] = {}  # tensor name → (key, PEFT's copy of the base's)
    raw_mod: dict[str, str] = {}  # module (the model's name) → as the adapter names it
    for key in tensors.shapes:
        stored = key.removeprefix(PREFIX)
        name = _text_key(stored, base.text_name)
        if name is None:
            continue  # (the vision tower of an image-and-text base: text is served)
        for kind, pattern in (("linear", _LINEAR), ("embedding", _EMBEDDING)):
            if m := pattern.fullmatch(name):  # (the key past the module is the same in both)
                parts.setdefault((kind, m["mod"]), {})[m["ab"]] = key
                raw_mod[m["mod"]] = stored[: len(stored) - len(name) + len(m["mod"])]
                break
        if m:
            continue
        copy = bool(m := _BASE_COPY.fullmatch(name))
        if copy:
            name = m["mod"] + ".weight"
        elif m := _BASE_BIAS.fullmatch(name):  # bias="all" or "lora_only": the tuned bias
            name = m["mod"] + ".bias"
        if "lora_" in name or name not in base.servable | {LM_HEAD}:
            raise CheckpointError(f"{where}: tensor {key} is not one the engine serves (LoRA "
                                  "factors of the attention and MLP projections, embedding or "
                                  "lm_head, or a whole norm, bias, embedding or lm_head): merge "
                                  "the adapter into its base and compress that")  # fmt: skip
        if name in whole:
            raise CheckpointError(f"{where}: {name} is stored twice; save the adapter again")
        whole[name] = (key, copy)
    exact = {}
    for name, (key, copy) in whole.items():
        got = tensors.shapes[key]
        own = EMBED if name == LM_HEAD and base.tied else name  # the base's tensor
        want = base.shapes.get(own)
        if want is None or not fits_base(tuple(got), tuple(want), own):
            raise wrong_base(f"{key} is {list(got)}, the base's {own} is "
                             f"{None if want is None else list(want)}")  # fmt: skip
        changed = 0
        if len(want) == 2:  # PEFT loads the file's over the base's: rows equal to the
            changed = _changed_rows(tensors.get(key), base.read(own))  # base's are dropped
            if copy and changed > want[0] // 2:  # its frozen copy of another base
                raise wrong_base(f"its copy of {name} differs from the base's in {changed} of "
                                 f"{want[0]} rows")  # fmt: skip
        if len(want) == 2 and got[0] == want[0] and not changed:
            continue  # the base's own (an embedding or lm_head saved beside its LoRA)
        if base.tied and name in (EMBED, LM_HEAD):
            raise CheckpointError(f"{where}: replaces {name} whole, and the base ties its "
                                  "embedding to lm_head; merge the adapter into its base and "
                                  "compress that")  # fmt: skip
        exact[name] = key
    vocab = _vocabulary(exact, tensors, base, where)
    linear, embedding, rank = {}, {}, 0
    for (kind, mod), ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            missing = ({"A", "B"} - set(ab)).pop()
            which = f"lora_{'embedding_' * (kind != 'linear')}{missing}"
            raise CheckpointError(f"{where}: {mod} has no {which}: the adapter is incomplete; "
                                  "save it again")  # fmt: skip
        name = mod + ".weight"
        a, b = tensors.shapes[ab["A"]], tensors.shapes[ab["B"]]
        if kind == "linear":
            if name not in base.targets:
                raise CheckpointError(f"{where}: LoRA on {mod}, which the engine does not apply "
                                      "per request (it serves LoRA on the attention and MLP "
                                      "projections, the embedding and lm_head): merge the "
                                      "adapter into its base and compress that")  # fmt: skip
            n, k = base.targets[name]
            if name == LM_HEAD and vocab:
                n = vocab
            ok = len(a) == 2 and len(b) == 2 and a[1] == k and b[0] == n and a[0] == b[1]
            shape = f"A {list(a)}, B {list(b)}; the base's layer is [{n}, {k}]"
        else:
            if name != EMBED:
                raise CheckpointError(f"{where}: embedding LoRA on {mod}; the engine serves it "
                                      f"on {EMBED[:-7]} only")  # fmt: skip
            v, h = base.shapes[EMBED]
            v = vocab or v
            ok = len(a) == 2 and len(b) == 2 and a[1] == v and b[0] == h and a[0] == b[1]
            shape = f"A {list(a)}, B {list(b)}; the base's embedding is [{v}, {h}]"
        if not ok or not a[0]:
            raise wrong_base(f"the LoRA factors of {mod} have shapes {shape}")
        r = a[0]
        alpha = _pattern(cfg.get("alpha_pattern") or {}, raw_mod[mod], cfg["lora_alpha"])
        scale = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
        (linear if kind == "linear" else embedding)[name] = _Factors(ab["A"], ab["B"], scale)
        rank = max(rank, r)
    if not linear and not embedding and not exact:
        raise CheckpointError(f"{where} holds no LoRA factors: save the adapter again")
    return LoraAdapter(path, tensors.path, linear, embedding, exact, vocab, rank, stamp)


def _vocabulary(exact: dict[str, str], tensors: _Tensors, base: LoraBase, where: str):
    """The adapter's vocabulary when it replaces the embedding and lm_head with more rows
    (added tokens); None otherwise."""
    rows = {n: tensors.shapes[exact[n]][0] if n in exact else base.shapes[n][0]
            for n in (EMBED, LM_HEAD) if n in exact or n in base.shapes}  # fmt: skip
    if len(set(rows.values())) > 1:
        raise CheckpointError(f"{where}: its embedding and lm_head have {rows} rows; a grown "
                              "vocabulary must be in both: save the adapter again")  # fmt: skip
    v = next(iter(rows.values()), None)
    return v if v is not None and v != base.shapes[EMBED][0] else None


def _changed_rows(theirs: torch.Tensor, ours: torch.Tensor, chunk: int = 8192) -> int:
    """Rows of `theirs` (the file's; its first len(ours) rows) that are not exactly the
    base's `ours` in the file's dtype — a copy PEFT saved of the base in another dtype is the
    same cast, so it changes none; any training does. In row chunks, in the file's dtype (a
    150k-token vocabulary is not copied to fp32 whole)."""
    n = 0
    for i in range(0, ours.shape[0], chunk):
        mine = theirs[i : min(i + chunk, ours.shape[0])]
        n += int((mine != ours[i : i + chunk].to(mine.dtype)).any(dim=-1).sum())
    return n


def checked_again(name: str, adapter: LoraAdapter, base: LoraBase) -> LoraAdapter:
    """The adapter as its files are now: itself when they have not changed since it was
    checked; else checked again, and taken when it still changes the same layers with the
    same rank and vocabulary (a copy of the same files, an edited alpha) — refused otherwise,
    since the engine planned for what was registered."""
    if not adapter.changed():
        return adapter
    again = f"LoRA adapter {adapter.path} changed since it was registered as {name!r}"
    try:
        new = open_lora(adapter.path, base)
    except CheckpointError as e:
        raise CheckpointError(f"{again} and no longer loads: {e}") from None
    layout = [(set(a.linear), set(a.embedding), set(a.exact), a.vocab, a.rank)
              for a in (adapter, new)]  # fmt: skip
    if layout[0] != layout[1]:
        raise CheckpointError(f"{again}, to other layers, rank or vocabulary: register it "
                              "again (remove, then add it)")  # fmt: skip
    return new


def load_lora(name: str, adapter: LoraAdapter, dtype: torch.dtype):
    """The adapter's tensors as an expert's weights (models/expert_weights.ExpertWeights):
    factors and whole replacements in `dtype`, each factor B times its scale (in fp32)."""
    from expertswitch.models.expert_weights import ExpertWeights

    tensors = _Tensors(adapter.weights)

    def pair(f: _Factors, embedding: bool) -> LoraPair:
        a = tensors.get_as(f.a, dtype)
        b = tensors.get_as(f.b, dtype, f.scale)
        return LoraPair(a.T.contiguous() if embedding else a, b)

    w = ExpertWeights(name, adapter.path)
    w.exact = {n: tensors.get_as(k, dtype) for n, k in adapter.exact.items()}
    w.lora = {n: pair(f, False) for n, f in adapter.linear.items()}
    w.lora_embedding = {n: pair(f, True) for n, f in adapter.embedding.items()}
    return w
