"""Compression quality and cost on a Mistral-7B-shaped layer set with synthetic deltas.

One decoder layer of Mistral-7B (q 4096×4096, k/v 1024×4096, o 4096×4096, gate/up 14336×4096,
down 4096×14336; 218M parameters, 1/32 of the model's linear weights). Deltas are heavy-tailed
(Student-t, ν = 3) with a low-rank part and a few input channels moved more; layer inputs have
per-channel scales and 0.5% outlier channels, as LLM activations do. For each method and bit
width: bits per parameter (everything stored: codes, scales, zeros, salient columns), size ratio
to fp16, weight SQNR, layer-output SQNR on held-out inputs, and compression wall time.

    python benchmarks/compress.py                     # full shapes (GPU when present)
    python benchmarks/compress.py --scale 0.25        # quarter-size dims, quick CPU run
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import run_info, write_results  # noqa: E402

from expertswitch.compress.calibration import LayerCalib  # noqa: E402
from expertswitch.compress.methods import compress_delta, make_method  # noqa: E402
from expertswitch.utils.imports import resolve_device  # noqa: E402

HIDDEN, FFN, KV = 4096, 14336, 1024
# (name, N, K, which input it reads)
LAYER = [
    ("q_proj", HIDDEN, HIDDEN, "attn"),
    ("k_proj", KV, HIDDEN, "attn"),
    ("v_proj", KV, HIDDEN, "attn"),
    ("o_proj", HIDDEN, HIDDEN, "o"),
    ("gate_proj", FFN, HIDDEN, "mlp"),
    ("up_proj", FFN, HIDDEN, "mlp"),
    ("down_proj", HIDDEN, FFN, "down"),
]
LAYERS_IN_MODEL = 32


def activations(k: int, rows: int, g: torch.Generator) -> torch.Tensor:
    """[rows, K]: per-channel log-normal scales, 0.5% outlier channels ×20, a shared low-rank
    component (real inputs are correlated across channels)."""
    scale = torch.exp(0.5 * torch.randn(k, generator=g))
    scale[torch.randperm(k, generator=g)[: max(1, k // 200)]] *= 20.0
    z = torch.randn(rows, k, generator=g) * scale
    low = torch.randn(rows, 8, generator=g) @ torch.randn(8, k, generator=g)
    return z + 0.5 * low * scale


def synthetic_delta(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    t = torch.distributions.StudentT(torch.tensor(3.0)).sample((n, k))
    low = torch.randn(n, 8, generator=g) @ torch.randn(8, k, generator=g) / 8
    d = t + low
    d[:, torch.randperm(k, generator=g)[: max(1, k // 100)]] *= 4.0
    return 2e-4 * d / d.std()


def build_layer(scale: float, rows: int, seed: int = 0):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    dim = lambda v: max(64, int(v * scale) // 64 * 64)  # noqa: E731
    inputs = {}
    for _, _, k, src in LAYER:
        if src not in inputs:
            inputs[src] = activations(dim(k), 2 * rows, g)
    mats = []
    for name, n, k, src in LAYER:
        x = inputs[src]
        calib = LayerCalib(mean_sq=x[:rows].square().mean(0), sample=x[:rows])
        mats.append((name, synthetic_delta(dim(n), dim(k), g), calib, x[rows:]))
    return mats


def evaluate(mats, method, device: str) -> dict:
    sig = noise = w_sig = w_noise = 0.0
    nbytes = params = 0
    seconds = 0.0
    for _, delta, calib, held in mats:
        d = delta.to(device)
        c = LayerCalib(calib.mean_sq.to(device), calib.sample.to(device))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        packed = compress_delta(d, c, method)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds += time.perf_counter() - t0
        approx = packed.dequantize(device)
        x = held.to(device)
        y, yq = x @ d.T, x @ approx.T
        sig += y.square().sum().item()
        noise += (y - yq).square().sum().item()
        w_sig += d.square().sum().item()
        w_noise += (d - approx).square().sum().item()
        nbytes += packed.nbytes()
        params += d.numel()
    bpp = 8 * nbytes / params
    return {
        "bits_per_param": round(bpp, 3),
        "ratio_vs_fp16": round(16 / bpp, 2),
        "weight_sqnr_db": round(10 * math.log10(w_sig / w_noise), 2),
        "output_sqnr_db": round(10 * math.log10(sig / noise), 2),
        "seconds_per_layer": round(seconds, 2),
        "model_minutes_est": round(seconds * LAYERS_IN_MODEL / 60, 1),
        "model_delta_gb_est": round(nbytes * LAYERS_IN_MODEL / 1e9, 3),
    }


def variants(bits_list, tune_steps: int, tune_bits):
    for bits in bits_list:
        yield f"rtn-{bits}", make_method("rtn", bits=bits)
        yield f"mixed-{bits}", make_method("mixed", bits=bits)
        if tune_steps and bits in tune_bits:
            yield f"mixed-{bits}+tune", make_method("mixed", bits=bits, tune_steps=tune_steps)
    yield "bitdelta (α = mean abs Δ)", make_method("bitdelta", distill=False)
    yield "bitdelta (distilled)", make_method("bitdelta")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every dim (≥ 64)")
    ap.add_argument("--bits", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--rows", type=int, default=512, help="calibration (and held-out) rows")
    ap.add_argument("--tune-steps", type=int, default=100)
    ap.add_argument("--tune-bits", type=int, nargs="*", default=[2])
    ap.add_argument("--device", default="auto")
    ap.add_argument(
        "--out", type=Path, default=None, help="results dir (default benchmarks/results)"
    )
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    mats = build_layer(args.scale, args.rows)
    rows = []
    for label, method in variants(args.bits, args.tune_steps, args.tune_bits):
        r = {"variant": label, "method": method.to_dict(), **evaluate(mats, method, device)}
        rows.append(r)
        print(
            f"{label:<22} {r['bits_per_param']:>6.3f} b/p  {r['ratio_vs_fp16']:>6.2f}×  "
            f"W {r['weight_sqnr_db']:>6.2f} dB  out {r['output_sqnr_db']:>6.2f} dB  "
            f"{r['seconds_per_layer']:>7.2f} s/layer",
            flush=True,
        )
    info = run_info(device)
    shapes = [(n, tuple(d.shape)) for n, d, _, _ in mats]
    payload = {**info, "benchmark": "compress", "scale": args.scale, "shapes": shapes,
               "rows": args.rows, "results": rows,
               "data": "synthetic: heavy-tailed random deltas and activations with outlier "
                       "channels, not a real fine-tune"}  # fmt: skip
    md = [
        f"# Delta compression, Mistral-7B layer set (scale {args.scale})",
        "",
        f"{info['device']}, torch {info['torch']}, commit {info['commit']}, {info['date']}. "
        f"Output SQNR on {args.rows} held-out input rows; sizes count every stored byte. "
        "Data: synthetic (heavy-tailed random deltas, activations with outlier channels).",
        "",
        "| variant | bits/param | × vs fp16 | weight SQNR dB | output SQNR dB | s / layer "
        "| est. 7B delta GB | est. 7B minutes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        md.append(
            f"| {r['variant']} | {r['bits_per_param']} | {r['ratio_vs_fp16']} | "
            f"{r['weight_sqnr_db']} | {r['output_sqnr_db']} | {r['seconds_per_layer']} | "
            f"{r['model_delta_gb_est']} | {r['model_minutes_est']} |"
        )
    tag = "gpu" if device.startswith("cuda") else "cpu"
    suffix = "" if args.scale == 1.0 else f"-scale{args.scale}"
    path = write_results(f"compress-{tag}{suffix}", payload, "\n".join(md), args.out)
    print("\n".join(md))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
