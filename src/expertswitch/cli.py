"""The `expertswitch` command: argument parsing over the library's typed functions."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from expertswitch.errors import ExpertSwitchError


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each default; flags whose default depends on the method say so in words."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


# compress flags that configure a method, and the config field each sets
METHOD_FLAGS = {"bits": "--bits", "group_size": "--group-size", "salient": "--salient",
                "symmetric": "--symmetric", "tune_steps": "--tune-steps",
                "clip_floor": "--clip-floor", "distill_steps": "--distill-steps"}  # fmt: skip


def _add_compress(sub) -> None:
    p = sub.add_parser("compress", help="compress a fine-tuned checkpoint into a delta archive",
                       formatter_class=_Defaults)  # fmt: skip
    p.add_argument("--base", required=True, help="base model directory (HF checkpoint)")
    p.add_argument("--expert", required=True, help="fine-tuned model directory (HF checkpoint)")
    p.add_argument("--out", required=True, help="archive directory to write")
    p.add_argument("--method", default="mixed", help="mixed (ME-Switch), rtn or bitdelta")
    p.add_argument("--bits", type=int, default=None,
                   help="bits per weight: 1, 2, 3, 4 or 8 (mixed, rtn; default 2; bitdelta is "
                   "1 bit by definition)")  # fmt: skip
    p.add_argument(
        "--salient",
        type=float,
        default=None,
        help="mixed: fp16 input channels, a fraction < 1 or a count (default 0.01)",
    )
    p.add_argument(
        "--group-size",
        type=int,
        default=None,
        help="mixed, rtn: input channels per step size (default 128)",
    )
    p.add_argument("--symmetric", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed, rtn: symmetric levels without zero points (default: at 1 bit "
                   "only)")  # fmt: skip
    p.add_argument(
        "--calib",
        default=None,
        help="calibration text, .txt or .jsonl with 'text' (default: built-in)",
    )
    p.add_argument("--tokenizer", default=None, metavar="DIR|bytes",
                   help="calibration tokenizer (default: the base's own; 'bytes': UTF-8 bytes "
                   "as ids, for a base without one)")  # fmt: skip
    p.add_argument(
        "--calib-tokens", type=int, default=None, help="calibration tokens (default 8192)"
    )
    p.add_argument("--seq-len", type=int, default=None,
                   help="calibration sequence length, cut to the model's positions (default "
                   "512)")  # fmt: skip
    p.add_argument("--tune-steps", type=int, default=None,
                   help="mixed: step-size tuning steps (default 0 = off); bitdelta: 0 turns its "
                   "distillation off")  # fmt: skip
    p.add_argument("--distill-steps", type=int, default=None,
                   help="mixed: distil the step sizes against the expert's logits for N steps "
                   "(model-level; default 0 = off)")  # fmt: skip
    p.add_argument("--clip-floor", type=float, default=None,
                   help="mixed: lowest clip ratio searched (default by bits, 0.12 at 2 bits); "
                   "higher keeps more of the delta's largest entries")  # fmt: skip
    p.add_argument("--quantize-embeddings", action="store_true",
                   help="quantize the embedding and lm_head deltas too (default: stored "
                   "exactly)")  # fmt: skip
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing archive at --out (never anything else)",
    )
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
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier reconstruction at --out (never anything else)",
    )
    p.add_argument("--quiet", action="store_true")


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the whole idea in one run, on the built-in expert family")
    p.add_argument("--preset", default="tiny", help="expert family: micro, tiny (default), small")
    p.add_argument("--bits", type=int, default=2, help="bits of the compressed deltas")
    p.add_argument("--items", type=int, default=300, help="task items per domain")
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
    p.add_argument("--items", type=int, default=300, help="task items per domain")
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
                   help="an expert archive or PEFT LoRA adapter directory to serve under "
                   "NAME (repeatable)")  # fmt: skip
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
    p.add_argument("--expert-parallel-size", type=int, default=1, metavar="N",
                   help="spread an MoE checkpoint's experts over N ranks: launch with torchrun "
                   "--nproc-per-node N -m expertswitch.cli generate ...")  # fmt: skip
    p.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                   help="slice the attention and MLP layers over N ranks (torchrun, as "
                   "above); combines with --expert-parallel-size")  # fmt: skip
    _add_step_flags(p)


def _add_step_flags(p) -> None:
    """How the engine runs its steps (generate and serve)."""
    p.add_argument("--enforce-eager", action="store_true",
                   help="run decode steps eagerly on a GPU instead of replaying them from CUDA "
                   "graphs (as vLLM's flag)")  # fmt: skip
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=True,
                   help="reuse the keys and values of a prompt's leading blocks already "
                   "computed for the same expert (default: on, as in vLLM)")  # fmt: skip
    p.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction,
                   default=True,
                   help="prefill long prompts in chunks beside the running requests' decode "
                   "tokens (default: on, as in vLLM)")  # fmt: skip
    p.add_argument("--max-num-batched-tokens", type=int, default=4096, metavar="N",
                   help="tokens computed in one step (default 4096)")  # fmt: skip
    p.add_argument("--long-prefill-token-threshold", type=int, default=None, metavar="N",
                   help="the most tokens of one prompt computed in a step (default: what the "
                   "step's budget has left)")  # fmt: skip
    p.add_argument("--max-num-seqs", type=int, default=64, metavar="N",
                   help="requests running in one step (default 64)")  # fmt: skip
    p.add_argument("--max-model-len", type=int, default=None, metavar="N",
                   help="longest prompt + answer in tokens (default: the model's "
                   "max_position_embeddings)")  # fmt: skip
    p.add_argument("--cpu-int4-deltas", action=argparse.BooleanOptionalAction,
                   default=None,
                   help="on CPU, compute deltas of up to 4 bits with torch's int4 matmul "
                   "(~7x faster delta terms, rounded to bf16; default: on for bfloat16 "
                   "and float16)")  # fmt: skip


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server over a base and its experts")
    p.add_argument("--base", default=None, help="base model directory (HF checkpoint)")
    p.add_argument("--expert", action="append", default=[], metavar="NAME=ARCHIVE",
                   help="an expert archive or PEFT LoRA adapter directory served as model "
                   "NAME (repeatable)")  # fmt: skip
    p.add_argument("--lora-modules", nargs="+", action="extend", default=[],
                   metavar="NAME=PATH",
                   help="PEFT LoRA adapters served as models, vLLM's flag: NAME=PATH or "
                   '\'{"name": NAME, "path": PATH}\' (archives work too)')  # fmt: skip
    p.add_argument(
        "--enable-lora",
        action="store_true",
        help="accepted for vLLM command lines (adapters are served without it)",
    )
    p.add_argument(
        "--max-loras",
        type=int,
        default=None,
        metavar="N",
        help="distinct experts or adapters in one step (default: any)",
    )
    p.add_argument(
        "--max-lora-rank",
        type=int,
        default=None,
        metavar="N",
        help="refuse LoRA adapters of a higher rank (default: any)",
    )
    p.add_argument(
        "--router",
        default=None,
        metavar="DIR",
        help="a saved router (`expertswitch router train`): enables model 'auto'",
    )
    p.add_argument(
        "--demo",
        action="store_true",
        help="serve the built-in family (base, its compressed experts, its router)",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: "
                   "bfloat16 on a GPU, float32 on CPU)")  # fmt: skip
    p.add_argument("--served-model-name", nargs="+", default=["base"], metavar="NAME",
                   help="the base model's name in the API; more names: it answers to each, "
                   "and replies say the first (vLLM's)")  # fmt: skip
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on "
                   "/v1 routes (default: $EXPERTSWITCH_API_KEY if set)")  # fmt: skip
    p.add_argument(
        "--enable-admin",
        action="store_true",
        help="allow loading, unloading and pinning experts over HTTP",
    )
    p.add_argument(
        "--gpu-budget",
        default=None,
        metavar="SIZE",
        help="device memory for resident experts, e.g. 20GiB",
    )
    p.add_argument(
        "--host-budget",
        default=None,
        metavar="SIZE",
        help="host memory for experts evicted from the device, e.g. 64GiB",
    )
    p.add_argument("--kv-cache-size", default=None, metavar="SIZE", help="KV-cache memory")
    p.add_argument("--expert-parallel-size", type=int, default=1, metavar="N",
                   help="spread an MoE checkpoint's experts over N ranks: torchrun "
                   "--nproc-per-node N -m expertswitch.cli serve ... (rank 0 serves "
                   "HTTP)")  # fmt: skip
    p.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                   help="slice the attention and MLP layers over N ranks (torchrun, as "
                   "above); combines with --expert-parallel-size")  # fmt: skip
    _add_step_flags(p)
    p.add_argument("--scheduling-policy", choices=["fcfs", "priority"], default="fcfs",
                   help="fcfs: requests in arrival order; priority: by each request's "
                   "priority (lower first; it may preempt running requests of a later "
                   "priority), then arrival, as vLLM's flag (default fcfs)")  # fmt: skip
    p.add_argument(
        "--max-tokens-limit",
        type=int,
        default=None,
        help="largest max_tokens a request may ask (default: the context length)",
    )
    p.add_argument("--max-request-bytes", default="4MiB", metavar="SIZE")
    p.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE",
        help="a Jinja chat template, used in place of the tokenizer's for every model served "
        "(vLLM's priority; e.g. a tool-calling template)",
    )
    p.add_argument("--default-chat-template-kwargs", default=None, metavar="JSON",
                   help="variables for the chat template, under each request's "
                   """chat_template_kwargs (e.g. '{"enable_thinking": false}')""")  # fmt: skip
    for flag, default, what in (("--allowed-origins", None, "origins"),
                                ("--allowed-methods", '["*"]', "methods"),
                                ("--allowed-headers", '["*"]', "headers")):  # fmt: skip
        p.add_argument(flag, default=default, metavar="JSON",
                       help=f"CORS: the {what} browsers may call from, a JSON list (vLLM's "
                       "flags; without --allowed-origins, no cross-origin calls: vLLM "
                       """allows '["*"]')""")  # fmt: skip
    p.add_argument(
        "--allow-credentials",
        action="store_true",
        help="CORS: browsers may send cookies and credentials",
    )
    p.add_argument("--generation-config", default="auto", metavar="auto|vllm|DIR",
                   help="requests' sampling defaults (temperature, top_p, top_k, min_p, "
                   "repetition_penalty) where they leave them out: auto, the base's "
                   "generation_config.json (vLLM's default; its max_new_tokens limits every "
                   "answer); vllm, OpenAI's neutral ones; or a folder with a "
                   "generation_config.json")  # fmt: skip
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='tool_choice "auto" (the default when a chat request gives tools): the '
                   "model decides whether to call, and --tool-call-parser reads its calls "
                   "(vLLM's flags)")  # fmt: skip
    p.add_argument("--tool-call-parser", default=None, metavar="NAME",
                   help="the format the model writes tool calls in: hermes (Qwen2.5, Hermes), "
                   "llama3_json (Llama 3.1), mistral, pythonic (Llama 3.2/4), "
                   "phi4_mini_json (Phi-4-mini) or qwen3_coder (Qwen3-Coder's XML calls; "
                   "alias qwen3_xml)")  # fmt: skip
    p.add_argument("--responses-kept", type=int, default=1000, metavar="N",
                   help="/v1/responses: how many responses are kept in memory for GET and "
                   "previous_response_id (the oldest dropped first; 0: none)")  # fmt: skip
    p.add_argument("--reasoning-parser", default=None, metavar="NAME",
                   help="split a reasoning model's <think>...</think> into reasoning_content "
                   "(its answer read as thinking until </think>): deepseek_r1 or qwen3; "
                   "structured outputs then hold the answer from </think> on")  # fmt: skip
    p.add_argument("--cpu-threads", type=int, default=None,
                   help="torch threads on a CPU engine (default: all cores but one, which the "
                   "HTTP side needs; measured +60%% tokens/s on 2 cores)")  # fmt: skip
    p.add_argument("--log-level", default="info")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a dense, MoE or PR-MoE LM, or distil a MoS student",
                       formatter_class=_Defaults)  # fmt: skip
    p.add_argument("--config", default=None, metavar="YAML",
                   help="the run's settings (over its `preset:`); docs/training.md")  # fmt: skip
    p.add_argument("--preset", default=None, help="dense, moe, pr-moe or mos (default: the "
                   "config's own, else the built-in defaults)")  # fmt: skip
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting, e.g. --set optim.lr=1e-3 (repeatable)",
    )
    p.add_argument("--out", default=None, help="run directory (default: the config's out)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (default: config)")
    p.add_argument("--device", default=None, help="cpu, cuda or auto (default: config)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in --out when it holds a run with another config "
                   "(deletes that run's checkpoints)")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p = sub.add_parser("export-checkpoint", help="a training checkpoint → an HF checkpoint")
    p.add_argument("checkpoint", help="RUN/checkpoints/step-N")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--overwrite", action="store_true",
                   help="replace a model checkpoint already in --out")  # fmt: skip


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
    _add_serve(sub)
    _add_train(sub)
    return parser


def cmd_train(args) -> None:
    from expertswitch.train.config import load_config
    from expertswitch.train.trainer import train

    given = {"out": args.out, "optim.steps": args.steps, "device": args.device}
    cfg = load_config(args.config, args.preset, args.set,
                      {k: v for k, v in given.items() if v is not None})  # fmt: skip
    with _process_group_closed():
        s = train(cfg, overwrite=args.overwrite, progress=not args.quiet)
    last = s.val[-1] if s.val else None
    print(json.dumps({"run": str(s.run_dir), "steps": s.steps, "params": s.params,
                      "active_params": s.active_params, "final_val": last, "kd": s.kd,
                      "seconds": s.seconds}))  # fmt: skip


def cmd_export_checkpoint(args) -> None:
    import torch

    from expertswitch.train.checkpoint import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, getattr(torch, args.dtype),
                            args.overwrite)  # fmt: skip
    print(f"wrote {out}")


def cmd_compress(args) -> None:
    from expertswitch.compress import CompressOptions, compress_expert, make_method
    from expertswitch.compress.calibration import CalibOptions
    from expertswitch.compress.report import archive_report
    from expertswitch.io.archive import open_archive
    from expertswitch.utils.imports import resolve_device

    method = make_method(args.method, **_method_args(args))
    options = CompressOptions(
        calib_file=args.calib,
        calib=CalibOptions(
            tokens=8192 if args.calib_tokens is None else args.calib_tokens,
            seq_len=512 if args.seq_len is None else args.seq_len,
            tokenizer=args.tokenizer,
        ),
        device=resolve_device(args.device),
        progress=not args.quiet,
        overwrite=args.overwrite,
        quantize_embeddings=args.quantize_embeddings,
    )
    out = compress_expert(args.base, args.expert, args.out, method, options)
    archive = open_archive(out, verify=False)
    rep = archive_report(archive)
    print(
        f"wrote {out}: {rep['archive_bytes'] / 2**20:,.2f} MiB, {rep['ratio_to_fp16']}× smaller "
        f"than the fp16 expert, {rep['bits_per_param_quantized']} bits/param in linear layers"
    )
    for line in exact_report(archive):
        print(line)


def exact_report(archive) -> list[str]:
    """What was stored exactly and why, and what went uncalibrated: said, not hidden."""
    summary = archive.manifest["summary"]
    lines = []
    why = summary.get("exact_because", {})
    if why:
        lines.append("stored exact (changed, not quantized): " + ", ".join(
            f"{n} {reason}" for reason, n in sorted(why.items())))  # fmt: skip
    odd = [e.name for e in archive if e.kind == "exact"
           and e.meta.get("exact_because") == "not a linear layer"]  # fmt: skip
    if odd:
        lines.append(f"warning: {len(odd)} changed matrices are not linear layers of this "
                     f"architecture and were stored exactly, e.g. {odd[0]}")  # fmt: skip
    if summary.get("uncalibrated"):
        names = summary["uncalibrated"]
        lines.append(f"warning: {len(names)} quantized tensors had no calibration inputs (their "
                     f"salient channels were chosen by weight alone), e.g. {names[0]}")  # fmt: skip
    return lines


def _method_args(args) -> dict:
    """The method flags the user gave, checked against what the method uses: a flag that
    would do nothing is an error, not a silent no-op."""
    from expertswitch.compress.methods import make_method, method_fields
    from expertswitch.errors import ConfigError

    given = {k: getattr(args, k) for k in METHOD_FLAGS if getattr(args, k) is not None}
    if args.method == "bitdelta":
        if given.get("bits") not in (None, 1):
            raise ConfigError(f"--method bitdelta stores 1 bit per weight by definition; "
                              f"--bits {given['bits']} needs --method mixed or rtn")  # fmt: skip
        given.pop("bits", None)
        steps = given.pop("tune_steps", None)
        if steps not in (None, 0):
            raise ConfigError("--method bitdelta runs its own distillation schedule: "
                              "--tune-steps takes only 0 (distillation off)")  # fmt: skip
        if steps == 0:
            given["distill"] = False
    fields = method_fields(args.method)
    unused = [METHOD_FLAGS[k] for k in given if k not in fields]
    calib_flags = {"--calib": args.calib, "--tokenizer": args.tokenizer,
                   "--calib-tokens": args.calib_tokens, "--seq-len": args.seq_len}  # fmt: skip
    if not unused and not make_method(args.method, **given).needs_calibration:
        unused = [flag for flag, v in calib_flags.items() if v is not None]
    if unused:
        raise ConfigError(f"{unused[0]} is not used by --method {args.method}: leave it out, or "
                          "choose a method that uses it (mixed uses them all)")  # fmt: skip
    return given


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


MAX_ITEMS = 900  # distinct held-out items every skill has (math's pool is the smallest)


def _check_items(n: int) -> None:
    from expertswitch.errors import ConfigError

    if not 1 <= n <= MAX_ITEMS:
        raise ConfigError(f"--items must be between 1 and {MAX_ITEMS} (held-out items per "
                          f"domain), got {n}")  # fmt: skip


def cmd_demo(args) -> None:
    from expertswitch.demo import run_demo
    from expertswitch.utils.imports import resolve_device

    _check_items(args.items)
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
    _check_items(args.items)
    if bool(args.base) != bool(args.delta) or bool(args.model) == bool(args.delta):
        raise ConfigError("pass a checkpoint directory, or --base and --delta (not both)")
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if args.delta:
            from expertswitch.compress import reconstruct

            model = reconstruct(args.base, args.delta, Path(tmp) / "expert", device, False)
        scores = evaluate_checkpoint(model, args.domains, None, args.items, device)
    print(f"{'domain':<8} {'task':<19} {'exact':>7} {'token acc':>9} {'ppl':>9}  items")
    for s in scores.values():
        print(
            f"{s.domain:<8} {s.task:<19} {s.score:>7.3f} {s.token_acc:>9.3f} {s.ppl:>9.2f}  {s.n}"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({d: s.to_dict() for d, s in scores.items()}, indent=1)
        )


def cmd_router(args) -> None:
    from expertswitch.router.workflow import evaluate_router, format_report, train_router

    if args.router_command == "train":
        from pathlib import Path

        from expertswitch.utils.fs import check_output_dir

        def is_router(d: Path) -> bool:  # a router written before, and nothing else
            return {p.name for p in d.iterdir()} <= {"router.json", "head.safetensors"}

        # a router replaces only a router: never files of the user's that share a name
        check_output_dir(args.out, {}, True, is_router, "router")
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


def _lora_args(items: list[str]) -> dict[str, str]:
    """vLLM's --lora-modules: NAME=PATH items, or JSON objects {"name": ..., "path": ...} (its
    base_model_name, the parent a model card names, is the served base here)."""
    import json

    from expertswitch.errors import ConfigError

    pairs = []
    for item in items:
        if not item.lstrip().startswith("{"):
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ConfigError(f"--lora-modules {item!r}: write NAME=PATH, e.g. "
                                  "sql=/adapters/sql-lora")  # fmt: skip
            pairs.append((name, path))
            continue
        try:
            spec = json.loads(item)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--lora-modules {item!r} is not valid JSON ({e})") from None
        if not isinstance(spec, dict) or not all(isinstance(spec.get(k), str) and spec[k]
                                                 for k in ("name", "path")):  # fmt: skip
            raise ConfigError(f"--lora-modules {item!r}: give \'{{\"name\": NAME, \"path\": "
                              "PATH}' or NAME=PATH")  # fmt: skip
        pairs.append((spec["name"], spec["path"]))
    out = {}
    for name, path in pairs:
        if name in out:
            raise ConfigError(f"--lora-modules {name!r} is given twice")
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
    from expertswitch.engine import SamplingParams
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
    with _process_group_closed():
        _generate(args, prompts, use, sampling, dtype)


def _generate(args, prompts, use, sampling, dtype) -> None:
    from expertswitch.engine import Engine
    from expertswitch.errors import ConfigError

    ep, tp = args.expert_parallel_size, args.tensor_parallel_size
    device = _init_ranks(ep, tp, args.device)
    eng = Engine(args.base, _expert_args(args.expert), device=device, dtype=dtype,
                 expert_parallel_size=ep, tensor_parallel_size=tp,
                 enforce_eager=args.enforce_eager,
                 enable_prefix_caching=args.enable_prefix_caching,
                 enable_chunked_prefill=args.enable_chunked_prefill,
                 max_num_batched_tokens=args.max_num_batched_tokens,
                 max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                 long_prefill_token_threshold=args.long_prefill_token_threshold,
                 cpu_int4_deltas=args.cpu_int4_deltas)  # fmt: skip
    experts = use * len(prompts) if len(use) == 1 else use
    if eng.parallel:
        if args.stream:
            raise ConfigError("--stream with --expert-parallel-size or --tensor-parallel-size: "
                              "not supported; drop --stream")  # fmt: skip
        outs = eng.generate(prompts, experts, sampling)  # the ranks agree on every step
        import torch.distributed as dist

        if dist.get_rank() != 0:
            return
        _print_outputs(prompts, outs)
        return
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
    _print_outputs(prompts, eng.generate(prompts, experts, sampling))


@contextlib.contextmanager
def _process_group_closed():
    """Destroy the process group a command made (torchrun ranks) before the interpreter exits:
    gloo's threads torn down at exit abort now and then ('terminate called without an active
    exception', exit code -6) after the work is done."""
    import torch.distributed as dist

    had = dist.is_available() and dist.is_initialized()  # a caller's group is left alone
    try:
        yield
    finally:
        if not had and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _init_ranks(ep_size: int, tp_size: int, device: str, command: str = "generate") -> str:
    """The process group torchrun's environment describes (gloo on CPU, NCCL on GPUs); the
    device of this rank. Both sizes must divide the world; `serve` needs a world of exactly
    their least common multiple (one server)."""
    import datetime
    import math
    import os

    from expertswitch.errors import ConfigError

    for flag, size in (("--expert-parallel-size", ep_size), ("--tensor-parallel-size", tp_size)):
        if size < 1:
            raise ConfigError(f"{flag} must be a positive integer, got {size}")
    if ep_size == tp_size == 1:
        return device
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    n = math.lcm(ep_size, tp_size)  # every rank runs the same batch: both sizes divide the world
    if world < 2 or world % n or (command == "serve" and world != n):
        flags = " and ".join(f"{f} {v}" for f, v in (("--expert-parallel-size", ep_size),
                             ("--tensor-parallel-size", tp_size)) if v > 1)  # fmt: skip
        size = f"of exactly {n}" if command == "serve" else f"that is a multiple of {n}"
        raise ConfigError(f"{flags} need{'s' if ' and ' not in flags else ''} torchrun with a "
                          f"world {size} (this one has {world}): torchrun --nproc-per-node {n} "
                          "-m expertswitch.cli "
                          f"{command} ...")  # fmt: skip
    import torch
    import torch.distributed as dist

    from expertswitch.errors import ParallelError

    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        # how long a rank waits in a collective for the others (torch's default otherwise)
        wait = os.environ.get("EXPERTSWITCH_DIST_TIMEOUT_S")
        try:
            timeout = None if not wait else datetime.timedelta(seconds=float(wait))
        except ValueError:
            raise ConfigError(f"EXPERTSWITCH_DIST_TIMEOUT_S={wait!r} is not a number of "
                              "seconds") from None  # fmt: skip
        try:
            dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
        except (RuntimeError, ValueError) as e:
            raise ParallelError(f"the ranks could not form a process group: {e}") from None
    return f"cuda:{local}" if cuda else "cpu"


def _print_outputs(prompts, outs) -> None:
    for prompt, out in zip(prompts, outs):
        answer = out.text if out.text is not None else " ".join(map(str, out.token_ids))
        shown = prompt if isinstance(prompt, str) else ",".join(map(str, prompt))
        print(f"[{out.expert or 'base'}] {shown!r} -> {answer!r}  ({out.finish_reason}"
              + (f": {out.error}" if out.error else "") + ")")  # fmt: skip


def cmd_serve(args) -> None:
    import os

    from expertswitch.errors import ConfigError
    from expertswitch.utils.imports import require_serve

    require_serve()
    from expertswitch.server import ServerConfig
    from expertswitch.server.tool_parsers import TOOL_PARSERS

    experts = _expert_args(args.expert)
    for name, path in _lora_args(args.lora_modules).items():
        if name in experts:
            raise ConfigError(f"{name!r} is given by both --expert and --lora-modules")
        experts[name] = path
    base, router = args.base, args.router
    if args.demo:
        from expertswitch.zoo.build import build_family
        from expertswitch.zoo.served import family_archives, family_router

        if base is not None:
            raise ConfigError("--demo serves the built-in family's base: leave out --base")
        if args.expert_parallel_size > 1:
            raise ConfigError("--demo's family is dense: --expert-parallel-size spreads an MoE "
                              "checkpoint's experts (give --base MOE_DIR)")  # fmt: skip
        family = build_family("tiny")
        base = family.base
        experts = {**family_archives(family), **experts}
        router = router or family_router(family)
    if base is None:
        raise ConfigError("give --base DIR (and --expert NAME=ARCHIVE ...), or --demo")
    api_key = args.api_key or os.environ.get("EXPERTSWITCH_API_KEY") or None
    if args.enable_admin and api_key is None and args.host not in ("127.0.0.1", "localhost",
                                                                   "::1"):  # fmt: skip
        raise ConfigError(f"--enable-admin on {args.host} lets anyone on the network load "
                          "files as experts: set --api-key too, or bind 127.0.0.1")  # fmt: skip
    template = None
    if args.chat_template:
        try:
            with open(args.chat_template, encoding="utf-8") as f:
                template = f.read()
        except OSError as e:
            raise ConfigError(f"--chat-template {args.chat_template}: {e.strerror}") from None
    template_kwargs = None
    if args.default_chat_template_kwargs is not None:
        try:
            template_kwargs = json.loads(args.default_chat_template_kwargs)
        except ValueError as e:
            raise ConfigError(
                f"--default-chat-template-kwargs is not JSON ({e}): give an "
                """object, e.g. '{"enable_thinking": false}'"""
            ) from None
    cors = {}
    for flag in ("allowed_origins", "allowed_methods", "allowed_headers"):
        given = getattr(args, flag)
        if given is None:
            continue
        try:
            cors[flag] = json.loads(given)
        except ValueError:
            cors[flag] = None
        if not isinstance(cors[flag], list) or not all(isinstance(x, str) for x in cors[flag]):
            raise ConfigError(f"--{flag.replace('_', '-')} takes a JSON list of strings, "
                              """e.g. '["http://localhost:3000"]'""")  # fmt: skip
        cors[flag] = tuple(cors[flag])
    if args.tool_call_parser is not None and args.tool_call_parser not in TOOL_PARSERS:
        raise ConfigError(f"unknown --tool-call-parser {args.tool_call_parser!r}: choose one of "
                          f"{', '.join(TOOL_PARSERS)}")  # fmt: skip
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise ConfigError("--enable-auto-tool-choice needs --tool-call-parser NAME: the format "
                          f"the model writes its calls in ({', '.join(TOOL_PARSERS)})")  # fmt: skip
    if args.tool_call_parser is not None and not args.enable_auto_tool_choice:
        print(
            f"note: --tool-call-parser {args.tool_call_parser} is used only with "
            '--enable-auto-tool-choice (tool_choice "auto" stays off)',
            file=sys.stderr,
        )
    cfg = ServerConfig(base_name=args.served_model_name[0],
                       base_aliases=tuple(args.served_model_name[1:]),
                       api_key=api_key,
                       enable_admin=args.enable_admin,
                       max_request_bytes=_size_arg(args.max_request_bytes, "--max-request-bytes"),
                       max_tokens_limit=args.max_tokens_limit, chat_template=template,
                       tool_call_parser=args.tool_call_parser if args.enable_auto_tool_choice
                       else None, reasoning_parser=args.reasoning_parser,
                       responses_kept=args.responses_kept,
                       default_chat_template_kwargs=template_kwargs,
                       generation_config=args.generation_config,
                       allow_credentials=args.allow_credentials, **cors)  # fmt: skip
    options = {"max_num_seqs": args.max_num_seqs, "max_model_len": args.max_model_len,
               "device_budget_bytes": _size_arg(args.gpu_budget, "--gpu-budget"),
               "host_budget_bytes": _size_arg(args.host_budget, "--host-budget"),
               "kv_cache_bytes": _size_arg(args.kv_cache_size, "--kv-cache-size"),
               "enforce_eager": args.enforce_eager or None,
               "enable_prefix_caching": args.enable_prefix_caching,
               "enable_chunked_prefill": args.enable_chunked_prefill,
               "max_num_batched_tokens": args.max_num_batched_tokens,
               "long_prefill_token_threshold": args.long_prefill_token_threshold,
               "scheduling_policy": args.scheduling_policy,
               "cpu_int4_deltas": args.cpu_int4_deltas,
               "max_active_experts": args.max_loras,
               "max_lora_rank": args.max_lora_rank}  # fmt: skip
    from expertswitch.utils.imports import resolve_device

    on_cpu = resolve_device(args.device) == "cpu"
    if args.cpu_threads is not None or (on_cpu and "OMP_NUM_THREADS" not in os.environ):
        import torch

        # torch's threads spin while waiting: with every core theirs, the event loop that
        # streams the tokens starves (ITL p50 103 → 47 ms on 2 cores, benchmarks/serve.py)
        torch.set_num_threads(max(1, args.cpu_threads or (os.cpu_count() or 2) - 1))
    options = {k: v for k, v in options.items() if v is not None}
    with _process_group_closed():
        _serve(args, base, experts, router, cfg, options)


def _serve(args, base, experts, router, cfg, options) -> None:
    from expertswitch.server import build_app, run_server
    from expertswitch.server.launch import follow, stop_when_the_ranks_fail

    ep, tp = args.expert_parallel_size, args.tensor_parallel_size
    device = _init_ranks(ep, tp, args.device, "serve")
    dtype = _dtype_arg(args.dtype)
    if ep > 1 or tp > 1:
        import torch.distributed as dist

        options["expert_parallel_size"] = ep
        options["tensor_parallel_size"] = tp
        if dist.get_rank() != 0:  # rank 0 takes the requests; this rank steps with it
            follow(base, experts, device, dtype, **options)
            return
    app, aengine = build_app(base, experts, router, device, dtype, cfg, **options)
    names = ", ".join([cfg.base_name, *experts] + (["auto"] if router else []))
    split = [f"experts over {ep} ranks"] * (ep > 1) + [f"layers sliced over {tp}"] * (tp > 1)
    on = f" ({', '.join(split)})" if split else ""
    print(f"serving {names} on http://{args.host}:{args.port}/v1{on}", flush=True)
    if aengine.engine.parallel:
        stop_when_the_ranks_fail(aengine)
    try:
        run_server(app, args.host, args.port, args.log_level)
    finally:
        aengine.close()
    if aengine.engine.parallel and aengine.error:
        from expertswitch.errors import ParallelError

        raise ParallelError(aengine.error)


def _size_arg(text: str | None, flag: str) -> int | None:
    """'20GiB', '512MB', '1e9' or plain bytes → bytes."""
    import re

    from expertswitch.errors import ConfigError

    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]i?b?|b)?\s*", text.lower())
    if not m:
        raise ConfigError(f"{flag} {text!r}: write a size such as 512MiB, 20GiB or 1000000")
    unit = (m.group(2) or "b").rstrip("b") or "b"
    scale = {"b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
             "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}[unit]  # fmt: skip
    try:
        value = int(float(m.group(1)) * scale)
    except OverflowError:
        raise ConfigError(f"{flag} {text!r} is too large") from None
    if value < 1:
        raise ConfigError(f"{flag} {text!r} must be at least one byte")
    return value


COMMANDS = {
    "compress": cmd_compress,
    "inspect": cmd_inspect,
    "reconstruct": cmd_reconstruct,
    "demo": cmd_demo,
    "zoo": cmd_zoo,
    "eval": cmd_eval,
    "router": cmd_router,
    "generate": cmd_generate,
    "serve": cmd_serve,
    "train": cmd_train,
    "export-checkpoint": cmd_export_checkpoint,
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
