"""The OpenAI request bodies the server accepts (vLLM's fields and defaults), and what they map to.

Fields OpenAI or vLLM define that the engine cannot honour (a suffix, regex or grammar
constraints, tool_choice "auto" on a server without a tool-call parser) are refused with a 400
that names them only when they would change the answer: a default value (`tools: []`,
`response_format: {"type": "text"}`) is accepted. Structured outputs come as OpenAI's
`response_format` (json_object, json_schema) or vLLM's `structured_outputs` / `guided_json` /
`guided_choice`; tools as a named function or "required" (the answer held to the parameters)
or "auto" (the answer read by the server's tool-call parser). Sampling follows vLLM's
parameters, penalties, logit_bias, min_tokens, min_p, allowed_token_ids and bad_words
included. Unknown fields are ignored,
as vLLM does, so clients written for other servers keep working.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, PrivateAttr, model_validator

from expertswitch.engine import SamplingParams, StructuredOutputsParams
from expertswitch.engine.beam import MAX_BEAM_WIDTH
from expertswitch.errors import ConfigError
from expertswitch.server.errors import HTTPError
from expertswitch.server.tool_parsers import TOOL_PARSERS


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _nulls_mean_defaults(cls, data):
        """`"n": null` and the like mean the default (clients send them; vLLM accepts them)."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in _DEFAULTED}
        return data

    model: str | None = None  # (vLLM's: left out, the base)
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    n: int = 1
    best_of: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    min_tokens: int = 0
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    min_p: float | None = None
    prompt_logprobs: int | None = None  # vLLM's: the prompt tokens' logprobs and top k
    # vLLM's: the prompt's and the answer's token ids beside the text (streamed: the prompt's
    # in the first chunk, each chunk its new ids)
    return_token_ids: bool = False
    # vLLM's: logprobs name tokens "token_id:N" instead of their text
    return_tokens_as_token_ids: bool = False
    allowed_token_ids: list[int] | None = None  # vLLM's: only these may be sampled
    # vLLM's: the prompt cut to its last k tokens (−1: to the context)
    truncate_prompt_tokens: int | None = None
    bad_words: list[str] | None = None  # vLLM's: words banned (engine/sampling.py)
    use_beam_search: bool = False  # vLLM's: n beams (engine/beam.py), each a choice
    length_penalty: float = 1.0  # vLLM's: a beam's score = logprob / length^length_penalty
    logits_processors: list[Any] | None = None  # vLLM's (refused: not implemented)
    user: str | None = None
    priority: int = 0  # vLLM's: lower runs first (the server's --scheduling-policy priority)
    cache_salt: str | None = None  # vLLM's: prefix-cache blocks shared only under this salt
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None  # vLLM's (json, json_object, choice, ...)
    guided_json: dict[str, Any] | str | None = None  # vLLM's older names
    guided_choice: list[str] | None = None
    guided_regex: str | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    add_special_tokens: bool = True  # vLLM's: the tokenizer's BOS and such around the text
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = None


class ChatCompletionRequest(_Request):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    add_generation_prompt: bool = True
    # vLLM's: special tokens added around the rendered template (it writes its own: off)
    add_special_tokens: bool = False
    # vLLM's: the last (assistant) message is left open for the answer to continue
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    include_reasoning: bool = True  # vLLM's: false drops the thinking (a reasoning parser's)
    # the server's tool-call parser (--tool-call-parser), set by the server before any check:
    # with one, tools with tool_choice "auto" (or unset, vLLM's default then) leave the
    # model to call them or not, and its answer is parsed for calls
    _tool_parser: str | None = PrivateAttr(default=None)
    # tools without a tool_choice on a server without a parser: answered freely (the
    # Responses API's follow-up turns, as before) rather than refused as chat's implied "auto"
    _free_without_parser: bool = PrivateAttr(default=False)


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a prompt, or chat messages rendered by the chat template."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    # vLLM's: the tokenizer's BOS and such: by default added to a prompt, not around messages
    # (the template writes its own)
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    """vLLM's /detokenize."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    tokens: list[int]


class ExpertLoad(BaseModel):
    name: str
    path: str
    pin: bool = False


class ExpertName(BaseModel):
    name: str


MAX_N = 128  # OpenAI's own limit on `n`
_DEFAULTED = {"n", "stream", "echo", "ignore_eos", "include_stop_str_in_output",
              "skip_special_tokens", "min_tokens", "add_generation_prompt",
              "include_reasoning", "continue_final_message", "return_token_ids",
              "return_tokens_as_token_ids", "add_special_tokens", "use_beam_search",
              "priority", "length_penalty"}  # fmt: skip


def refuse_unsupported(req: _Request) -> None:
    """400 for options that would change the answer in ways the engine does not implement."""
    unsupported = {}
    if isinstance(req, CompletionRequest):
        unsupported["suffix"] = bool(req.suffix)
    else:
        assert isinstance(req, ChatCompletionRequest)
        if req.top_logprobs and not req.logprobs:
            raise HTTPError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        forced_tool(req)  # (a 400 for a tool choice it cannot hold the answer to)
    unsupported["guided_whitespace_pattern"] = req.guided_whitespace_pattern is not None
    unsupported["logits_processors"] = bool(req.logits_processors)
    extra = req.model_extra or {}  # (vLLM's fields that change its answer, not served here)
    if isinstance(req, ChatCompletionRequest):
        unsupported["echo"] = bool(extra.get("echo"))
    for name in ("logprob_token_ids", "thinking_token_budget", "repetition_detection"):
        unsupported[name] = extra.get(name) not in (None, False, [], {})
    k = req.truncate_prompt_tokens
    if k is not None and (isinstance(k, bool) or not (k == -1 or k >= 1)):
        raise HTTPError(400, f"truncate_prompt_tokens must be a positive number of tokens (or "
                        f"-1: the context), got {k}", param="truncate_prompt_tokens")  # fmt: skip
    if req.prompt_logprobs is not None and req.stream:
        raise HTTPError(400, "prompt_logprobs is not available with stream: true (vLLM's "
                        "rule); ask without streaming", param="prompt_logprobs")  # fmt: skip
    if req.use_beam_search:
        beam_search_limits(req)
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise HTTPError(400, f"{bad[0]} is not supported by this server; leave it out (or at "
                        "its default) and try again", param=bad[0])  # fmt: skip
    if not 1 <= req.n <= MAX_N:
        raise HTTPError(400, f"n must be between 1 and {MAX_N}, got {req.n}", param="n")
    if req.best_of not in (None, req.n):
        raise HTTPError(400, "best_of is not supported unless it equals n", param="best_of")


def beam_search_limits(req: _Request) -> None:
    """A 400 for what beam search does not apply (vLLM's search ignores these; here they are
    refused rather than silently dropped): streaming, logprobs, stop conditions other than
    EOS, sampling filters, penalties and constraints."""
    chat = isinstance(req, ChatCompletionRequest)
    checks = {
        "stream": req.stream, "logprobs": bool(req.logprobs) if chat else req.logprobs is not None,
        "prompt_logprobs": req.prompt_logprobs is not None,
        "echo": not chat and req.echo, "stop": bool(req.stop),
        "stop_token_ids": bool(req.stop_token_ids), "min_tokens": req.min_tokens > 0,
        "top_p": req.top_p is not None and req.top_p < 1,
        "top_k": req.top_k is not None and req.top_k not in (0, -1),
        "min_p": bool(req.min_p), "presence_penalty": bool(req.presence_penalty),
        "frequency_penalty": bool(req.frequency_penalty),
        "repetition_penalty": req.repetition_penalty not in (None, 1, 1.0),
        "logit_bias": bool(req.logit_bias), "bad_words": bool(req.bad_words),
        "allowed_token_ids": req.allowed_token_ids is not None,
        "response_format": (req.response_format or {}).get("type", "text") != "text",
        "structured_outputs": req.structured_outputs is not None,
        "guided_json": req.guided_json is not None, "guided_choice": req.guided_choice is not None,
        "guided_regex": req.guided_regex is not None,
        "tool_choice": chat and bool(req.tools) and req.tool_choice not in (None, "none", "auto"),
    }  # fmt: skip
    bad = [k for k, v in checks.items() if v]
    if bad:
        raise HTTPError(400, f"{bad[0]} is not available with use_beam_search (beam search "
                        "ranks whole answers by their logprobs: it streams nothing and "
                        "applies no stop string, sampling filter, penalty or constraint); "
                        f"leave it out or turn beam search off", param=bad[0])  # fmt: skip
    if not 1 <= req.n <= MAX_BEAM_WIDTH:
        raise HTTPError(400, f"with use_beam_search, n is the beam width: from 1 to "
                        f"{MAX_BEAM_WIDTH}, got {req.n}", param="n")  # fmt: skip


ANY_TOOL = ""  # forced_tool's name for "required" over several tools


def auto_tools(req: _Request) -> bool:
    """Whether the model's answer is read for tool calls by the server's parser (tools given,
    tool_choice "auto" or left out — not an explicit null, as in vLLM — and a parser on the
    server)."""
    if not isinstance(req, ChatCompletionRequest) or not req.tools or req._tool_parser is None:
        return False
    return req.tool_choice == "auto" or "tool_choice" not in req.model_fields_set


def tool_choice_required(req: _Request) -> bool:
    """tool_choice "required" with tools: a whole answer ends with "tool_calls"."""
    return isinstance(req, ChatCompletionRequest) and bool(req.tools) \
        and req.tool_choice == "required"  # fmt: skip


def forced_tool(req: ChatCompletionRequest) -> tuple[str, dict] | None:
    """(name, parameters schema) of the function a chat request makes the model call
    (tool_choice naming a function, or "required" with one tool: the answer is held to its
    parameters, as vLLM does); (ANY_TOOL, schema) for "required" over several tools (the
    answer is a JSON list of {"name", "parameters"} calls, each held to its function's
    parameters: vLLM's schema; streamed whole, in the last chunk); None when the model
    answers freely (no tools, tool_choice "none", or tools left to the model's choice: with
    tool_choice unset, or "auto" — which needs the server's tool-call parser to read the
    calls, else a 400 says how to start the server)."""
    choice, tools = req.tool_choice, req.tools or []
    named: dict[str, dict] = {}
    for t in tools:  # (checked whatever the choice: templates and parsers read them)
        fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise HTTPError(400, 'each tool is {"type": "function", "function": {"name": ..., '
                            '"parameters": {...}}}', param="tools")  # fmt: skip
        if fn["name"] in named:
            raise HTTPError(400, f"two tools are named {fn['name']!r}: tool names must differ",
                            param="tools")  # fmt: skip
        named[fn["name"]] = _parameters(fn["name"], fn.get("parameters"))
    if choice is None and tools and "tool_choice" not in req.model_fields_set:
        # (left out beside tools: vLLM's "auto"; an explicit null: none)
        choice = None if req._free_without_parser and req._tool_parser is None else "auto"
    if not tools or choice in (None, "none"):
        if isinstance(choice, dict) or choice == "required":
            raise HTTPError(400, "tool_choice names a tool but tools is empty: give the tools",
                            param="tool_choice")  # fmt: skip
        return None
    if choice == "required":
        if len(named) == 1:
            return next(iter(named.items()))
        return ANY_TOOL, _calls_schema(named)
    if isinstance(choice, dict):
        fn = choice.get("function") if choice.get("type") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or name not in named:
            raise HTTPError(400, f"tool_choice names function {name!r}, which is not among the "
                            f"tools ({', '.join(named)}); write "
                            '{"type": "function", "function": {"name": ...}}',
                            param="tool_choice")  # fmt: skip
        return name, named[name]
    if choice == "auto" and req._tool_parser is not None:
        return None
    if choice == "auto":  # (given, or left out beside tools: vLLM's default then)
        said = "" if "tool_choice" in req.model_fields_set else " (the default with tools)"
        raise HTTPError(400, f'tool_choice "auto"{said} needs a tool-call parser for this '
                        "model: start the server with --enable-auto-tool-choice "
                        f"--tool-call-parser NAME ({', '.join(TOOL_PARSERS)}), or name the "
                        'function to call, or use "required" or "none"',
                        param="tool_choice")  # fmt: skip
    raise HTTPError(400, f"tool_choice {choice!r} is not one of \"none\", \"auto\", "
                    '"required" or {"type": "function", "function": {"name": ...}}',
                    param="tool_choice")  # fmt: skip


def _parameters(name: str, params) -> dict:
    """A tool's parameters schema for its arguments: no parameters means none (an empty
    object, as OpenAI documents it); a schema without a type is an object's."""
    if params is None or params == {}:
        return {"type": "object", "properties": {}}
    if not isinstance(params, dict):
        raise HTTPError(400, f"tool {name!r}: parameters must be a JSON schema object",
                        param="tools")  # fmt: skip
    if not {"type", "$ref", "anyOf", "oneOf", "allOf", "enum", "const"} & set(params):
        params = {**params, "type": "object"}
    return params


def _calls_schema(named: dict[str, dict]) -> dict:
    """vLLM's schema for "required" over several tools: a list of {"name", "parameters"}
    calls, each held to its own function's parameters. Each tool's $defs / definitions move
    to the top, where its references ("#/$defs/Name") then point."""
    defs: dict[str, dict] = {}
    calls = []
    for name, params in named.items():
        params = dict(params)
        if '"$ref": "#"' in json.dumps(params):
            raise HTTPError(400, f"tool {name!r}: a $ref to the whole schema ('#') cannot be "
                            'resolved beside other tools; name the function to call',
                            param="tools")  # fmt: skip
        for key in ("$defs", "definitions"):
            for d, schema in (params.pop(key, None) or {}).items():
                if defs.setdefault(key, {}).setdefault(d, schema) != schema:
                    raise HTTPError(400, f"tools define {key}/{d} differently: rename one",
                                    param="tools")  # fmt: skip
        calls.append({"type": "object", "properties": {"name": {"enum": [name]},
                                                       "parameters": params},
                      "required": ["name", "parameters"]})  # fmt: skip
    return {"type": "array", "minItems": 1, "items": {"anyOf": calls}, **defs}


def logprob_counts(req: _Request) -> tuple[int | None, int | None]:
    """(logprobs, prompt_logprobs) for the engine: how many top tokens per generated / prompt
    token (None: not asked). Prompt logprobs come with a completion's echo, or vLLM's
    prompt_logprobs (the more of the two)."""
    asked = req.prompt_logprobs
    if isinstance(req, CompletionRequest):
        echoed = req.logprobs if req.echo and req.logprobs is not None else None
        both = [k for k in (echoed, asked) if k is not None]
        return req.logprobs, (max(both) if both else None)
    assert isinstance(req, ChatCompletionRequest)
    return ((req.top_logprobs or 0) if req.logprobs else None), asked


_UNSET = object()

# generation_config.json's keys that are requests' sampling defaults (vLLM's
# --generation-config auto), with OpenAI's neutral values where the file has none
GENERATION_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
                       "repetition_penalty": 1.0}  # fmt: skip


def generation_defaults(folder) -> dict:
    """The sampling defaults a checkpoint folder's generation_config.json sets (those of
    GENERATION_DEFAULTS it has; none without the file), and its max_new_tokens as
    "max_tokens": as vLLM reads it, a limit on every request's output (the server's
    `_serve`). A file that is not JSON, or a value that is not a number, is a ConfigError
    naming it and the way round it."""
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        if not Path(folder).is_dir():
            raise ConfigError(f"--generation-config {folder}: no such folder (give auto, vllm, "
                              "or a folder with a generation_config.json)")  # fmt: skip
        return {}
    fix = "fix the file, or start the server with --generation-config vllm (neutral defaults)"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e}): {fix}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path} is not a JSON object: {fix}")
    out = {}
    for key in [*GENERATION_DEFAULTS, "max_new_tokens"]:
        v = cfg.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ConfigError(f"{path}: {key} is {v!r}, not a number: {fix}")
        if key == "max_new_tokens":
            if v != int(v) or v < 1:
                raise ConfigError(f"{path}: max_new_tokens is {v!r}, not a positive whole "
                                  f"number: {fix}")  # fmt: skip
            out["max_tokens"] = int(v)
        else:
            out[key] = int(v) if key == "top_k" else float(v)
    return out


def sampling_params(req: _Request, max_tokens: int, choice: int, structured=_UNSET,
                    defaults: dict | None = None) -> SamplingParams:  # fmt: skip
    """The engine's SamplingParams for choice `choice` of `req` (ConfigError when invalid).
    A seeded request with n > 1 seeds its choices seed, seed+1, ... so they differ.
    structured: the request's `structured_outputs(req)`, when the caller has it already (the
    same for every choice). defaults: the model's sampling defaults (`generation_defaults`)
    for the fields the request leaves out (vLLM's order: the request's, the model's, then
    OpenAI's)."""
    d = {**GENERATION_DEFAULTS, **(defaults or {})}

    def pick(key):
        v = getattr(req, key)
        return d[key] if v is None else v

    seed = None if req.seed is None else (req.seed + choice) % 2**63
    logprobs, prompt_logprobs = logprob_counts(req)
    if isinstance(req, ChatCompletionRequest) and choice:
        prompt_logprobs = None  # (one prompt: its first choice scores it, for the answer)
    return SamplingParams(
        temperature=pick("temperature"),
        top_p=pick("top_p"),
        top_k=pick("top_k"),
        seed=seed,
        max_tokens=max_tokens,
        stop=req.stop or [],
        stop_token_ids=req.stop_token_ids or [],
        ignore_eos=req.ignore_eos,
        include_stop_str_in_output=req.include_stop_str_in_output,
        # (hermes and mistral calls are read with special tokens kept, as vLLM reads them:
        # some of those models' markers are special tokens)
        skip_special_tokens=req.skip_special_tokens
        and not (auto_tools(req) and TOOL_PARSERS[req._tool_parser].keeps_special_tokens),
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=pick("repetition_penalty"),
        logit_bias=_logit_bias(req.logit_bias),
        allowed_token_ids=req.allowed_token_ids,
        bad_words=req.bad_words,
        min_tokens=req.min_tokens,
        min_p=pick("min_p"),
        structured_outputs=structured_outputs(req) if structured is _UNSET else structured,
    )


def structured_outputs(req: _Request) -> StructuredOutputsParams | None:
    """The request's constraint on its answer, from whichever field names it (one at most):
    OpenAI's response_format, vLLM's structured_outputs, guided_json, guided_choice,
    guided_regex or guided_grammar (the last two refused)."""
    asked = {}
    fmt = req.response_format
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "json_object":
            asked["response_format"] = {"json_object": True}
        elif kind == "json_schema":
            spec = fmt.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if schema is None:
                raise HTTPError(400, "response_format of type json_schema needs json_schema: "
                                '{"name": ..., "schema": {...}}',
                                param="response_format")  # fmt: skip
            asked["response_format"] = {"json": schema}
        elif kind != "text":
            said = "has no type" if kind is None else f"type {kind!r} is not supported"
            raise HTTPError(400, f"response_format {said}: use text, json_object or "
                            "json_schema", param="response_format")  # fmt: skip
    tool = forced_tool(req) if isinstance(req, ChatCompletionRequest) else None
    if tool is not None:
        asked["tool_choice"] = {"json": tool[1]}
    if req.structured_outputs is not None:
        asked["structured_outputs"] = dict(req.structured_outputs)
        if "reasoning_end" in asked["structured_outputs"]:
            raise HTTPError(400, "structured_outputs.reasoning_end is the server's to set (its "
                            "--reasoning-parser): leave it out",
                            param="structured_outputs")  # fmt: skip
    for name, key in (("guided_json", "json"), ("guided_choice", "choice"),
                      ("guided_regex", "regex"), ("guided_grammar", "grammar")):  # fmt: skip
        if getattr(req, name) is not None:
            asked[name] = {key: getattr(req, name)}
    if len(asked) > 1:
        raise HTTPError(400, f"{' and '.join(asked)} both constrain the answer: give one",
                        param=next(iter(asked)))  # fmt: skip
    if not asked:
        return None
    ((name, fields),) = asked.items()
    try:
        return StructuredOutputsParams(**fields)
    except TypeError:
        raise HTTPError(400, f"{name} takes json, json_object or choice (and whitespace); got "
                        f"{sorted(fields)}", param=name) from None  # fmt: skip
    except ConfigError as e:
        raise HTTPError(400, f"{name}: {e}", param=name) from None


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's logit_bias keys are token ids as JSON strings ("50256"): 400 for any other."""
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit()):
            raise HTTPError(400, f"logit_bias key {key!r} is not a token id: its keys are "
                            "token ids as strings, e.g. {\"50256\": -100}",
                            param="logit_bias")  # fmt: skip
        if int(key) in out:
            raise HTTPError(400, f"logit_bias names token {int(key)} twice", param="logit_bias")
        out[int(key)] = value
    return out


def chat_messages(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """OpenAI chat messages → [{"role", "content": text}] for a chat template. Content may be
    a string or a list of text parts; anything else is a 400 naming the message."""
    if not messages:
        raise HTTPError(400, "messages is empty: give at least one message", param="messages")
    out = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            raise HTTPError(400, f"messages[{i}] has no role", param="messages")
        if isinstance(content, list):
            parts = []
            for p in content:
                if not isinstance(p, dict) or p.get("type") != "text" or \
                        not isinstance(p.get("text"), str):  # fmt: skip
                    kind = p.get("type") if isinstance(p, dict) else type(p).__name__
                    raise HTTPError(400, f"messages[{i}] has a content part of type {kind!r}; "
                                    "only text parts are supported", param="messages")  # fmt: skip
                parts.append(p["text"])
            content = "\n".join(parts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise HTTPError(400, f"messages[{i}].content must be a string or a list of text "
                            "parts", param="messages")  # fmt: skip
        msg = {"role": role, "content": content}
        for key in ("name", "tool_call_id"):
            if isinstance(m.get(key), str):
                msg[key] = m[key]
        if isinstance(m.get("tool_calls"), list):  # an earlier turn's calls, for templates
            msg["tool_calls"] = [_call_for_template(c) for c in m["tool_calls"]]
        thought = m.get("reasoning", m.get("reasoning_content"))
        if role == "assistant" and isinstance(thought, str):  # an earlier turn's thinking:
            msg["reasoning"] = msg["reasoning_content"] = thought  # (vLLM's, both names)
        out.append(msg)
    return out


def _call_for_template(call):
    """A tool call of an earlier assistant turn as chat templates read it (vLLM's): its
    arguments parsed from their JSON text."""
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        return call
    fn = dict(call["function"])
    if isinstance(fn.get("arguments"), str):
        with contextlib.suppress(ValueError, RecursionError):  # (else left as the text)
            fn["arguments"] = json.loads(fn["arguments"])
    return {**call, "function": fn}


def prompt_list(prompt) -> list[str | list[int]]:
    """A completion's `prompt` field → one entry per prompt (text or token ids)."""
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        prompts = [list(prompt)]
    else:
        prompts = list(prompt)
    if not prompts:
        raise HTTPError(400, "prompt is empty: give a string, a list of strings or token ids",
                        param="prompt")  # fmt: skip
    return prompts
