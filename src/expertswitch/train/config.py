"""`RunConfig`: one training run (model, data, optimiser, evaluation, checkpoints, KD), from a
YAML file over a named preset, validated before anything runs.

    cfg = load_config("run.yaml")                  # `preset: moe` in the file, or none
    cfg = load_config(None, preset="mos", overrides=["optim.steps=200", "kd.beta=0.5"])

Presets (small: minutes on a CPU, seconds on a GPU; benchmarks/train_moe.py scales them):
`dense`, `moe` (top-1, 8 experts on every other FFN), `pr-moe` (Pyramid-Residual: 4 then 8
experts, every MoE layer residual) and `mos` (a PR-MoE student distilled from a teacher run).
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import get_type_hints

from expertswitch.errors import ConfigError
from expertswitch.moe.pyramid import PyramidConfig, parse_expert_spec
from expertswitch.utils.typed import coerce


@dataclass
class MoESection:
    experts: str = "8x2"  # 'E×layers' terms, one per MoE layer in order (moe/pyramid.py)
    moe_every: int = 2
    first_moe_layer: int = 1
    k: int = 1
    use_residual: bool = False
    capacity_factor: float = 1.0
    eval_capacity_factor: float = 1.0
    min_capacity: int = 4
    drop_tokens: bool = True
    noisy_gate_policy: str | None = None
    use_rts: bool = True


@dataclass
class ModelSection:
    hidden_size: int = 128
    intermediate_size: int = 256  # the dense MLP's and each expert's
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    moe: MoESection | None = None
    init_from: str | None = None  # an HF checkpoint to start from (its config wins)


@dataclass
class DataSection:
    domains: list[str] = field(default_factory=lambda: ["code", "math", "prose"])
    mixture: list[float] | None = None  # sampling weight per domain; None: equal
    scale: float = 1.0  # zoo corpus scale (< 1: smaller sources, for tests)
    tokens_per_domain: int = 2_000_000
    val_tokens_per_domain: int = 65_536
    vocab_size: int = 4096  # of the tokenizer trained on the corpora
    tokenizer: str | None = None  # a tokenizer directory instead (init_from / teacher: theirs)
    seq_len: int = 128
    # where the prepared tokenizer + token streams live (default RUN/data); runs on the same
    # corpus settings may share one (benchmarks/train_moe.py does)
    dir: str | None = None


@dataclass
class OptimSection:
    steps: int = 300
    batch_size: int = 16  # sequences per optimiser step, over all ranks and micro-batches
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 30
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0


@dataclass
class KDSection:
    """Mixture-of-Students: the student is the teacher's embedding, final norm, lm_head and the
    layers `student_layers` (or `depth` evenly spread ones, first and last kept)."""

    teacher: str | None = None  # the teacher's HF checkpoint (a run's `model/`)
    student_layers: list[int] | None = None
    depth: int | None = None
    beta: float = 1.0
    temperature: float = 1.0
    stop_step: int | None = None  # staged KD: off from this step on
    plateau_patience: int | None = None  # … or after this many evaluations without improvement
    min_delta: float = 0.0  # an improvement must beat the best validation loss by this much


@dataclass
class RunConfig:
    out: str = "runs/train"
    seed: int = 0
    device: str = "auto"
    aux_loss_coef: float = 0.01
    eval_every: int = 50
    eval_windows: int = 32  # seq_len windows per domain
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    tensorboard: bool = True
    ep_size: int = 1  # expert parallelism under torchrun (world must be a multiple)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    kd: KDSection | None = None

    def __post_init__(self):
        _check(self)

    def to_dict(self) -> dict:
        return asdict(self)

    def fingerprint(self) -> dict:
        """What a resumed run must share with the checkpoint's run (not out, device, logging,
        or the step count: a run may be extended)."""
        d = self.to_dict()
        for k in ("out", "device", "tensorboard", "log_every", "keep_checkpoints"):
            d.pop(k)
        d["optim"] = {k: v for k, v in d["optim"].items() if k != "steps"}
        return d

    def moe_layers(self) -> list[dict | None] | None:
        """Per layer: None (dense) or the MoE layer's config.json entry; None if no MoE."""
        m = self.model.moe
        if m is None:
            return None
        pyr = PyramidConfig(self.model.num_layers, parse_expert_spec(m.experts), m.moe_every,
                            m.first_moe_layer, m.use_residual, m.k)  # fmt: skip
        opts = {f.name: getattr(m, f.name) for f in fields(m)
                if f.name not in ("experts", "moe_every", "first_moe_layer")}  # fmt: skip
        return [None if e is None else {"num_experts": e, **opts} for e in pyr.layer_experts()]


def _check(c: RunConfig) -> None:
    o, m, d = c.optim, c.model, c.data
    positive = {"optim.steps": o.steps, "optim.batch_size": o.batch_size,
                "optim.grad_accum": o.grad_accum, "data.seq_len": d.seq_len,
                "eval_windows": c.eval_windows, "keep_checkpoints": c.keep_checkpoints,
                "log_every": c.log_every, "ep_size": c.ep_size}  # fmt: skip
    for name, v in positive.items():
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    if o.batch_size % o.grad_accum:
        raise ConfigError(f"optim.batch_size {o.batch_size} is not a multiple of grad_accum "
                          f"{o.grad_accum}")  # fmt: skip
    if not (o.lr > 0 and 0 <= o.min_lr_ratio <= 1 and o.warmup >= 0 and o.grad_clip > 0):
        raise ConfigError("need optim.lr > 0, 0 ≤ min_lr_ratio ≤ 1, warmup ≥ 0, grad_clip > 0")
    if not (0 <= o.beta1 < 1 and 0 <= o.beta2 < 1 and o.weight_decay >= 0):
        raise ConfigError("need 0 ≤ optim.beta1, beta2 < 1 and weight_decay ≥ 0")
    if not 0 <= c.seed < 2**31:
        raise ConfigError(f"seed must be in [0, 2³¹), got {c.seed}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", c.device):
        raise ConfigError(f"device {c.device!r}: choose auto, cpu, cuda or cuda:N")
    if m.init_from is None:
        _check_model(m)
    if c.aux_loss_coef < 0 or c.eval_every < 0 or c.checkpoint_every < 0:
        raise ConfigError("aux_loss_coef, eval_every and checkpoint_every must be ≥ 0")
    if d.seq_len > m.max_position_embeddings and m.init_from is None:
        raise ConfigError(f"data.seq_len {d.seq_len} exceeds max_position_embeddings "
                          f"{m.max_position_embeddings}")  # fmt: skip
    if d.mixture is not None and (len(d.mixture) != len(d.domains) or min(d.mixture) < 0
                                  or sum(d.mixture) <= 0):  # fmt: skip
        raise ConfigError("data.mixture needs one non-negative weight per domain")
    if m.moe is not None and m.init_from is None:  # (init_from: its config.json wins)
        c.moe_layers()  # raises on a spec that does not fit the layers
    k = c.kd
    if k is not None:
        if not k.teacher:
            raise ConfigError("kd needs teacher: the teacher model's directory (a run's model/)")
        if k.student_layers is None and k.depth is None:
            raise ConfigError("kd needs student_layers (teacher layer indices) or depth")
        if k.beta < 0 or k.temperature <= 0:
            raise ConfigError("kd.beta must be ≥ 0 and kd.temperature > 0")
        if k.plateau_patience is not None and k.plateau_patience < 1:
            raise ConfigError("kd.plateau_patience must be ≥ 1 (evaluations)")
        if k.plateau_patience and not c.eval_every:
            raise ConfigError("kd.plateau_patience watches the validation loss: set eval_every")
        if m.init_from:
            raise ConfigError("kd builds the student from the teacher: drop model.init_from")


def _check_model(m: ModelSection) -> None:
    """The shapes transformers' Llama needs, and each MoE option, before anything runs."""
    from expertswitch.models.config import MoELayerSpec

    dims = {"model.hidden_size": m.hidden_size, "model.intermediate_size": m.intermediate_size,
            "model.num_layers": m.num_layers, "model.num_heads": m.num_heads,
            "model.num_kv_heads": m.num_kv_heads,
            "model.max_position_embeddings": m.max_position_embeddings}  # fmt: skip
    for name, v in dims.items():
        if v < 1:
            raise ConfigError(f"{name} must be ≥ 1, got {v}")
    if m.hidden_size % m.num_heads or m.num_heads % m.num_kv_heads:
        raise ConfigError(f"model.hidden_size {m.hidden_size} must be a multiple of "
                          f"num_heads {m.num_heads}, and num_heads of num_kv_heads "
                          f"{m.num_kv_heads}")  # fmt: skip
    if m.rope_theta <= 0:
        raise ConfigError("model.rope_theta must be > 0")
    if m.moe is not None:
        opts = {f.name: getattr(m.moe, f.name) for f in fields(m.moe)
                if f.name not in ("experts", "moe_every", "first_moe_layer")}  # fmt: skip
        MoELayerSpec(num_experts=max(parse_expert_spec(m.moe.experts)), **opts)


def _small_pr_moe() -> dict:
    return {"model": {"num_layers": 6, "moe": {"experts": "4x2+8x1", "use_residual": True}}}


PRESETS: dict[str, dict] = {
    "dense": {"model": {"num_layers": 6}},
    "moe": {"model": {"num_layers": 6, "moe": {"experts": "8x3"}}},
    "pr-moe": _small_pr_moe(),
    # the student of a pr-moe teacher: 6 → 5 layers, the first expert group loses a layer
    "mos": {"model": {"num_layers": 6}, "kd": {"teacher": "runs/pr-moe/model",
                                               "student_layers": [0, 1, 2, 4, 5]}},
}  # fmt: skip


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _build(cls, d, where: str):
    if d is None:
        return None
    if not isinstance(d, dict):
        raise ConfigError(f"{where or 'the config'} must be a mapping, got {d!r}")
    odd = [k for k in d if not isinstance(k, str)]
    if odd:
        raise ConfigError(f"setting names are words: {odd[0]!r} under "
                          f"{where or 'the top level'} is not")  # fmt: skip
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ConfigError(f"unknown setting{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(where + u for u in unknown)}: known under "
                          f"{where or 'the top level'} are {sorted(known)}")  # fmt: skip
    hints = get_type_hints(cls)
    kw = {}
    for name, value in d.items():
        sub = _SECTIONS.get((cls, name))
        if sub and value is None and known[name].default is not None:  # model, data, optim
            raise ConfigError(f"{where}{name} must be a mapping of settings, got null")
        if sub:
            kw[name] = _build(sub, value, f"{where}{name}.")
        else:
            kw[name] = coerce(value, hints[name], where + name)
    return cls(**kw)


_SECTIONS = {(RunConfig, "model"): ModelSection, (RunConfig, "data"): DataSection,
             (RunConfig, "optim"): OptimSection, (RunConfig, "kd"): KDSection,
             (ModelSection, "moe"): MoESection}  # fmt: skip


def _parse_override(item: str) -> tuple[list[str], object]:
    import yaml

    if "=" not in item:
        raise ConfigError(f"--set {item!r}: write KEY=VALUE, e.g. optim.lr=1e-3")
    key, value = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value)


def load_config(path: str | Path | None = None, preset: str | None = None,
                overrides: list[str] | None = None,
                values: dict[str, object] | None = None) -> RunConfig:  # fmt: skip
    """The preset (the file's `preset:` unless given), then the file, then KEY=VALUE overrides
    (values parsed as YAML), then `values` (dotted key → value, taken as they are: the CLI's
    --out, --steps, --device)."""
    import yaml

    data: dict = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except OSError as e:
            raise ConfigError(f"cannot read the config {path}: {e.strerror or e}") from None
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid UTF-8 YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of settings")
    name = preset or data.pop("preset", None)
    data.pop("preset", None)
    if name is not None and (not isinstance(name, str) or name not in PRESETS):
        raise ConfigError(f"unknown preset {name!r}: choose one of {sorted(PRESETS)}")
    merged = _merge(PRESETS[name], data) if name else data
    for item in overrides or []:
        keys, value = _parse_override(item)
        node = merged
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {k} is not a section")
        node[keys[-1]] = value
    for key, value in (values or {}).items():
        node = merged
        for k in key.split(".")[:-1]:
            node = node.setdefault(k, {})
        node[key.split(".")[-1]] = value
    return _build(RunConfig, merged, "")


def config_json(cfg: RunConfig) -> str:
    return json.dumps(cfg.to_dict(), indent=1, sort_keys=True) + "\n"


def from_dict(d: dict) -> RunConfig:
    return _build(RunConfig, d, "")
