"""What an archive holds, for `expertswitch inspect`: sizes, bits per parameter, ratio to the
fp16 expert, and per-tensor error measured at compression time."""

from __future__ import annotations

import math

import torch

from expertswitch.io.archive import Archive


def archive_report(archive: Archive) -> dict:
    m = archive.manifest
    parts = m["parts"]
    rows, q_bits, q_params, exact_bytes = [], 0, 0, 0
    for entry in archive:
        nbytes = sum(_part_bytes(parts[f"{entry.name}::{p}"]) for p in entry.parts)
        numel = math.prod(entry.meta["shape"])
        if entry.kind == "exact":
            exact_bytes += nbytes
            continue
        q_bits += 8 * nbytes
        q_params += numel
        rows.append(
            {
                "name": entry.name,
                "shape": entry.meta["shape"],
                "bits": entry.meta["bits"],
                "n_salient": entry.meta.get("n_salient", 0),
                "bits_per_param": round(8 * nbytes / numel, 3),
                "sqnr_db": entry.meta.get("sqnr_db"),
                "out_sqnr_db": entry.meta.get("out_sqnr_db"),
            }
        )
    total = m["delta_file"]["bytes"]
    fp16 = m["expert"]["fp16_bytes"]
    return {
        "path": str(archive.path),
        "method": m["method"],
        "base_fingerprint": m["base"]["fingerprint"],
        "archive_bytes": total,
        "expert_fp16_bytes": fp16,
        "ratio_to_fp16": round(fp16 / total, 2) if total else None,
        "bits_per_param_overall": round(8 * total / m["expert"]["params"], 3),
        "bits_per_param_quantized": round(q_bits / q_params, 3) if q_params else None,
        "quantized_params": q_params,
        "exact_bytes": exact_bytes,
        "summary": m["summary"],
        "tensors": rows,
    }


def _part_bytes(rec: dict) -> int:
    return math.prod(rec["shape"]) * getattr(torch, rec["dtype"]).itemsize


def format_report(rep: dict) -> str:
    def mb(n):
        return f"{n / 2**20:,.2f} MiB"

    meth = rep["method"]
    params = ", ".join(f"{k}={v}" for k, v in meth.items() if k != "method")
    lines = [
        f"archive      {rep['path']}",
        f"method       {meth['method']} ({params})",
        f"base         {rep['base_fingerprint'][:40]}…",
        f"size         {mb(rep['archive_bytes'])} (fp16 expert {mb(rep['expert_fp16_bytes'])}, "
        f"ratio {rep['ratio_to_fp16']}×)",
        f"bits/param   {rep['bits_per_param_overall']} overall, "
        f"{rep['bits_per_param_quantized']} in quantized linear layers",
        f"tensors      {rep['summary']['quantized_tensors']} quantized, "
        f"{rep['summary']['exact_tensors']} exact ({mb(rep['exact_bytes'])}), "
        f"{rep['summary']['unchanged_tensors']} unchanged",
        "",
    ]
    width = max((len(r["name"]) for r in rep["tensors"]), default=4)
    lines.append(
        f"{'tensor':<{width}}  {'shape':>16}  bits  salient  bits/param  SQNR dB  out SQNR dB"
    )
    for r in rep["tensors"]:
        shape = "×".join(map(str, r["shape"]))
        lines.append(
            f"{r['name']:<{width}}  {shape:>16}  {r['bits']:>4}  {r['n_salient']:>7}  "
            f"{r['bits_per_param']:>10.3f}  {_db(r['sqnr_db']):>7}  {_db(r['out_sqnr_db']):>11}"
        )
    return "\n".join(lines)


def _db(x) -> str:
    return "-" if x is None else f"{x:.2f}"
