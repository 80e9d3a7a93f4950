"""Per-linear input statistics of the base model on calibration text.

For every `nn.Linear` of the base we record E[x_i²] per input channel i and a random sample
of input rows. Fused MoE experts (transformers ≥ 5 keeps each layer's experts as stacked
`gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I] parameters, not Linear modules) get the
same per expert, from the rows routed to that expert: the expert input for gate/up, and
act(gate)·up for down. The base is run once with transformers; its weights are freed before
the deltas are streamed.
"""

from __future__ import annotations

import gc
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from expertswitch.errors import CheckpointError, ConfigError


@dataclass
class LayerCalib:
    """mean_sq: fp32 [K], E[x_i²] per input channel; sample: fp32 [R, K] input rows or None."""

    mean_sq: torch.Tensor
    sample: torch.Tensor | None = None


@dataclass
class CalibOptions:
    tokens: int = 8192
    seq_len: int = 512  # cut to the model's max_position_embeddings when that is shorter
    batch_size: int = 4
    sample_rows: int = 256
    seed: int = 0
    # the base's own tokenizer (None), another checkpoint's or tokenizer directory, or "bytes":
    # UTF-8 bytes as token ids (an explicit choice: weaker statistics than real tokens)
    tokenizer: str | None = None

    def __post_init__(self):
        for name in ("tokens", "seq_len", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                flag = {"tokens": "--calib-tokens", "seq_len": "--seq-len"}.get(name, name)
                raise ConfigError(f"{flag} must be a positive integer, got {v!r}")
        if not isinstance(self.sample_rows, int) or self.sample_rows < 0:
            raise ConfigError(f"sample_rows must be ≥ 0, got {self.sample_rows!r}")


class _Accumulator:
    """Running Σx² and row count per key, plus a bounded random sample of rows."""

    def __init__(self, rows_per_call: int, seed: int):
        self.rows_per_call = rows_per_call
        self.gen = torch.Generator().manual_seed(seed)
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.samples: dict[str, list[torch.Tensor]] = {}

    def add(self, key: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()  # [rows, K]
        if x.shape[0] == 0:
            return
        sq = x.square().sum(0).cpu()
        self.sums[key] = sq if key not in self.sums else self.sums[key] + sq
        self.counts[key] = self.counts.get(key, 0) + x.shape[0]
        pick = torch.randperm(x.shape[0], generator=self.gen)[: self.rows_per_call]
        self.samples.setdefault(key, []).append(x[pick.to(x.device)].cpu())

    def result(self, sample_rows: int) -> dict[str, LayerCalib]:
        return {
            key: LayerCalib(
                mean_sq=self.sums[key] / self.counts[key],
                sample=torch.cat(self.samples[key])[:sample_rows] if sample_rows else None,
            )
            for key in self.sums
        }


# --- fused MoE experts ------------------------------------------------------------------------

_LAYER = re.compile(r"^(.*\.layers\.\d+)\.")
_EXPERT_2D = re.compile(
    r"^(?P<layer>.*\.layers\.\d+)\..*experts\.(?P<e>\d+)\."
    r"(?P<proj>w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$"
)
_EXPERT_3D = re.compile(
    r"^(?P<layer>.*\.layers\.\d+)\..*experts\.(?P<proj>gate_up_proj|down_proj)$"
)
_ROLE = {"w1": "in", "w3": "in", "gate_proj": "in", "up_proj": "in", "gate_up_proj": "in",
         "w2": "mid", "down_proj": "mid"}  # fmt: skip


def _expert_key(layer: str, e: int, role: str) -> str:
    return f"{layer}.experts.{e}.{role}"


def _fused_experts(module) -> bool:
    gu, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (
        isinstance(gu, torch.Tensor) and gu.dim() == 3
        and isinstance(down, torch.Tensor) and down.dim() == 3
        and callable(getattr(module, "act_fn", None))
    )  # fmt: skip


def _expert_hook(layer: str, acc: _Accumulator):
    def fn(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        idx = args[1] if len(args) > 1 else kwargs.get("top_k_index")
        w = module.gate_up_proj  # [E, 2I, H] (Mixtral, Qwen2-MoE) or [E, H, 2I] (Llama 4)
        x = x.reshape(-1, x.shape[-1])
        if idx is None:  # Llama 4: expert e gets rows e·T … (e+1)·T, its unrouted rows zeroed
            xs = x.reshape(w.shape[0], -1, x.shape[-1])
            rows = [xs[e][xs[e].abs().sum(-1) > 0] for e in range(w.shape[0])]
        else:
            idx = idx.reshape(x.shape[0], -1)
            rows = [x[(idx == e).any(-1)] for e in range(w.shape[0])]
        for e in range(w.shape[0]):
            xe = rows[e]
            if xe.shape[0] == 0:
                continue
            h = xe @ (w[e].T if w.shape[-1] == x.shape[-1] else w[e])
            gate, up = h.chunk(2, dim=-1)
            acc.add(_expert_key(layer, e, "in"), xe)
            acc.add(_expert_key(layer, e, "mid"), module.act_fn(gate) * up)

    return fn


def calib_for(name: str, shape: tuple[int, ...], calib: dict[str, LayerCalib]):
    """Statistics for checkpoint tensor `name`: a LayerCalib, a per-expert list for a stacked
    [E, N, K] tensor, or None when the calibration run did not see its inputs. An
    image-and-text checkpoint's keys ("language_model.model.layers.0…") are found under the
    module names the run recorded ("model.language_model.layers.0…"): `collect_calibration`
    files each also under its io/checkpoint.layout_free name."""
    from expertswitch.io.checkpoint import layout_free

    if name in calib:
        return calib[name]
    if (alias := calib.get(_ALIAS + layout_free(name))) is not None:
        return alias
    m = _EXPERT_2D.match(name)
    if m:
        return calib.get(_expert_key(m["layer"], int(m["e"]), _ROLE[m["proj"]]))
    m = _EXPERT_3D.match(name)
    if m and len(shape) == 3:
        per = [calib.get(_expert_key(m["layer"], e, _ROLE[m["proj"]])) for e in range(shape[0])]
        return per if any(c is not None for c in per) else None
    return None


# --- running the base -------------------------------------------------------------------------


def tokenize(model_dir: Path, texts: list[str], vocab_size: int, total: int,
             tokenizer: str | None = None) -> list[int]:  # fmt: skip
    """Token ids of `texts` (at most `total`): with the checkpoint's tokenizer, the one given, or
    with tokenizer="bytes" UTF-8 bytes folded into the vocabulary. A base without a tokenizer
    and no choice made is an error: calibrating on the wrong ids would be silently weaker."""
    tok = None
    if tokenizer != "bytes":
        src = Path(tokenizer) if tokenizer else model_dir
        if not any((src / f).exists() for f in ("tokenizer.json", "tokenizer.model",
                                                "vocab.json")):  # fmt: skip
            raise ConfigError(
                f"{src} has no tokenizer, and calibration turns text into the ids the model "
                "was trained on: pass --tokenizer DIR (the base's tokenizer), or --tokenizer "
                "bytes to calibrate on UTF-8 bytes as ids (weaker statistics)"
            )
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(src)
        except Exception as e:  # a broken tokenizer.json, a missing vocab file, ...
            raise ConfigError(f"cannot load the tokenizer in {src} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); pass a working "
                              "--tokenizer DIR") from None  # fmt: skip
        if len(tok) > vocab_size:
            raise ConfigError(f"the tokenizer in {src} has {len(tok)} tokens but the model's "
                              f"vocabulary has {vocab_size}: it is not this model's tokenizer; "
                              "pass the base's own with --tokenizer DIR")  # fmt: skip
    ids: list[int] = []
    for text in texts:
        piece = text[: 8 * total]  # a few chars per token; bounds tokenizer work on big documents
        new = tok(piece)["input_ids"] if tok is not None else list(piece.encode("utf-8"))
        ids.extend(i % vocab_size for i in new)
        if len(ids) >= total:
            break
    return ids[:total]


def calibration_windows(model_dir: str | Path, texts: list[str], opts: CalibOptions,
                        config=None) -> torch.Tensor:  # fmt: skip
    """Token windows [B, T] of the calibration text (T: seq_len cut to the model's positions
    and to the text)."""
    if config is None and _model_type(Path(model_dir)) == "expertswitch_moe":
        from expertswitch.io.checkpoint import open_checkpoint
        from expertswitch.models.config import ModelConfig

        config = _OwnConfig(ModelConfig.from_dict(open_checkpoint(model_dir).config))
    if config is None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_dir)
    vocab = config.get_text_config().vocab_size
    ids = tokenize(Path(model_dir), texts, vocab, opts.tokens, opts.tokenizer)
    if not ids:
        raise CheckpointError("calibration text produced no tokens; pass a non-empty --calib file")
    max_pos = getattr(config.get_text_config(), "max_position_embeddings", None) or opts.seq_len
    seq = min(opts.seq_len, len(ids), max_pos)  # windows past the positions the model has
    return torch.tensor(ids[: len(ids) // seq * seq]).view(-1, seq)  # [B_total, T]


def _load_model(model_dir: Path, device: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    if _model_type(model_dir) == "expertswitch_moe":  # transformers has no such class
        return _load_own_model(model_dir, device)
    try:
        config = AutoConfig.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    except (ValueError, OSError, KeyError) as e:
        raise CheckpointError(
            f"transformers could not load {model_dir} for calibration ({e}); pass a checkpoint of "
            "a causal-LM architecture transformers supports, or use --method rtn (no calibration)"
        ) from None
    n_params = sum(p.numel() for p in model.parameters())
    if device == "cpu" and model.dtype in (torch.float16, torch.bfloat16) and n_params < 2e9:
        # half-precision matmuls on CPU are slow; above 2B parameters fp32 would not fit in RAM
        model = model.float()
    return model.to(device).eval(), config


def _model_type(model_dir: Path) -> str | None:
    import json

    try:
        return json.loads((model_dir / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None  # transformers reports the problem


class _OwnConfig:
    def __init__(self, cfg):
        self.vocab_size, self.max_position_embeddings = cfg.vocab_size, cfg.max_position_embeddings

    def get_text_config(self):
        return self


def _load_own_model(model_dir: Path, device: str):
    from expertswitch.models.causal_lm import CausalLM

    lm = CausalLM.from_pretrained(model_dir).float()
    return lm.to(device).eval(), _OwnConfig(lm.cfg)


def _run(model, ids: torch.Tensor) -> None:
    """One forward pass of a transformers model or an `expertswitch train` one (its attention
    and dense MLP linears are nn.Linear, so the hooks see them; stacked MoE experts get no
    statistics and are quantized without)."""
    from expertswitch.models.causal_lm import CausalLM

    if isinstance(model, CausalLM):
        model(ids)
    else:
        model(input_ids=ids, use_cache=False)


def _register_hooks(model, acc: _Accumulator) -> list:
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear, weight [in, out]

    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Linear, Conv1D)):  # lm_head too: it may be quantized
            key = f"{name}.weight"
            handles.append(mod.register_forward_pre_hook(lambda _m, a, k=key: acc.add(k, a[0])))
        elif _fused_experts(mod) and _LAYER.match(name):
            hook = _expert_hook(_LAYER.match(name)[1], acc)
            handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


def collect_calibration(
    model_dir: str | Path,
    texts: list[str],
    options: CalibOptions | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, LayerCalib]:
    """Run the base on `texts`. Keys: "<module>.weight" for every nn.Linear, and
    "<layer>.experts.<e>.in|mid" for fused MoE experts (look tensors up with `calib_for`)."""
    from tqdm.auto import tqdm

    opts = options or CalibOptions()
    model_dir = Path(model_dir)
    model, config = _load_model(model_dir, device)
    windows = calibration_windows(model_dir, texts, opts, config)
    n_batches = math.ceil(windows.shape[0] / opts.batch_size)
    acc = _Accumulator(math.ceil(opts.sample_rows / n_batches), opts.seed)
    handles = _register_hooks(model, acc)
    try:
        with torch.inference_mode():
            batches = windows.split(opts.batch_size)
            for batch in tqdm(batches, desc="calibrating", disable=not progress, unit="batch"):
                _run(model, batch.to(device))
    finally:
        for h in handles:
            h.remove()
        del model
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    out = acc.result(opts.sample_rows)
    from expertswitch.io.checkpoint import layout_free

    out.update({_ALIAS + layout_free(k): v for k, v in list(out.items()) if layout_free(k) != k})
    return out


_ALIAS = "layout-free:"  # calibration keys that are a name in either layout (calib_for)
