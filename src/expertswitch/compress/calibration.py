"""Per-linear input statistics of the base model on calibration text.

For every `nn.Linear` of the base (lm_head excluded: it is stored exactly, never quantized) we
record E[x_i²] per input channel i and a random sample of input rows. The base is run once with
transformers; its weights are freed before the deltas are streamed.
"""

from __future__ import annotations

import gc
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from expertswitch.errors import CheckpointError


@dataclass
class LayerCalib:
    """mean_sq: fp32 [K], E[x_i²] per input channel; sample: fp32 [R, K] input rows or None."""

    mean_sq: torch.Tensor
    sample: torch.Tensor | None = None


@dataclass
class CalibOptions:
    tokens: int = 8192
    seq_len: int = 512
    batch_size: int = 4
    sample_rows: int = 256
    seed: int = 0


def tokenize(model_dir: Path, texts: list[str], vocab_size: int, total: int) -> list[int]:
    """Token ids of `texts` (at most `total`) with the checkpoint's tokenizer; without one, UTF-8
    bytes folded into the vocabulary (still real text statistics, noted with a warning)."""
    tok = None
    if any((model_dir / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
    else:
        warnings.warn(
            f"{model_dir} has no tokenizer: calibrating on UTF-8 bytes as token ids",
            stacklevel=2,
        )
    ids: list[int] = []
    for text in texts:
        piece = text[: 8 * total]  # a few chars per token; bounds tokenizer work on big documents
        new = tok(piece)["input_ids"] if tok is not None else list(piece.encode("utf-8"))
        ids.extend(i % vocab_size for i in new)
        if len(ids) >= total:
            break
    return ids[:total]


def _load_model(model_dir: Path, device: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    except (ValueError, OSError, KeyError) as e:
        raise CheckpointError(
            f"transformers could not load {model_dir} for calibration ({e}); pass a checkpoint of "
            "a causal-LM architecture transformers supports, or use --method rtn (no calibration)"
        ) from None
    if device == "cpu" and model.dtype in (torch.float16, torch.bfloat16):
        model = model.float()  # half-precision matmuls on CPU are slow or missing
    return model.to(device).eval(), config


def collect_calibration(
    model_dir: str | Path,
    texts: list[str],
    options: CalibOptions | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, LayerCalib]:
    """Run the base on `texts`; returns {"<module>.weight": LayerCalib} for every nn.Linear."""
    from tqdm.auto import tqdm

    opts = options or CalibOptions()
    model_dir = Path(model_dir)
    model, config = _load_model(model_dir, device)
    vocab = config.get_text_config().vocab_size
    ids = tokenize(model_dir, texts, vocab, opts.tokens)
    if not ids:
        raise CheckpointError("calibration text produced no tokens; pass a non-empty --calib file")
    seq = min(opts.seq_len, len(ids))
    windows = torch.tensor(ids[: len(ids) // seq * seq]).view(-1, seq)  # [B_total, T]
    n_batches = math.ceil(windows.shape[0] / opts.batch_size)
    rows_per_batch = math.ceil(opts.sample_rows / n_batches)
    gen = torch.Generator().manual_seed(opts.seed)

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    samples: dict[str, list[torch.Tensor]] = {}

    def hook(name):
        def fn(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # [rows, K]
            sq = x.square().sum(0).cpu()
            sums[name] = sq if name not in sums else sums[name] + sq
            counts[name] = counts.get(name, 0) + x.shape[0]
            pick = torch.randperm(x.shape[0], generator=gen)[:rows_per_batch]
            samples.setdefault(name, []).append(x[pick.to(x.device)].cpu())

        return fn

    handles = [
        mod.register_forward_pre_hook(hook(f"{name}.weight"))
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and not name.endswith("lm_head")
    ]
    try:
        with torch.inference_mode():
            batches = windows.split(opts.batch_size)
            for batch in tqdm(batches, desc="calibrating", disable=not progress, unit="batch"):
                model(input_ids=batch.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        del model
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return {
        name: LayerCalib(
            mean_sq=sums[name] / counts[name],
            sample=torch.cat(samples[name])[: opts.sample_rows] if opts.sample_rows else None,
        )
        for name in sums
    }
