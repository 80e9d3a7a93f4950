"""`compress_expert`: fine-tuned HF checkpoint + its base → expert archive.

Steps: open both checkpoints and check they belong together; calibrate on the base (when the
method needs activation statistics); stream the expert's tensors one at a time, quantizing the
delta of every linear weight and storing other tensors exactly when they differ; write the
archive atomically.
"""

from __future__ import annotations

import math
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
from expertswitch.compress.layout import IN_OUT, LinearLayout, linear_layout
from expertswitch.compress.methods import MethodConfig, compress_delta
from expertswitch.compress.metrics import output_sqnr_db, sqnr_db
from expertswitch.errors import ConfigError
from expertswitch.io.archive import ArchiveEntry, is_archive, write_archive
from expertswitch.io.checkpoint import Checkpoint, check_compatible, open_checkpoint
from expertswitch.utils.fs import check_output_dir


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


def _compress_tensor(name: str, base: Checkpoint, expert: Checkpoint,
                     calib: dict[str, LayerCalib], method, opts, layout: LinearLayout):  # fmt: skip
    """(entry, parts) for one expert tensor, or None when it equals the base's."""
    value = expert.get(name)
    shape = tuple(value.shape)
    same_shape = name in base and base.shape(name) == shape
    orient = layout.orientation(name, shape, opts.quantize_embeddings) if same_shape else None
    if same_shape:
        ref = base.get(name)
        if ref.dtype == value.dtype and torch.equal(ref, value):
            return None
    if orient is not None:
        device = opts.device
        delta = value.to(device).float() - ref.to(device).float()
        if orient == IN_OUT:  # Conv1D [in, out], Llama 4 [E, in, out] → input channels last
            delta = delta.transpose(-1, -2).contiguous()
        lc = calib_for(name, tuple(delta.shape), calib)
        packed = compress_delta(delta, lc, method)
        approx = packed.dequantize(device)
        meta = {
            **packed.meta(),
            "dtype": str(value.dtype).removeprefix("torch."),
            "calibrated": lc is not None,
            "sqnr_db": _finite(sqnr_db(delta, approx)),
        }
        if orient == IN_OUT:
            meta["transposed"] = True  # stored [out, in]; the tensor itself is [in, out]
        if isinstance(lc, LayerCalib) and lc.sample is not None and delta.dim() == 2:
            meta["out_sqnr_db"] = _finite(output_sqnr_db(lc.sample.to(device), delta, approx))
        parts = packed.parts()
        return ArchiveEntry(name, "quantized", meta, list(parts)), parts
    meta = {"shape": list(shape), "dtype": str(value.dtype).removeprefix("torch."),
            "exact_because": "new or reshaped" if not same_shape
            else layout.why_exact(name, shape)}  # fmt: skip
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
    layout = linear_layout(base.path)
    windows = _distill_windows(base, expert, layout, method, opts)  # checked before any work
    calib, calib_info = _calibrate(base, method, opts)
    names = expert.names()

    def produced():  # one tensor's work at a time: the writer drops each as it is written
        for name in tqdm(names, desc="compressing", unit="tensor", disable=not opts.progress):
            item = _compress_tensor(name, base, expert, calib, method, opts, layout)
            if item is not None:
                yield item
            del item  # not held while the next tensor is compressed

    distill_info: dict = {}

    def manifest(entries: list[ArchiveEntry]) -> dict:
        m = _manifest(entries, names, base, expert, base_dir, expert_dir, method, calib_info,
                      layout, start, opts)  # fmt: skip
        if distill_info:
            m["distillation"] = distill_info
        return m

    items: object = produced()
    if windows is not None:
        # the student needs every delta at once: held (packed, ~the archive's size) until written
        items = list(items)
        distill_info.update(_distill(items, base, expert, method, opts, layout, windows))
    return write_archive(out_dir, manifest, items, expert.aux_files(), opts.overwrite)


def _distill_windows(base: Checkpoint, expert: Checkpoint, layout: LinearLayout, method,
                     opts) -> torch.Tensor | None:  # fmt: skip
    """Calibration windows for distillation, or None when it is off; a ConfigError, before any
    work, when distillation cannot run on this pair."""
    if not getattr(method, "distill_steps", 0):
        return None
    from expertswitch.compress.calib_text import default_calibration_texts, load_calibration_file
    from expertswitch.compress.calibration import calibration_windows

    if layout.source != "modules" or not any(o == "out_in" for o in layout.linear.values()):
        raise ConfigError("--distill-steps needs nn.Linear layers transformers can build from "
                          "this config; this model has none: leave it out")  # fmt: skip
    foreign = sorted(set(base.names()) - layout.params)
    if foreign:
        raise ConfigError(f"--distill-steps needs checkpoint names that are the model's own "
                          f"parameter names; this checkpoint stores e.g. {foreign[0]} "
                          "(transformers converts it when loading): leave it out")  # fmt: skip
    grown = [n for n in expert.names() if n in base and expert.shape(n) != base.shape(n)]
    if grown:
        raise ConfigError(f"--distill-steps cannot run on an expert whose shapes differ from "
                          f"the base's (e.g. {grown[0]}, a grown vocabulary): leave it "
                          "out")  # fmt: skip
    texts = load_calibration_file(opts.calib_file) if opts.calib_file else \
        default_calibration_texts()  # fmt: skip
    windows = calibration_windows(base.path, texts, opts.calib)
    if len(windows) < 2:
        raise ConfigError(f"--distill-steps needs at least 2 calibration windows; "
                          f"--calib-tokens {opts.calib.tokens} makes {len(windows)}: give more "
                          "tokens or a shorter --seq-len")  # fmt: skip
    return windows


def _distill(items: list, base: Checkpoint, expert: Checkpoint, method, opts,
             layout: LinearLayout, windows: torch.Tensor) -> dict:  # fmt: skip
    """Replace the step sizes of the quantized [out, in] linear deltas in `items` by distilled
    ones (compress/distill.py); their entries' meta follows. Every other changed tensor enters
    the student as the reconstruction will hold it, so the student is the rebuilt model."""
    from expertswitch.compress.distill import DistillOptions, distill_steps
    from expertswitch.compress.packed import PackedDelta

    packed, fixed = {}, {}
    for e, parts in items:
        if e.kind == "quantized":
            p = PackedDelta.from_parts(e.meta, parts)
            if layout.linear.get(e.name) == "out_in" and not e.meta.get("transposed"):
                packed[e.name] = p
                continue
            d = p.dequantize()
            d = d.transpose(-1, -2) if e.meta.get("transposed") else d
            fixed[e.name] = base.get(e.name).float() + d
        else:
            fixed[e.name] = parts["value"]
    if not packed:
        raise ConfigError("--distill-steps found no changed nn.Linear weight to distil: leave "
                          "it out")  # fmt: skip
    tuned, report = distill_steps(base.path, expert.path, packed, windows,
                                  DistillOptions(steps=method.distill_steps), opts.device,
                                  opts.progress, fixed)  # fmt: skip
    for i, (e, _) in enumerate(items):
        if e.name in tuned:
            p = tuned[e.name]
            delta = (expert.get(e.name).float() - base.get(e.name).float()).to(opts.device)
            meta = {**e.meta, **p.meta(), "distilled": True,
                    "sqnr_db": _finite(sqnr_db(delta, p.dequantize(opts.device)))}  # fmt: skip
            meta.pop("out_sqnr_db", None)  # measured on the fitted steps; no longer these
            items[i] = (ArchiveEntry(e.name, e.kind, meta, list(p.parts())), p.parts())
    return report


def _manifest(entries: list[ArchiveEntry], names: list[str], base: Checkpoint,
              expert: Checkpoint, base_dir, expert_dir, method, calib_info: dict,
              layout: LinearLayout, start: float, opts: CompressOptions) -> dict:  # fmt: skip
    quantized = [e for e in entries if e.kind == "quantized"]
    exact = [e for e in entries if e.kind == "exact"]
    reasons: dict[str, int] = {}
    for e in exact:
        reasons[e.meta["exact_because"]] = reasons.get(e.meta["exact_because"], 0) + 1
    expert_params = expert.numel()
    return {
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
            "uncalibrated": sorted(
                e.name for e in quantized if not e.meta["calibrated"] and method.needs_calibration
            ),
            "exact_because": reasons,
            "linear_layers_from": layout.source,
            "seconds": round(time.perf_counter() - start, 2),
        },
    }
