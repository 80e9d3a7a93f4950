"""Shared benchmark plumbing: where results go and what run produced them."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu: {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        # results written by an earlier benchmark of the same run are outputs, not code
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
             ":!benchmarks/results"], capture_output=True, text=True,
        )  # fmt: skip
        return out + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_info(device: str) -> dict:
    return {
        "device": device_name(device),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(),
        "torch": torch.__version__,
        "command": " ".join(["python", *sys.argv]),  # how to run it again
    }


def write_results(stem: str, payload: dict, markdown: str, out_dir: Path | None = None) -> Path:
    out_dir = out_dir or RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(payload, indent=1) + "\n")
    (out_dir / f"{stem}.md").write_text(markdown + "\n")
    return out_dir / f"{stem}.json"


def svg_line_plot(series: dict[str, list[tuple[float, float]]], title: str, xlabel: str,
                  ylabel: str, width: int = 640, height: int = 400) -> str:  # fmt: skip
    """A small dependency-free SVG line chart: one polyline with markers per series."""
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]
    pts = [p for s in series.values() for p in s]
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(0.0, min(p[1] for p in pts)), max(1.0, max(p[1] for p in pts))
    left, right, top, bottom = 60, 150, 40, 50

    def sx(x):
        return left + (x - x0) / ((x1 - x0) or 1) * (width - left - right)

    def sy(y):
        return height - bottom - (y - y0) / ((y1 - y0) or 1) * (height - top - bottom)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="12">',
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>',
           f'<line x1="{left}" y1="{sy(y0)}" x2="{width - right}" y2="{sy(y0)}" stroke="black"/>',
           f'<line x1="{left}" y1="{sy(y0)}" x2="{left}" y2="{sy(y1)}" stroke="black"/>',
           f'<text x="{(left + width - right) / 2}" y="{height - 12}" '
           f'text-anchor="middle">{xlabel}</text>',
           f'<text x="15" y="{(top + height - bottom) / 2}" text-anchor="middle" '
           f'transform="rotate(-90 15 {(top + height - bottom) / 2})">{ylabel}</text>']  # fmt: skip
    for i in range(6):
        yv = y0 + (y1 - y0) * i / 5
        xv = x0 + (x1 - x0) * i / 5
        out.append(f'<text x="{left - 6}" y="{sy(yv) + 4}" text-anchor="end">{yv:.2f}</text>')
        out.append(f'<text x="{sx(xv)}" y="{sy(y0) + 16}" text-anchor="middle">{xv:.2f}</text>')
        out.append(f'<line x1="{left}" y1="{sy(yv)}" x2="{width - right}" y2="{sy(yv)}" '
                   f'stroke="#ddd"/>')  # fmt: skip
    for i, (label, s) in enumerate(series.items()):
        c = colors[i % len(colors)]
        s = sorted(s)
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s)
        out.append(f'<polyline points="{path}" fill="none" stroke="{c}" stroke-width="2"/>')
        out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{c}"/>' for x, y in s]
        ly = top + 20 * i
        out.append(f'<line x1="{width - right + 10}" y1="{ly}" x2="{width - right + 30}" '
                   f'y2="{ly}" stroke="{c}" stroke-width="2"/>')  # fmt: skip
        out.append(f'<text x="{width - right + 35}" y="{ly + 4}">{label}</text>')
    out.append("</svg>")
    return "\n".join(out)
