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
(engine/pool.py). An expert stays in use (never evicted) while it has running requests; one
that does not fit the device now waits; one whose archive fails to load fails its own
requests (finish_reason "error") while the others are served. Each expert stops at its own
EOS tokens and uses its own tokenizer when its archive carries one.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import secrets
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from expertswitch.engine.beam import Beam, BeamSearch, BeamSearchParams
from expertswitch.engine.config import EngineConfig
from expertswitch.engine.graphs import DecodeGraphs
from expertswitch.engine.guided import Guide, ThinkFirst, token_index
from expertswitch.engine.kv_cache import BlockManager, auto_num_blocks
from expertswitch.engine.mirror import StepMirror, agree, min_over_ranks, rank0_value, step_digest
from expertswitch.engine.pool import ExpertLoadError, ExpertPool, PoolError, PoolFullError
from expertswitch.engine.registry import ExpertRegistry, eos_ids
from expertswitch.engine.request import Request, RequestOutput, Status
from expertswitch.engine.runner import ModelRunner
from expertswitch.engine.sampler import SamplingFailure, logprobs_of, sample
from expertswitch.engine.sampling import SamplingParams
from expertswitch.engine.scheduler import Scheduler
from expertswitch.engine.tokenizer import bad_word_ids, decode_ids, load_tokenizer
from expertswitch.errors import ConfigError, ParallelError
from expertswitch.io.lora import LoraBase, checked_again, load_lora
from expertswitch.kernels.delta_cpu import int4_available, to_int4
from expertswitch.models.decoder import Decoder
from expertswitch.models.expert_weights import load_expert
from expertswitch.models.rope import LENGTH_DEPENDENT


class Engine:
    def __init__(
        self,
        base: str | Path,
        experts: dict[str, str | Path] | None = None,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        config: EngineConfig | None = None,
        *,
        tokenizer: bool = True,
        **options,
    ):
        """options: EngineConfig's fields (max_num_seqs, block_size, num_kv_blocks, ...)."""
        from expertswitch.utils.imports import resolve_device

        if config is not None and options:
            raise ConfigError("pass an EngineConfig or its fields as keywords, not both")
        try:
            cfg = config or EngineConfig(**options)
        except TypeError as e:
            raise ConfigError(f"unknown engine option: {e}") from None
        self.config = cfg
        self.device = torch.device(resolve_device(device))
        self.dtype = dtype
        self.ep_size = cfg.expert_parallel_size
        self.tp_size = cfg.tensor_parallel_size
        # split over torchrun ranks that run every step together on the same batch
        self.parallel = self.ep_size > 1 or self.tp_size > 1
        if self.parallel:
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()):
                which = "expert" if self.ep_size > 1 else "tensor"
                raise ConfigError(f"{which}_parallel_size > 1 needs torch.distributed: launch "
                                  "with torchrun (the CLI sets the process group up)")  # fmt: skip
        self.model = Decoder.load(base, self.device, dtype, self.ep_size, self.tp_size)
        int4 = cfg.cpu_int4_deltas
        self.cpu_int4 = (
            self.device.type == "cpu"
            and int4_available()
            and (int4 if int4 is not None else dtype in (torch.bfloat16, torch.float16))
        )
        self.base_path = Path(base)
        self.base_fingerprint = _fingerprint(self.base_path)
        self.tokenizer = load_tokenizer(self.base_path) if tokenizer else None
        eos = eos_ids(self.base_path) or frozenset(self.model.cfg.eos_token_ids)
        self.registry = ExpertRegistry(self.base_path, self.base_fingerprint,
                                       self.model.servable_names(), self.model.cfg.vocab_size,
                                       eos, self.tokenizer, tokenizer,
                                       LoraBase.of(self.model, self.base_path),
                                       cfg.max_lora_rank, self.model.text_name)  # fmt: skip
        budget = cfg.device_budget_bytes
        if self.device.type == "cuda" and budget is None:
            # experts get a third of the memory the base left free, the KV cache most of the
            # rest (_auto_blocks), so that loading experts cannot run the GPU out of memory
            budget = torch.cuda.mem_get_info(self.device)[0] // 3
        block = cfg.block_size
        num_blocks = cfg.num_kv_blocks or auto_num_blocks(self.model, cfg, self.device, budget)
        if self.parallel:  # every rank admits, preempts and defers alike: the smallest GPU's
            num_blocks, budget = min_over_ranks(num_blocks, budget)
        self.max_model_len = min(cfg.max_model_len or self.model.cfg.max_position_embeddings,
                                 num_blocks * block)  # fmt: skip
        # (an explicit max_model_len may pass max_position_embeddings: scaled RoPE)
        # dynamic NTK RoPE rotates a key by the length of the sequence that computed it: a
        # prefix computed for another prompt length is not the same keys
        # (LongRoPE alike, unless no sequence can grow past the pretrained length)
        rope = self.model.rope
        steady = rope.kind == "longrope" and self.max_model_len <= rope.original
        caching = cfg.enable_prefix_caching and (rope.kind not in LENGTH_DEPENDENT or steady)
        self.blocks = BlockManager(num_blocks, block, prefix_caching=caching)
        # one block more than the scheduler hands out: decode graphs' padding rows write there
        self.kv_cache = self.model.new_kv_cache(num_blocks + 1, block)
        self.scheduler = Scheduler(self.blocks, cfg.max_num_seqs, cfg.max_num_batched_tokens,
                                   cfg.max_active_experts,
                                   chunked_prefill=cfg.enable_chunked_prefill,
                                   long_prefill=cfg.long_prefill_token_threshold,
                                   policy=cfg.scheduling_policy)  # fmt: skip
        graphs = None
        if not cfg.enforce_eager:
            graphs = DecodeGraphs(self.model, self.kv_cache, num_blocks, block,
                                  -(-self.max_model_len // block), cfg.max_num_seqs)  # fmt: skip
        self.runner = ModelRunner(self.model, self.blocks, self.kv_cache, graphs)
        self.pool = ExpertPool(self._load, self.device, budget, cfg.host_budget_bytes)
        self._held: dict[str, object] = {}  # experts acquired while they have running requests
        self._searches: collections.Counter[str] = collections.Counter()  # beam searches running
        self._requests: dict[str, Request] = {}
        self._undelivered: list[RequestOutput] = []  # finished elsewhere, for the next step()
        self._ids = itertools.count()
        self._arrivals = itertools.count()
        self.aborted = 0  # requests stopped before they finished
        self.steps = 0  # forward-pass steps scheduled (the ranks' agreement counts them)
        self._last_outputs: list | None = None  # step_digest of the last step, not yet agreed
        # expert-parallel serving: rank 0 records its operations, the others replay them
        self.mirror: StepMirror | None = None
        for name, path in (experts or {}).items():
            self.add_expert(name, path)

    # experts -----------------------------------------------------------------------------

    def add_expert(self, name: str, path: str | Path, checked=None) -> None:
        """Register an archive (or a PEFT LoRA adapter) under `name`. Its manifest is checked
        now (made for this base, only tensors the engine can apply per row); its weights load
        on first use. checked: `registry.check(path)` run beforehand, off the engine's thread
        (the server's load routes: an adapter's check may read whole base tensors). Serving
        over ranks, the other ranks check it themselves between steps, as before."""
        self.registry.add(name, path, checked)
        self.pool.register(name)
        if self.mirror is not None and self.mirror.leader:  # serving over ranks: all or none
            op = ("add_expert", name, str(path))
            failed = [(r, why) for r, why in enumerate(self.mirror.confirm(op)) if why]
            if failed:
                self._undo(op)
                rank, why = failed[0]
                raise ConfigError(f"expert {name!r} is not registered: rank {rank} could not "
                                  f"register it ({why}); every rank reads the archive at the "
                                  "same path: give a path all of them can read")  # fmt: skip

    def _undo(self, op: tuple) -> None:
        """Take back an operation confirmed on some ranks only (engine/mirror.py)."""
        kind, name, *_ = op
        if kind != "add_expert":
            raise ParallelError(f"cannot undo {kind!r}")
        self.pool.forget(name)
        self.registry.remove(name)

    def remove_expert(self, name: str) -> None:
        self.registry.get(name)
        if self._searches[name]:  # (between two steps of a search no request runs)
            raise ConfigError(f"expert {name!r} still serves {self._searches[name]} beam "
                              "search(es): let them finish or abort them first")  # fmt: skip
        busy = [r.request_id for r in self._requests.values() if r.expert == name]
        if busy:
            raise ConfigError(f"expert {name!r} still serves {len(busy)} request(s), e.g. "
                              f"{busy[0]}: let them finish or abort them first")  # fmt: skip
        self._release_idle()
        self.pool.forget(name)
        self.registry.remove(name)
        self.blocks.forget_expert(name)  # a new archive under this name computes anew
        self._record("remove_expert", name)

    def pin_expert(self, name: str, on: bool = True) -> None:
        """Keep `name` on the device until unpinned (loading it now), or unpin it."""
        self.registry.get(name)
        ok = False
        try:
            if on:
                self.pool.pin(name)
            else:
                self.pool.unpin(name)
            ok = True
        finally:  # a failed pin may have evicted others: the other ranks try it too
            self._record("pin_expert", name, on, ok)

    def reset_prefix_cache(self) -> None:
        """Forget the prefix cache (vLLM's reset_prefix_cache): later prompts compute every
        token, e.g. for a benchmark's cold start."""
        self.blocks.reset_prefix_cache()
        self._record("reset_prefix_cache")

    def _load(self, name: str):
        entry = self.registry.get(name)
        if entry.lora is not None:  # (checked again if its files changed since)
            entry.lora = checked_again(name, entry.lora, self.registry.lora_base)
            return self.model.slice_expert(load_lora(name, entry.lora, self.dtype))
        w = load_expert(name, entry.path, self.base_fingerprint, self.model.shapes, self.dtype,
                        self.model.text_name)  # fmt: skip
        w = self.model.slice_expert(w)  # this rank's slices under tensor parallelism (first:
        if self.cpu_int4:  # the forms are made from the slices; a delta the kernel cannot take
            # keeps the torch path; an untied embedding's delta is looked up by rows, not
            # multiplied: it gets none)
            embed = self.model.embed.name
            lookup_only = embed != self.model.lm_head.name
            forms = {n: to_int4(d) for n, d in w.deltas.items()
                     if not (lookup_only and n == embed)}  # fmt: skip
            w.cpu_int4 = {n: f for n, f in forms.items() if f is not None}
        return w

    @property
    def experts(self) -> list[str]:
        return list(self.registry.entries)

    def tokenizer_for(self, expert: str | None):
        """The expert's own tokenizer when its archive ships one, else the base's."""
        return self.registry.tokenizer(expert)

    # requests ----------------------------------------------------------------------------

    def add_request(
        self,
        prompt: str | Sequence[int],
        expert: str | None = None,
        sampling: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> str:
        """Queue a request; its id. priority: under scheduling_policy="priority", lower runs
        first (vLLM's); under "fcfs" it must be 0. cache_salt (vLLM's): the request reuses
        and leaves prefix-cache blocks only for requests with the same salt (tenants who must
        not learn from each other's cache hits)."""
        req = self._make_request(prompt, expert, sampling, request_id, priority, cache_salt)
        self._submit(req)
        return req.request_id

    def _make_request(self, prompt, expert, sampling, request_id, priority=0,
                      cache_salt=None) -> Request:  # fmt: skip
        """A validated request (not yet queued)."""
        if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
            raise ConfigError(f"cache_salt must be a non-empty string, got {cache_salt!r}")
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ConfigError(f"priority must be an integer, got {priority!r}")
        if priority and self.config.scheduling_policy != "priority":
            raise ConfigError(f"priority {priority} needs priority scheduling: start the engine "
                              "with scheduling_policy='priority' (--scheduling-policy "
                              "priority)")  # fmt: skip
        sampling = sampling or SamplingParams()
        if not isinstance(sampling, SamplingParams):
            raise ConfigError("sampling must be a SamplingParams")
        # unseeded: fresh entropy, without reseeding torch's global generator as torch.seed();
        # under expert parallelism rank 0's, drawn before any check can fail on one rank only
        seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
        if self.parallel and sampling.seed is None and self.mirror is None:
            seed = rank0_value(seed)  # every rank must draw the same tokens (a server's
            #                            leader sends its seed with the request instead)
        if expert is not None:
            self.registry.get(expert)
        tok = self.tokenizer_for(expert)
        if sampling.stop and tok is None:
            raise ConfigError("stop strings need a tokenizer; this base has none: use "
                              "stop_token_ids")  # fmt: skip
        text, ids = self._encode(prompt, tok)
        self.check_prompt(ids, expert)
        if sampling.bad_words:
            if tok is None:
                raise ConfigError("bad_words need a tokenizer; this base has none: use "
                                  "bad_words_token_ids")  # fmt: skip
            sampling = dataclasses.replace(
                sampling,
                bad_words=None,
                bad_words_token_ids=[
                    *(sampling.bad_words_token_ids or ()),
                    *bad_word_ids(tok, sampling.bad_words),
                ],
            )
        vocab = self.registry.vocab(expert)
        words = [t for q in sampling.bad_words_token_ids or () for t in q]
        for name, named in (("logit_bias", sampling.logit_bias or ()),
                            ("stop_token_ids", sampling.stop_token_ids),
                            ("allowed_token_ids", sampling.allowed_token_ids or ()),
                            ("bad_words_token_ids", words)):  # fmt: skip
            bad = [t for t in named if t >= vocab]
            if bad:
                raise ConfigError(f"{name} names token id {bad[0]}, outside the vocabulary "
                                  f"(size {vocab})")  # fmt: skip
        if sampling.structured_outputs is not None and tok is None:
            raise ConfigError("structured outputs need a tokenizer (they constrain the text); "
                              f"{self.base_path} has none")  # fmt: skip
        if request_id is None:
            request_id = next(r for r in (f"req-{i}" for i in self._ids)
                              if r not in self._requests)  # fmt: skip
        elif request_id in self._requests:
            raise ConfigError(f"request id {request_id!r} is already in use")
        return Request(request_id, ids, expert, sampling, prompt=text,
                       generator=self._generator(seed), text=None if tok is None else "",
                       guide=self._guide(expert, sampling), priority=priority,
                       cache_salt=cache_salt)  # fmt: skip

    def _guide(self, expert: str | None, sampling: SamplingParams) -> Guide | ThinkFirst | None:
        """A request's place in its structured output (None without one; free until the
        thinking ends when the constraint has a reasoning_end)."""
        so = sampling.structured_outputs
        if so is None:
            return None
        stop = set(sampling.stop_token_ids)
        if not sampling.ignore_eos:
            stop |= self.registry.eos(expert)
        index = token_index(self.tokenizer_for(expert), self.registry.vocab(expert))
        guide = Guide(so.grammar_, index, frozenset(stop))
        return guide if so.reasoning_end is None else ThinkFirst(guide, so.reasoning_end)

    @staticmethod
    def _generator(seed: int) -> torch.Generator:
        """A request's own generator (on the host: the sampler draws one number per step from
        it, engine/sampler.py)."""
        gen = torch.Generator()
        gen.manual_seed(seed)
        return gen

    def _submit(self, req: Request) -> None:
        req.arrival = next(self._arrivals)
        self._requests[req.request_id] = req
        self.scheduler.add(req)
        self._record("submit", req.request_id, req.prompt_token_ids, req.expert, req.sampling,
                     req.generator.initial_seed(), req.prompt, req.text is not None,
                     req.priority, req.cache_salt)  # fmt: skip
        if req.expert is not None and not self.parallel:
            # (split over ranks, loads happen on the step alone: a background load
            # finishing sooner on one rank would make the ranks schedule differently)
            # a hint: it fills free room only (running experts are in use); a failure shows
            # on the step that needs the expert, as an error on its requests
            with contextlib.suppress(PoolError, ExpertLoadError):
                self.pool.prefetch(req.expert)

    def _encode(self, prompt, tok) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if tok is None:
                raise ConfigError(f"{self.base_path} has no tokenizer files: pass token ids")
            return prompt, list(tok.encode(prompt))
        try:
            ids = list(prompt)
        except TypeError:
            raise ConfigError("a prompt is a string or a list of integer token ids") from None
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ConfigError("a prompt is a string or a list of integer token ids")
        return None, ids

    def check_prompt(self, ids: list[int], expert: str | None) -> None:
        """ConfigError unless `ids` is a prompt `expert` can serve (not empty, fits the context
        with one token to spare, every id in its vocabulary)."""
        if not ids:
            raise ConfigError("the prompt is empty: give at least one token")
        if len(ids) >= self.max_model_len:
            raise ConfigError(
                f"the prompt has {len(ids)} tokens but the context holds {self.max_model_len} "
                "(prompt + at least one generated token): shorten it"
            )
        vocab = self.registry.vocab(expert)
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ConfigError(f"token id {bad[0]} is outside the vocabulary (size {vocab})")

    def abort(self, request_id: str) -> None:
        """Stop a request; its final output (finish_reason "abort") comes with the next step."""
        req = self._requests.pop(request_id, None)
        if req is None or req.finished:
            return
        self._record("abort", request_id)
        self.scheduler.finish(req)
        req.finish("abort")
        self.aborted += 1
        self._undelivered.append(RequestOutput.of(req, []))
        self._release_idle()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def has_outputs(self) -> bool:
        """Outputs wait for the next step() (requests aborted or finished outside a step)."""
        return bool(self._undelivered)

    # the step loop -----------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, run one forward pass, sample; outputs of every request that got a token
        or finished in this step (and of any finished since the last step())."""
        outs, self._undelivered = self._undelivered, []
        return outs + self._step()

    def idle(self) -> None:
        """Called by a serving loop with nothing to step: under expert-parallel serving rank 0
        sends what changed, or a heartbeat, to the other ranks."""
        if self.mirror is not None:
            self.mirror.idle()

    def _rerotate(self) -> None:
        """LongRoPE (Phi-3): a sequence whose next token passes original_max_position_embeddings
        switches from the short factors to the long ones for every position, as transformers'
        Phi-3 does (it drops the cache there): its keys are recomputed, once (every rank alike:
        the same requests cross in lockstep)."""
        rope = self.model.rope
        if rope.kind != "longrope":
            return
        for r in list(self.scheduler.running):
            if r.rope_short and r.num_cached and r.num_tokens > rope.original:
                self.scheduler.preempt(r)  # (back in this step, its whole sequence long)

    def _step(self) -> list[RequestOutput]:
        if self.mirror is not None:  # rank 0 serving: the other ranks replay, then step too
            self.mirror.before_step()
        if self.mirror is None:
            return self._run_step()
        try:
            return self._run_step()
        except BaseException:  # the other ranks may wait in a collective this rank left:
            self.mirror.closed = True  # nothing more is sent (no "stop" they cannot receive)
            raise

    def _run_step(self) -> list[RequestOutput]:
        self._rerotate()
        reqs = self.scheduler.schedule()
        if self.model.rope.kind == "longrope":  # which factors this step's keys are rotated by
            for r in reqs:
                r.rope_short = r.num_tokens <= self.model.rope.original
        self.steps += 1
        failed, deferred = {}, set()
        if reqs:
            failed, deferred = self._acquire({r.expert for r in reqs if r.expert is not None})
        for r in reqs:
            if r.expert in failed:
                self.scheduler.finish(r)
                r.finish("error", failed[r.expert])
        for r in reversed(reqs):  # back to the head of the queue in their order
            if r.expert in deferred:
                self.scheduler.preempt(r)  # until its expert fits
        live = [r for r in reqs if r.status is Status.RUNNING]
        if self.parallel:  # before the forward pass, whose collectives need the same batch:
            # what was scheduled and what runs after the expert loads (one rank's failed or
            # deferred load would change it), with the previous step's outputs (one collective
            # a step: engine/mirror.py)
            batch = [(r.request_id, r.num_tokens, r.num_cached, r.num_new,
                      r.status is Status.RUNNING) for r in reqs]  # fmt: skip
            self._agree("the batch or the previous step's tokens", (batch, self._last_outputs))
            self._last_outputs = None
        if not reqs:
            return []
        ready: list[Request] = []  # (a prompt prefilled only in part samples nothing yet)
        if live:
            try:
                logits, ready = self.runner.run(live, {None: None, **self._held})
            except BaseException:  # (KeyboardInterrupt, out of memory): the requests stay,
                for r in live:  # to compute these tokens again; blocks registered for them
                    self.blocks.forget_uncomputed(r)  # hold no keys and must not be reused
                    r.num_new = 0
                raise
        if ready:
            try:
                self._sample(logits, ready)
            except BaseException:  # (Ctrl-C): a request left without its token recomputes
                for r in reversed(ready):  # its last one (preempted: no shared block is
                    if r.status is Status.RUNNING and r.num_cached == r.num_tokens:  # rewritten)
                        del r.logprobs[len(r.output_token_ids) :]
                        self.scheduler.preempt(r)
                raise
        self._release_idle()
        outs = self._outputs(reqs)
        if self.parallel:  # checked with the next step's batch (or by check_last_step)
            self._last_outputs = step_digest(outs)
        return outs

    def _sample(self, logits: torch.Tensor, ready: list[Request]) -> None:
        """A token for each request whose tokens are all computed (logits row i: ready[i])."""
        eos = None
        if any(r.sampling.min_tokens for r in ready):  # banned until min_tokens
            eos = [self.registry.eos(r.expert) for r in ready]
        tokens = sample(logits, ready, eos)
        self._record_logprobs(logits, ready, tokens)
        for r, tok in zip(ready, tokens):
            if isinstance(tok, SamplingFailure):
                self._finish(r, "error", str(tok))
            else:
                self._append(r, tok)

    def check_last_step(self) -> None:
        """Ranks stepping together: check the last step's outputs, which no next step's
        agreement will (the end of `generate`)."""
        if self.parallel and self._last_outputs is not None:
            self._agree("the tokens", self._last_outputs)
            self._last_outputs = None

    def _agree(self, what: str, payload) -> None:
        try:
            agree(what, self.steps, payload)
        except Exception:
            if self.mirror is not None:
                self.mirror.closed = True  # the ranks no longer step together
            raise

    def _record(self, *op) -> None:
        if self.mirror is not None:
            self.mirror.record(*op)

    def _replay(self, op: tuple) -> None:
        """A follower applies rank 0's operation (engine/mirror.py)."""
        kind, *args = op
        if kind == "submit":
            rid, ids, expert, sampling, seed, prompt, has_text, priority, salt = args
            self._submit(Request(rid, list(ids), expert, sampling, prompt=prompt,
                                 generator=self._generator(seed),
                                 text="" if has_text else None, priority=priority,
                                 cache_salt=salt,
                                 guide=self._guide(expert, sampling)))  # fmt: skip
        elif kind == "abort":
            self.abort(*args)
        elif kind == "add_expert":
            self.add_expert(*args)
        elif kind == "remove_expert":
            self.remove_expert(*args)
        elif kind == "reset_prefix_cache":
            self.reset_prefix_cache()
        elif kind == "pin_expert":
            name, on, ok = args
            try:
                self.pin_expert(name, on)
                why = None
            except Exception as e:  # noqa: BLE001 - compared with rank 0's outcome below
                why = f"{type(e).__name__}: {e}"
            if ok != (why is None):
                raise ParallelError(f"{'un' if not on else ''}pinning expert {name!r} "
                                    f"{'failed' if ok else 'succeeded'} here but not on rank 0"
                                    + (f" ({why})" if why else ""))  # fmt: skip
        else:
            raise ParallelError(f"unknown operation {kind!r} from rank 0: the ranks run "
                                "different expertswitch versions?")  # fmt: skip

    @staticmethod
    def _record_logprobs(logits: torch.Tensor, reqs: list[Request], tokens: list) -> None:
        want = [i for i, r in enumerate(reqs) if r.sampling.logprobs is not None
                and not isinstance(tokens[i], SamplingFailure)]  # fmt: skip
        if not want:
            return
        k = max(reqs[i].sampling.logprobs for i in want)
        rows = logits.index_select(0, torch.tensor(want, device=logits.device))
        for i, lp in zip(want, logprobs_of(rows, [tokens[i] for i in want], k)):
            lp.top = lp.top[: reqs[i].sampling.logprobs]
            reqs[i].logprobs.append(lp)

    def _acquire(self, names: set[str]) -> tuple[dict[str, str], set[str]]:
        """Make this step's experts resident and in use; (failed: name → why, deferred)."""
        failed, deferred = {}, set()
        for name in sorted(names - set(self._held)):
            try:
                self._held.update(self.pool.acquire([name]))
            except PoolFullError as e:
                # room held by running requests (given back when they finish) or by loads
                # under way (they settle): wait; held by pinned experts: waiting never ends
                if self._held or self.pool.wait_loads():
                    deferred.add(name)
                else:
                    failed[name] = str(e)
            except (ExpertLoadError, PoolError) as e:
                failed[name] = str(e)
        if deferred:  # learn how many experts fit at once, so admission stops thrashing
            cap = max(1, len(self._held))
            if self.scheduler.max_active_experts is None or cap < self.scheduler.max_active_experts:
                self.scheduler.max_active_experts = cap
        return failed, deferred

    def _release_idle(self) -> None:
        """Experts stay in use while they have running requests; release the others."""
        running = {r.expert for r in self.scheduler.running}
        idle = [name for name in self._held if name not in running]
        if idle:
            self.pool.release(idle)
            for name in idle:
                del self._held[name]
        if not self._held:  # a cap learned from a full device holds only while it is full
            self.scheduler.max_active_experts = self.config.max_active_experts

    def _append(self, r: Request, token: int) -> None:
        if len(r.output_token_ids) + 1 == r.sampling.min_tokens and r.text is not None:
            r.stop_floor = len(r.text)  # stop strings must end past the first min_tokens − 1
        r.output_token_ids.append(token)
        sp = r.sampling
        if r.guide is not None and not r.guide.advance(token):  # (the mask allows no such token)
            self._finish(r, "error", f"structured output: token {token} does not continue the "
                         "answer")  # fmt: skip
            return
        eos = self.registry.eos(r.expert)
        stopper = token in sp.stop_token_ids or (not sp.ignore_eos and token in eos)
        tok = self.tokenizer_for(r.expert)
        if tok is not None:  # the whole output each time: exact for any tokenizer
            # (a token that stops the answer is not part of its text: vLLM's rule)
            shown = r.output_token_ids
            if stopper and not sp.include_stop_str_in_output:
                shown = shown[:-1]
            r.text = decode_ids(tok, shown, sp.skip_special_tokens)
        early = len(r.output_token_ids) < sp.min_tokens  # (EOS and stop ids are banned then)
        if token in sp.stop_token_ids:
            r.stop_reason = token
            self._finish(r, "stop")
        elif (
            (not sp.ignore_eos and token in eos)
            or (sp.stop and not early and self._hit_stop(r))
            or (r.guide is not None and r.guide.complete)  # nothing may follow (closed JSON)
        ):
            self._finish(r, "stop")
        elif len(r.output_token_ids) >= sp.max_tokens or r.num_tokens >= self.max_model_len:
            self._finish(r, "length")

    def _hit_stop(self, r: Request) -> bool:
        """The earliest stop string in the text (with min_tokens: the earliest that ends past
        the text of the first min_tokens − 1 tokens, as vLLM checks none before)."""
        found = [(r.text.find(s, max(0, r.stop_floor - len(s) + 1)), s) for s in r.sampling.stop]
        hits = [(at, s) for at, s in found if at >= 0]
        if not hits:
            return False
        at, s = min(hits)
        r.text = r.text[: at + len(s)] if r.sampling.include_stop_str_in_output else r.text[:at]
        r.stop_reason = s
        return True

    def _finish(self, r: Request, reason: str, error: str | None = None) -> None:
        self.scheduler.finish(r)
        r.finish(reason, error)

    def _outputs(self, reqs: list[Request]) -> list[RequestOutput]:
        outs = []
        for r in reqs:
            new = r.output_token_ids[r.emitted :]
            if new or r.finished:
                r.emitted = len(r.output_token_ids)
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
        priority: int | Sequence[int] = 0,
        cache_salt: str | None | Sequence[str | None] = None,
    ) -> list[RequestOutput]:
        """Run `prompts` to completion; outputs in the prompts' order. Every prompt is checked
        before any is queued; other requests keep being served and their outputs wait for
        the next step(). priority, cache_salt: one for all, or one per prompt (add_request's)."""
        from tqdm.auto import tqdm

        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        n = len(prompts)
        experts = list(expert) if isinstance(expert, (list, tuple)) else [expert] * n
        params = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling] * n
        ranks = list(priority) if isinstance(priority, (list, tuple)) else [priority] * n
        salts = list(cache_salt) if isinstance(cache_salt, (list, tuple)) else [cache_salt] * n
        if len({n, len(experts), len(params), len(ranks), len(salts)}) > 1:
            raise ConfigError(f"{n} prompts need {n} experts / sampling params / priorities / "
                              "cache salts (or one for all)")  # fmt: skip
        reqs: list[Request] = []
        try:
            for p, e, s, r, salt in zip(prompts, experts, params, ranks, salts):
                reqs.append(self._make_request(p, e, s, None, r, salt))
                self._requests[reqs[-1].request_id] = reqs[-1]  # reserve the id
        finally:  # queued below only when every prompt passed
            for r in reqs:
                self._requests.pop(r.request_id)
        for r in reqs:
            self._submit(r)
        ids = {r.request_id for r in reqs}
        final: dict[str, RequestOutput] = {}
        with tqdm(total=n, desc="generating", disable=not progress, unit="req") as bar:
            try:
                while len(final) < n:
                    for out in self._step():
                        if out.request_id not in ids:
                            self._undelivered.append(out)
                        elif out.finished:
                            final[out.request_id] = out
                            bar.update(1)
            except BaseException:  # (Ctrl-C in a notebook): nobody waits for the rest now
                for r in reqs:
                    self.abort(r.request_id)  # (a finished one is left alone)
                self._undelivered = [o for o in self._undelivered if o.request_id not in ids]
                raise
        if self.mirror is None:  # ranks in lockstep: their last tokens agree too
            self.check_last_step()
        return [final[r.request_id] for r in reqs]

    def beam_search(self, prompt: str | Sequence[int], expert: str | None = None,
                    params: BeamSearchParams | None = None, priority: int = 0,
                    cache_salt: str | None = None) -> list[RequestOutput]:  # fmt: skip
        """vLLM's beam search (engine/beam.py): the `params.beam_width` best beams, best first,
        each an output with its tokens, text, cumulative_logprob and finish_reason ("stop" on
        an EOS token, else "length")."""
        params = params or BeamSearchParams(beam_width=4, max_tokens=16)
        if not isinstance(params, BeamSearchParams):
            raise ConfigError(f"params must be a BeamSearchParams, got {type(params).__name__}")
        room = SamplingParams(max_tokens=params.max_tokens)  # (the prompt checked, tokenized)
        ids = self._make_request(prompt, expert, room, None, priority, cache_salt).prompt_token_ids
        if len(ids) + params.max_tokens > self.max_model_len:
            raise ConfigError(f"the context holds {self.max_model_len} tokens, but the beam search "
                              f"asks for {len(ids) + params.max_tokens} ({len(ids)} in the "
                              f"prompt, max_tokens {params.max_tokens}): lower max_tokens or "
                              "shorten the prompt")  # fmt: skip
        search = BeamSearch(ids, params, self.registry.eos(expert))
        while not search.done:
            outs = self.generate(search.pending(), expert, search.step_params(), False,
                                 priority, cache_salt)  # fmt: skip
            search.advance(outs)
        return [self.beam_output(b, ids, expert, i) for i, b in enumerate(search.best())]

    @property
    def beam_searches(self) -> dict[str, int]:
        """Experts held by beam searches driven from outside (hold_for_search): how many."""
        return dict(self._searches)

    def hold_for_search(self, expert: str | None, on: bool = True) -> None:
        """A beam search driven from outside (the server's, step by step) uses `expert`
        (on) or is over (off): remove_expert refuses it meanwhile, as it refuses an expert
        with running requests — between two of the search's steps none runs."""
        if expert is None:
            return
        if on:
            self.registry.get(expert)  # (an unknown expert: its clear error)
            self._searches[expert] += 1
        elif self._searches[expert] > 1:
            self._searches[expert] -= 1
        else:
            del self._searches[expert]

    def beam_output(self, beam: Beam, prompt_ids: list[int], expert: str | None, index: int,
                    skip_special_tokens: bool = True) -> RequestOutput:  # fmt: skip
        """A finished beam as a request's final output (its text decoded with the expert's
        tokenizer, if the engine has one)."""
        tok = self.tokenizer_for(expert)
        text = None
        if tok is not None:
            text = decode_ids(tok, list(beam.tokens), skip_special_tokens)
        out = RequestOutput(f"beam-{index}", list(prompt_ids), list(beam.tokens), text, expert,
                            True, "stop" if beam.eos else "length", list(beam.tokens))  # fmt: skip
        out.cumulative_logprob = beam.cum_logprob
        return out

    def stream(self, prompt, expert: str | None = None, sampling: SamplingParams | None = None,
               priority: int = 0, cache_salt: str | None = None,
               ) -> Iterator[RequestOutput]:  # fmt: skip
        """Yield this request's outputs token by token (other requests keep being served;
        their outputs wait for the next step())."""
        rid = self.add_request(prompt, expert, sampling, priority=priority, cache_salt=cache_salt)
        while True:
            if rid not in self._requests:  # aborted: its final output is waiting
                mine = [o for o in self._undelivered if o.request_id == rid]
                self._undelivered = [o for o in self._undelivered if o.request_id != rid]
                yield from mine
                return
            for out in self._step():
                if out.request_id != rid:
                    self._undelivered.append(out)
                    continue
                yield out
                if out.finished:
                    return

    def stats(self) -> dict:
        return {
            "kv_blocks_total": self.blocks.num_blocks,
            "kv_blocks_used": self.blocks.num_used,
            "prefix_cache_queries": self.blocks.queries,
            "prefix_cache_hits": self.blocks.hits,
            "waiting": len(self.scheduler.waiting),
            "running": len(self.scheduler.running),
            "aborted": self.aborted,
            "pool": self.pool.stats(),
            "residency": self.pool.residency(),
            "decode_graphs": self.runner.graphs.stats() if self.runner.graphs else None,
        }

    def close(self) -> None:
        for rid in list(self._requests):
            self.abort(rid)
        if self.runner.graphs is not None:
            self.runner.graphs.reset()  # their memory pool goes with them
        self.pool.close()
        if self.mirror is not None:
            self.mirror.close()  # the other ranks replay the aborts, then stop


def _fingerprint(path: Path) -> str:
    from expertswitch.io.checkpoint import open_checkpoint

    return open_checkpoint(path).fingerprint()
