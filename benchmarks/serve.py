"""The OpenAI server under load, against serving the same stream by swapping full models.

Both run on the `tiny` family (base + code/math/prose experts; ours serves each expert from its
2-bit mixed delta, the baseline the checkpoint `reconstruct` rebuilds from the same archive).

  ours      `expertswitch serve` in its own process (real HTTP, the router for `auto`), driven
            by an async client over loopback with streaming requests: base, every expert and
            `auto` interleaved, arrivals as a Poisson process (and a burst, all at t=0)
  swap      DeltaZip's comparison: one full model resident at a time; the oldest waiting
            request's model is loaded (from disk) when it is not the one resident, and all
            arrived requests for that model run as one batch (transformers, KV cache, greedy,
            token by token so TTFT and inter-token latency are measured); no HTTP — which only
            favours it
  load test 200 concurrent streaming requests over every expert and `auto`; every request must
            be answered or refused with an OpenAI error, each stream's text must equal the same
            request sent alone afterwards, and the server must hold nothing afterwards (KV
            blocks, running requests, in-flight handlers; its RSS is reported round by round)

    python benchmarks/serve.py                 # CPU, the tiny family
    python benchmarks/serve.py --device cuda   # the same on a GPU (bf16)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import run_info, write_results  # noqa: E402

DOMAINS = ("code", "math", "prose")
MODELS = ("code", "math", "prose", "base", "auto")


# --- the request stream ----------------------------------------------------------------------


def request_stream(family, n: int, rate: float | None, seed: int = 0) -> list[dict]:
    """n requests round-robin over MODELS with their domain's held-out prompts; `auto` gets a
    prompt of the domain it should route to. Arrival offsets: Poisson at `rate` req/s, or
    all at 0 (rate None)."""
    from expertswitch.eval.tasks import task_items
    from expertswitch.zoo.corpora import load_corpora

    corpora = load_corpora(family.manifest["seed"])
    items = {d: task_items(d, corpora, n) for d in DOMAINS}
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(n):
        model = MODELS[i % len(MODELS)]
        domain = model if model in DOMAINS else DOMAINS[i % 3]
        out.append({"model": model, "domain": domain, "prompt": items[domain][i].prompt,
                    "max_tokens": rng.randint(16, 48), "at": t})  # fmt: skip
        if rate:
            t += rng.expovariate(rate)
    return out


def percentiles(xs: list[float]) -> dict:
    if not xs:
        return {"p50": None, "p99": None, "mean": None}
    s = sorted(xs)
    return {"p50": s[len(s) // 2], "p99": s[min(len(s) - 1, int(0.99 * len(s)))],
            "mean": statistics.fmean(s)}  # fmt: skip


def summarize(results: list[dict], seconds: float) -> dict:
    ok = [r for r in results if r.get("status") == 200]
    tokens = sum(r["tokens"] for r in ok)
    return {"requests": len(results), "answered": len(ok), "seconds": seconds,
            "req_s": len(ok) / seconds, "tok_s": tokens / seconds, "tokens": tokens,
            "ttft_s": percentiles([r["ttft"] for r in ok]),
            "itl_s": percentiles([x for r in ok for x in r["itl"]])}  # fmt: skip


# --- ours: the server in its own process -----------------------------------------------------


class Server:
    def __init__(self, family, archives, router, device: str, port: int, seqs: int):
        cmd = [sys.executable, "-m", "expertswitch.cli", "serve", "--base", str(family.base),
               "--router", str(router), "--device", device, "--port", str(port),
               "--log-level", "warning", "--max-num-seqs", str(seqs)]  # fmt: skip
        for d, a in archives.items():
            cmd += ["--expert", f"{d}={a}"]
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(cmd)
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.2)

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def metric(self, name: str) -> float:
        for line in httpx.get(self.url + "/metrics", timeout=30).text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        return float("nan")

    def close(self):
        self.proc.terminate()
        self.proc.wait(60)


async def one_stream(http: httpx.AsyncClient, url: str, req: dict, start: float) -> dict:
    await asyncio.sleep(max(0.0, start + req["at"] - time.perf_counter()))
    sent = time.perf_counter()
    body = {"model": req["model"], "prompt": req["prompt"], "max_tokens": req["max_tokens"],
            "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    text, times, tokens, model = "", [], 0, None
    async with http.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            err = json.loads(await r.aread()).get("error", {})
            return {"status": r.status_code, "error": err}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"status": 500, "error": chunk["error"]}
            model = chunk.get("model", model)
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for c in chunk["choices"]:
                if c["text"]:
                    text += c["text"]
                    times.append(time.perf_counter())
    itl = [b - a for a, b in zip(times, times[1:])]
    return {"status": 200, "text": text, "tokens": tokens, "model": model,
            "ttft": (times[0] - sent) if times else None, "itl": itl}  # fmt: skip


async def drive(url: str, stream: list[dict], limit: int = 1000) -> tuple[list[dict], float]:
    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1200), limits=limits) as http:
        start = time.perf_counter()
        out = await asyncio.gather(*(one_stream(http, url, r, start) for r in stream))
        return list(out), time.perf_counter() - start


# --- the swap baseline -----------------------------------------------------------------------


class SwapServer:
    """One full model resident; swap on demand; static batches per model, token by token."""

    def __init__(self, paths: dict[str, Path], router, device: str, dtype, max_batch: int):
        self.paths, self.router, self.device, self.dtype = paths, router, device, dtype
        self.max_batch = max_batch
        self.loaded, self.model, self.tok = None, None, None
        self.load_s, self.swaps = 0.0, 0

    def load(self, name: str) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        t0 = time.perf_counter()
        self.model = None  # the old one goes first: one model resident
        self.tok = AutoTokenizer.from_pretrained(self.paths[name])
        self.model = AutoModelForCausalLM.from_pretrained(self.paths[name], dtype=self.dtype)
        self.model = self.model.to(self.device).eval()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        self.loaded = name
        self.load_s += time.perf_counter() - t0
        self.swaps += 1

    @torch.inference_mode()
    def run_batch(self, batch: list[dict], results: dict, start: float) -> None:
        tok, model = self.tok, self.model
        enc = [tok(r["prompt"])["input_ids"] for r in batch]
        width = max(map(len, enc))
        pad = tok.pad_token_id or 0
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc], device=self.device)
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc],
                            device=self.device)  # fmt: skip
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        want = [r["max_tokens"] for r in batch]
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        past, gen, times = out.past_key_values, [[] for _ in batch], [[] for _ in batch]
        for step in range(max(want)):
            nxt = out.logits[:, -1].argmax(-1)
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
            now = time.perf_counter()
            for j, t in enumerate(nxt.tolist()):
                if step < want[j]:
                    gen[j].append(t)
                    times[j].append(now)
            if step + 1 == max(want):
                break
            mask = torch.cat([mask, mask.new_ones(len(batch), 1)], dim=1)
            pos = pos[:, -1:] + 1
            out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos,
                        past_key_values=past, use_cache=True)  # fmt: skip
            past = out.past_key_values
        for j, r in enumerate(batch):
            results[r["i"]] = {"status": 200, "tokens": len(gen[j]), "model": self.loaded,
                               "text": tok.decode(gen[j], skip_special_tokens=True),
                               "ttft": times[j][0] - (start + r["at"]),
                               "itl": [b - a for a, b in zip(times[j], times[j][1:])]}  # fmt: skip

    def serve(self, stream: list[dict]) -> tuple[list[dict], float]:
        stream = [{**r, "i": i} for i, r in enumerate(stream)]
        for r in stream:  # `auto`: the router decides, as in our server (its time is counted)
            if r["model"] == "auto":
                route = self.router.route([r["prompt"]])[0]
                r["target"] = "base" if route.expert == "__base__" else route.expert
            else:
                r["target"] = r["model"]
        results: dict[int, dict] = {}
        waiting = list(stream)
        start = time.perf_counter()
        while waiting:
            now = time.perf_counter() - start
            arrived = [r for r in waiting if r["at"] <= now]
            if not arrived:
                time.sleep(min(r["at"] for r in waiting) - now)
                continue
            target = arrived[0]["target"]  # the oldest waiting request's model
            if target != self.loaded:
                self.load(target)
            now = time.perf_counter() - start
            batch = [r for r in waiting if r["at"] <= now and r["target"] == target]
            batch = batch[: self.max_batch]
            self.run_batch(batch, results, start)
            done = {r["i"] for r in batch}
            waiting = [r for r in waiting if r["i"] not in done]
        return [results[i] for i in range(len(stream))], time.perf_counter() - start


# --- the load test ---------------------------------------------------------------------------


def load_test(server: Server, family, n: int) -> dict:
    stream = request_stream(family, n, None, seed=1)
    for r in stream:
        r["max_tokens"] = 8 + r["max_tokens"] % 17  # 8-24 tokens: bounded
    rounds = []
    for _ in range(2):
        results, seconds = asyncio.run(drive(server.url, stream))
        rounds.append((results, seconds, server.rss_mib()))
    results, seconds, _ = rounds[0]
    ok = [r for r in results if r["status"] == 200]
    refused = [r for r in results if r["status"] != 200]
    proper = all(set(r.get("error", {})) >= {"message", "type", "code"} for r in refused)
    # each answer against the same request sent alone (one at a time), once per distinct one
    alone: dict[tuple, dict] = {}
    mismatched = 0
    for r, res in zip(stream, results):
        if res["status"] != 200:
            continue
        key = (r["model"], r["prompt"], r["max_tokens"])
        if key not in alone:
            alone[key] = asyncio.run(drive(server.url, [{**r, "at": 0.0}]))[0][0]
        mismatched += (res["text"], res["model"]) != (alone[key]["text"], alone[key]["model"])
    same_rounds = all(a["text"] == b["text"] for a, b in zip(rounds[0][0], rounds[1][0])
                      if a["status"] == b["status"] == 200)  # fmt: skip
    return {
        "requests": n,
        "answered": len(ok),
        "refused": len(refused),
        "refusals_in_openai_shape": proper,
        "lost": n - len(ok) - len(refused),
        "mismatched_vs_alone": mismatched,
        "distinct_checked_alone": len(alone),
        "rounds_identical": same_rounds,
        "req_s": len(ok) / seconds,
        "ttft_s": percentiles([r["ttft"] for r in ok]),
        "seconds": seconds,
        "rss_mib_after_rounds": [round(x, 1) for _, _, x in rounds],
        "after": {
            k: server.metric(f"expertswitch_{k}")
            for k in (
                "kv_blocks_used",
                "num_requests_running",
                "num_requests_waiting",
                "requests_in_flight",
            )
        },  # fmt: skip
    }


# --- main ------------------------------------------------------------------------------------


def engine_alone(family, archives, router, stream: list[dict], device: str, dtype) -> dict:
    """The same requests through the Engine in this process, all at once, no HTTP: what the
    server adds on top of the engine."""
    from expertswitch.engine import Engine, SamplingParams

    eng = Engine(family.base, archives, device=device, dtype=dtype, max_num_seqs=64)
    experts = []
    for r in stream:
        name = router.route([r["prompt"]])[0].expert if r["model"] == "auto" else r["model"]
        experts.append(None if name in ("base", "__base__") else name)
    params = [SamplingParams(temperature=0, max_tokens=r["max_tokens"], ignore_eos=True)
              for r in stream]  # fmt: skip
    eng.generate([r["prompt"] for r in stream[:5]], experts[:5], params[:5])  # warm-up
    eng.reset_prefix_cache()  # the warm-up's prompts must not start the timed run cached
    t0 = time.perf_counter()
    outs = eng.generate([r["prompt"] for r in stream], experts, params)
    seconds = time.perf_counter() - t0
    eng.close()
    tokens = sum(len(o.token_ids) for o in outs)
    return {"seconds": seconds, "tokens": tokens, "tok_s": tokens / seconds,
            "req_s": len(stream) / seconds}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--rate", type=float, default=4.0, help="Poisson arrival rate, req/s")
    ap.add_argument("--load-requests", type=int, default=200)
    ap.add_argument("--port", type=int, default=8321)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--preset", default="tiny", help="the family served (small: on a GPU)")
    ap.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    args = ap.parse_args()

    from expertswitch.compress import reconstruct
    from expertswitch.router import load_router
    from expertswitch.zoo.build import build_family
    from expertswitch.zoo.served import family_archives, family_router

    family = build_family(args.preset, device=args.device, log=lambda *_: None)
    archives = family_archives(family, device=args.device, log=lambda *_: None)
    router_dir = family_router(family, log=lambda *_: None)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    scenarios = {"poisson": request_stream(family, args.requests, args.rate),
                 "burst": request_stream(family, args.requests, None)}  # fmt: skip
    payload = {**run_info(args.device), "family": args.preset, "scenarios": {}}

    server = Server(family, archives, router_dir, args.device, args.port, args.max_num_seqs)
    try:
        asyncio.run(drive(server.url, scenarios["burst"][:5]))  # warm-up: experts loaded
        ours = {k: summarize(*asyncio.run(drive(server.url, s))) for k, s in scenarios.items()}
        payload["load_test"] = load_test(server, family, args.load_requests)
        payload["server_rss_mib"] = server.rss_mib()
    finally:
        server.close()

    with tempfile.TemporaryDirectory() as tmp:
        paths = {"base": family.base}
        for d, a in archives.items():
            paths[d] = reconstruct(family.base, a, Path(tmp) / d, progress=False)
        swap = SwapServer(paths, load_router(router_dir), args.device, dtype, args.max_num_seqs)
        theirs = {}
        for k, s in scenarios.items():
            swap.load_s, swap.swaps, swap.loaded = 0.0, 0, None
            res, seconds = swap.serve(s)
            theirs[k] = {**summarize(res, seconds), "swaps": swap.swaps, "load_s": swap.load_s}

    alone = engine_alone(family, archives, load_router(router_dir), scenarios["burst"],
                         args.device, dtype)  # fmt: skip
    payload["engine_alone_burst"] = alone
    lines = ["# Serving: our server vs swapping full models", "",
             f"{payload['device']}, {payload['date']}, commit {payload['commit']}; the "
             f"{args.preset} family, {args.requests} streaming requests over {', '.join(MODELS)} "
             "(greedy, 16-48 tokens each, EOS ignored).", "",
             "| scenario | system | req/s | tok/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | "
             "swaps |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for k in scenarios:
        for name, r in (("ours (deltas, one server)", ours[k]), ("swap full models", theirs[k])):
            lines.append(f"| {k} | {name} | {r['req_s']:.2f} | {r['tok_s']:.0f} | "
                         f"{r['ttft_s']['p50'] * 1e3:.0f} ms | {r['ttft_s']['p99'] * 1e3:.0f} ms "
                         f"| {r['itl_s']['p50'] * 1e3:.1f} ms | {r['itl_s']['p99'] * 1e3:.1f} ms "
                         f"| {r.get('swaps', 0)} |")  # fmt: skip
        tput = ours[k]["tok_s"] / theirs[k]["tok_s"]
        ttft = theirs[k]["ttft_s"]["p50"] / ours[k]["ttft_s"]["p50"]
        payload["scenarios"][k] = {"ours": ours[k], "swap": theirs[k], "throughput_ratio": tput,
                                   "ttft_p50_swap_over_ours": ttft}  # fmt: skip
        lines.append(f"| {k} | ours / swap | | {tput:.2f}× | swap's / ours: {ttft:.2f} | | | | |")
    lines += ["", f"The engine alone (same burst, in process, no HTTP): {alone['tok_s']:.0f} "
              f"tok/s, {alone['req_s']:.2f} req/s."]  # fmt: skip
    lt = payload["load_test"]
    lines += ["", f"## Load test: {lt['requests']} concurrent streaming requests", "",
              f"answered {lt['answered']}, refused {lt['refused']} (OpenAI error shape: "
              f"{lt['refusals_in_openai_shape']}), lost {lt['lost']}; streams differing from "
              f"the same request sent alone: {lt['mismatched_vs_alone']} (of "
              f"{lt['distinct_checked_alone']} distinct requests checked); two rounds "
              f"identical: {lt['rounds_identical']}", "",
              f"{lt['req_s']:.2f} req/s, TTFT p50 {lt['ttft_s']['p50'] * 1e3:.0f} ms, p99 "
              f"{lt['ttft_s']['p99'] * 1e3:.0f} ms; {lt['seconds']:.1f} s in all", "",
              f"afterwards: {lt['after']}; server RSS after each round (MiB): "
              f"{lt['rss_mib_after_rounds']}"]  # fmt: skip
    md = "\n".join(lines)
    print(md)
    stem = "serve-cpu" if args.device == "cpu" else f"serve-gpu-{args.preset}"
    print(write_results(stem, payload, md, Path(args.out) if args.out else None))


if __name__ == "__main__":
    main()
