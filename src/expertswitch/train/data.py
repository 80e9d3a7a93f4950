"""Training data: the zoo's domain corpora as token streams, prepared once per run and kept in
the run directory (so a resumed run reads the very tokens the first one did), and batches that
are a pure function of (seed, step): the data position of a run is its step count.

    data = prepare_data(cfg, run_dir / "data")     # tokenizer + train/val streams
    ids = step_batch(data, cfg, step)              # [batch_size, seq_len + 1] for that step
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from expertswitch.errors import ConfigError
from expertswitch.train.config import RunConfig

STREAMS_FILE = "streams.safetensors"
MANIFEST_FILE = "data.json"  # the settings the streams were prepared with


@dataclass
class RunData:
    tokenizer: object  # transformers PreTrainedTokenizerFast
    train: dict[str, torch.Tensor]  # domain → int64 [N]
    val: dict[str, torch.Tensor]

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)


def _tokenize(docs: list[str], tok, limit: int) -> torch.Tensor:
    ids: list[int] = []
    eos = tok.eos_token_id
    for doc in docs:
        ids += tok(doc)["input_ids"] + ([eos] if eos is not None else [])
        if len(ids) >= limit:
            break
    return torch.tensor(ids[:limit], dtype=torch.int64)


def _tokenizer_source(cfg: RunConfig) -> str | None:
    """Where the run's tokenizer comes from: data.tokenizer, else the model it starts from."""
    if cfg.data.tokenizer:
        return cfg.data.tokenizer
    src = cfg.kd.teacher if cfg.kd else cfg.model.init_from
    if not src:
        return None
    if not any((Path(src) / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        # a tokenizer trained here would give the model's token ids other meanings
        raise ConfigError(f"{src} ships no tokenizer: set data.tokenizer to the directory of "
                          "the tokenizer it was trained with")  # fmt: skip
    return src


def prepare_data(cfg: RunConfig, directory: Path, log=print) -> RunData:
    """Load the run's data from `directory`, or build it there (atomically) the first time."""
    from safetensors.torch import load_file, save_file

    from expertswitch.models.tokenizer import load_tokenizer as load_model_tokenizer
    from expertswitch.utils.fs import atomic_directory
    from expertswitch.zoo.corpora import DOMAINS, load_corpora
    from expertswitch.zoo.tokenizer import load_tokenizer, train_tokenizer

    want = _manifest(cfg)
    if (directory / MANIFEST_FILE).is_file():
        try:
            have = json.loads((directory / MANIFEST_FILE).read_text())
            streams = load_file(str(directory / STREAMS_FILE))
            tok = load_tokenizer(directory)
        except Exception as e:  # noqa: BLE001 - any damage: name the directory and the fix
            raise ConfigError(f"the prepared data in {directory} cannot be read ({e}); delete "
                              "it to prepare it again") from None  # fmt: skip
        diff = _differences(have, want, cfg)
        if diff:
            raise ConfigError(f"the data in {directory} was prepared with other settings "
                              f"({', '.join(diff)}): use another data.dir, or delete "
                              "it")  # fmt: skip
        return _split(streams, tok, cfg)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ConfigError(f"{directory} exists and is not prepared training data: point "
                          "data.dir at a new or empty directory")  # fmt: skip
    unknown = sorted(set(cfg.data.domains) - set(DOMAINS))
    if unknown or not cfg.data.domains:
        raise ConfigError(f"data.domains {cfg.data.domains}: choose among {list(DOMAINS)}")
    log(f"preparing the training data in {directory} (once per run)")
    corpora = load_corpora(cfg.seed, cfg.data.scale)
    source = _tokenizer_source(cfg)
    if source:
        tok = load_model_tokenizer(source)
        if tok is None:
            raise ConfigError(
                f"{source} has no tokenizer files (tokenizer.json): set "
                "data.tokenizer to the model's tokenizer directory"
            )
    else:
        texts = [d for name in cfg.data.domains for d in corpora[name].train[:400]]
        tok = train_tokenizer(texts, cfg.data.vocab_size)
    streams = {}
    for name in cfg.data.domains:
        c = corpora[name]
        streams[f"train.{name}"] = _tokenize(c.train, tok, cfg.data.tokens_per_domain)
        streams[f"val.{name}"] = _tokenize(c.heldout, tok, cfg.data.val_tokens_per_domain)
    with atomic_directory(directory) as tmp:
        tok.save_pretrained(tmp)
        save_file(streams, str(tmp / STREAMS_FILE))
        want["tokenizer_sha256"] = _source_digest(source) if source else \
            _sha256(tmp / "tokenizer.json")  # fmt: skip
        (tmp / MANIFEST_FILE).write_text(json.dumps(want, indent=1) + "\n")
    return _split(streams, tok, cfg)


def _manifest(cfg: RunConfig) -> dict:
    d = cfg.data
    return {"format": 1, "seed": cfg.seed, "domains": list(d.domains), "scale": d.scale,
            "tokens_per_domain": d.tokens_per_domain,
            "val_tokens_per_domain": d.val_tokens_per_domain,
            "trained_vocab_size": None if _tokenizer_source(cfg) else d.vocab_size}  # fmt: skip


def _sha256(path: Path) -> str | None:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _source_digest(source: str) -> str | None:
    """The digest of a tokenizer directory's defining file."""
    for name in ("tokenizer.json", "tokenizer.model"):
        if (Path(source) / name).is_file():
            return _sha256(Path(source) / name)
    return None


def _differences(have: dict, want: dict, cfg: RunConfig) -> list[str]:
    """Settings in which prepared data differs from what cfg asks for. The tokenizer is the
    same when its tokenizer.json is byte for byte the one cfg names (a teacher exported by a
    run carries the run's tokenizer), or, when cfg trains one, when it was trained alike."""
    keys = [k for k in want if k != "trained_vocab_size"]
    diff = [k for k in keys if have.get(k) != want.get(k)]
    source = _tokenizer_source(cfg)
    if source:
        same = have.get("tokenizer_sha256") == _source_digest(source)
    else:
        same = have.get("trained_vocab_size") == want["trained_vocab_size"]
    return diff + ([] if same else ["tokenizer"])


def _split(streams: dict[str, torch.Tensor], tok, cfg: RunConfig) -> RunData:
    train = {k[6:]: v for k, v in streams.items() if k.startswith("train.")}
    val = {k[4:]: v for k, v in streams.items() if k.startswith("val.")}
    need = cfg.data.seq_len + 1
    for name in cfg.data.domains:
        for split, s in (("train", train), ("validation", val)):
            if name not in s:
                raise ConfigError(f"the run's prepared data has no {split} stream for {name}: "
                                  "it was prepared for other domains; use a new --out")  # fmt: skip
            if len(s[name]) < need:
                raise ConfigError(f"the {split} stream of {name} has {len(s[name])} tokens, "
                                  f"fewer than seq_len + 1 = {need}: raise data.scale or "
                                  "lower data.seq_len")  # fmt: skip
    return RunData(tok, {d: train[d] for d in cfg.data.domains},
                   {d: val[d] for d in cfg.data.domains})  # fmt: skip


def step_batch(data: RunData, cfg: RunConfig, step: int) -> torch.Tensor:
    """The optimiser step's whole batch, [batch_size, seq_len + 1] windows, drawn from a
    generator seeded by (seed, step) alone: resuming at a step draws what the first run drew,
    and each data-parallel rank takes its rows of the same batch."""
    gen = torch.Generator().manual_seed((cfg.seed << 32) + step)
    names = cfg.data.domains
    weights = torch.tensor(cfg.data.mixture or [1.0] * len(names), dtype=torch.float64)
    which = torch.multinomial(weights, cfg.optim.batch_size, replacement=True, generator=gen)
    n = cfg.data.seq_len + 1
    rows = []
    for d in which.tolist():
        s = data.train[names[d]]
        start = int(torch.randint(len(s) - n + 1, (1,), generator=gen))
        rows.append(s[start : start + n])
    return torch.stack(rows)


def val_batches(data: RunData, cfg: RunConfig) -> dict[str, torch.Tensor]:
    """domain → [N, seq_len + 1]: up to eval_windows windows evenly spread over its held-out
    stream (the same every evaluation)."""
    n = cfg.data.seq_len + 1
    out = {}
    for name, s in data.val.items():
        count = min(cfg.eval_windows, len(s) // n)
        starts = torch.linspace(0, len(s) - n, count).long().tolist()
        out[name] = torch.stack([s[i : i + n] for i in starts])
    return out
