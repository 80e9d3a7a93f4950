"""`expertswitch demo`: the whole idea in one run on the built-in tiny expert family.

Builds (or reuses) the family, compresses every expert into a mixed-precision delta against
the shared base, reconstructs each one, and shows on held-out items of each expert's skill the
base's answer, the full expert's and the compressed expert's, marked right or wrong; then exact
match on a few hundred such items for all three, sizes and ratios, and a routed mixed batch
served by one engine.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

from expertswitch.compress import reconstruct
from expertswitch.compress.report import archive_report
from expertswitch.eval.tasks import (
    TASK_NAMES,
    answer_items,
    extract_answer,
    is_correct,
    load_checkpoint,
    score_items,
    task_items,
)
from expertswitch.io.archive import open_archive
from expertswitch.zoo.build import build_family
from expertswitch.zoo.corpora import load_corpora
from expertswitch.zoo.served import family_archives, family_router

VARIANTS = ("base", "expert", "compressed")


def margin_kept(base: float, full: float, comp: float) -> float | None:
    """Share of the expert's gain over the base that the compressed expert keeps."""
    gain = full - base
    return None if abs(gain) < 1e-9 else (comp - base) / gain


def nll_kept(ppl_base: float, ppl_full: float, ppl_comp: float) -> float | None:
    """`margin_kept` on held-out log-perplexity (nats per token): the share of the fine-tune's
    loss reduction on its own domain that survives compression."""
    return margin_kept(-math.log(ppl_base), -math.log(ppl_full), -math.log(ppl_comp))


def run_demo(preset: str = "tiny", bits: int = 2, n_items: int = 300, device: str = "cpu",
             out=print, shown: int = 3) -> dict:  # fmt: skip
    start = time.perf_counter()
    family = build_family(preset, device=device, log=out)
    corpora = load_corpora(family.manifest["seed"])  # held-out items do not depend on scale
    domains = list(family.domains)
    out(f"family '{preset}': base + {len(domains)} fully fine-tuned experts "
        f"({family.manifest['params'] / 1e6:.2f}M parameters each)")  # fmt: skip
    archives = family_archives(family, bits, device, log=out)
    base, tok = load_checkpoint(family.base, device)
    rows, examples = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for d in domains:
            items = task_items(d, corpora, n_items)
            rec = reconstruct(family.base, archives[d], Path(tmp) / f"{d}-rebuilt", device,
                              progress=False)  # fmt: skip
            answers = {}
            for name, path in zip(VARIANTS, (None, family.experts[d], rec)):
                model = base if path is None else load_checkpoint(path, device)[0]
                answers[name] = answer_items(model, tok, d, items)
            em = {name: score_items(d, items, a) for name, a in answers.items()}
            rep = archive_report(open_archive(archives[d]))
            rows.append({
                "expert": d, "task": TASK_NAMES[d], "n": len(items),
                **{f"em_{k}": v for k, v in em.items()},
                "kept": margin_kept(em["base"], em["expert"], em["compressed"]),
                "fp16_mb": rep["expert_fp16_bytes"] / 2**20,
                "delta_mb": rep["archive_bytes"] / 2**20, "ratio": rep["ratio_to_fp16"],
                "bits_per_param": rep["bits_per_param_quantized"],
            })  # fmt: skip
            examples[d] = [(items[i], {k: a[i] for k, a in answers.items()})
                           for i in range(min(shown, len(items)))]  # fmt: skip
    _print_examples(examples, bits, out)
    _print_table(rows, bits, out)
    fp16_total = sum(r["fp16_mb"] for r in rows) + rows[0]["fp16_mb"]
    stored = rows[0]["fp16_mb"] + sum(r["delta_mb"] for r in rows)
    out(f"\nbase + {len(rows)} experts: {stored:.2f} MiB as base + deltas vs {fp16_total:.2f} MiB "
        f"as {len(rows) + 1} fp16 models ({fp16_total / stored:.1f}× less).")  # fmt: skip
    served = serve_mixed_batch(family, archives, corpora, device, out)
    out(f"\nDemo took {time.perf_counter() - start:.0f} s. Serve it over HTTP (OpenAI API): "
        "expertswitch serve --demo")  # fmt: skip
    return {"rows": rows, "examples": examples, "served": served}


def _shown_answer(domain: str, completion: str) -> str:
    got = extract_answer(domain, completion)
    if got is None:  # nothing parseable: show what was said
        got = completion.strip().split("\n")[0][:30] or "(nothing)"
    return got


def _mark(domain: str, item, completion: str) -> str:
    return "✓" if is_correct(domain, item, completion) else "✗"


def _print_examples(examples, bits, out) -> None:
    out(f"\nHeld-out questions (never trained on): the base's answer, the expert's, and the "
        f"expert rebuilt from its mixed {bits}-bit delta:")  # fmt: skip
    labels = {"base": "base", "expert": "expert", "compressed": f"{bits}-bit expert"}
    for d, pairs in examples.items():
        for item, answers in pairs:
            want = item.answer[1:] if d == "code" else item.answer.strip().rstrip(".")
            out(f"  [{d}] {item.prompt.strip()}   (right answer: {want})")
            out("        " + "  |  ".join(
                f"{labels[k]}: {_shown_answer(d, a)} {_mark(d, item, a)}"
                for k, a in answers.items()))  # fmt: skip


def serve_mixed_batch(family, archives, corpora, device: str, out=print) -> dict:
    """ME-Switch end to end: the router picks an expert for each of a few mixed held-out
    queries, and one engine answers them all in one batch — the base resident once, each
    expert as its packed delta."""
    import torch

    from expertswitch.engine import Engine, SamplingParams
    from expertswitch.router import load_router

    router = load_router(family_router(family, device, log=out), device=device)
    pairs = [(d, item) for d in family.domains for item in task_items(d, corpora, 2, seed=1)]
    queries = [item.prompt for _, item in pairs]
    routes = router.route(queries)
    experts = [None if r.expert == "__base__" else r.expert for r in routes]
    engine = Engine(family.base, archives, device=device, dtype=torch.float32)
    answers = engine.generate(queries, experts, SamplingParams(temperature=0.0, max_tokens=24))
    out(f"\nRouted and served in one mixed batch (router: {router.backbone.name}; below a "
        f"confidence of {router.threshold:.2f} a query goes to the base):")  # fmt: skip
    out("  held-out question of → routed to (confidence): the question → the answer served")
    for (domain, item), r, a in zip(pairs, routes, answers):
        name = "base" if r.expert == "__base__" else r.expert
        out(f"  {domain:>5} → {name:<5} ({r.confidence:.2f}): {item.prompt.strip()} → "
            f"{_shown_answer(domain, a.text)} {_mark(domain, item, a.text)}")  # fmt: skip
    base_params = sum(n * m for n, m in (_dims(s) for s in engine.model.shapes.values()))
    packed = {n: engine.pool.get(n).nbytes() for n in archives}  # the packed parts held
    held = 2 * base_params + sum(packed.values())
    separate = 2 * base_params * (1 + len(archives))
    out(f"memory held: base {2 * base_params / 2**20:.2f} MiB (fp16) + packed deltas "
        f"{sum(packed.values()) / 2**20:.2f} MiB = {held / 2**20:.2f} MiB, against "
        f"{separate / 2**20:.2f} MiB for the base and {len(archives)} experts as separate fp16 "
        f"models ({separate / held:.1f}× less)")  # fmt: skip
    engine.close()
    return {"routes": [(r.expert, r.confidence) for r in routes], "held_bytes": held,
            "separate_fp16_bytes": separate, "answers": [a.text for a in answers]}  # fmt: skip


def _dims(shape) -> tuple[int, int]:
    shape = list(shape)
    return (shape[0], int(math.prod(shape[1:]))) if len(shape) > 1 else (shape[0], 1)


def _print_table(rows, bits, out) -> None:
    n = rows[0]["n"]
    out(f"\nExact match on {n} held-out items per expert's own skill: the base, the full expert "
        f"and the expert rebuilt from its mixed {bits}-bit delta; 'kept' = share of the "
        f"expert's lead over the base that the {bits}-bit delta keeps; the delta's size, its "
        f"ratio to the fp16 expert and bits per quantized parameter (salient channels in fp16 "
        f"included).")  # fmt: skip
    head = (f"{'expert':<7} {'task':<19} {'base':>6} {'expert':>7} {f'{bits}-bit':>6} "
            f"{'kept':>5}   {'delta MiB':>9} {'ratio':>6} {'bits/p':>6}")  # fmt: skip
    out(head)
    out("-" * len(head))
    for r in rows:
        kept = "-" if r["kept"] is None else f"{100 * r['kept']:.0f}%"
        out(f"{r['expert']:<7} {r['task']:<19} {100 * r['em_base']:>5.1f}% "
            f"{100 * r['em_expert']:>6.1f}% {100 * r['em_compressed']:>5.1f}% {kept:>5}   "
            f"{r['delta_mb']:>9.3f} {r['ratio']:>5.1f}× {r['bits_per_param']:>6.2f}")  # fmt: skip
