"""`expertswitch demo`: the whole idea in one run on the built-in tiny expert family.

Builds (or reuses) the family, compresses every expert into a mixed-precision delta against
the shared base, reconstructs each one, and prints sizes, ratios and how much of each expert's
gain over the base survives compression, plus one sample answer per expert.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

from expertswitch.compress import reconstruct
from expertswitch.compress.report import archive_report
from expertswitch.eval.tasks import (
    evaluate_checkpoint,
    evaluate_model,
    greedy,
    load_checkpoint,
)
from expertswitch.io.archive import open_archive
from expertswitch.zoo.build import build_family
from expertswitch.zoo.corpora import load_corpora
from expertswitch.zoo.served import family_archives, family_router

SAMPLE_PROMPTS = {
    "code": "def fibonacci(n):\n    ",
    "math": "Q: Tom has 23 marbles and finds 15 more. How many marbles does he have?\nA:",
    "prose": "The import statement",
}


def margin_kept(base: float, full: float, comp: float) -> float | None:
    """Share of the expert's gain over the base that the compressed expert keeps."""
    gain = full - base
    return None if abs(gain) < 1e-9 else (comp - base) / gain


def nll_kept(ppl_base: float, ppl_full: float, ppl_comp: float) -> float | None:
    """`margin_kept` on held-out log-perplexity (nats per token): the share of the fine-tune's
    loss reduction on its own domain that survives compression."""
    return margin_kept(-math.log(ppl_base), -math.log(ppl_full), -math.log(ppl_comp))


def run_demo(preset: str = "tiny", bits: int = 2, n_items: int = 60, device: str = "cpu",
             out=print) -> dict:  # fmt: skip
    start = time.perf_counter()
    family = build_family(preset, device=device, log=out)
    corpora = load_corpora(family.manifest["seed"])  # held-out items do not depend on scale
    domains = list(family.domains)
    out(f"family '{preset}': base + {len(domains)} fully fine-tuned experts "
        f"({family.manifest['params'] / 1e6:.2f}M parameters each)")  # fmt: skip
    base_scores = evaluate_checkpoint(family.base, domains, corpora, n_items, device)
    archives = family_archives(family, bits, device, log=out)
    rows, samples = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for d, path in family.experts.items():
            full = evaluate_checkpoint(path, [d], corpora, n_items, device)[d]
            archive = archives[d]
            rec = reconstruct(family.base, archive, Path(tmp) / f"{d}-rebuilt", device,
                              progress=False)  # fmt: skip
            model, tok = load_checkpoint(rec, device)
            comp = evaluate_model(model, tok, [d], corpora, n_items)[d]
            samples[d] = greedy(model, tok, [SAMPLE_PROMPTS[d]], 24)[0]
            rep = archive_report(open_archive(archive))
            b = base_scores[d]
            rows.append({
                "expert": d, "task": full.task, "base": b.token_acc, "full": full.token_acc,
                "compressed": comp.token_acc, "kept": nll_kept(b.ppl, full.ppl, comp.ppl),
                "ppl_base": b.ppl, "ppl_full": full.ppl, "ppl_compressed": comp.ppl,
                "fp16_mb": rep["expert_fp16_bytes"] / 2**20,
                "delta_mb": rep["archive_bytes"] / 2**20, "ratio": rep["ratio_to_fp16"],
                "bits_per_param": rep["bits_per_param_quantized"],
            })  # fmt: skip
    _print_table(rows, bits, out)
    out("\nOne answer per compressed expert (greedy):")
    for d, text in samples.items():
        shown = (SAMPLE_PROMPTS[d] + text).strip().replace("\n", "\n    ")
        out(f"  [{d}]\n    {shown}")
    fp16_total = sum(r["fp16_mb"] for r in rows) + rows[0]["fp16_mb"]
    stored = rows[0]["fp16_mb"] + sum(r["delta_mb"] for r in rows)
    out(f"\nbase + {len(rows)} experts: {stored:.2f} MiB as base + deltas vs {fp16_total:.2f} MiB "
        f"as {len(rows) + 1} fp16 models ({fp16_total / stored:.1f}× less).")  # fmt: skip
    served = serve_mixed_batch(family, archives, corpora, device, out)
    out(f"\nDemo took {time.perf_counter() - start:.0f} s. Serve it over HTTP (OpenAI API): "
        "expertswitch serve --demo")  # fmt: skip
    return {"rows": rows, "samples": samples, "served": served}


def serve_mixed_batch(family, archives, corpora, device: str, out=print) -> dict:
    """ME-Switch end to end: the router picks an expert for each of a few mixed held-out
    queries, and one engine answers them all in one batch — the base resident once, each
    expert as its packed delta."""
    import torch

    from expertswitch.engine import Engine, SamplingParams
    from expertswitch.eval.tasks import task_items
    from expertswitch.router import load_router

    router = load_router(family_router(family, device, log=out), device=device)
    pairs = [(d, item.prompt) for d in family.domains for item in task_items(d, corpora, 2)]
    queries = [q for _, q in pairs]
    routes = router.route(queries)
    experts = [None if r.expert == "__base__" else r.expert for r in routes]
    engine = Engine(family.base, archives, device=device, dtype=torch.float32)
    answers = engine.generate(queries, experts, SamplingParams(temperature=0.0, max_tokens=24))
    out(f"\nRouted and served in one mixed batch (router: {router.backbone.name}; below a "
        f"confidence of {router.threshold:.2f} a query goes to the base):")  # fmt: skip
    out("  held-out query from → routed to (confidence): the query's end / the answer")
    for (domain, q), r, a in zip(pairs, routes, answers):
        shown_q = q.strip().replace("\n", " ⏎ ")[-60:]
        shown_a = a.text.strip().replace("\n", " ⏎ ")[:60]
        name = "base" if r.expert == "__base__" else r.expert
        out(f"  {domain:>5} → {name:<5} ({r.confidence:.2f}): …{shown_q}\n{'':26}{shown_a}")
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
    out(f"\nEach expert on its own domain's held-out text: perplexity of the base, the full expert "
        f"and the expert rebuilt from its mixed {bits}-bit delta; 'kept' = share of the expert's "
        f"log-perplexity gain over the base that survives; answer-token accuracy on the domain "
        f"task (teacher-forced top-1).")  # fmt: skip
    head = (f"{'expert':<7} {'ppl base':>9} {'full':>7} {'comp.':>7} {'kept':>6}   "
            f"{'task acc base':>13} {'full':>6} {'comp.':>6}   {'delta MiB':>9} {'ratio':>6} "
            f"{'bits/p':>6}")  # fmt: skip
    out(head)
    out("-" * len(head))
    for r in rows:
        kept = "-" if r["kept"] is None else f"{100 * r['kept']:.0f}%"
        out(f"{r['expert']:<7} {r['ppl_base']:>9.2f} {r['ppl_full']:>7.2f} "
            f"{r['ppl_compressed']:>7.2f} {kept:>6}   {r['base']:>13.3f} {r['full']:>6.3f} "
            f"{r['compressed']:>6.3f}   {r['delta_mb']:>9.3f} {r['ratio']:>5.1f}× "
            f"{r['bits_per_param']:>6.2f}")  # fmt: skip
