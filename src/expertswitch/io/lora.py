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
}


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

    @classmethod
    def of(cls, model, path: str | Path) -> LoraBase:
        """For a models/decoder.Decoder loaded from `path` (tensors read from its checkpoint
        when a check needs them)."""
        from expertswitch.io.checkpoint import open_checkpoint

        def read(name: str) -> torch.Tensor:
            return open_checkpoint(path).get(name)

        return cls(Path(path), dict(model.shapes), model.lora_targets(), model.servable_names(),
                   model.lm_head.name == model.embed.name, read)  # fmt: skip


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
                self.shapes = {k: tuple(self._st.get_slice(k).get_shape())
                               for k in self._st.keys()}  # fmt: skip  # noqa: SIM118
            else:  # weights_only: tensors and containers, never code
                self._all = torch.load(path, map_location="cpu", weights_only=True)
                if not isinstance(self._all, dict) or not all(
                    isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in self._all.items()
                ):
                    raise ValueError("not a dict of named tensors")
                self.shapes = {k: tuple(v.shape) for k, v in self._all.items()}
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
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            what = "holds values that are not finite" if t.is_floating_point() else (
                f"is {t.dtype}, not floating point")  # fmt: skip
            raise CheckpointError(f"tensor {key} of {self.path} {what}: the adapter is "
                                  "corrupt; save it again")  # fmt: skip
        return t


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
    for key in ("r", "lora_alpha"):
        v = cfg.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or v <= 0:  # fmt: skip
            raise CheckpointError(f"{f}: {key} must be a positive number, not {v!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        pat = cfg.get(key) or {}
        ok = isinstance(pat, dict) and all(
            isinstance(k, str) and not isinstance(v, bool) and isinstance(v, (int, float))
            and math.isfinite(v) and v > 0 for k, v in pat.items()
        )  # fmt: skip
        if not ok:
            raise CheckpointError(f"{f}: {key} must map module names to positive numbers")
        for k in pat:
            try:
                re.compile(k)
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


def open_lora(path: str | Path, base: LoraBase, check_values: bool = True) -> LoraAdapter:
    """The adapter at `path`, checked against `base`; `check_values`: compare the copies of
    the base's tensors PEFT saved with the base's own (a different base is refused)."""
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

    parts: dict[tuple[str, str], dict[str, str]] = {}  # (kind, module) → {"A": key, "B": key}
    exact: dict[str, str] = {}
    copies: dict[str, str] = {}  # PEFT's copy of a base tensor beside an adapted layer
    for key in tensors.shapes:
        name = key.removeprefix(PREFIX)
        if m := _LINEAR.fullmatch(name):
            parts.setdefault(("linear", m["mod"]), {})[m["ab"]] = key
            continue
        if m := _EMBEDDING.fullmatch(name):
            parts.setdefault(("embedding", m["mod"]), {})[m["ab"]] = key
            continue
        if m := _BASE_COPY.fullmatch(name):
            copies[m["mod"] + ".weight"] = key
            continue
        if m := _BASE_BIAS.fullmatch(name):  # bias="all" or "lora_only": the tuned bias
            name = m["mod"] + ".bias"
        if "lora_" in name or name not in base.servable:
            raise CheckpointError(f"{where}: tensor {key} is not one the engine serves (LoRA "
                                  "factors of the attention and MLP projections, embedding or "
                                  "lm_head, or a whole norm, bias, embedding or lm_head): merge "
                                  "the adapter into its base and compress that")  # fmt: skip
        if name in exact:
            raise CheckpointError(f"{where}: {name} is stored twice; save the adapter again")
        exact[name] = key
    for name, key in copies.items():  # equal to the base's: dropped; grown: a replacement
        if name in exact:
            raise CheckpointError(f"{where}: {name} is stored twice; save the adapter again")
        want = base.shapes.get(name) or (base.shapes.get(EMBED) if name == LM_HEAD else None)
        got = tensors.shapes[key]
        if want is None:
            raise CheckpointError(f"{where}: tensor {key} copies {name}, which the base has "
                                  "not")  # fmt: skip
        if len(got) != 2 or got[1] != want[1] or got[0] < want[0]:
            raise wrong_base(f"{key} is {list(got)}, the base's {name} is {list(want)}")
        if check_values:
            ours = base.read(EMBED if name == LM_HEAD and base.tied else name).float()
            theirs = tensors.get(key)[: want[0]].float()
            if (theirs - ours).norm() > 1e-2 * ours.norm():
                raise wrong_base(f"its copy of {name} differs from the base's")
        if got[0] > want[0]:
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
        alpha = _pattern(cfg.get("alpha_pattern") or {}, mod, cfg["lora_alpha"])
        scale = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
        (linear if kind == "linear" else embedding)[name] = _Factors(ab["A"], ab["B"], scale)
        rank = max(rank, r)
    if not linear and not embedding and not exact:
        raise CheckpointError(f"{where} holds no LoRA factors: save the adapter again")
    return LoraAdapter(path, tensors.path, linear, embedding, exact, vocab, rank)


def _vocabulary(exact: dict[str, str], tensors: _Tensors, base: LoraBase, where: str):
    """The adapter's vocabulary when it replaces the embedding or lm_head with more rows
    (added tokens), after checking every whole replacement's shape; None otherwise."""
    from expertswitch.models.expert_weights import fits_base

    rows = {}
    for name, key in exact.items():
        got, want = tensors.shapes[key], base.shapes.get(name)
        if base.tied and name in (EMBED, LM_HEAD):
            raise CheckpointError(f"{where}: replaces {name} whole, and the base ties its "
                                  "embedding to lm_head; merge the adapter into its base and "
                                  "compress that")  # fmt: skip
        if want is None or not fits_base(tuple(got), tuple(want), name):
            raise CompatibilityError(f"{where}: {key} is {list(got)}, the base's {name} is "
                                     f"{None if want is None else list(want)}; serve it with "
                                     "the base it was trained on")  # fmt: skip
        if name in (EMBED, LM_HEAD):
            rows[name] = got[0]
    for name in (EMBED, LM_HEAD):
        if name not in rows and name in base.shapes:
            rows[name] = base.shapes[name][0]
    if len(set(rows.values())) > 1:
        raise CheckpointError(f"{where}: its embedding and lm_head have {rows} rows; a grown "
                              "vocabulary must be in both: save the adapter again")  # fmt: skip
    v = next(iter(rows.values()), None)
    return v if v is not None and v != base.shapes[EMBED][0] else None


def load_lora(name: str, adapter: LoraAdapter, dtype: torch.dtype):
    """The adapter's tensors as an expert's weights (models/expert_weights.ExpertWeights):
    factors and whole replacements in `dtype`, each factor B times its scale (in fp32)."""
    from expertswitch.models.expert_weights import ExpertWeights

    tensors = _Tensors(adapter.weights)

    def pair(f: _Factors, embedding: bool) -> LoraPair:
        a = tensors.get(f.a)
        b = tensors.get(f.b).float() * f.scale
        a = a.T.contiguous() if embedding else a
        return LoraPair(a.to(dtype), b.to(dtype))

    w = ExpertWeights(name, adapter.path)
    w.exact = {n: tensors.get(k).to(dtype) for n, k in adapter.exact.items()}
    w.lora = {n: pair(f, False) for n, f in adapter.linear.items()}
    w.lora_embedding = {n: pair(f, True) for n, f in adapter.embedding.items()}
    return w
