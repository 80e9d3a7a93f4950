"""Build the small expert family: a Llama-architecture base trained on a mixture of the domain
corpora, then one fully fine-tuned expert per domain (all weights) on its domain's skill (answers
only are targets) beside some of its raw text, saved as HF checkpoints. docs/family.md has the
measurements the `tiny` preset was chosen by.

    family = build_family("tiny")          # cached under ~/.cache/expertswitch/zoo/
    family.base, family.experts["math"]    # checkpoint directories

Presets: `micro` (tests: seconds), `tiny` (CPU: the family in a few minutes on 2 cores; the
demo's), `small` (~90M parameters, for the GPU; rebuilt by command, never committed).
Deterministic for a seed; built in a temporary directory and renamed into place, so an
interrupted build leaves nothing half-made.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from expertswitch.errors import ConfigError
from expertswitch.train.lm import TrainConfig, supervised_stream, train_lm
from expertswitch.utils.fs import atomic_directory, cache_dir, check_output_dir
from expertswitch.zoo.corpora import DOMAINS, load_corpora, skill_items
from expertswitch.zoo.tokenizer import train_tokenizer

FAMILY_FILE = "family.json"
# Part of the cache key: bump it whenever corpora, tokenizer, presets or training change, so
# that a user's cached family is rebuilt rather than silently reused.
FORMAT_VERSION = 3


@dataclass(frozen=True)
class FamilyPreset:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    seq_len: int
    batch: int
    base_steps: int
    expert_steps: int
    lr: float
    expert_lr: float
    corpus_scale: float = 1.0
    tokens_per_domain: int = 2_000_000
    # the base is a generalist: mostly prose and code, few worked problems, so that each
    # expert's fine-tune (on data the base saw little of) carries real skill
    base_mixture: tuple[float, ...] = (0.4, 0.2, 0.4)  # code, math, prose
    # experts' early stopping: the tail share of each domain's train stream is held apart as
    # validation, checked every val_every steps; the expert keeps its best weights (0: off)
    val_share: float = 0.0
    val_every: int = 0
    # expert fine-tuning, per domain (code, math, prose): steps (0: expert_steps) and the share
    # of each batch drawn from the domain's skill items, the rest from its raw text (none for
    # math: its raw text is the base's additions);
    # and how many distinct training items each skill has
    domain_steps: tuple[int, ...] = (0, 0, 0)
    skill_share: tuple[float, ...] = (0.75, 1.0, 0.75)
    skill_items: int = 20_000

    def steps_for(self, domain: str) -> int:
        return self.domain_steps[DOMAINS.index(domain)] or self.expert_steps

    def skill_share_for(self, domain: str) -> float:
        return self.skill_share[DOMAINS.index(domain)]


PRESETS = {
    "micro": FamilyPreset("micro", 64, 2, 4, 2, 160, 512, 64, 8, 60, 30, 3e-3, 1e-3, 0.03,
                          60_000, skill_items=2000),
    # chosen by measurement (docs/family.md): a base that has seen additions as plain text (30%
    # of its mixture) but cannot add, and experts that each learn their skill in 250-500 steps;
    # ~1550 steps of 2K tokens in all, under 4 minutes on 2 cores
    "tiny": FamilyPreset("tiny", 128, 4, 4, 2, 352, 2048, 128, 16, 400, 300, 3e-3, 3e-3, 0.5,
                         600_000, (0.35, 0.3, 0.35), domain_steps=(400, 500, 250)),
    # ~90M parameters on ~3.7M distinct tokens of raw text (code ~1.9M, additions ~1.8M, prose
    # only ~0.1M: all of pydoc_data); experts fine-tune on their skill (90% of each batch), so
    # the prose one does not spend its steps memorising 100K tokens. ~2400 steps in all:
    # minutes on an H100. Not yet re-measured with the skills (a GPU run is owed).
    "small": FamilyPreset("small", 768, 12, 12, 4, 2048, 8192, 512, 32, 1200, 400, 1e-3, 2e-4,
                          3.0, 4_000_000, (0.6, 0.3, 0.1), skill_items=60_000),
}  # fmt: skip


@dataclass
class Family:
    root: Path
    preset: str
    domains: tuple[str, ...]
    manifest: dict = field(default_factory=dict)

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def experts(self) -> dict[str, Path]:
        return {d: self.root / "experts" / d for d in self.domains}


def default_cache_dir() -> Path:
    return cache_dir()


def family_dir(preset: str, seed: int, cache: Path | None = None) -> Path:
    return (cache or default_cache_dir()) / "zoo" / f"{preset}-v{FORMAT_VERSION}-seed{seed}"


def load_family(root: str | Path) -> Family:
    root = Path(root)
    mf = root / FAMILY_FILE
    if not mf.is_file():
        raise ConfigError(f"{root} holds no expert family ({FAMILY_FILE} missing); build one "
                          "with `expertswitch zoo build`")  # fmt: skip
    manifest = json.loads(mf.read_text())
    return Family(root, manifest["preset"], tuple(manifest["domains"]), manifest)


def _model_config(p: FamilyPreset, vocab: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=p.hidden, intermediate_size=p.ffn, num_hidden_layers=p.layers,
        num_attention_heads=p.heads, num_key_value_heads=p.kv_heads, vocab_size=vocab,
        max_position_embeddings=max(2048, p.seq_len), tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, rope_theta=10000.0,
    )  # fmt: skip


def _streams(corpora, tok, limit: int) -> dict[str, torch.Tensor]:
    out = {}
    for d, c in corpora.items():
        ids: list[int] = []
        for doc in c.train:
            ids += tok(doc)["input_ids"] + [tok.eos_token_id]
            if len(ids) >= limit:
                break
        out[d] = torch.tensor(ids[:limit])
    return out


def build_family(
    preset: str = "tiny",
    root: str | Path | None = None,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    force: bool = False,
    log=print,
) -> Family:
    """Build (or reuse the cached) family; returns where its checkpoints are."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}: choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    root = Path(root) if root else family_dir(preset, seed)
    if (root / FAMILY_FILE).is_file() and not force:
        return load_family(root)
    # a directory that is not a family is never replaced (it may be the user's)
    check_output_dir(root, {}, True, lambda d: (d / FAMILY_FILE).is_file(), "expert family")
    from transformers import LlamaForCausalLM

    log(f"building the '{preset}' expert family in {root} (once; later runs reuse it)")
    start = time.perf_counter()
    torch.manual_seed(seed)
    corpora = load_corpora(seed, p.corpus_scale)
    skills = {d: [(it.prompt, it.answer) for it in skill_items(d, p.skill_items, False, seed)]
              for d in DOMAINS}  # fmt: skip
    skill_docs = ["\n\n".join(map("".join, s[i : i + 8])) for s in skills.values()
                  for i in range(0, min(len(s), 480), 8)]  # fmt: skip
    tok = train_tokenizer([d for c in corpora.values() for d in c.train[:400]] + skill_docs,
                          p.vocab)  # fmt: skip
    streams = _streams(corpora, tok, p.tokens_per_domain)
    skill_streams = {d: supervised_stream(tok, s) for d, s in skills.items()}
    # math's raw text: two-digit additions as plain text (every token a target) in windows of
    # whole lines. The base learns the digits there without learning to carry, and that is
    # what lets the math expert learn its skill in minutes (docs/family.md)
    additions = skill_items("additions", p.skill_items, False, seed)
    adds = supervised_stream(tok, [(it.prompt, it.answer) for it in additions])
    streams["math"] = replace(adds, answer=torch.ones_like(adds.answer))
    val = {}
    if p.val_share:  # the tail of each train stream, never trained on by base or experts
        for d, s in streams.items():
            if not isinstance(s, torch.Tensor):
                continue  # whole examples (math): no validation tail
            cut = len(s) - max(p.seq_len + 1, int(len(s) * p.val_share))
            streams[d], val[d] = s[:cut], s[cut:]
    with atomic_directory(root) as tmp:
        model = LlamaForCausalLM(_model_config(p, len(tok)))
        cfg = TrainConfig(p.base_steps, p.batch, p.seq_len, p.lr, seed=seed,
                          mixture=p.base_mixture)  # fmt: skip
        base = train_lm(model, [streams[d] for d in DOMAINS], cfg, device, progress, "base")
        _save(model, tok, tmp / "base")
        experts = {}
        for i, d in enumerate(DOMAINS):
            expert = copy.deepcopy(model)  # from the fp32 master weights, not the bf16 file
            share = p.skill_share_for(d)
            ecfg = TrainConfig(p.steps_for(d), p.batch, p.seq_len, p.expert_lr, warmup=10,
                               seed=seed + 1 + i, val_every=p.val_every,
                               mixture=(share, 1 - share) if share < 1 else None)  # fmt: skip
            mine = [skill_streams[d], streams[d]] if share < 1 else [skill_streams[d]]
            experts[d] = train_lm(expert, mine, ecfg, device,
                                  progress, f"expert {d}",
                                  [val[d]] if d in val else None)  # fmt: skip
            if experts[d].best_step is not None:
                log(
                    f"expert {d}: kept the weights of step {experts[d].best_step} "
                    f"(validation loss {dict(experts[d].val_losses)[experts[d].best_step]})"
                )
            _save(expert, tok, tmp / "experts" / d)
        manifest = {
            "format_version": FORMAT_VERSION,
            "preset": preset,
            "seed": seed,
            "domains": list(DOMAINS),
            "config": asdict(p),
            "params": sum(t.numel() for t in model.parameters()),
            "corpora": {d: c.manifest() for d, c in corpora.items()},
            "train_tokens_per_domain": {d: len(s) for d, s in streams.items()},
            "skill_items_per_domain": {d: len(s) for d, s in skills.items()},
            "validation_tokens_per_domain": {d: len(s) for d, s in val.items()},
            "base_loss": {"first": base.losses[0], "last": _tail(base.losses)},
            "expert_loss": {
                d: {
                    "first": r.losses[0],
                    "last": _tail(r.losses),
                    "best_step": r.best_step,
                    "val": r.val_losses,
                }
                for d, r in experts.items()
            },  # fmt: skip
            "seconds": round(time.perf_counter() - start, 1),
            "device": device,
        }
        (tmp / FAMILY_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
    log(f"built the family in {manifest['seconds']} s")
    return load_family(root)


def _tail(losses: list[float]) -> float:
    last = losses[-10:]
    return round(sum(last) / len(last), 4)


def _save(model, tok, path: Path) -> None:
    """bf16 on disk, as published checkpoints are; training keeps fp32 master weights."""
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(path)
    tok.save_pretrained(path)
