"""`Engine`: one resident base, many compressed experts, continuous batching across them.

    eng = Engine(base="BASE_DIR", experts={"math": "math.delta", "code": "code.delta"},
                 device="cpu", dtype=torch.float32)
    outs = eng.generate(prompts, expert="math", sampling=SamplingParams(temperature=0.0))
    outs[i].token_ids, outs[i].text, outs[i].expert, outs[i].finish_reason

    rid = eng.add_request("def f(", expert="code")   # streaming: step() until finished
    while eng.has_unfinished():
        for out in eng.step(): print(out.request_id, out.new_token_ids)

`expert`: a registered name, None (the base alone), or one entry per prompt (a mixed batch).
Experts are archives (`expertswitch compress`), held as packed parts by the pool
(engine/pool.py); an expert whose archive fails to load fails its own requests
(finish_reason "error") while the others are served.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from expertswitch.engine.kv_cache import BlockManager
from expertswitch.engine.pool import ExpertLoadError, ExpertPool, PoolError
from expertswitch.engine.request import Request, RequestOutput, Status
from expertswitch.engine.runner import ModelRunner
from expertswitch.engine.sampler import sample
from expertswitch.engine.sampling import SamplingParams
from expertswitch.engine.scheduler import Scheduler
from expertswitch.engine.tokenizer import Detokenizer, load_tokenizer
from expertswitch.errors import ArchiveError, CompatibilityError, ConfigError
from expertswitch.io.archive import open_archive
from expertswitch.models.decoder import Decoder
from expertswitch.models.expert_weights import load_expert

_CPU_KV_BYTES = 512 * 2**20  # default KV cache on a CPU engine


class Engine:
    def __init__(
        self,
        base: str | Path,
        experts: dict[str, str | Path] | None = None,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 4096,
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        kv_cache_bytes: int | None = None,
        max_model_len: int | None = None,
        max_active_experts: int | None = None,
        device_budget_bytes: int | None = None,
        host_budget_bytes: int | None = None,
        tokenizer: bool = True,
    ):
        from expertswitch.utils.imports import resolve_device

        self.device = torch.device(resolve_device(device))
        self.dtype = dtype
        self.model = Decoder.load(base, self.device, dtype)
        cfg = self.model.cfg
        self.base_path = Path(base)
        self.base_fingerprint = _fingerprint(self.base_path)
        self.tokenizer = load_tokenizer(self.base_path) if tokenizer else None
        self.scheduler_limits = (max_num_seqs, max_num_batched_tokens)
        num_blocks = num_kv_blocks or self._auto_blocks(block_size, kv_cache_bytes)
        if num_blocks < 1:
            raise ConfigError("the KV cache must hold at least one block")
        # an explicit max_model_len may pass max_position_embeddings (scaled RoPE), not the cache
        self.max_model_len = min(max_model_len or cfg.max_position_embeddings,
                                 num_blocks * block_size)  # fmt: skip
        self.blocks = BlockManager(num_blocks, block_size)
        self.kv_cache = self.model.new_kv_cache(num_blocks, block_size)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_num_batched_tokens,
                                   max_active_experts)  # fmt: skip
        self.runner = ModelRunner(self.model, self.blocks, self.kv_cache)
        self.pool = ExpertPool(self._load, self.device, device_budget_bytes, host_budget_bytes)
        self.expert_paths: dict[str, Path] = {}
        self._requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self._detok: dict[str, Detokenizer] = {}
        for name, path in (experts or {}).items():
            self.add_expert(name, path)

    # experts -----------------------------------------------------------------------------

    def add_expert(self, name: str, path: str | Path) -> None:
        """Register an archive under `name`. Its manifest is checked now (made for this base,
        only tensors the engine can apply per row); its weights load on first use."""
        if not name or name in ("auto", "__base__"):
            raise ConfigError(f"{name!r} cannot name an expert: it is reserved")
        archive = open_archive(path, verify=False)  # checksums: at load time, by the pool
        if archive.base_fingerprint != self.base_fingerprint:
            raise CompatibilityError(
                f"expert {name!r} ({path}) is a delta against a different base than "
                f"{self.base_path} (made from {archive.manifest['base'].get('path', '?')}); "
                "serve it with the base it was compressed against"
            )
        served = self.model.servable_names()
        foreign = [n for n in archive.entries if n not in served]
        if foreign:
            raise ArchiveError(
                f"expert {name!r} changes {len(foreign)} tensor(s) the engine cannot apply per "
                f"request, e.g. {foreign[0]} (MoE expert weights and routers are not served from "
                "deltas yet); rebuild it with `expertswitch reconstruct` and serve that instead"
            )
        self.expert_paths[name] = Path(path)
        self.pool.register(name)

    def _load(self, name: str):
        return load_expert(name, self.expert_paths[name], self.base_fingerprint,
                           self.model.shapes, self.dtype)  # fmt: skip

    @property
    def experts(self) -> list[str]:
        return list(self.expert_paths)

    # requests ----------------------------------------------------------------------------

    def add_request(
        self,
        prompt: str | Sequence[int],
        expert: str | None = None,
        sampling: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> str:
        sampling = sampling or SamplingParams()
        if expert is not None and expert not in self.expert_paths:
            known = ", ".join(sorted(self.expert_paths)) or "none"
            raise ConfigError(f"unknown expert {expert!r}: registered experts are {known} "
                              "(or None for the base alone)")  # fmt: skip
        text, ids = self._encode(prompt)
        self._check_prompt(ids, expert)
        rid = request_id or f"req-{next(self._ids)}"
        if rid in self._requests:
            raise ConfigError(f"request id {rid!r} is already in use")
        gen = torch.Generator()
        gen.manual_seed(sampling.seed if sampling.seed is not None else torch.seed())
        req = Request(rid, ids, expert, sampling, prompt=text, generator=gen)
        self._requests[rid] = req
        self.scheduler.add(req)
        if expert is not None:
            self._prefetch(expert)
        return rid

    def _prefetch(self, expert: str) -> None:
        # a failure shows on the step that needs the expert, as an error on its requests
        with contextlib.suppress(PoolError, ExpertLoadError):
            self.pool.prefetch(expert)

    def _encode(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ConfigError(f"{self.base_path} has no tokenizer files: pass token ids")
            return prompt, self.tokenizer.encode(prompt)
        ids = list(prompt)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ConfigError("a prompt is a string or a list of integer token ids")
        return None, ids

    def _check_prompt(self, ids: list[int], expert: str | None) -> None:
        if not ids:
            raise ConfigError("the prompt is empty: give at least one token")
        if len(ids) >= self.max_model_len:
            raise ConfigError(
                f"the prompt has {len(ids)} tokens but the context holds {self.max_model_len} "
                "(prompt + at least one generated token): shorten it"
            )
        vocab = self.model.cfg.vocab_size
        if expert is not None:
            vocab = max(vocab, self._expert_vocab(expert))
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ConfigError(f"token id {bad[0]} is outside the vocabulary (size {vocab})")

    def _expert_vocab(self, expert: str) -> int:
        archive = open_archive(self.expert_paths[expert], verify=False)
        entry = archive.entries.get("model.embed_tokens.weight")
        return entry.meta["shape"][0] if entry is not None else self.model.cfg.vocab_size

    def abort(self, request_id: str) -> None:
        req = self._requests.get(request_id)
        if req is not None and not req.finished:
            self.scheduler.finish(req)
            req.finish("abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # the step loop -----------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, run one forward pass, sample; outputs of every request that got a token
        or finished in this step."""
        reqs, _ = self.scheduler.schedule()
        if not reqs:
            return self._drain_finished([])
        experts, failed = self._acquire({r.expert for r in reqs if r.expert is not None})
        for r in reqs:
            if r.expert in failed:
                self.scheduler.finish(r)
                r.finish("error", failed[r.expert])
        live = [r for r in reqs if not r.finished]
        try:
            if live:
                logits = self.runner.run(live, experts)
                for r, tok in zip(live, sample(logits, live)):
                    self._append(r, tok)
        finally:
            self.pool.release(list(experts)[1:])
        return self._drain_finished(reqs)

    def _acquire(self, names: set[str]):
        experts: dict = {None: None}
        failed: dict[str, str] = {}
        for name in sorted(names):
            try:
                experts.update(self.pool.acquire([name]))
            except (ExpertLoadError, PoolError) as e:
                failed[name] = str(e)
        return experts, failed

    def _append(self, r: Request, token: int) -> None:
        r.output_token_ids.append(token)
        sp = r.sampling
        detok = self._detokenizer(r)
        if detok is not None:
            r.text = detok.decode(r.output_token_ids)
        eos = self.model.cfg.eos_token_ids
        if token in sp.stop_token_ids:
            r.stop_reason = token
            self._finish(r, "stop")
        elif (not sp.ignore_eos and token in eos) or (detok and sp.stop and self._hit_stop(r)):
            self._finish(r, "stop")
        elif len(r.output_token_ids) >= sp.max_tokens or r.num_tokens >= self.max_model_len:
            self._finish(r, "length")

    def _hit_stop(self, r: Request) -> bool:
        hits = [(r.text.find(s), s) for s in r.sampling.stop if s in r.text]
        if not hits:
            return False
        at, s = min(hits)
        r.text = r.text[: at + len(s)] if r.sampling.include_stop_str_in_output else r.text[:at]
        r.stop_reason = s
        return True

    def _finish(self, r: Request, reason: str) -> None:
        self.scheduler.finish(r)
        r.finish(reason)

    def _detokenizer(self, r: Request) -> Detokenizer | None:
        if self.tokenizer is None:
            return None
        if "base" not in self._detok:
            self._detok["base"] = Detokenizer(self.tokenizer)
        return self._detok["base"]

    def _drain_finished(self, reqs: list[Request]) -> list[RequestOutput]:
        outs = []
        for r in reqs:
            new = r.output_token_ids[r._emitted :]
            if new or r.finished:
                r._emitted = len(r.output_token_ids)
                outs.append(RequestOutput.of(r, new))
            if r.finished:
                self._requests.pop(r.request_id, None)
        return outs

    # whole batches and streams -----------------------------------------------------------

    def generate(
        self,
        prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
        expert: str | None | Sequence[str | None] = None,
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        progress: bool = False,
    ) -> list[RequestOutput]:
        """Run `prompts` to completion; outputs in the prompts' order."""
        from tqdm.auto import tqdm

        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        n = len(prompts)
        experts = list(expert) if isinstance(expert, (list, tuple)) else [expert] * n
        params = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling] * n
        if len(experts) != n or len(params) != n:
            raise ConfigError(f"{n} prompts need {n} experts / sampling params (or one for all)")
        ids = [self.add_request(p, e, s) for p, e, s in zip(prompts, experts, params)]
        final: dict[str, RequestOutput] = {}
        with tqdm(total=n, desc="generating", disable=not progress, unit="req") as bar:
            while len(final) < n and self.has_unfinished():
                for out in self.step():
                    if out.finished and out.request_id in ids:
                        final[out.request_id] = out
                        bar.update(1)
        return [final[i] for i in ids]

    def stream(self, prompt, expert: str | None = None,
               sampling: SamplingParams | None = None) -> Iterator[RequestOutput]:  # fmt: skip
        """Yield this request's outputs token by token (other requests keep being served)."""
        rid = self.add_request(prompt, expert, sampling)
        while True:
            for out in self.step():
                if out.request_id == rid:
                    yield out
                    if out.finished:
                        return

    def stats(self) -> dict:
        return {
            "kv_blocks_total": self.blocks.num_blocks,
            "kv_blocks_used": self.blocks.num_used,
            "waiting": len(self.scheduler.waiting),
            "running": len(self.scheduler.running),
            "pool": self.pool.stats(),
            "residency": self.pool.residency(),
        }

    def _auto_blocks(self, block_size: int, kv_bytes: int | None) -> int:
        per_block = self.model.kv_bytes_per_token() * block_size
        if kv_bytes is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                kv_bytes = int(free * 0.6)  # the rest: experts, activations
            else:  # enough for every sequence at full length, within a bound
                cfg = self.model.cfg
                need = self.scheduler_limits[0] * min(cfg.max_position_embeddings, 4096)
                kv_bytes = min(_CPU_KV_BYTES, need * self.model.kv_bytes_per_token())
        return max(1, kv_bytes // per_block)

    def close(self) -> None:
        self.pool.close()
        for r in list(self._requests.values()):
            if not r.finished and r.status is not Status.FINISHED:
                self.abort(r.request_id)


def _fingerprint(path: Path) -> str:
    from expertswitch.io.checkpoint import open_checkpoint

    return open_checkpoint(path).fingerprint()
