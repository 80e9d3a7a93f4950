"""How long `expertswitch demo` takes as a user first runs it and when everything is cached.

Runs the README's command twice in a subprocess on an empty cache directory: the first run builds
the family, compresses the experts and trains the router (target: ≤ 5 minutes on 2 CPU cores);
the second reuses all of it (target: ≤ 30 s). Run it on a clean clone with nothing else busy:

    python benchmarks/demo_time.py                 # writes benchmarks/results/demo-time-cpu.*
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import run_info, write_results  # noqa: E402

TARGETS = {"fresh": 300.0, "cached": 30.0}


def timed_demo(cache: Path, extra: list[str]) -> tuple[float, str]:
    env = {**os.environ, "EXPERTSWITCH_CACHE": str(cache)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "expertswitch.cli", "demo", *extra], env=env,
                          capture_output=True, text=True)  # fmt: skip
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"the demo failed:\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--out", default=None, help="results directory")
    args = ap.parse_args()
    extra = ["--preset", args.preset]
    with tempfile.TemporaryDirectory() as tmp:
        fresh, out_fresh = timed_demo(Path(tmp), extra)
        cached, out_cached = timed_demo(Path(tmp), extra)
    rows = {"fresh": fresh, "cached": cached}
    table = [ln for ln in out_cached.splitlines() if ln.startswith(("code", "math", "prose"))]
    cores = os.cpu_count()
    md = [f"# `expertswitch demo` wall time, '{args.preset}' family", "",
          f"{run_info('cpu')['device']}, {cores} cores visible, subprocess on an empty cache.", "",
          "| run | seconds | target | met |", "|---|---|---|---|"]  # fmt: skip
    for k, v in rows.items():
        met = "yes" if v <= TARGETS[k] else "**no**"
        md.append(f"| {k} | {v:.0f} | ≤ {TARGETS[k]:.0f} | {met} |")
    md += ["", "The table the cached run printed:", "", "```", *table, "```"]
    stages = re.findall(r"^(building|compressing|training)[^\n]*", out_fresh, re.M)
    payload = {**run_info("cpu"), "preset": args.preset, "cores": cores, "seconds": rows,
               "targets": TARGETS, "stages_run_fresh": stages, "table": table}  # fmt: skip
    print("\n".join(md))
    write_results(f"demo-time-{args.preset}-cpu", payload, "\n".join(md),
                  Path(args.out) if args.out else None)  # fmt: skip


if __name__ == "__main__":
    main()
