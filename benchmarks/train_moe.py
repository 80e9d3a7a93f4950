"""DeepSpeed-MoE's training claims at small scale, on the zoo's corpora, equal training tokens:

(a) MoE vs dense at equal compute per token (top-1, each expert the dense FFN's size):
    validation loss;
(b) PR-MoE (fewer experts early, more late, every MoE layer residual) vs standard MoE:
    parameters vs validation loss;
(c) Mixture-of-Students: a student with 12.5% fewer layers (one MoE layer of the first group
    dropped, as the paper's 24 → 21), built from the PR-MoE teacher, trained with KD all the
    way, with staged KD (off at 60% of the steps) and without KD. A student starts from the
    trained teacher's layers, so the teacher trained on as many more tokens ("pr-moe
    continued") is its fair reference, beside the teacher as it was.

Each run is `expertswitch.train.train` (the library's trainer, nothing special-cased); one table
(JSON + markdown) and the validation-loss curves (SVG) go to benchmarks/results/.

    python benchmarks/train_moe.py --device cuda              # the H200 run (~8 minutes)
    python benchmarks/train_moe.py --device cpu --tiny        # the script itself, on a CPU
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _common import run_info, svg_line_plot, write_results  # noqa: E402

from expertswitch.train.config import load_config  # noqa: E402
from expertswitch.train.logs import read_csv  # noqa: E402
from expertswitch.train.trainer import train  # noqa: E402

# 8 layers; MoE on layers 1, 3, 5, 7 (every other FFN, as the paper's)
GPU = ["model.hidden_size=384", "model.intermediate_size=1024", "model.num_layers=8",
       "model.num_heads=6", "model.num_kv_heads=6", "data.seq_len=256", "optim.batch_size=32",
       "optim.steps=1200", "optim.warmup=100", "optim.lr=1e-3", "eval_every=100",
       "eval_windows=64", "data.vocab_size=8192", "checkpoint_every=0"]  # fmt: skip
TINY = ["model.hidden_size=64", "model.intermediate_size=128", "model.num_layers=8",
        "model.num_heads=4", "model.num_kv_heads=4", "data.seq_len=64", "optim.batch_size=8",
        "optim.steps=60", "optim.warmup=6", "eval_every=15", "eval_windows=8",
        "data.vocab_size=512", "data.scale=0.02", "data.tokens_per_domain=40000",
        "data.val_tokens_per_domain=4000", "checkpoint_every=0"]  # fmt: skip
EXPERTS = {"gpu": (16, "8x2+16x2"), "tiny": (8, "4x2+8x2")}
STUDENT = "[0,1,2,4,5,6,7]"  # drops layer 3: an MoE layer of the first (smaller) group


def runs(scale: str) -> list[tuple[str, str, list[str]]]:
    e, pyramid = EXPERTS[scale]
    return [
        ("dense", "dense", []),
        (f"moe-{e}", "moe", [f"model.moe.experts={e}x4"]),
        ("pr-moe", "pr-moe", [f"model.moe.experts={pyramid}"]),
        # the teacher trained on as many more tokens as the students get: the fair reference
        # for them (a student starts from the trained teacher's layers)
        ("pr-moe continued", "pr-moe", ["model.init_from=TEACHER"]),
        ("mos (kd all the way)", "mos", ["kd.beta=1.0"]),
        ("mos (staged kd)", "mos", ["kd.beta=1.0", "kd.stop_step=STOP"]),
        ("student without kd", "mos", ["kd.beta=0.0"]),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="CPU-sized models (checks the script)")
    ap.add_argument("--work", default=None, help="run directories (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    scale = "tiny" if args.tiny else "gpu"
    base = TINY if args.tiny else GPU
    work = Path(args.work or tempfile.mkdtemp(prefix="train_moe-"))
    steps = int(next(s for s in base if s.startswith("optim.steps=")).split("=")[1])
    rows, curves = [], {}
    teacher = work / "pr-moe" / "model"
    for name, preset, extra in runs(scale):
        out = work / "".join(c if c.isalnum() or c == "-" else "_" for c in name)
        extra = [x.replace("STOP", str(int(0.6 * steps))).replace("TEACHER", str(teacher))
                 for x in extra]  # fmt: skip
        if preset == "mos":  # the student's layers come from the teacher
            extra += [f"kd.teacher={teacher}", f"kd.student_layers={STUDENT}"]
        # one corpus and tokenizer for all runs, prepared by the first
        sets = [*base, *extra, f"out={out}", f"device={args.device}", "tensorboard=false",
                f"data.dir={work / 'data'}"]  # fmt: skip
        cfg = load_config(None, preset, sets)
        t0 = time.perf_counter()
        s = train(cfg, overwrite=True, progress=False, log=lambda m, n=name: print(f"[{n}] {m}"))
        seconds = time.perf_counter() - t0
        val = read_csv(out / "eval.csv")
        curves[name] = [(r["step"], r["val_loss"]) for r in val]
        last = val[-1]
        rows.append({"run": name, "params": s.params, "active_params": s.active_params,
                     "tokens": steps * cfg.optim.batch_size * cfg.data.seq_len,
                     "val_loss": last["val_loss"],
                     **{d: last[d] for d in cfg.data.domains},
                     "kd_stopped_at": (s.kd or {}).get("stopped_at"),
                     "seconds": round(seconds, 1),
                     "tokens_per_s": round(steps * cfg.optim.batch_size * cfg.data.seq_len
                                           / s.seconds)})  # fmt: skip
        print(rows[-1])
    by = {r["run"]: r for r in rows}
    e = EXPERTS[scale][0]
    findings = {
        "moe_vs_dense_val_loss": round(by[f"moe-{e}"]["val_loss"] - by["dense"]["val_loss"], 4),
        "pr_moe_vs_moe_val_loss": round(by["pr-moe"]["val_loss"] - by[f"moe-{e}"]["val_loss"], 4),
        "pr_moe_params_share_of_moe": round(by["pr-moe"]["params"] / by[f"moe-{e}"]["params"], 3),
        "mos_vs_teacher_val_loss": round(by["mos (staged kd)"]["val_loss"]
                                         - by["pr-moe"]["val_loss"], 4),
        "mos_vs_teacher_continued": round(by["mos (staged kd)"]["val_loss"]
                                          - by["pr-moe continued"]["val_loss"], 4),
        "mos_vs_student_without_kd": round(by["mos (staged kd)"]["val_loss"]
                                           - by["student without kd"]["val_loss"], 4),
        "staged_vs_full_kd": round(by["mos (staged kd)"]["val_loss"]
                                   - by["mos (kd all the way)"]["val_loss"], 4),
    }  # fmt: skip
    info = run_info(args.device)
    head = ["run", "params", "active_params", "tokens", "val_loss", "code", "math", "prose",
            "kd_stopped_at", "seconds", "tokens_per_s"]  # fmt: skip
    md = [f"# Training MoE LMs at small scale ({info['device']}, {info['date']}, "
          f"{info['commit']})", "", "| " + " | ".join(head) + " |",
          "|" + "---|" * len(head)]  # fmt: skip
    md += ["| " + " | ".join(str(r.get(h)) for h in head) + " |" for r in rows]
    md += ["", "Differences in validation loss (negative: the first is better):", ""]
    md += [f"- {k}: {v}" for k, v in findings.items()]
    stem = "train_moe" + ("-cpu-tiny" if args.tiny else "")
    out_dir = args.out
    path = write_results(stem, {**info, "scale": scale, "rows": rows, "findings": findings,
                                "curves": curves}, "\n".join(md), out_dir)  # fmt: skip
    svg = svg_line_plot(curves, "validation loss vs step (equal tokens)", "step", "val loss")
    path.with_suffix(".svg").write_text(svg)
    print("\n".join(md))


if __name__ == "__main__":
    main()
