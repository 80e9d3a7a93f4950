"""OpenAI's Responses API (`POST /v1/responses`, `GET` / `DELETE /v1/responses/{id}`), as vLLM
serves it for chat models: a request is turned into the chat completion it means and served by
the chat path (templates, tools, tool-call and reasoning parsers, structured outputs, experts
and the router all apply alike); the answer comes back as Response output items.

    input         a string (one user message) or a list of items: messages (roles user,
                  system, developer — a system message here —, assistant; text parts),
                  function_call and function_call_output items (a tool round trip), reasoning
                  items (dropped, as chat templates drop past thinking)
    instructions  a system message before the rest (not carried into a follow-up, as OpenAI)
    tools         function tools ({"type": "function", "name", "parameters", ...}); tool_choice
                  "auto" / "none" / "required" / {"type": "function", "name"}
    text.format   text, json_object or json_schema: the answer held to it
    output        a reasoning item (with a reasoning parser), the message (output_text), a
                  function_call item per call; status "incomplete" when max_output_tokens cut it
    stream        the Responses events: response.created, .in_progress, each item's
                  .output_item.added, its deltas (output_text, reasoning_text,
                  function_call_arguments) and .done events, then response.completed (or
                  .incomplete, or .failed), each with a sequence_number
    store         (default true) the response is kept, in memory, for GET and for a later
                  request's previous_response_id (its conversation continues: the earlier
                  input and output before the new input, not its instructions); the oldest
                  are dropped beyond ServerConfig.responses_kept responses or
                  responses_kept_bytes of JSON

A last input item that is an assistant message in progress (status "in_progress" or
"incomplete") is continued, as vLLM does; reasoning.effort reaches the chat template as
reasoning_effort. What the engine cannot do is refused with a 400 naming it: images, files
and audio in the input, built-in tools (web search, file search, computer use, MCP...),
background mode, truncation "auto", logprobs (top_logprobs, include of
output_text.logprobs), stored conversations and prompts, max_tool_calls.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from expertswitch.server.errors import HTTPError
from expertswitch.server.protocol import ChatCompletionRequest
from expertswitch.server.serving import ClosingStream

log = logging.getLogger(__name__)

_TEXT_PARTS = ("input_text", "output_text", "text")
# vLLM's extra sampling fields, passed on to the chat request as they are
_PASSED = ("top_k", "min_p", "seed", "stop", "repetition_penalty", "presence_penalty",
           "frequency_penalty", "logit_bias", "min_tokens", "ignore_eos", "priority",
           "cache_salt", "chat_template_kwargs", "skip_special_tokens",
           "include_reasoning", "structured_outputs", "include_stop_str_in_output",
           "stop_token_ids", "bad_words", "allowed_token_ids", "guided_json",
           "guided_choice", "guided_regex", "guided_grammar")  # fmt: skip
# Responses fields that would change the answer but are not served: refused by name
_REFUSED = {"conversation": "conversations are not kept here: send previous_response_id or "
                            "the whole history as input",
            "prompt": "prompt templates are not kept here: send the input itself",
            "max_tool_calls": "a cap on tool calls is not enforced here: leave it out"}  # fmt: skip
_TOOL_CHOICES = ("auto", "none", "required")


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _nulls_mean_defaults(cls, data):
        if isinstance(data, dict):  # ("store": null and the like: the default)
            return {k: v for k, v in data.items() if v is not None}
        return data

    model: str | None = None  # (left out: the base)
    input: Any  # (a string or items: checked by _messages, in clearer words than pydantic's)
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    background: bool = False
    truncation: str | None = None
    include: list[str] | None = None
    top_logprobs: int | None = None
    user: str | None = None


class ResponseStore:
    """The responses kept for GET and previous_response_id: id → (response, conversation as
    chat messages after it), the oldest dropped beyond `limit` responses or `max_bytes` of
    their JSON."""

    def __init__(self, limit: int, max_bytes: int):
        self.limit, self.max_bytes = limit, max_bytes
        self._items: OrderedDict[str, tuple[dict, list[dict], int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, response: dict, conversation: list[dict]) -> None:
        size = len(json.dumps(response)) + len(json.dumps(conversation))
        with self._lock:
            self._items[response["id"]] = (response, conversation, size)
            self._bytes += size
            while self._items and (len(self._items) > self.limit or self._bytes > self.max_bytes):
                self._bytes -= self._items.popitem(last=False)[1][2]

    def get(self, rid: str, param: str | None = None) -> tuple[dict, list[dict]]:
        with self._lock:
            found = self._items.get(rid)
        if found is None:
            raise HTTPError(404, f"no response {rid!r} is kept here (unknown, deleted, made "
                            "with store false, or dropped as the oldest)", param=param,
                            code="response_not_found")  # fmt: skip
        return found[0], found[1]

    def delete(self, rid: str) -> None:
        with self._lock:
            found = self._items.pop(rid, None)
            if found is not None:
                self._bytes -= found[2]
        if found is None:
            self.get(rid)  # (its 404)


class Responses:
    def __init__(self, serving, limit: int, max_bytes: int):
        self.serving, self.store = serving, ResponseStore(limit, max_bytes)

    async def create(self, req: ResponsesRequest, http: Request):
        _refuse(req)
        req.model = req.model or self.serving.cfg.base_name  # (the Response names it)
        history = []
        if req.previous_response_id is not None:
            history = self.store.get(req.previous_response_id, "previous_response_id")[1]
        new, open_end = _messages(req.input)
        head = [{"role": "system", "content": req.instructions}] if req.instructions else []
        chat = _chat_request(req, head + history + new, open_end)
        answer = await self.serving.chat(chat, http)
        shell = _shell(req, f"resp_{uuid.uuid4().hex}")
        if req.stream:
            events = self._events(answer, shell, history, new, open_end, req.store)
            return ClosingStream(events, cleanup=answer.cleanup, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})  # fmt: skip
        body = json.loads(answer.body)
        choice = body["choices"][0]
        msg, finish = choice["message"], choice["finish_reason"]
        items = []
        if msg.get("reasoning_content"):
            items.append(_reasoning_item(msg["reasoning_content"]))
        # the text (an empty answer: an empty message), unless only thinking or calls came
        if msg.get("content") or not (msg.get("tool_calls") or items):
            items.append(_message_item(msg.get("content") or ""))
        items += [_call_item(c) for c in msg.get("tool_calls") or []]
        if finish == "length":
            _cut(items)["status"] = "incomplete"
        shell.update(_served(body))
        response = _finished(shell, items, finish, body["usage"])
        if req.store:
            self.store.put(response, history + _continued(new, items, open_end))
        return JSONResponse(response)

    async def _events(self, answer: StreamingResponse, shell: dict, history: list[dict],
                      new: list[dict], open_end: bool, store: bool):  # fmt: skip
        """The chat stream of `answer` as the Responses events (see the module)."""
        seq = iter(range(1 << 62))
        items: list[dict] = []  # the output items so far
        open_item: dict | None = None  # the one receiving text (a message or reasoning)
        calls: dict[int, dict] = {}  # the chat stream's tool call index → its item
        finish, usage, failed = None, None, None

        def event(kind: str, **fields) -> str:
            obj = {"type": kind, "sequence_number": next(seq), **fields}
            return f"event: {kind}\ndata: {json.dumps(obj, ensure_ascii=False)}\n\n"

        def where(item: dict) -> dict:
            return {"item_id": item["id"], "output_index": items.index(item)}

        def added(item: dict) -> str:
            items.append(item)
            return event("response.output_item.added", output_index=len(items) - 1,
                         item=item)  # fmt: skip

        def open_text(kind: str) -> list[str]:
            """A message (output_text) or reasoning (reasoning_text) item and its part."""
            nonlocal open_item
            out = close()
            maker = _message_item if kind == "message" else _reasoning_item
            open_item = maker("")
            part = open_item["content"].pop()
            open_item["status"] = "in_progress"
            out.append(added(open_item))
            open_item["content"].append(part)
            out.append(event("response.content_part.added", **where(open_item),
                             content_index=0, part=dict(part)))  # fmt: skip
            return out

        def close(status: str = "completed") -> list[str]:
            nonlocal open_item
            if open_item is None:
                return []
            item, open_item = open_item, None
            item["status"] = status
            part = item["content"][0]
            done = "output_text" if item["type"] == "message" else "reasoning_text"
            extra = {"logprobs": []} if item["type"] == "message" else {}
            return [event(f"response.{done}.done", **where(item), content_index=0,
                          text=part["text"], **extra),
                    event("response.content_part.done", **where(item), content_index=0,
                          part=part),
                    event("response.output_item.done", output_index=items.index(item),
                          item=item)]  # fmt: skip

        def text_delta(kind: str, delta: str) -> list[str]:
            out = []
            if open_item is None or open_item["type"] != kind:
                out += open_text(kind)
            open_item["content"][0]["text"] += delta
            extra = {"logprobs": []} if kind == "message" else {}
            name = "output_text" if kind == "message" else "reasoning_text"
            out.append(event(f"response.{name}.delta", **where(open_item), content_index=0,
                             delta=delta, **extra))  # fmt: skip
            return out

        def call_delta(call: dict) -> list[str]:
            out = []
            k = call.get("index", 0)
            fn = call.get("function") or {}
            if k not in calls:  # (a message stays open: text after the calls joins it,
                if open_item is not None and open_item["type"] == "reasoning":  # as in the
                    out += close()  # body, where the answer's text is one message)
                item = _call_item({"id": call.get("id"), "function": {
                    "name": fn.get("name", ""), "arguments": ""}})  # fmt: skip
                item["status"] = "in_progress"
                calls[k] = item
                out.append(added(item))
            item = calls[k]
            if fn.get("arguments"):
                item["arguments"] += fn["arguments"]
                out.append(event("response.function_call_arguments.delta", **where(item),
                                 delta=fn["arguments"]))  # fmt: skip
            return out

        yield event("response.created", response=shell)
        yield event("response.in_progress", response=shell)
        try:
            async for line in answer.body_iterator:
                if line.startswith(":"):  # (a keep-alive comment: passed on)
                    yield line
                    continue
                data = line.removeprefix("data: ").strip()
                if not data or data == "[DONE]":
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    failed = chunk["error"].get("message", "")
                    break
                shell.update(_served(chunk))
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices", []):
                    delta = choice.get("delta") or {}
                    out = []
                    if delta.get("reasoning_content"):
                        out += text_delta("reasoning", delta["reasoning_content"])
                    if delta.get("content"):
                        out += text_delta("message", delta["content"])
                    for call in delta.get("tool_calls") or []:
                        out += call_delta(call)
                    for e in out:
                        yield e
                    finish = choice.get("finish_reason") or finish
        except Exception as e:  # noqa: BLE001 - told to the client, which has its 200 already
            log.exception("a streamed response failed")
            failed = f"{type(e).__name__}: {e}"
        finally:  # (the chat stream's clean-up: its requests aborted if the client left;
            await answer.body_iterator.aclose()  # its cleanup too runs in ClosingStream)
        if failed is not None:
            error = {"code": "server_error", "message": failed}
            yield event(
                "response.failed",
                response={**shell, "status": "failed", "output": items, "error": error},
            )
            return
        if not items:  # (an empty answer: an empty message, as the body has)
            for e in open_text("message"):
                yield e
        cut = _cut(items) if finish == "length" else None
        for e in close("incomplete" if open_item is cut else "completed"):
            yield e
        for item in calls.values():
            item["status"] = "incomplete" if item is cut else "completed"
            yield event("response.function_call_arguments.done", **where(item),
                        arguments=item["arguments"])  # fmt: skip
            yield event("response.output_item.done", output_index=items.index(item), item=item)
        response = _finished(shell, items, finish, usage or {})
        if store:
            self.store.put(response, history + _continued(new, items, open_end))
        kind = "response.incomplete" if response["status"] == "incomplete" else \
            "response.completed"  # fmt: skip
        yield event(kind, response=response)


def _served(chunk: dict) -> dict:
    """What a chat body or chunk says of the model that answered (an expert the router
    chose for "auto"), for the Response."""
    out = {"model": chunk["model"]} if "model" in chunk else {}
    if "routing" in chunk:
        out["routing"] = chunk["routing"]
    return out


def _sendable(obj, where: str) -> None:
    """What the Response echoes must go back out as JSON: no NaN or Infinity, no string that
    UTF-8 cannot carry (a lone surrogate from a "\\ud800" escape)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        raise HTTPError(400, f"{where} holds {obj}, which JSON cannot carry", param=where)
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            raise HTTPError(400, f"{where} holds text that is not valid Unicode (a lone "
                            "surrogate)", param=where) from None  # fmt: skip
    if isinstance(obj, dict):
        for k, v in obj.items():
            _sendable(k, where)
            _sendable(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _sendable(v, f"{where}[{i}]")


def _refuse(req: ResponsesRequest) -> None:
    if req.max_output_tokens is not None and req.max_output_tokens < 1:
        raise HTTPError(400, f"max_output_tokens must be at least 1, got "
                        f"{req.max_output_tokens}", param="max_output_tokens")  # fmt: skip
    if req.background:
        raise HTTPError(400, "background responses are not supported here: leave background "
                        "false", param="background")  # fmt: skip
    if req.truncation not in (None, "disabled"):
        raise HTTPError(400, f"truncation {req.truncation!r} is not supported: only "
                        '"disabled" (a prompt past the context is an error)',
                        param="truncation")  # fmt: skip
    if req.top_logprobs or any("logprobs" in i for i in req.include or []):
        raise HTTPError(400, "logprobs are not returned by /v1/responses here: use "
                        "/v1/chat/completions with logprobs", param="top_logprobs")  # fmt: skip
    for key, why in _REFUSED.items():
        if (req.model_extra or {}).get(key) is not None:
            raise HTTPError(400, f"{key}: {why}", param=key)
    meta = req.metadata or {}
    if len(meta) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in meta.items()):
        raise HTTPError(400, "metadata holds at most 16 pairs, keys up to 64 characters and "
                        "values up to 512", param="metadata")  # fmt: skip
    try:  # (echoed in the Response, or read: must go back out as JSON)
        for key, value in {**req.model_dump(), **(req.model_extra or {})}.items():
            _sendable(value, key)
    except RecursionError:
        raise HTTPError(400, "the request nests too deeply", param=None) from None


def _text(content, where: str) -> str:
    """A message's content as text: a string, or its text parts joined by newlines (as the
    chat path joins them)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise HTTPError(400, f"{where}: content must be a string or a list of parts",
                        param="input")  # fmt: skip
    out = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind in _TEXT_PARTS and isinstance(part.get("text"), str):
            out.append(part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            out.append(part["refusal"])
        else:
            raise HTTPError(400, f"{where}: content part of type {kind!r} is not supported "
                            "(this server serves text models: give input_text parts)",
                            param="input")  # fmt: skip
    return "\n".join(out)


def _messages(inp) -> tuple[list[dict], bool]:
    """The request's input as chat messages (function calls joined to the assistant turn
    before them), and whether the last is an assistant message to continue (its status
    in_progress or incomplete)."""
    if isinstance(inp, str):
        return [{"role": "user", "content": inp}], False
    if not isinstance(inp, list):
        raise HTTPError(400, f"input must be a string or a list of input items, got "
                        f"{type(inp).__name__}", param="input")  # fmt: skip
    out: list[dict] = []
    open_end = False  # the last message is an assistant's, in progress
    for i, item in enumerate(inp):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise HTTPError(400, f"{where} must be an object", param="input")
        kind = item.get("type", "message" if "role" in item else None)
        was_open, open_end = open_end, False
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise HTTPError(400, f"{where}: role {role!r} is not one of user, system, "
                                "developer, assistant", param="input")  # fmt: skip
            role = "system" if role == "developer" else role
            text = _text(item.get("content", ""), where)
            prev = out[-1] if out and out[-1]["role"] == "assistant" else None
            if role == "assistant" and prev is not None and (was_open or "tool_calls" in prev):
                # one turn: text after its calls (a stream sends it as a second message), or
                # the continuation of a message in progress
                prev["content"] = (prev["content"] or "") + text
            else:
                out.append({"role": role, "content": text})
            open_end = role == "assistant" and item.get("status") in ("in_progress", "incomplete")
        elif kind == "function_call":
            for key in ("call_id", "name", "arguments"):
                if not isinstance(item.get(key), str):
                    raise HTTPError(400, f"{where}: a function_call needs {key} (a string)",
                                    param="input")  # fmt: skip
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            }
            if out and out[-1]["role"] == "assistant":  # (its text, then its calls)
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise HTTPError(400, f"{where}: a function_call_output needs call_id (a "
                                "string)", param="input")  # fmt: skip
            out.append({"role": "tool", "tool_call_id": item["call_id"],
                        "content": _text(item.get("output", ""), where)})  # fmt: skip
        elif kind == "reasoning":
            continue  # (past thinking: chat templates drop it too)
        else:
            raise HTTPError(400, f"{where}: input items of type {kind!r} are not supported "
                            "(messages, function_call, function_call_output and reasoning "
                            "are)", param="input")  # fmt: skip
    return out, open_end


def _chat_tools(tools) -> list[dict] | None:
    if tools is None:
        return None
    out = []
    for i, t in enumerate(tools):
        kind = t.get("type") if isinstance(t, dict) else None
        if kind != "function":
            raise HTTPError(400, f"tools[{i}]: tools of type {kind!r} are not supported here "
                            "(only function tools)", param="tools")  # fmt: skip
        if not isinstance(t.get("name"), str) or not t["name"] or \
                not isinstance(t.get("parameters", {}), dict | None):  # fmt: skip
            raise HTTPError(400, f"tools[{i}]: a function tool is {{\"type\": \"function\", "
                            '"name": ..., "parameters": {...}} (name a string, parameters a '
                            "JSON schema)", param="tools")  # fmt: skip
        fn = {k: t[k] for k in ("name", "description", "parameters", "strict") if k in t}
        out.append({"type": "function", "function": fn})
    return out


def _chat_tool_choice(choice):
    if choice is None or choice in _TOOL_CHOICES:
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        fn = choice.get("function")  # (the chat shape, accepted too)
        name = fn.get("name") if isinstance(fn, dict) else choice.get("name")
        return {"type": "function", "function": {"name": name}}
    raise HTTPError(400, f"tool_choice {choice!r} is not supported: use \"auto\", \"none\", "
                    '"required" or {"type": "function", "name": ...}',
                    param="tool_choice")  # fmt: skip


def _response_format(text: dict | None) -> dict | None:
    fmt = (text or {}).get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise HTTPError(400, f"text.format must be an object, got {fmt!r}", param="text.format")
    if fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") == "json_schema":
        spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": spec}
    raise HTTPError(400, f"text.format {fmt!r} is not one of text, json_object, json_schema",
                    param="text.format")  # fmt: skip


def _chat_request(req: ResponsesRequest, messages: list[dict],
                  open_end: bool) -> ChatCompletionRequest:  # fmt: skip
    body = {"model": req.model, "messages": messages, "stream": req.stream,
            "max_completion_tokens": req.max_output_tokens, "temperature": req.temperature,
            "top_p": req.top_p, "tools": _chat_tools(req.tools),
            "tool_choice": _chat_tool_choice(req.tool_choice),
            "response_format": _response_format(req.text), "user": req.user}  # fmt: skip
    if req.stream:
        body["stream_options"] = {"include_usage": True}
    if open_end:  # (vLLM's: the last assistant message continued)
        body.update(add_generation_prompt=False, continue_final_message=True)
    body.update((k, v) for k, v in (req.model_extra or {}).items() if k in _PASSED)
    effort = (req.reasoning or {}).get("effort")
    kwargs = body.get("chat_template_kwargs")
    if effort is not None and (kwargs is None or isinstance(kwargs, dict)):
        # (vLLM's: the template reads it, gpt-oss's and others')
        body["chat_template_kwargs"] = {"reasoning_effort": effort, **(kwargs or {})}
    try:
        chat = ChatCompletionRequest(**{k: v for k, v in body.items() if v is not None})
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(x) for x in err["loc"])
        raise HTTPError(400, f"{field}: {err['msg']}", param=field) from None
    # (tools without a tool_choice and no parser on the server: answered freely, as the
    # Responses API has been — a turn after a call's output mostly answers in words)
    chat._free_without_parser = True
    return chat


def _shell(req: ResponsesRequest, rid: str) -> dict:
    """The Response object before its output: what the request asked for."""
    return {"id": rid, "object": "response", "created_at": int(time.time()),
            "status": "in_progress", "error": None, "incomplete_details": None,
            "model": req.model, "instructions": req.instructions, "output": [],
            "max_output_tokens": req.max_output_tokens, "temperature": req.temperature,
            "top_p": req.top_p, "tools": req.tools or [],
            "tool_choice": req.tool_choice or "auto",
            "parallel_tool_calls": req.parallel_tool_calls,
            "previous_response_id": req.previous_response_id, "reasoning": req.reasoning,
            "text": req.text or {"format": {"type": "text"}}, "truncation": "disabled",
            "store": req.store, "metadata": req.metadata or {}, "user": req.user,
            "background": False, "usage": None}  # fmt: skip


def _finished(shell: dict, items: list[dict], finish: str | None, usage: dict) -> dict:
    cut = finish == "length"
    prompt, done = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    thinking = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens", 0)
    return {**shell, "status": "incomplete" if cut else "completed", "output": items,
            "completed_at": None if cut else int(time.time()),
            "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
            "usage": {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
                      "output_tokens": done,
                      "output_tokens_details": {"reasoning_tokens": thinking},
                      "total_tokens": prompt + done}}  # fmt: skip


def _message_item(text: str) -> dict:
    return {"type": "message", "id": f"msg_{uuid.uuid4().hex}", "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}  # fmt: skip


def _reasoning_item(text: str) -> dict:
    return {
        "type": "reasoning",
        "id": f"rs_{uuid.uuid4().hex}",
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}],
        "status": "completed",
    }


def _call_item(call: dict) -> dict:
    fn = call["function"]
    return {
        "type": "function_call",
        "id": f"fc_{uuid.uuid4().hex}",
        "call_id": call["id"],
        "name": fn["name"],
        "arguments": fn["arguments"],
        "status": "completed",
    }


def _cut(items: list[dict]) -> dict:
    """The item max_output_tokens cut: the message (what the parsers could not read as a call
    stays its text), else the last."""
    return next((i for i in items if i["type"] == "message"), items[-1])


def _continued(new: list[dict], items: list[dict], open_end: bool) -> list[dict]:
    """The conversation after a request: its input, then the answer as one assistant turn —
    the continuation of the input's last message when that one was in progress."""
    answer = _answer_turn(items)
    if not open_end:
        return new + [answer]
    merged = {**new[-1], "content": (new[-1]["content"] or "") + (answer["content"] or "")}
    if "tool_calls" in answer:
        merged["tool_calls"] = answer["tool_calls"]
    return new[:-1] + [merged]


def _answer_turn(items: list[dict]) -> dict:
    """The output items as the assistant turn a follow-up continues from (the thinking
    dropped, as chat templates drop it)."""
    text = "".join(i["content"][0]["text"] for i in items if i["type"] == "message")
    calls = [{"id": i["call_id"], "type": "function",
              "function": {"name": i["name"], "arguments": i["arguments"]}}
             for i in items if i["type"] == "function_call"]  # fmt: skip
    msg: dict = {"role": "assistant", "content": text or (None if calls else "")}
    if calls:
        msg["tool_calls"] = calls
    return msg
