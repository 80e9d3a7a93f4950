"""`/v1/completions` and `/v1/chat/completions`: resolve the model (an expert, the base, or
`auto` through the router), queue every choice on the engine in one step, then answer as one
JSON body or as server-sent events.

Errors follow the request's life: options and prompts are checked before anything is queued
(400/404); an expert that cannot be loaded fails its requests before their first token (503,
also for a stream, whose headers wait for that first token); a failure after tokens were sent
ends the stream with an error event. A client that goes away has its requests aborted: the
engine frees their sequences and KV blocks before its next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import threading
import time
import uuid
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from expertswitch.engine import Engine, SamplingParams
from expertswitch.engine.beam import BeamSearch, BeamSearchParams
from expertswitch.engine.guided import token_index
from expertswitch.engine.request import Logprob, RequestOutput
from expertswitch.engine.tokenizer import bad_word_ids
from expertswitch.errors import ConfigError
from expertswitch.server.async_engine import AsyncEngine, ClientGone, OutputCollector
from expertswitch.server.errors import HTTPError, error_body
from expertswitch.server.logprobs import LogprobFormatter
from expertswitch.server.metrics import Metrics
from expertswitch.server.protocol import (
    ANY_TOOL,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    auto_tools,
    chat_messages,
    forced_tool,
    generation_defaults,
    prompt_list,
    refuse_unsupported,
    sampling_params,
    structured_outputs,
    tool_choice_required,
)
from expertswitch.server.reasoning import (
    END,
    REASONING_PARSERS,
    START,
    ReasoningParser,
    ReasoningStream,
    split,
    thinking_counter,
)
from expertswitch.server.tool_parsers import (
    TOOL_PARSERS,
    ToolCall,
    ToolParser,
    ToolStream,
    extract,
    json_text,
)
from expertswitch.utils.threads import as_side_work, side_work

AUTO = "auto"
MAX_CHOICES = 1024  # sequences one HTTP request may queue (prompts × n)


# a stream that has sent nothing for this long (a tool call the parser holds until it is
# whole, a long thinking with include_reasoning false) sends an SSE comment, which clients
# ignore, so that a proxy's idle timeout (nginx: 60 s) does not cut it
KEEPALIVE_S = 15.0


@dataclass
class ServerConfig:
    base_name: str = "base"  # the name the base model answers to (besides "base")
    # more names it answers to (vLLM's --served-model-name A B ...: replies say base_name)
    base_aliases: tuple[str, ...] = ()
    api_key: str | None = None
    enable_admin: bool = False
    max_request_bytes: int = 4 * 2**20
    max_tokens_limit: int | None = None  # default: the engine's context length
    chat_template: str | None = None  # used in place of the tokenizer's (vLLM's priority)
    # merged under each chat request's chat_template_kwargs (vLLM's
    # --default-chat-template-kwargs, e.g. {"enable_thinking": false} server-wide)
    default_chat_template_kwargs: dict | None = None
    # requests' sampling defaults (vLLM's --generation-config): "auto" the base's
    # generation_config.json (temperature, top_p, top_k, min_p, repetition_penalty), "vllm"
    # none (OpenAI's neutral ones), or a folder holding a generation_config.json
    generation_config: str = "auto"
    # browsers' cross-origin calls (vLLM's --allowed-origins and friends): none unless given
    # (vLLM allows every origin; here the admin routes load files, so a page of any site
    # must not reach a local server unasked)
    allowed_origins: tuple[str, ...] = ()
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False
    # tool_choice "auto": the format the model writes its calls in (tool_parsers.py); None:
    # "auto" is refused (vLLM's --enable-auto-tool-choice --tool-call-parser NAME)
    tool_call_parser: str | None = None
    # a reasoning model's thinking split from its answer (reasoning.py; vLLM's
    # --reasoning-parser NAME); None: the thinking stays in the content
    reasoning_parser: str | None = None
    # /v1/responses with store (its default): how many responses, and how many bytes of their
    # JSON, are kept in memory for GET and previous_response_id, the oldest dropped first
    responses_kept: int = 1000
    responses_kept_bytes: int = 256 * 2**20

    def base_names(self) -> tuple[str, ...]:
        """Every name the base answers to."""
        return (self.base_name, *self.base_aliases, "base")

    def __post_init__(self):
        for what, name, known in (
            ("tool-call", self.tool_call_parser, TOOL_PARSERS),
            ("reasoning", self.reasoning_parser, REASONING_PARSERS),
        ):
            if name is not None and name not in known:
                raise ConfigError(f"unknown {what} parser {name!r}: choose one of "
                                  f"{', '.join(known)}")  # fmt: skip
        if not isinstance(self.default_chat_template_kwargs, dict | None):
            raise ConfigError("default_chat_template_kwargs must be a JSON object, e.g. "
                              '{"enable_thinking": false}')  # fmt: skip
        if self.generation_config not in ("auto", "vllm"):
            generation_defaults(self.generation_config)  # (a missing or bad file: said now)
        for what, n in (("responses_kept", self.responses_kept),
                        ("responses_kept_bytes", self.responses_kept_bytes)):  # fmt: skip
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ConfigError(f"{what} must be a count ≥ 0 (0: nothing kept), got {n!r}")


@dataclass
class Target:
    expert: str | None  # the engine's name; None = the base alone
    name: str  # what replies call the model
    route: dict | None = None  # the router's decision, for model "auto"


@dataclass
class _Choice:
    request_id: str
    index: int
    prompt: int  # which prompt
    sent: str = ""
    tokens: int = 0
    started: float = 0.0
    last: float | None = None
    finish: str | None = None
    out: RequestOutput | None = None
    lps: list[Logprob] = field(default_factory=list)  # of the generated tokens, if asked
    plps: list | None = None  # of the prompt tokens, if asked (echo)
    lp_sent: int = -1  # streaming: logprobs entries already sent (−1: the prompt's too)
    lp_offset: int = 0  # streaming: text offset of the next token
    tools: ToolStream | None = None  # streaming, tool_choice "auto": the calls sent so far
    thinking: ReasoningStream | None = None  # streaming, a reasoning parser: reasoning sent
    content_sent: int = 0  # streaming, a reasoning parser without tools: content characters
    ids: list[int] = field(default_factory=list)  # return_token_ids: the answer's token ids
    ids_sent: int = -1  # streaming, return_token_ids: ids already sent (−1: not the prompt's)


@dataclass
class _Job:
    kind: str  # "chat" | "completion"
    target: Target
    choices: list[_Choice]
    collector: OutputCollector
    prompt_tokens: list[list[int]]
    prompt_texts: list[str]
    stops: list[str]
    echo: bool
    logprobs: LogprobFormatter | None = None  # when the request asks for logprobs
    score_only: bool = False  # echo with max_tokens 0: the generated token is not shown
    tool: str | None = None  # chat: the function the answer calls (its arguments, as JSON)
    tool_required: bool = False  # tool_choice "required": a whole answer ends "tool_calls"
    parser: ToolParser | None = None  # tool_choice "auto": reads the calls out of the answer
    short_call_ids: bool = False  # Mistral's 9-character call ids (see _call_id)
    reasoning: ReasoningParser | None = None  # chat: splits the thinking from the content
    show_reasoning: bool = True  # include_reasoning (vLLM's): false drops the thinking
    count_thinking: object = None  # with `reasoning`: answer ids → thinking tokens (usage)
    prompt_k: int | None = None  # vLLM's prompt_logprobs, when asked: the top k shown
    prompt_lp: LogprobFormatter | None = None  # ... and their formatter
    token_ids: bool = False  # vLLM's return_token_ids
    created: int = field(default_factory=lambda: int(time.time()))
    id: str = ""

    def by_id(self) -> dict[str, _Choice]:
        return {c.request_id: c for c in self.choices}


class OpenAIServing:
    def __init__(self, aengine: AsyncEngine, router, cfg: ServerConfig, metrics: Metrics):
        self.aengine, self.router, self.cfg, self.metrics = aengine, router, cfg, metrics
        self.engine: Engine = aengine.engine
        self._router_lock = threading.Lock()
        where = cfg.generation_config
        if where == "auto":
            where = self.engine.base_path
        # (the requests' defaults where they leave a sampling field out)
        self.sampling_defaults = {} if where == "vllm" else generation_defaults(where)
        try:  # (a value out of range is the file's fault, said now, not each request's)
            SamplingParams(**self.sampling_defaults)
        except ConfigError as e:
            raise ConfigError(
                f"{where}/generation_config.json: {e}; fix the file, or start "
                "the server with --generation-config vllm"
            ) from None

    # model resolution --------------------------------------------------------------------

    async def model_names(self) -> list[str]:
        return await self.aengine.call(lambda: list(self.engine.experts))

    async def resolve(self, model: str | None, query) -> Target:
        if model is None or model in self.cfg.base_names():  # (None: vLLM's default)
            return Target(None, self.cfg.base_name)
        if model == AUTO:
            if self.router is None:
                raise HTTPError(404, "model 'auto' needs a router: start the server with "
                                "--router DIR", param="model", code="model_not_found")  # fmt: skip
            route = await asyncio.to_thread(self._route, query)
            expert = None if route.expert == "__base__" else route.expert
            decision = {"expert": expert or self.cfg.base_name,
                        "confidence": round(route.confidence, 6), "fallback": route.fallback,
                        "reason": route.reason, "probs": route.probs}  # fmt: skip
            self.metrics.routed.labels(decision["expert"], str(route.fallback).lower()).inc()
            if expert is not None and expert not in await self.model_names():
                raise HTTPError(503, f"the router chose expert {expert!r}, which is not loaded "
                                "now", code="expert_unavailable")  # fmt: skip
            return Target(expert, expert or self.cfg.base_name, decision)
        if model in await self.model_names():
            return Target(model, model)
        known = ", ".join([self.cfg.base_name, *await self.model_names()]
                          + ([AUTO] if self.router else []))  # fmt: skip
        shown = model if len(model) <= 80 else model[:77] + "..."
        raise HTTPError(404, f"the model {shown!r} does not exist; this server has: {known}",
                        param="model", code="model_not_found")  # fmt: skip

    def _route(self, query):
        with self._router_lock, side_work():  # (the backbone is not re-entrant; a worker
            return self.router.route([query])[0]  # thread: its OpenMP pool freed after)

    # endpoints ---------------------------------------------------------------------------

    async def completions(self, req: CompletionRequest, http: Request):
        refuse_unsupported(req)
        prompts = prompt_list(req.prompt)
        self._check_choices(len(prompts), req.n)
        if req.model == AUTO and len(prompts) > 1:
            raise HTTPError(400, "model 'auto' routes one prompt per request: send the prompts "
                            "one by one", param="prompt")  # fmt: skip
        query = prompts[0]
        if req.model == AUTO and not isinstance(query, str):

            def decode(engine: Engine) -> str:
                engine.check_prompt(query, None)  # ids the base's tokenizer can decode
                return engine.tokenizer.decode(query)

            query = await self._engine_call(decode)
        target = await self.resolve(req.model, query)

        def tokenize(engine: Engine):
            tok = engine.tokenizer_for(target.expert)
            special = req.add_special_tokens
            ids = [list(tok.encode(p, add_special_tokens=special)) if isinstance(p, str) else p
                   for p in prompts]  # fmt: skip
            cut = [self._truncated(p, req, engine) for p in ids]
            for p in cut:
                engine.check_prompt(p, target.expert)
            texts = [p if isinstance(p, str) and c is i else tok.decode(c) if req.echo else ""
                     for p, i, c in zip(prompts, ids, cut)]  # fmt: skip
            return cut, texts, tok

        ids, texts, tok = await self._engine_call(tokenize)
        max_tokens = 16 if req.max_tokens is None else req.max_tokens  # OpenAI's default
        return await self._serve("completion", req, http, target, ids, texts, req.echo,
                                 max_tokens, tok)  # fmt: skip

    async def chat(self, req: ChatCompletionRequest, http: Request):
        req._tool_parser = self.cfg.tool_call_parser
        refuse_unsupported(req)
        messages = chat_messages(req.messages)
        target = await self.resolve(req.model, messages)
        kwargs = self._template_kwargs(req)

        def render(engine: Engine):
            tok = engine.tokenizer_for(target.expert)
            if req.tools:  # (templates that describe tools to the model use them)
                kwargs.setdefault("tools", req.tools)
            text = self._render(tok, messages, req, kwargs)
            # the template writes its own special tokens (BOS...): by default none added
            ids = list(tok.encode(text, add_special_tokens=req.add_special_tokens))
            cut = self._truncated(ids, req, engine)
            return [cut], [text if cut is ids else tok.decode(cut)], tok

        ids, texts, tok = await self._engine_call(render)
        max_tokens = req.max_completion_tokens
        if max_tokens is None:
            max_tokens = req.max_tokens
        if max_tokens is None:  # vLLM: the rest of the context (within the server's limit)
            max_tokens = max(1, min(self._limit(), self.engine.max_model_len - len(ids[0])))
        return await self._serve("chat", req, http, target, ids, texts, False, max_tokens, tok)

    @staticmethod
    def _truncated(ids: list[int], req, engine: Engine) -> list[int]:
        """vLLM's truncate_prompt_tokens: the prompt's last k tokens (−1: as many as the
        context holds with one token to generate); `ids` itself when nothing is cut."""
        k = req.truncate_prompt_tokens
        if k is None:
            return ids
        k = engine.max_model_len - 1 if k == -1 else k
        return ids[-k:] if len(ids) > k else ids

    def _template_kwargs(self, req) -> dict:
        """The chat template's variables: the server's defaults, under the request's
        chat_template_kwargs, and vLLM's reasoning_effort and documents (read by gpt-oss's,
        Command R's and other templates). A template of the request's own is refused, as
        vLLM does without --trust-request-chat-template."""
        extra = req.model_extra or {}
        if extra.get("chat_template") is not None:
            raise HTTPError(400, "chat_template in a request is not accepted: the server's "
                            "template (--chat-template, or the tokenizer's) renders every "
                            "request", param="chat_template")  # fmt: skip
        kwargs = {**(self.cfg.default_chat_template_kwargs or {}),
                  **(req.chat_template_kwargs or {})}  # fmt: skip
        for key in ("reasoning_effort", "documents"):
            if extra.get(key) is not None:
                kwargs.setdefault(key, extra[key])
        return kwargs

    def _render(self, tok, messages, req, kwargs: dict) -> str:
        """Chat messages → the prompt text the tokenizer's chat template (or the server's
        --chat-template) makes, with the request's add_generation_prompt and
        continue_final_message (vLLM's: the last message left open)."""
        if req.continue_final_message and req.add_generation_prompt:
            raise ConfigError("continue_final_message continues the last message: set "
                              "add_generation_prompt to false with it (vLLM's rule)")  # fmt: skip
        if tok is None:
            raise ConfigError("this model has no tokenizer: send token ids to /v1/completions")
        template = self.cfg.chat_template  # (None: the tokenizer's)
        if template is None and not getattr(tok, "chat_template", None):
            raise ConfigError("this model's tokenizer has no chat template: start the "
                              "server with --chat-template FILE, or use "
                              "/v1/completions")  # fmt: skip
        try:
            return tok.apply_chat_template(messages, tokenize=False, chat_template=template,
                                           add_generation_prompt=req.add_generation_prompt,
                                           continue_final_message=req.continue_final_message,
                                           **kwargs)  # fmt: skip
        except Exception as e:  # jinja: a role or layout the template refuses
            raise ConfigError(f"the chat template cannot render these messages: {e}") from e

    async def _tokenizer_of(self, model: str | None) -> str | None:
        """The expert whose tokenizer a /tokenize or /detokenize request means (None: the
        base's, also for `auto`, which routes only what it generates)."""
        if model == AUTO and self.router is None:
            await self.resolve(model, None)  # the 404 chat and completions give
        if model is None or model == AUTO:
            return None
        return (await self.resolve(model, None)).expert

    async def tokenize(self, req: TokenizeRequest) -> dict:
        if (req.prompt is None) == (req.messages is None):
            raise HTTPError(400, "give either prompt (text) or messages (chat) to tokenize",
                            param="prompt")  # fmt: skip
        messages = None if req.messages is None else chat_messages(req.messages)
        expert = await self._tokenizer_of(req.model)

        def encode(engine: Engine):
            tok = engine.tokenizer_for(expert)
            if messages is not None:
                kwargs = self._template_kwargs(req)
                if req.tools:  # as chat renders them
                    kwargs.setdefault("tools", req.tools)
                text = self._render(tok, messages, req, kwargs)
                ids = tok.encode(text, add_special_tokens=bool(req.add_special_tokens))
            else:
                if tok is None:
                    raise ConfigError("this model has no tokenizer: nothing to tokenize with")
                ids = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens is not False)
            strs = tok.convert_ids_to_tokens(ids) if req.return_token_strs else None
            return list(ids), strs

        ids, strs = await self._engine_call(encode)
        return {"count": len(ids), "max_model_len": self.engine.max_model_len, "tokens": ids,
                "token_strs": strs}  # fmt: skip

    async def tokenizer_info(self) -> dict:
        """vLLM's /tokenizer_info: the base tokenizer's special tokens, class, chat template
        (the server's --chat-template when given) and the context length — what lm-eval's
        remote tokenizer reads (with /tokenize and /detokenize) instead of loading one."""

        def info(engine: Engine) -> dict:
            tok = engine.tokenizer
            out = {k: getattr(tok, k, None) for k in ("bos_token", "eos_token", "pad_token",
                                                        "unk_token")}  # fmt: skip
            out = {k: None if v is None else str(v) for k, v in out.items()}
            out["tokenizer_class"] = type(tok).__name__
            out["chat_template"] = self.cfg.chat_template or getattr(tok, "chat_template", None)
            out["model_max_length"] = engine.max_model_len
            return out

        return await self._engine_call(info)

    async def detokenize(self, req: DetokenizeRequest) -> dict:
        expert = await self._tokenizer_of(req.model)

        def decode(engine: Engine) -> str:
            tok = engine.tokenizer_for(expert)
            if tok is None:
                raise ConfigError("this model has no tokenizer: nothing to detokenize with")
            vocab = engine.registry.vocab(expert)
            bad = [t for t in req.tokens if not 0 <= t < vocab]
            if bad:
                raise ConfigError(f"token id {bad[0]} is outside the vocabulary (size {vocab})")
            return tok.decode(req.tokens)

        return {"prompt": await self._engine_call(decode)}

    # the common path ---------------------------------------------------------------------

    def _limit(self) -> int:
        return self.cfg.max_tokens_limit or self.engine.max_model_len

    @staticmethod
    def _check_choices(prompts: int, n: int | None) -> None:
        if n is not None and prompts * n > MAX_CHOICES:
            raise HTTPError(400, f"{prompts} prompt(s) × n={n} would make {prompts * n} "
                            f"sequences; one request may make at most {MAX_CHOICES}: split it",
                            param="n")  # fmt: skip

    async def _engine_call(self, fn):
        try:
            return await self.aengine.call(fn, self.engine)
        except ConfigError as e:
            code = "context_length_exceeded" if "context holds" in str(e) else None
            raise HTTPError(400, str(e), code=code) from None

    async def _serve(self, kind, req, http, target, ids, texts, echo, max_tokens, tok):
        score_only = echo and max_tokens == 0  # vLLM: the prompt (and its logprobs) alone
        if score_only:
            max_tokens = 1  # the engine generates one token that nobody is shown
        if max_tokens < 1:
            raise HTTPError(400, f"max_tokens must be at least 1 (0 only with echo), got "
                            f"{max_tokens}", param="max_tokens")  # fmt: skip
        if max_tokens > self._limit():
            raise HTTPError(400, f"max_tokens is {max_tokens} but this server allows at most "
                            f"{self._limit()}", param="max_tokens")  # fmt: skip
        context = self.engine.max_model_len
        longest = max(map(len, ids))
        if longest + max_tokens > context:  # vLLM's rule: refuse rather than cut short
            raise HTTPError(400, f"this model's context holds {context} tokens, but the request "
                            f"asks for {longest + max_tokens} ({longest} in the prompt, "
                            f"{max_tokens} to generate): lower max_tokens or shorten the prompt",
                            param="max_tokens", code="context_length_exceeded")  # fmt: skip
        # the model's generation_config.json max_new_tokens limits every answer (vLLM's
        # rule: the least of it, the request's and the context's room)
        max_tokens = min(max_tokens, self.sampling_defaults.get("max_tokens", max_tokens))
        tool = forced_tool(req) if kind == "chat" else None
        try:
            structured = structured_outputs(req)  # (once: the same for every choice)
            # (the prompt's last think tag closes the thinking: the answer has none — vLLM
            # reads the prompt's tokens back to its last tag the same way)
            closed = kind == "chat" and texts[0].rfind(END) > texts[0].rfind(START)
            if self._thinks_first(kind, structured, tool, closed):
                structured = dataclasses.replace(structured, reasoning_end=END)
            params = [sampling_params(req, max_tokens, j, structured, self.sampling_defaults)
                      for j in range(req.n)]  # fmt: skip
            if req.bad_words and tok is not None:  # tokenized once here, not once per choice
                words = bad_word_ids(tok, params[0].bad_words)
                params = [dataclasses.replace(p, bad_words=None, bad_words_token_ids=words)
                          for p in params]  # fmt: skip
        except ConfigError as e:
            raise HTTPError(400, str(e)) from None
        stops = params[0].stop
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        job_id = f"{prefix}-{uuid.uuid4().hex}"
        plan = [(f"{job_id}-{i}-{j}", i, j) for i in range(len(ids)) for j in range(req.n)]

        add_all = _adder([(rid, ids[i], params[j]) for rid, i, j in plan], target, req)
        if params[0].structured_outputs is not None and tok is not None:
            # the tokenizer's tries are built once, here rather than on the engine's thread
            # (~1 s for a 152K vocabulary, which every running request would wait out)
            with contextlib.suppress(ConfigError):  # (an expert removed meanwhile: the
                vocab = self.engine.registry.vocab(target.expert)  # engine says so below)
                await asyncio.to_thread(as_side_work, token_index, tok, vocab)
        start = time.perf_counter()
        collector = OutputCollector()
        beams = None
        parser = None  # (before the requests start: nothing after them may fail)
        if auto_tools(req):  # (a format whose values the tools' schemas type keeps them)
            parser = TOOL_PARSERS[self.cfg.tool_call_parser].for_tools(req.tools)
        if req.use_beam_search:  # the answers first (the search's own step requests)
            beams = await self._beam_search(req, http, target, ids, max_tokens, plan,
                                            params[0].skip_special_tokens)  # fmt: skip
        else:
            await self._submit(add_all, collector)
        choices = [_Choice(rid, k, i, started=start) for k, (rid, i, _) in enumerate(plan)]
        fmt = None
        if params[0].logprobs is not None:
            fmt = LogprobFormatter(tok, params[0].logprobs, req.return_tokens_as_token_ids)
        thinking = None  # (an answer held from its first token — a forced tool call's — has
        # no thinking to split off)
        free = structured is None or structured.reasoning_end is not None
        if kind == "chat" and free and not closed and self.cfg.reasoning_parser is not None:
            thinking = REASONING_PARSERS[self.cfg.reasoning_parser]
        job = _Job(kind, target, choices, collector, ids, texts, stops, echo, fmt, score_only,
                   tool=tool and tool[0], tool_required=tool_choice_required(req),
                   parser=parser, id=job_id,
                   short_call_ids=self.cfg.tool_call_parser == "mistral", reasoning=thinking,
                   show_reasoning=getattr(req, "include_reasoning", True),
                   count_thinking=thinking and thinking_counter(thinking, tok),
                   prompt_k=req.prompt_logprobs,
                   prompt_lp=None if req.prompt_logprobs is None
                   else LogprobFormatter(tok), token_ids=req.return_token_ids)  # fmt: skip
        self.metrics.prompt_tokens.labels(target.name).inc(sum(len(p) for p in ids))
        for c in choices:
            c.sent = texts[c.prompt] if echo else ""
            c.tools = ToolStream(parser) if parser is not None and req.stream else None
            c.thinking = ReasoningStream(thinking) if thinking is not None and req.stream else None
        if beams is not None:
            for c in choices:
                self._observe(job, c, beams[c.request_id])
            return JSONResponse(self._body(job))
        if req.stream:
            return await self._stream(job, req, http)
        return await self._collect(job, http)

    async def _beam_search(self, req, http, target, ids, max_tokens, plan,
                           skip_special: bool) -> dict:  # fmt: skip
        """vLLM's use_beam_search: req.n beams of each prompt (engine/beam.py; the prompts'
        searches side by side), each step's requests run by the engine beside every other
        request; {request id of the plan: the beam's final output}, the n best of prompt i
        for the plan's (i, 0..n−1). skip_special: as the answer's text is decoded otherwise
        (False for a tool parser whose call markers are special tokens)."""
        try:
            params = BeamSearchParams(req.n, max_tokens, req.ignore_eos, req.temperature or 0.0,
                                      req.length_penalty, req.include_stop_str_in_output,
                                      req.seed)  # fmt: skip
        except ConfigError as e:
            raise HTTPError(400, str(e)) from None
        eos = await self._engine_call(lambda engine: engine.registry.eos(target.expert))

        async def search(i: int) -> list[tuple[str, RequestOutput]]:
            prompt = ids[i]
            beams = BeamSearch(prompt, params, eos)
            while not beams.done:
                outs = await self._finished(http, target, beams.pending(),
                                            beams.step_params(), req)  # fmt: skip
                try:
                    beams.advance(outs)
                except ConfigError as e:  # (a step failed: its expert could not load)
                    raise HTTPError(503, f"{target.name}: {e}", code="expert_unavailable"
                                    ) from None  # fmt: skip
            best = beams.best()
            rids = [rid for rid, p, _ in plan if p == i]
            if len(best) < len(rids):  # (a vocabulary smaller than the beam width)
                raise HTTPError(400, f"the beam search found {len(best)} answers, fewer than "
                                f"n={len(rids)}: lower n", param="n")  # fmt: skip

            def outputs(engine: Engine) -> list[RequestOutput]:
                return [engine.beam_output(b, prompt, target.expert, k, skip_special)
                        for k, b in enumerate(best)]  # fmt: skip

            found = list(zip(rids, await self._engine_call(outputs)))
            for rid, out in found:
                out.request_id = rid
            return found

        # the expert may not be unloaded between two steps (no request of it runs then)
        await self._engine_call(lambda engine: engine.hold_for_search(target.expert))
        tasks = []
        try:
            tasks = [asyncio.ensure_future(search(i)) for i in range(len(ids))]
            return dict(pair for done in await asyncio.gather(*tasks) for pair in done)
        finally:  # one prompt's search failed (or the client left): the others stop too
            for t in tasks:
                t.cancel()
            self.aengine.post(lambda engine: engine.hold_for_search(target.expert, False),
                              self.engine)  # fmt: skip

    async def _submit(self, add_all, collector: OutputCollector) -> None:
        try:
            await self.aengine.submit(add_all, collector)
        except ConfigError as e:
            code = "context_length_exceeded" if "context holds" in str(e) else None
            raise HTTPError(400, str(e), code=code) from None

    async def _finished(self, http, target, prompts, params, req) -> list[RequestOutput]:
        """Run `prompts` to their end on the engine (beside everything else it serves)."""
        rids = [f"beam-{uuid.uuid4().hex}" for _ in prompts]
        collector = OutputCollector()
        await self._submit(_adder(list(zip(rids, prompts, [params] * len(rids))), target, req),
                           collector)  # fmt: skip
        final: dict[str, RequestOutput] = {}
        watch = _watch_disconnect(http, collector)
        try:
            while len(final) < len(rids):
                final.update((o.request_id, o) for o in await collector.get() if o.finished)
        except ClientGone:
            raise Disconnected() from None
        finally:
            watch.cancel()
            for rid in set(rids) - set(final):
                self.aengine.abort(rid)
        return [final[rid] for rid in rids]

    def _thinks_first(self, kind: str, structured, tool, closed: bool) -> bool:
        """With a reasoning parser, a chat answer held to a constraint (response_format,
        guided_json, guided_choice) thinks first, the constraint holding from </think> on (as
        vLLM applies it) — unless the prompt closed the thinking already (`closed`: Qwen3's
        enable_thinking false writes an empty <think></think>; the answer then has no
        thinking to split off either). A forced tool call's arguments stream from the first
        token: held from there."""
        return (kind == "chat" and self.cfg.reasoning_parser is not None and tool is None
                and structured is not None and not closed)  # fmt: skip

    async def _collect(self, job: _Job, http: Request):
        pending = job.by_id()
        watch = _watch_disconnect(http, job.collector)
        try:
            while pending:
                for out in await job.collector.get():
                    c = pending.get(out.request_id)
                    if c is None:
                        continue
                    self._observe(job, c, out)
                    if out.finished:
                        c.out = out
                        del pending[out.request_id]
        except ClientGone:
            raise Disconnected() from None
        finally:  # the client left (or we fail): free their sequences now
            watch.cancel()
            self._abandon(job, pending)
        failed = [c for c in job.choices if c.out.finish_reason == "error"]
        if failed:
            c = failed[0]
            status = 503 if c.tokens == 0 else 500
            raise HTTPError(status, f"{job.target.name}: {c.out.error}",
                            code="expert_unavailable" if status == 503 else None)  # fmt: skip
        return JSONResponse(self._body(job))

    async def _stream(self, job: _Job, req, http: Request):
        pending = job.by_id()
        # headers wait for the first output: an expert that cannot load is a plain 503
        watch = _watch_disconnect(http, job.collector)
        try:
            first = await job.collector.get()
        except BaseException as e:
            self._abandon(job, pending)
            if isinstance(e, ClientGone):
                raise Disconnected() from None
            raise
        finally:  # from here on StreamingResponse listens for the disconnect itself
            watch.cancel()
        err = next((o for o in first if o.finish_reason == "error" and not o.token_ids), None)
        if err is not None:
            self._abandon(job, pending)
            raise HTTPError(503, f"{job.target.name}: {err.error}", code="expert_unavailable")
        opts = req.stream_options or {}
        usage = bool(opts.get("include_usage"))
        every = usage and bool(opts.get("continuous_usage_stats"))  # vLLM's: in every chunk
        return ClosingStream(self._events(job, pending, first, usage, every),
                             cleanup=lambda: self._abandon(job, pending),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})  # fmt: skip

    async def _events(self, job: _Job, pending: dict[str, _Choice], first, usage: bool,
                      every: bool = False):  # fmt: skip
        try:
            for c in job.choices:  # the role (chat) or the echoed prompt of every choice
                if job.kind == "chat" or c.sent:
                    yield _sse(self._with_usage(job, c, self._chunk(job, c, opening=True), every))
            batch = first
            quiet = time.monotonic()  # when the stream last sent something
            while True:
                for out in batch:
                    c = pending.get(out.request_id)
                    if c is None:
                        continue
                    self._observe(job, c, out)
                    if out.finished:
                        del pending[out.request_id]
                    if out.finish_reason == "error":
                        yield _sse(error_body(500, f"{job.target.name}: {out.error}"))
                        yield "data: [DONE]\n\n"
                        return
                    if job.tool == ANY_TOOL and not out.finished:
                        continue  # several calls: sent whole, once the list is read
                    delta = self._delta(job, c, out)
                    content, thought, calls = c.sent, "", []
                    if c.thinking is not None:  # the thinking, then the content
                        thought, content = c.thinking.feed(c.sent, out.finished)
                        thought = thought if job.show_reasoning else ""
                        content = content or ""
                        if c.tools is None:
                            delta, c.content_sent = content[c.content_sent :], len(content)
                    if c.tools is not None:  # tool_choice "auto": content, then calls
                        delta, calls = c.tools.feed(content, out.finished)
                        if out.finished and c.tools.calls:
                            c.finish = _called(c.finish)
                    lp = self._stream_logprobs(job, c)
                    if delta or calls or thought or out.finished or lp is not None:
                        k = len(c.tools.calls) - len(calls) if calls else 0
                        chunk = self._chunk(job, c, text=delta, finish=c.finish, lp=lp,
                                            calls=[(k + i, call) for i, call in
                                                   enumerate(calls)], thought=thought)  # fmt: skip
                        yield _sse(self._with_usage(job, c, chunk, every))
                        quiet = time.monotonic()
                if not pending:
                    break
                if time.monotonic() - quiet > KEEPALIVE_S:  # (a long tool call held back:
                    yield ": keep-alive\n\n"  # a comment, so that proxies keep the stream)
                    quiet = time.monotonic()
                batch = await job.collector.get()
            if usage:
                yield _sse({**self._head(job, chunk=True), "choices": [],
                            "usage": self._usage(job)})  # fmt: skip
            yield "data: [DONE]\n\n"
        finally:  # client gone (cancelled here) or an error: free them now
            self._abandon(job, pending)

    @staticmethod
    def _with_usage(job: _Job, c: _Choice, chunk: dict, every: bool) -> dict:
        """With vLLM's continuous_usage_stats, each chunk carries its choice's usage so far."""
        if every:
            prompt = len(job.prompt_tokens[c.prompt])
            chunk["usage"] = {"prompt_tokens": prompt, "completion_tokens": c.tokens,
                              "total_tokens": prompt + c.tokens}  # fmt: skip
        return chunk

    def _abandon(self, job: _Job, pending: dict[str, _Choice]) -> None:
        for rid in list(pending):
            self.aengine.abort(rid)
            self.metrics.requests.labels(job.target.name, "abort").inc()
        pending.clear()

    # formatting --------------------------------------------------------------------------

    def _observe(self, job: _Job, c: _Choice, out: RequestOutput) -> None:
        now = time.perf_counter()
        m, name = self.metrics, job.target.name
        n_new = 0 if job.score_only else len(out.new_token_ids)
        if n_new:
            if c.tokens == 0:
                m.ttft.labels(name).observe(now - c.started)
            elif c.last is not None:
                m.itl.labels(name).observe((now - c.last) / n_new)
            c.tokens += n_new
            c.last = now
            m.generation_tokens.labels(name).inc(n_new)
        if not job.score_only:
            c.lps.extend(out.new_logprobs)
            c.ids.extend(out.new_token_ids)
        if c.plps is None and out.prompt_logprobs is not None:
            c.plps = out.prompt_logprobs
        if out.finished:
            c.finish = {"abort": "abort", "error": "error"}.get(out.finish_reason,
                                                                out.finish_reason)  # fmt: skip
            if job.tool_required and c.finish == "stop":  # (OpenAI's and vLLM's reason)
                c.finish = "tool_calls"
            m.requests.labels(name, out.finish_reason).inc()
            m.e2e.labels(name).observe(now - c.started)
            c.out = out

    def _delta(self, job: _Job, c: _Choice, out: RequestOutput) -> str:
        """New text safe to send: not a partial UTF-8 character and not what could still turn
        out to be the start of a stop string (vLLM holds those back the same way)."""
        text = (job.prompt_texts[c.prompt] if job.echo else "") + _generated(job, out)
        if not out.finished:
            text = text.rstrip("\ufffd")
            hold = max((len(s) for s in job.stops), default=1) - 1
            if hold:
                text = text[: max(len(c.sent), len(text) - hold)]
        if len(text) <= len(c.sent):
            return ""
        # (a tokenizer that re-decodes earlier text differently cannot unsend it: the rest
        # still goes out, so that no generated text is dropped)
        delta, c.sent = text[len(c.sent) :], text
        return delta

    def _head(self, job: _Job, chunk: bool) -> dict:
        obj = {"chat": "chat.completion", "completion": "text_completion"}[job.kind]
        if chunk and job.kind == "chat":
            obj += ".chunk"
        head = {"id": job.id, "object": obj, "created": job.created, "model": job.target.name}
        if job.target.route is not None:
            head["routing"] = job.target.route
        return head

    def _entries(self, job: _Job, c: _Choice, start: int) -> list:
        """(token id, Logprob | None) of a completion choice from `start` (−1: with the
        prompt's, when echoed)."""
        out = []
        if start < 0:
            if job.echo and c.plps is not None:
                out += list(zip(job.prompt_tokens[c.prompt], c.plps))
            start = 0
        return out + [(lp.token_id, lp) for lp in c.lps[start:]]

    def _stream_logprobs(self, job: _Job, c: _Choice) -> dict | None:
        start = max(0, c.lp_sent) if job.kind == "chat" else c.lp_sent  # chat: no prompt's
        if job.logprobs is None or start == len(c.lps):
            return None
        if job.kind == "chat":
            lp = job.logprobs.chat(c.lps[max(0, c.lp_sent) :])
        else:
            entries = self._entries(job, c, c.lp_sent)
            lp = job.logprobs.completion(entries, c.lp_offset)
            c.lp_offset += sum(len(t) for t in lp["tokens"])
        c.lp_sent = len(c.lps)
        return lp

    def _choice_logprobs(self, job: _Job, c: _Choice) -> dict | None:
        if job.logprobs is None:
            return None
        if job.kind == "chat":
            return job.logprobs.chat(c.lps)
        return job.logprobs.completion(self._entries(job, c, -1), 0)

    def _chunk(self, job: _Job, c: _Choice, text: str = "", finish=None, opening=False,
               lp: dict | None = None, calls: list[tuple[int, ToolCall]] = (),
               thought: str = ""):  # fmt: skip
        if job.kind == "chat":
            delta = {"role": "assistant", "content": ""} if opening else {"content": text}
            if calls or (thought and not text):  # (no empty content beside them)
                delta = {"content": text} if text else {}
            if thought:  # the thinking (vLLM's reasoning_content, and its newer name)
                delta["reasoning_content"] = delta["reasoning"] = thought
            if calls:  # tool_choice "auto": each call whole, once complete
                delta["tool_calls"] = [{"index": k, **_call_json(job, c, k, call)}
                                       for k, call in calls]  # fmt: skip
            if job.tool == ANY_TOOL:  # the calls, whole, with the finish
                if not opening:
                    msg = _tool_message(job, c, _generated(job, c.out) if c.out else "")
                    calls = msg["tool_calls"]
                    delta = {"tool_calls": [{"index": k, **call} for k, call in enumerate(calls)]}
                    if not calls:  # cut short: its text
                        delta = {"content": msg["content"]}
            elif job.tool is not None:  # the arguments stream as the tool call's
                call = {"index": 0, "function": {"arguments": text}}
                if opening:
                    call = {"index": 0, "id": _call_id(job, c), "type": "function",
                            "function": {"name": job.tool, "arguments": ""}}  # fmt: skip
                delta = {**delta, "tool_calls": [call]} if opening else {"tool_calls": [call]}
            choice = {"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": finish}
        else:
            if opening:
                text = c.sent  # the echoed prompt, or nothing
            choice = {"index": c.index, "text": text, "logprobs": lp, "finish_reason": finish}
        if finish is not None and c.out is not None and c.out.stop_reason is not None:
            choice["stop_reason"] = c.out.stop_reason
        head = self._head(job, chunk=True)
        if job.token_ids:  # vLLM's: the prompt's ids with the first chunk, then each new id
            if c.ids_sent < 0:
                prompt = job.prompt_tokens[c.prompt]
                if job.kind == "chat":  # (one prompt: at the top level, as in the body, once)
                    if c.index == 0:
                        head["prompt_token_ids"] = prompt
                else:
                    choice["prompt_token_ids"] = prompt
            start = max(c.ids_sent, 0)
            choice["token_ids"] = c.ids[start:]
            c.ids_sent = len(c.ids)
        return {**head, "choices": [choice]}

    def _body(self, job: _Job) -> dict:
        choices = []
        for c in job.choices:
            text = (job.prompt_texts[c.prompt] if job.echo else "") + _generated(job, c.out)
            base = {"index": c.index, "logprobs": self._choice_logprobs(job, c),
                    "finish_reason": c.finish, "stop_reason": c.out.stop_reason}  # fmt: skip
            if job.kind == "chat" and job.tool is not None:  # vLLM's shape for a named call
                base["message"] = _tool_message(job, c, text)
            elif job.kind == "chat":
                base["message"] = msg = _message(job, c, text)
                if msg.get("tool_calls"):
                    base["finish_reason"] = _called(c.finish)
            else:
                base["text"] = text
            if job.prompt_lp is not None and job.kind == "completion":
                base["prompt_logprobs"] = self._prompt_logprobs(job, c)
            if job.token_ids:  # vLLM's return_token_ids
                if job.kind == "completion":
                    base["prompt_token_ids"] = job.prompt_tokens[c.prompt]
                base["token_ids"] = list(c.ids)
            choices.append(base)
        body = {**self._head(job, chunk=False), "choices": choices}
        if job.prompt_lp is not None and job.kind == "chat":  # (one prompt: vLLM's top level)
            body["prompt_logprobs"] = self._prompt_logprobs(job, job.choices[0])
        if job.token_ids and job.kind == "chat":
            body["prompt_token_ids"] = job.prompt_tokens[0]
        return {**body, "usage": self._usage(job)}

    @staticmethod
    def _prompt_logprobs(job: _Job, c: _Choice) -> list | None:
        if c.plps is None:
            return None
        return job.prompt_lp.prompt(job.prompt_tokens[c.prompt], c.plps, job.prompt_k)

    @staticmethod
    def _usage(job: _Job) -> dict:
        prompt = sum(len(p) for p in job.prompt_tokens)
        completion = sum(c.tokens for c in job.choices)
        # prompt tokens served from the prefix cache, as OpenAI reports them: each prompt's
        # first choice (its others, admitted in the same step, compute it beside it)
        firsts = {c.prompt: c for c in reversed(job.choices)}.values()
        cached = sum(c.out.num_cached_tokens for c in firsts if c.out is not None)
        usage = {"prompt_tokens": prompt, "completion_tokens": completion,
                 "total_tokens": prompt + completion,
                 "prompt_tokens_details": {"cached_tokens": cached}}  # fmt: skip
        if job.count_thinking is not None:  # (a reasoning parser split the answers)
            thinking = sum(job.count_thinking(c.ids) for c in job.choices)
            usage["completion_tokens_details"] = {"reasoning_tokens": thinking}
        return usage


class Disconnected(Exception):
    """The client went away before its answer was sent."""


class ClosingStream(StreamingResponse):
    """Closes its event generator when the response ends, however it ends (a disconnect
    cancels the response while the generator may sit at a `yield`): its clean-up — aborting
    the requests — runs now, not when the garbage collector gets to it; and `cleanup` runs
    too, for a client gone before the generator started (closing an unstarted generator runs
    none of its code)."""

    def __init__(self, content, cleanup=None, **kwargs):
        super().__init__(content, **kwargs)
        self.cleanup = cleanup or (lambda: None)

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            self.cleanup()


def _watch_disconnect(http: Request, collector: OutputCollector) -> asyncio.Task:
    """A task that closes `collector` when the client disconnects (the body is read already,
    so the next ASGI message is the disconnect)."""

    async def watch():
        while True:
            msg = await http.receive()
            if msg["type"] == "http.disconnect":
                collector.close()
                return

    return asyncio.ensure_future(watch())


def _adder(entries, target: Target, req):
    """add_all(engine) for AsyncEngine.submit: each (request id, prompt, SamplingParams) of
    `entries` added for the target's expert, all or none."""

    def add_all(engine: Engine) -> list[str]:
        added = []
        try:
            for rid, prompt, params in entries:
                added.append(engine.add_request(prompt, target.expert, params, rid,
                                                priority=req.priority,
                                                cache_salt=req.cache_salt))  # fmt: skip
        except Exception:
            for rid in added:
                engine.abort(rid)
            raise
        return added

    return add_all


def _generated(job: _Job, out: RequestOutput) -> str:
    return "" if job.score_only else out.text or ""


def _call_id(job: _Job, c: _Choice, k: int = 0) -> str:
    """A call's id, unique in the server's answers. Mistral's chat templates refuse a later
    turn whose call ids are not 9 letters or digits: a server reading Mistral's calls gives
    every call such an id (vLLM's)."""
    cid = f"call-{job.id.rsplit('-', 1)[-1][:16]}-{c.index}" + (f"-{k}" if k else "")
    return hashlib.sha256(cid.encode()).hexdigest()[:9] if job.short_call_ids else cid


def _message(job: _Job, c: _Choice, text: str) -> dict:
    """A chat answer's assistant message: with a reasoning parser its thinking apart
    (reasoning_content, and vLLM's newer name reasoning; content None when it has none), with
    tool_choice "auto" the calls read out of its content."""
    msg: dict = {"role": "assistant", "content": text}
    if job.reasoning is not None:
        thought, msg["content"] = split(job.reasoning, text)
        if job.show_reasoning:
            msg["reasoning_content"] = msg["reasoning"] = thought
    if job.parser is not None and msg["content"] is not None:
        msg["content"], calls = extract(job.parser, msg["content"])
        if calls:
            msg["tool_calls"] = [_call_json(job, c, k, call) for k, call in enumerate(calls)]
    return msg


def _call_json(job: _Job, c: _Choice, k: int, call: ToolCall) -> dict:
    """A call read by tool_choice "auto"'s parser, as OpenAI's tool_calls entry."""
    return {"id": _call_id(job, c, k), "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}  # fmt: skip


def _called(finish: str | None) -> str | None:
    """An answer that called tools and ended by itself ends "tool_calls" (vLLM's and
    OpenAI's reason); one cut short keeps "length", so that the client knows."""
    return "tool_calls" if finish == "stop" else finish


def _tool_message(job: _Job, c: _Choice, text: str) -> dict:
    """The assistant message of a forced tool call: the named function with `text` as its
    arguments, or ("required" over several tools) each call of the JSON list `text` holds;
    an answer cut short (max_tokens) that is not JSON yet stays as its text."""
    if job.tool != ANY_TOOL:
        calls = [(job.tool, text)]
    else:
        try:
            calls = [(call["name"], json_text(call["parameters"])) for call in json.loads(text)]
        except (ValueError, TypeError, KeyError):
            return {"role": "assistant", "content": text, "tool_calls": []}
    return {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": _call_id(job, c, k),
                "type": "function",
                "function": {"name": name, "arguments": args},
            }
            for k, (name, args) in enumerate(calls)
        ],
    }


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
