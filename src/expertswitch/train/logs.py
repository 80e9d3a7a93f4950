"""A run's metric logs: `metrics.csv` (one row per optimiser step), `eval.csv` (one row per
evaluation) and, when the `tensorboard` package is installed, TensorBoard events under `tb/`.

A resumed run first drops the rows a killed run wrote after its last checkpoint, so each file
reads as one uninterrupted run.
"""

from __future__ import annotations

import csv
from pathlib import Path

STEP_FIELDS = ["step", "tokens", "lr", "loss", "lm_loss", "aux_loss", "kd_loss", "kd_weight",
               "grad_norm", "tokens_per_s"]  # fmt: skip


def _truncate(path: Path, last_step: int) -> None:
    if not path.is_file():
        return
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    kept = [rows[0]] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= last_step]
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(kept)


class MetricsLog:
    def __init__(self, run_dir: Path, eval_fields: list[str], resume_step: int,
                 tensorboard: bool, log=print):  # fmt: skip
        self.steps_path = run_dir / "metrics.csv"
        self.eval_path = run_dir / "eval.csv"
        self.eval_fields = ["step", *eval_fields]
        for p in (self.steps_path, self.eval_path):
            if resume_step == 0:
                p.unlink(missing_ok=True)
            _truncate(p, resume_step)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log("TensorBoard logging is off: the tensorboard package is not installed "
                    "(pip install tensorboard); metrics.csv has every step")  # fmt: skip
            else:
                self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step + 1)

    def _append(self, path: Path, fields: list[str], rows: list[dict]) -> None:
        new = not path.is_file() or path.stat().st_size == 0
        with path.open("a", newline="") as f:
            w = csv.DictWriter(f, fields)
            if new:
                w.writeheader()
            w.writerows(rows)

    def steps(self, rows: list[dict]) -> None:
        self._append(self.steps_path, STEP_FIELDS, rows)
        if self.tb:
            for r in rows:
                for k in STEP_FIELDS[2:]:
                    self.tb.add_scalar(f"train/{k}", r[k], r["step"])

    def evaluation(self, row: dict) -> None:
        self._append(self.eval_path, self.eval_fields, [row])
        if self.tb:
            for k in self.eval_fields[1:]:
                self.tb.add_scalar(f"val/{k}", row[k], row["step"])

    def flush(self) -> None:
        if self.tb:
            self.tb.flush()

    def close(self) -> None:
        if self.tb:
            self.tb.close()


def read_csv(path: Path) -> list[dict]:
    """Rows with numbers parsed (benchmarks and tests read the logs back)."""
    with Path(path).open(newline="") as f:
        return [{k: float(v) if v not in ("", None) else None for k, v in r.items()}
                for r in csv.DictReader(f)]  # fmt: skip
