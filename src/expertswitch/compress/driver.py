"""`compress_expert`: fine-tuned HF checkpoint + its base → expert archive.

Steps: open both checkpoints and check they belong together; calibrate on the base (when the
method needs activation statistics); stream the expert's tensors one at a time, quantizing the
delta of every linear weight and storing other tensors exactly when they differ; write the
archive atomically.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from expertswitch.compress.calib_text import default_calibration_texts, load_calibration_file
from expertswitch.compress.calibration import (
    CalibOptions,
    LayerCalib,
    calib_for,
    collect_calibration,
)
from expertswitch.compress.methods import MethodConfig, compress_delta
from expertswitch.compress.metrics import output_sqnr_db, sqnr_db
from expertswitch.io.archive import ArchiveEntry, is_archive, write_archive
from expertswitch.io.checkpoint import Checkpoint, check_compatible, open_checkpoint
from expertswitch.utils.fs import check_output_dir

# Linear projections of Llama/Mistral/Qwen2/Mixtral (and the usual names of other families);
# the MoE router ("...gate.weight"), norms, embeddings and lm_head are deliberately absent.
_LINEAR = re.compile(
    r"\.(q_proj|k_proj|v_proj|o_proj|qkv_proj|gate_proj|up_proj|down_proj|gate_up_proj|"
    r"w1|w2|w3|fc1|fc2|dense|query_key_value|dense_h_to_4h|dense_4h_to_h)(\.weight)?$"
)


_EMBEDDING = re.compile(r"(embed_tokens|lm_head|wte|word_embeddings)\.weight$")


def is_linear_delta(name: str, shape: tuple[int, ...], embeddings: bool = False) -> bool:
    """Weights whose deltas are quantized: 2-D linear weights and stacked [E, N, K] experts;
    with `embeddings`, also the token embedding and lm_head (same vocabulary as the base)."""
    if embeddings and _EMBEDDING.search(name) and len(shape) == 2:
        return True
    return bool(_LINEAR.search(name)) and len(shape) in (2, 3)


@dataclass
class CompressOptions:
    calib_file: str | Path | None = None
    calib: CalibOptions = field(default_factory=CalibOptions)
    device: str = "cpu"
    progress: bool = True
    overwrite: bool = False
    # Quantize the deltas of the token embedding and lm_head too (default: stored exactly when
    # changed). Small models are embedding-heavy: 40% of a 1M-parameter model, 4% of a 7B one.
    quantize_embeddings: bool = False


def _finite(x: float) -> float | None:
    return round(x, 3) if math.isfinite(x) else None


def _calibrate(base: Checkpoint, method: MethodConfig, opts: CompressOptions):
    if not method.needs_calibration:
        return {}, {"source": None}
    texts = (
        load_calibration_file(opts.calib_file) if opts.calib_file else default_calibration_texts()
    )
    calib = collect_calibration(base.path, texts, opts.calib, opts.device, opts.progress)
    source = str(opts.calib_file) if opts.calib_file else "builtin"
    return calib, {"source": source, "tokens": opts.calib.tokens, "seq_len": opts.calib.seq_len}


def _compress_tensor(
    name: str, base: Checkpoint, expert: Checkpoint, calib: dict[str, LayerCalib], method, opts
):
    """(entry, parts) for one expert tensor, or None when it equals the base's."""
    value = expert.get(name)
    same_shape = name in base and base.shape(name) == tuple(value.shape)
    if same_shape:
        ref = base.get(name)
        if ref.dtype == value.dtype and torch.equal(ref, value):
            return None
        if is_linear_delta(name, tuple(value.shape), opts.quantize_embeddings):
            device = opts.device
            delta = value.to(device).float() - ref.to(device).float()
            lc = calib_for(name, tuple(value.shape), calib)
            packed = compress_delta(delta, lc, method)
            approx = packed.dequantize(device)
            meta = {
                **packed.meta(),
                "dtype": str(value.dtype).removeprefix("torch."),
                "calibrated": lc is not None,
                "sqnr_db": _finite(sqnr_db(delta, approx)),
            }
            if isinstance(lc, LayerCalib) and lc.sample is not None and delta.dim() == 2:
                meta["out_sqnr_db"] = _finite(output_sqnr_db(lc.sample.to(device), delta, approx))
            parts = packed.parts()
            return ArchiveEntry(name, "quantized", meta, list(parts)), parts
    meta = {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
    return ArchiveEntry(name, "exact", meta, ["value"]), {"value": value}


def compress_expert(
    base_dir: str | Path,
    expert_dir: str | Path,
    out_dir: str | Path,
    method: MethodConfig,
    options: CompressOptions | None = None,
) -> Path:
    """Compress `expert_dir` against `base_dir` into the archive `out_dir`; returns its path."""
    from tqdm.auto import tqdm

    opts = options or CompressOptions()
    start = time.perf_counter()
    # before minutes of work: an --out that would destroy an input or a stranger's directory
    check_output_dir(out_dir, {"--base": base_dir, "--expert": expert_dir}, opts.overwrite,
                     is_archive, "expert archive")  # fmt: skip
    base, expert = open_checkpoint(base_dir), open_checkpoint(expert_dir)
    check_compatible(base, expert)
    calib, calib_info = _calibrate(base, method, opts)
    entries = []
    names = expert.names()
    for name in tqdm(names, desc="compressing", unit="tensor", disable=not opts.progress):
        item = _compress_tensor(name, base, expert, calib, method, opts)
        if item is not None:
            entries.append(item)
    quantized = [e for e, _ in entries if e.kind == "quantized"]
    expert_params = expert.numel()
    manifest = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "method": method.to_dict(),
        "base": {
            "fingerprint": base.fingerprint(),
            "path": str(Path(base_dir).resolve()),
            "architectures": base.config.get("architectures"),
            "model_type": base.config.get("model_type"),
        },
        "expert": {
            "path": str(Path(expert_dir).resolve()),
            "params": expert_params,
            "fp16_bytes": 2 * expert_params,
        },
        "calibration": calib_info,
        "quantize_embeddings": opts.quantize_embeddings,
        "summary": {
            "tensors": len(names),
            "quantized_tensors": len(quantized),
            "quantized_params": sum(math.prod(e.meta["shape"]) for e in quantized),
            "exact_tensors": len(entries) - len(quantized),
            "unchanged_tensors": len(names) - len(entries),
            "uncalibrated_tensors": sum(not e.meta["calibrated"] for e in quantized),
            "seconds": round(time.perf_counter() - start, 2),
        },
    }
    return write_archive(out_dir, manifest, entries, expert.aux_files(), opts.overwrite)
