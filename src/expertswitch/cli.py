"""The `expertswitch` command: argument parsing over the library's typed functions."""

from __future__ import annotations

import argparse
import json
import sys

from expertswitch.errors import ExpertSwitchError


def _add_compress(sub) -> None:
    p = sub.add_parser("compress", help="compress a fine-tuned checkpoint into a delta archive")
    p.add_argument("--base", required=True, help="base model directory (HF checkpoint)")
    p.add_argument("--expert", required=True, help="fine-tuned model directory (HF checkpoint)")
    p.add_argument("--out", required=True, help="archive directory to write")
    p.add_argument("--method", default="mixed", help="mixed (ME-Switch), rtn or bitdelta")
    p.add_argument("--bits", type=int, default=2, help="bits per weight: 1, 2, 3, 4 or 8")
    p.add_argument(
        "--salient", type=float, default=0.01, help="fp16 input channels: fraction < 1 or count"
    )
    p.add_argument("--group-size", type=int, default=128, help="input channels per step size")
    p.add_argument(
        "--symmetric",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="symmetric levels without zero points (default: at 1 bit only)",
    )
    p.add_argument("--calib", default=None, help="calibration text (.txt or .jsonl 'text')")
    p.add_argument("--calib-tokens", type=int, default=8192, help="calibration tokens")
    p.add_argument("--seq-len", type=int, default=512, help="calibration sequence length")
    p.add_argument(
        "--tune-steps",
        type=int,
        default=None,
        help="step-size tuning steps (mixed; default 0 = off); 0 turns BitDelta's distillation off",
    )
    p.add_argument(
        "--clip-floor",
        type=float,
        default=None,
        help="mixed: lowest clip ratio searched (default by bits, 0.12 at 2 bits); higher keeps "
        "more of the delta's largest entries",
    )
    p.add_argument(
        "--quantize-embeddings",
        action="store_true",
        help="quantize the embedding and lm_head deltas too (default: stored exactly)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="print an archive's size, bits/param and per-layer SQNR")
    p.add_argument("archive")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--no-verify", action="store_true", help="skip checksum verification")


def _add_reconstruct(sub) -> None:
    p = sub.add_parser("reconstruct", help="base + archive → a normal HF checkpoint")
    p.add_argument("--base", required=True)
    p.add_argument("--delta", required=True, help="archive directory")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default=None,
                   help="write weights in float32, bfloat16 or float16 (default: their own; "
                   "float32 keeps a small delta that bf16 storage would round away)")  # fmt: skip
    p.add_argument("--device", default="cpu")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the whole idea in one run, on the built-in expert family")
    p.add_argument("--preset", default="tiny", help="expert family: micro, tiny (default), small")
    p.add_argument("--bits", type=int, default=2, help="bits of the compressed deltas")
    p.add_argument("--items", type=int, default=60, help="task items per domain")
    p.add_argument("--device", default="cpu")


def _add_zoo(sub) -> None:
    p = sub.add_parser("zoo", help="the built-in expert family")
    zsub = p.add_subparsers(dest="zoo_command", required=True)
    b = zsub.add_parser("build", help="train the base and the domain experts (cached)")
    b.add_argument("--preset", default="tiny", help="micro, tiny or small (~90M, for a GPU)")
    b.add_argument("--out", default=None, help="directory (default: the user cache)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--device", default="auto")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="per-domain task scores and held-out perplexity")
    p.add_argument("model", nargs="?", help="HF checkpoint directory")
    p.add_argument("--base", help="with --delta: evaluate base + expert archive")
    p.add_argument("--delta", help="expert archive (needs --base)")
    p.add_argument("--domains", nargs="+", default=["code", "math", "prose"])
    p.add_argument("--items", type=int, default=100, help="task items per domain")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--device", default="auto")


def _add_router(sub) -> None:
    p = sub.add_parser("router", help="train and evaluate the model-level router")
    rsub = p.add_subparsers(dest="router_command", required=True)
    t = rsub.add_parser("train", help="fit a router (default data: the zoo's domains)")
    t.add_argument("--data", default=None, help='JSONL: {"text": ..., "expert": ...} per line')
    t.add_argument("--backbone", default="minilm", help="minilm (default), base or ngram")
    t.add_argument("--base-model", default=None, help="the base LLM, for --backbone base")
    t.add_argument("--out", required=True)
    t.add_argument(
        "--target-accuracy",
        type=float,
        default=0.98,
        help="calibrate the fallback threshold to this held-out accuracy",
    )
    t.add_argument("--default", default="__base__", help="where low-confidence queries go")
    t.add_argument("--device", default="cpu")
    e = rsub.add_parser("eval", help="accuracy, macro-F1, confusion, fallback, latency")
    e.add_argument("router")
    e.add_argument("--data", default=None, help="JSONL (default: zoo held-out + style shift)")
    e.add_argument("--base-model", default=None)
    e.add_argument("--json", default=None, help="also write the report here")
    e.add_argument("--device", default="cpu")


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="serve a base and expert archives: generate text")
    p.add_argument("--base", required=True, help="base model directory (HF checkpoint)")
    p.add_argument("--expert", action="append", default=[], metavar="NAME=ARCHIVE",
                   help="an expert archive to serve under NAME (repeatable)")  # fmt: skip
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    p.add_argument("--prompt-ids", action="append", default=[], metavar="IDS",
                   help="a prompt as comma-separated token ids (repeatable)")  # fmt: skip
    p.add_argument("--use", action="append", default=None, metavar="NAME",
                   help="the expert that answers (default: the base alone); once for all "
                   "prompts or once per prompt; 'base' for the base")  # fmt: skip
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--stream", action="store_true", help="print tokens as they come (1 prompt)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="expertswitch", description="Hold and serve many expert LLMs on one GPU."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo(sub)
    _add_compress(sub)
    _add_inspect(sub)
    _add_reconstruct(sub)
    _add_zoo(sub)
    _add_eval(sub)
    _add_router(sub)
    _add_generate(sub)
    return parser


def cmd_compress(args) -> None:
    from expertswitch.compress import CompressOptions, compress_expert, make_method
    from expertswitch.compress.calibration import CalibOptions
    from expertswitch.compress.report import archive_report
    from expertswitch.io.archive import open_archive
    from expertswitch.utils.imports import resolve_device

    extra = {}
    if args.method == "bitdelta" and args.tune_steps == 0:
        extra["distill"] = False
    method = make_method(
        args.method,
        bits=args.bits,
        group_size=args.group_size,
        salient=args.salient,
        symmetric=args.symmetric,
        tune_steps=args.tune_steps,
        clip_floor=args.clip_floor,
        **extra,
    )
    options = CompressOptions(
        calib_file=args.calib,
        calib=CalibOptions(tokens=args.calib_tokens, seq_len=args.seq_len),
        device=resolve_device(args.device),
        progress=not args.quiet,
        overwrite=args.overwrite,
        quantize_embeddings=args.quantize_embeddings,
    )
    out = compress_expert(args.base, args.expert, args.out, method, options)
    rep = archive_report(open_archive(out, verify=False))
    print(
        f"wrote {out}: {rep['archive_bytes'] / 2**20:,.2f} MiB, {rep['ratio_to_fp16']}× smaller "
        f"than the fp16 expert, {rep['bits_per_param_quantized']} bits/param in linear layers"
    )


def cmd_inspect(args) -> None:
    from expertswitch.compress.report import archive_report, format_report
    from expertswitch.io.archive import open_archive

    rep = archive_report(open_archive(args.archive, verify=not args.no_verify))
    print(json.dumps(rep, indent=1) if args.json else format_report(rep))


def cmd_reconstruct(args) -> None:
    from expertswitch.compress import reconstruct
    from expertswitch.utils.imports import resolve_device

    out = reconstruct(
        args.base,
        args.delta,
        args.out,
        device=resolve_device(args.device),
        progress=not args.quiet,
        overwrite=args.overwrite,
        dtype=_dtype_arg(args.dtype),
    )
    print(f"wrote {out}")


def cmd_demo(args) -> None:
    from expertswitch.demo import run_demo
    from expertswitch.utils.imports import resolve_device

    run_demo(args.preset, args.bits, args.items, resolve_device(args.device))


def cmd_zoo(args) -> None:
    from expertswitch.utils.imports import resolve_device
    from expertswitch.zoo.build import build_family

    fam = build_family(args.preset, args.out, args.seed, resolve_device(args.device),
                       force=args.force)  # fmt: skip
    print(f"family '{fam.preset}' at {fam.root}")
    print(f"  base     {fam.base}")
    for d, path in fam.experts.items():
        print(f"  {d:<8} {path}")


def cmd_eval(args) -> None:
    import tempfile
    from pathlib import Path

    from expertswitch.errors import ConfigError
    from expertswitch.eval.tasks import evaluate_checkpoint
    from expertswitch.utils.imports import resolve_device

    device = resolve_device(args.device)
    if bool(args.base) != bool(args.delta) or bool(args.model) == bool(args.delta):
        raise ConfigError("pass a checkpoint directory, or --base and --delta (not both)")
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if args.delta:
            from expertswitch.compress import reconstruct

            model = reconstruct(args.base, args.delta, Path(tmp) / "expert", device, False)
        scores = evaluate_checkpoint(model, args.domains, None, args.items, device)
    print(f"{'domain':<8} {'task':<16} {'exact':>7} {'token acc':>9} {'ppl':>9}  items")
    for s in scores.values():
        print(
            f"{s.domain:<8} {s.task:<16} {s.score:>7.3f} {s.token_acc:>9.3f} {s.ppl:>9.2f}  {s.n}"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({d: s.to_dict() for d, s in scores.items()}, indent=1)
        )


def cmd_router(args) -> None:
    from expertswitch.router.workflow import evaluate_router, format_report, train_router

    if args.router_command == "train":
        r = train_router(args.out, args.data, args.backbone, args.base_model,
                         args.target_accuracy, args.default, device=args.device)  # fmt: skip
        print(f"router for {r.experts} on {r.backbone.identity['backbone']}: train accuracy "
              f"{r.info['train_accuracy']}, fallback threshold {r.threshold:.3f}; saved to "
              f"{args.out}")  # fmt: skip
        return
    report = evaluate_router(args.router, args.data, args.base_model, args.device)
    print(format_report(report))
    if args.json:
        from pathlib import Path

        Path(args.json).write_text(json.dumps(report, indent=1))


def _expert_args(items: list[str]) -> dict[str, str]:
    from expertswitch.errors import ConfigError

    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--expert {item!r}: write NAME=ARCHIVE_DIR, e.g. math=math.delta")
        if name in out:
            raise ConfigError(f"--expert {name!r} is given twice")
        out[name] = path
    return out


def _prompt_args(args) -> list:
    from expertswitch.errors import ConfigError

    prompts: list = list(args.prompt)
    for item in args.prompt_ids:
        try:
            prompts.append([int(t) for t in item.split(",") if t.strip()])
        except ValueError:
            raise ConfigError(f"--prompt-ids {item!r}: give comma-separated integers") from None
    if not prompts:
        raise ConfigError("give at least one --prompt TEXT (or --prompt-ids 1,2,3)")
    return prompts


def _dtype_arg(name: str | None):
    import torch

    from expertswitch.errors import ConfigError

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name is None:
        return None
    if name not in dtypes:
        raise ConfigError(f"--dtype {name!r}: choose one of {', '.join(dtypes)}")
    return dtypes[name]


def cmd_generate(args) -> None:
    from expertswitch.engine import Engine, SamplingParams
    from expertswitch.errors import ConfigError

    dtype = _dtype_arg(args.dtype)
    prompts = _prompt_args(args)
    use = [None if u in ("base", "__base__") else u for u in (args.use or [None])]
    if len(use) not in (1, len(prompts)):
        raise ConfigError(f"--use is given {len(use)} times for {len(prompts)} prompts: give it "
                          "once (all prompts) or once per prompt")  # fmt: skip
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                              seed=args.seed, max_tokens=args.max_tokens,
                              stop=args.stop)  # fmt: skip
    eng = Engine(args.base, _expert_args(args.expert), device=args.device,
                 dtype=dtype)  # fmt: skip
    experts = use * len(prompts) if len(use) == 1 else use
    if args.stream:
        if len(prompts) != 1:
            raise ConfigError("--stream prints one answer as it comes: give one prompt")
        seen = ""
        for out in eng.stream(prompts[0], experts[0], sampling):
            text = out.text if out.text is not None else " ".join(map(str, out.new_token_ids))
            print(text[len(seen) :] if out.text is not None else text + " ", end="", flush=True)
            seen = out.text or ""
        print(f"\n[{experts[0] or 'base'}: {out.finish_reason}]")
        return
    for prompt, out in zip(prompts, eng.generate(prompts, experts, sampling)):
        answer = out.text if out.text is not None else " ".join(map(str, out.token_ids))
        shown = prompt if isinstance(prompt, str) else ",".join(map(str, prompt))
        print(f"[{out.expert or 'base'}] {shown!r} -> {answer!r}  ({out.finish_reason}"
              + (f": {out.error}" if out.error else "") + ")")  # fmt: skip


COMMANDS = {
    "compress": cmd_compress,
    "inspect": cmd_inspect,
    "reconstruct": cmd_reconstruct,
    "demo": cmd_demo,
    "zoo": cmd_zoo,
    "eval": cmd_eval,
    "router": cmd_router,
    "generate": cmd_generate,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except ExpertSwitchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
