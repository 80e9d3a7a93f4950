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
                  input and output before the new input); the oldest are dropped beyond
                  ServerConfig.responses_kept

What the engine cannot do is refused with a 400 naming it: images, files and audio in the
input, built-in tools (web search, file search, computer use, MCP...), background mode,
truncation "auto", logprobs (top_logprobs, include of output_text.logprobs).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, model_validator

from expertswitch.server.errors import HTTPError
from expertswitch.server.protocol import ChatCompletionRequest

_TEXT_PARTS = ("input_text", "output_text", "text")
# vLLM's extra sampling fields, passed on to the chat request as they are
_PASSED = ("top_k", "min_p", "seed", "stop", "repetition_penalty", "presence_penalty",
           "frequency_penalty", "logit_bias", "min_tokens", "ignore_eos", "priority",
           "cache_salt", "chat_template_kwargs", "skip_special_tokens",
           "include_reasoning", "structured_outputs")  # fmt: skip


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _nulls_mean_defaults(cls, data):
        if isinstance(data, dict):  # ("store": null and the like: the default)
            return {k: v for k, v in data.items() if v is not None}
        return data

    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, Any] | None = None
    background: bool = False
    truncation: str | None = None
    include: list[str] | None = None
    top_logprobs: int | None = None
    user: str | None = None


class ResponseStore:
    """The responses kept for GET and previous_response_id: id → (response, conversation as
    chat messages after it), the oldest dropped beyond `limit`."""

    def __init__(self, limit: int):
        self.limit = limit
        self._items: OrderedDict[str, tuple[dict, list[dict]]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, response: dict, conversation: list[dict]) -> None:
        with self._lock:
            self._items[response["id"]] = (response, conversation)
            while len(self._items) > self.limit:
                self._items.popitem(last=False)

    def get(self, rid: str) -> tuple[dict, list[dict]]:
        with self._lock:
            found = self._items.get(rid)
        if found is None:
            raise HTTPError(404, f"no response {rid!r} is kept here (unknown, deleted, made "
                            "with store false, or dropped as the oldest)",
                            param="previous_response_id", code="response_not_found")  # fmt: skip
        return found

    def delete(self, rid: str) -> None:
        self.get(rid)
        with self._lock:
            self._items.pop(rid, None)


class Responses:
    def __init__(self, serving, limit: int):
        self.serving, self.store = serving, ResponseStore(limit)

    async def create(self, req: ResponsesRequest, http: Request):
        _refuse(req)
        history = []
        if req.previous_response_id is not None:
            history = self.store.get(req.previous_response_id)[1]
        new = _messages(req.input)
        head = [{"role": "system", "content": req.instructions}] if req.instructions else []
        chat = _chat_request(req, head + history + new)
        answer = await self.serving.chat(chat, http)
        rid = f"resp_{uuid.uuid4().hex}"
        shell = _shell(req, rid)
        if req.stream:
            events = self._events(answer, shell, history + new, req.store)
            return _Events(events, media_type="text/event-stream",
                           headers={"Cache-Control": "no-cache"})  # fmt: skip
        body = json.loads(answer.body)
        choice = body["choices"][0]
        msg = choice["message"]
        items = []
        if msg.get("reasoning_content"):
            items.append(_reasoning_item(msg["reasoning_content"]))
        # the text (an empty answer: an empty message), unless only thinking or calls came
        if msg.get("content") or not (msg.get("tool_calls") or items):
            items.append(_message_item(msg.get("content") or "", choice["finish_reason"]))
        items += [_call_item(c) for c in msg.get("tool_calls") or []]
        response = _finished(shell, items, choice["finish_reason"], body["usage"])
        if req.store:
            self.store.put(response, history + new + _as_chat(items))
        return JSONResponse(response)

    async def _events(self, answer: StreamingResponse, shell: dict, conversation, store):
        seq = iter(range(1 << 62))
        items: list[dict] = []  # the output items so far
        open_item: dict | None = None  # the one receiving deltas (a message or reasoning)
        calls: dict[int, dict] = {}  # the chat stream's tool call index → its item
        finish, usage, failed = None, None, None

        def event(kind: str, **fields) -> str:
            obj = {"type": kind, "sequence_number": next(seq), **fields}
            return f"event: {kind}\ndata: {json.dumps(obj, ensure_ascii=False)}\n\n"

        def close() -> list[str]:
            nonlocal open_item
            if open_item is None:
                return []
            item, open_item = open_item, None
            index = items.index(item)
            item["status"] = "completed"
            out = []
            if item["type"] == "message":
                part = item["content"][0]
                out.append(event("response.output_text.done", item_id=item["id"],
                                 output_index=index, content_index=0, text=part["text"],
                                 logprobs=[]))  # fmt: skip
                out.append(event("response.content_part.done", item_id=item["id"],
                                 output_index=index, content_index=0, part=part))  # fmt: skip
            else:
                part = item["content"][0]
                out.append(event("response.reasoning_text.done", item_id=item["id"],
                                 output_index=index, content_index=0,
                                 text=part["text"]))  # fmt: skip
            return out + [event("response.output_item.done", output_index=index, item=item)]

        def add(item: dict) -> str:
            items.append(item)
            return event("response.output_item.added", output_index=len(items) - 1,
                         item=item)  # fmt: skip

        def text_delta(kind: str, delta: str) -> list[str]:
            nonlocal open_item
            out = []
            if open_item is None or open_item["type"] != kind:
                out += close()
                if kind == "message":
                    open_item = _message_item("", None)
                    open_item["status"], open_item["content"] = "in_progress", []
                    out.append(add(open_item))
                    part = {"type": "output_text", "text": "", "annotations": []}
                    open_item["content"].append(part)
                    out.append(event("response.content_part.added", item_id=open_item["id"],
                                     output_index=len(items) - 1, content_index=0,
                                     part=dict(part)))  # fmt: skip
                else:
                    open_item = _reasoning_item("")
                    open_item["status"] = "in_progress"
                    out.append(add(open_item))
            open_item["content"][0]["text"] += delta
            name = "response.output_text.delta" if kind == "message" else \
                "response.reasoning_text.delta"  # fmt: skip
            extra = {"logprobs": []} if kind == "message" else {}
            out.append(event(name, item_id=open_item["id"], output_index=items.index(open_item),
                             content_index=0, delta=delta, **extra))  # fmt: skip
            return out

        def call_delta(call: dict) -> list[str]:
            out = []
            k = call.get("index", 0)
            fn = call.get("function") or {}
            if k not in calls:
                out += close()
                item = _call_item({"id": call.get("id"), "function": {
                    "name": fn.get("name", ""), "arguments": ""}})  # fmt: skip
                item["status"] = "in_progress"
                calls[k] = item
                out.append(add(item))
            item = calls[k]
            if fn.get("arguments"):
                item["arguments"] += fn["arguments"]
                out.append(event("response.function_call_arguments.delta", item_id=item["id"],
                                 output_index=items.index(item),
                                 delta=fn["arguments"]))  # fmt: skip
            return out

        try:
            yield event("response.created", response=shell)
            yield event("response.in_progress", response=shell)
            async for line in answer.body_iterator:
                data = line.removeprefix("data: ").strip()
                if not data or data == "[DONE]":
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    failed = chunk["error"]
                    break
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices", []):
                    delta = choice.get("delta") or {}
                    if delta.get("reasoning_content"):
                        for e in text_delta("reasoning", delta["reasoning_content"]):
                            yield e
                    if delta.get("content"):
                        for e in text_delta("message", delta["content"]):
                            yield e
                    for call in delta.get("tool_calls") or []:
                        for e in call_delta(call):
                            yield e
                    finish = choice.get("finish_reason") or finish
            if failed is not None:
                response = {**shell, "status": "failed", "output": items,
                            "error": {"code": "server_error",
                                      "message": failed.get("message", "")}}  # fmt: skip
                yield event("response.failed", response=response)
                return
            for e in close():
                yield e
            if not items:  # (an empty answer: an empty message, as the body has)
                message = _message_item("", finish)
                yield add(message)
                yield event("response.output_item.done", output_index=0, item=message)
            for item in calls.values():
                index = items.index(item)
                item["status"] = "completed"
                yield event("response.function_call_arguments.done", item_id=item["id"],
                            output_index=index, arguments=item["arguments"])  # fmt: skip
                yield event("response.output_item.done", output_index=index, item=item)
            if finish == "length":
                for item in items:
                    if item["type"] == "message":
                        item["status"] = "incomplete"
            response = _finished(shell, items, finish, usage or {})
            if store:
                self.store.put(response, conversation + _as_chat(items))
            kind = "response.incomplete" if response["status"] == "incomplete" else \
                "response.completed"  # fmt: skip
            yield event(kind, response=response)
        finally:  # (the chat stream's clean-up: its requests aborted if the client left)
            await answer.body_iterator.aclose()


class _Events(StreamingResponse):
    """Closes its generator however the response ends (see serving._ClosingStream)."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def _refuse(req: ResponsesRequest) -> None:
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


def _text(content, where: str) -> str:
    """A message's content as text: a string, or its text parts joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise HTTPError(400, f"{where}: content must be a string or a list of parts",
                        param="input")  # fmt: skip
    out = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _TEXT_PARTS and isinstance(part.get("text"), str):
            out.append(part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            out.append(part["refusal"])
        else:
            raise HTTPError(400, f"{where}: content part of type {kind!r} is not supported "
                            "(this server serves text models: give input_text parts)",
                            param="input")  # fmt: skip
    return "".join(out)


def _messages(inp) -> list[dict]:
    """The request's input as chat messages (function calls joined into assistant turns)."""
    if isinstance(inp, str):
        return [{"role": "user", "content": inp}]
    out: list[dict] = []
    for i, item in enumerate(inp):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise HTTPError(400, f"{where} must be an object", param="input")
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise HTTPError(400, f"{where}: role {role!r} is not one of user, system, "
                                "developer, assistant", param="input")  # fmt: skip
            role = "system" if role == "developer" else role
            out.append({"role": role, "content": _text(item.get("content", ""), where)})
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
            if out and out[-1]["role"] == "assistant" and "tool_calls" in out[-1]:
                out[-1]["tool_calls"].append(call)
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
    return out


def _chat_tools(tools) -> list[dict] | None:
    if tools is None:
        return None
    out = []
    for i, t in enumerate(tools):
        kind = t.get("type") if isinstance(t, dict) else None
        if kind != "function":
            raise HTTPError(400, f"tools[{i}]: tools of type {kind!r} are not supported here "
                            "(only function tools)", param="tools")  # fmt: skip
        fn = {k: t[k] for k in ("name", "description", "parameters", "strict") if k in t}
        out.append({"type": "function", "function": fn})
    return out


def _chat_tool_choice(choice):
    if choice is None or isinstance(choice, str):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    raise HTTPError(400, f"tool_choice {choice!r} is not supported: use \"auto\", \"none\", "
                    '"required" or {"type": "function", "name": ...}',
                    param="tool_choice")  # fmt: skip


def _response_format(text: dict | None) -> dict | None:
    fmt = (text or {}).get("format")
    if fmt is None or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") == "json_schema":
        spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": spec}
    raise HTTPError(400, f"text.format {fmt!r} is not one of text, json_object, json_schema",
                    param="text")  # fmt: skip


def _chat_request(req: ResponsesRequest, messages: list[dict]) -> ChatCompletionRequest:
    body = {"model": req.model, "messages": messages, "stream": req.stream,
            "max_completion_tokens": req.max_output_tokens, "temperature": req.temperature,
            "top_p": req.top_p, "tools": _chat_tools(req.tools),
            "tool_choice": _chat_tool_choice(req.tool_choice),
            "response_format": _response_format(req.text), "user": req.user}  # fmt: skip
    if req.stream:
        body["stream_options"] = {"include_usage": True}
    body.update((k, v) for k, v in (req.model_extra or {}).items() if k in _PASSED)
    return ChatCompletionRequest(**{k: v for k, v in body.items() if v is not None})


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
    return {**shell, "status": "incomplete" if cut else "completed", "output": items,
            "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
            "usage": {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
                      "output_tokens": done,
                      "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": prompt + done}}  # fmt: skip


def _message_item(text: str, finish: str | None) -> dict:
    return {"type": "message", "id": f"msg_{uuid.uuid4().hex}", "role": "assistant",
            "status": "incomplete" if finish == "length" else "completed",
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


def _as_chat(items: list[dict]) -> list[dict]:
    """The output items as the chat messages a follow-up continues from (the thinking
    dropped, as chat templates drop it)."""
    text = "".join(i["content"][0]["text"] for i in items if i["type"] == "message")
    calls = [{"id": i["call_id"], "type": "function",
              "function": {"name": i["name"], "arguments": i["arguments"]}}
             for i in items if i["type"] == "function_call"]  # fmt: skip
    msg: dict = {"role": "assistant", "content": text or (None if calls else "")}
    if calls:
        msg["tool_calls"] = calls
    return [msg]
