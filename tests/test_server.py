"""The OpenAI-compatible server, started for real on loopback and driven with the official
`openai` client (and raw HTTP where the client would hide what is sent): every answer is compared
with the same request served alone by an independent Engine, every error case gets OpenAI's
error shape and status, and a client that leaves mid-stream frees its KV blocks at once."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from conftest import finetune_like, make_adapter, peft_greedy, tiny_config

from expertswitch.compress import CompressOptions, compress_expert, make_method
from expertswitch.compress.calibration import CalibOptions
from expertswitch.engine import Engine, SamplingParams
from expertswitch.io.archive import open_archive
from expertswitch.router import Router
from expertswitch.router.data import domain_queries
from expertswitch.server import ServerConfig, ServerThread, build_app
from expertswitch.zoo.corpora import load_corpora
from expertswitch.zoo.tokenizer import train_tokenizer

DOMAINS = ("code", "math", "prose")
OPTS = CompressOptions(calib=CalibOptions(tokens=256, seq_len=64), progress=False)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A tiny Llama with a real BPE tokenizer (with chat template), three compressed experts
    named after the zoo's domains, and an n-gram router over those domains."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    root = tmp_path_factory.mktemp("serve")
    corpora = load_corpora(0, scale=0.05)
    texts, labels = domain_queries(corpora, "train", 120)
    tok = train_tokenizer(texts, 384)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
                      max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).float()
    base = root / "base"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    archives = {}
    for i, d in enumerate(DOMAINS):
        expert = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        finetune_like(expert, seed=10 + i, scale=0.3)
        expert.save_pretrained(root / f"{d}-full")
        archives[d] = compress_expert(base, root / f"{d}-full", root / f"{d}.delta",
                                      make_method("mixed", bits=2), OPTS)  # fmt: skip
    with torch.random.fork_rng():  # the same router whichever tests ran before, and the
        torch.manual_seed(0)  # global generator left as it was for the tests after
        router = Router.train(*domain_queries(corpora, "train", 300), backbone="ngram")
    router = router.save(root / "router")
    return base, archives, router


@pytest.fixture(scope="module")
def server(family):
    base, archives, router = family
    app, aengine = build_app(base, archives, router, device="cpu", dtype=torch.float32,
                             cfg=ServerConfig(), max_num_seqs=16)  # fmt: skip
    with ServerThread(app) as srv:
        yield srv, aengine
    aengine.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0].url + "/v1", api_key="unused", max_retries=0,
                         timeout=300)  # fmt: skip


@pytest.fixture(scope="module")
def reference(family):
    """An independent engine: what each request gets when served alone."""
    base, archives, _ = family
    return Engine(base, archives, device="cpu", dtype=torch.float32)


def alone(reference, prompt, expert, max_tokens, **kw) -> str:
    return alone_output(reference, prompt, expert, max_tokens, **kw).text


def alone_output(reference, prompt, expert, max_tokens, **kw):
    sp = SamplingParams(**{"temperature": 0.0, "max_tokens": max_tokens, **kw})
    return reference.generate([prompt], expert=expert, sampling=sp)[0]


def chat_ids(reference, messages) -> list[int]:
    """The prompt the zoo's chat template must make, written out by hand (not rendered by the
    template, which is what the server does)."""
    text = "".join(f"<|{m['role']}|>\n{m['content']}</s>\n" for m in messages)
    return list(reference.tokenizer.encode(text + "<|assistant|>\n", add_special_tokens=False))


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


# the API ---------------------------------------------------------------------------------------


def test_models_list_base_experts_and_auto(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["base", *DOMAINS, "auto"]


@pytest.mark.parametrize("model", ["math", "base", "code"])
def test_completion_equals_the_request_served_alone(client, reference, model):
    prompt = "def total(values):\n    "
    r = client.completions.create(model=model, prompt=prompt, max_tokens=20, temperature=0)
    want = alone_output(reference, prompt, None if model == "base" else model, 20)
    assert r.model == model
    assert r.choices[0].text == want.text
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == len(want.prompt_token_ids)
    assert r.usage.completion_tokens == len(want.token_ids)


def test_chat_streaming_and_not_equal_the_request_alone(client, reference):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is 12 + 30?"}]  # fmt: skip
    want = alone(reference, chat_ids(reference, messages), "math", 24, ignore_eos=True)
    r = client.chat.completions.create(model="math", messages=messages, max_tokens=24,
                                       temperature=0, extra_body={"ignore_eos": True})  # fmt: skip
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 24
    stream = client.chat.completions.create(model="math", messages=messages, max_tokens=24,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == "length" and set(finals[:-1]) == {None}
    assert chunks[-1].usage.completion_tokens == 24 and not chunks[-1].choices


def test_invocations_routes_by_body_as_vllm_does(server, reference):
    """/invocations (SageMaker's route): a body with messages is answered as a chat
    completion, one with prompt as a completion, both as the request served alone; a body
    with neither, one that is not JSON and one with a bad field get 400s naming the problem."""
    url = server[0].url + "/invocations"
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    r = httpx.post(url, timeout=120, json={"model": "math", "messages": messages,
                                           "max_tokens": 6, "temperature": 0,
                                           "ignore_eos": True}).json()  # fmt: skip
    assert r["object"] == "chat.completion"
    want = alone(reference, chat_ids(reference, messages), "math", 6, ignore_eos=True)
    assert r["choices"][0]["message"]["content"] == want
    prompt = "def total(values):\n    "
    r = httpx.post(url, timeout=120, json={"model": "code", "prompt": prompt, "max_tokens": 5,
                                           "temperature": 0}).json()  # fmt: skip
    assert r["object"] == "text_completion"
    assert r["choices"][0]["text"] == alone(reference, prompt, "code", 5)
    for body, says in ((b'{"model": "base"}', "messages) or a completion"),
                       (b"[1, 2]", "messages) or a completion"),
                       (b"{nope", "not valid JSON"),
                       (b'{"prompt": "x", "max_tokens": "many"}', "max_tokens")):  # fmt: skip
        resp = httpx.post(url, content=body, headers={"content-type": "application/json"})
        assert says in _error(resp, 400)["message"], body


def test_a_repeated_prompt_is_served_from_the_prefix_cache(server, client, reference):
    """The second time, a prompt's full blocks come from the prefix cache: usage reports them
    (OpenAI's prompt_tokens_details), the metrics count them, the answer is the same."""
    url = server[0].url
    prompt = "# prefix cache check\ndef mean(values):\n    total = 0\n    for v in values:\n"
    want = alone_output(reference, prompt, "code", 12)
    hits = metric(url, "expertswitch_prefix_cache_hits_total")
    got = [client.completions.create(model="code", prompt=prompt, max_tokens=12, temperature=0)
           for _ in range(2)]  # fmt: skip
    n = len(want.prompt_token_ids)
    assert n > 16  # the server's blocks hold 16 tokens
    cached = [r.usage.prompt_tokens_details.cached_tokens for r in got]
    assert cached == [0, (n - 1) // 16 * 16]
    assert [r.choices[0].text for r in got] == [want.text] * 2
    assert metric(url, "expertswitch_prefix_cache_hits_total") == hits + cached[1]


def test_stream_ends_with_done_as_server_sent_events(server):
    body = {"model": "code", "prompt": "import os\n", "max_tokens": 5, "stream": True}
    with httpx.stream("POST", server[0].url + "/v1/completions", json=body, timeout=120) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["object"] == "text_completion"


def _sse_chunks(url: str, route: str, body: dict) -> list[dict]:
    with httpx.stream("POST", url + route, json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(ln[6:]) for ln in lines[:-1]]


def test_return_token_ids_and_tokens_as_ids(server, reference):
    """vLLM's return_token_ids: the prompt's ids (completions: per choice; chat: at the top
    level) and the answer's ids beside the text, the engine's own; streamed, the prompt's with
    the first chunk and each chunk's new ids, adding up to the same. return_tokens_as_token_ids
    names the logprobs' tokens "token_id:N"."""
    url = server[0].url
    prompt = "def add(a, b):"
    ids = list(reference.tokenizer.encode(prompt))
    want = alone_output(reference, ids, "code", 6, ignore_eos=True).token_ids
    body = {"model": "code", "prompt": prompt, "max_tokens": 6, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}  # fmt: skip
    r = httpx.post(url + "/v1/completions", json={**body, "logprobs": 1,
                   "return_tokens_as_token_ids": True}, timeout=120).json()  # fmt: skip
    choice = r["choices"][0]
    assert choice["prompt_token_ids"] == ids and choice["token_ids"] == want
    assert choice["logprobs"]["tokens"] == [f"token_id:{t}" for t in want]
    chunks = _sse_chunks(url, "/v1/completions", body)
    got = [c["choices"][0] for c in chunks if c["choices"]]
    assert got[0]["prompt_token_ids"] == ids and all("prompt_token_ids" not in g for g in got[1:])
    assert sum((g["token_ids"] for g in got), []) == want
    messages = [{"role": "user", "content": "Q: What is 12 + 30?"}]
    prompt_ids = chat_ids(reference, messages)
    want = alone_output(reference, prompt_ids, "math", 6, ignore_eos=True).token_ids
    chat = {**body, "model": "math", "messages": messages}
    del chat["prompt"]
    r = httpx.post(url + "/v1/chat/completions", json={**chat, "logprobs": True,
                   "return_tokens_as_token_ids": True}, timeout=120).json()  # fmt: skip
    assert r["prompt_token_ids"] == prompt_ids and r["choices"][0]["token_ids"] == want
    assert [e["token"] for e in r["choices"][0]["logprobs"]["content"]] == [
        f"token_id:{t}" for t in want
    ]
    chunks = _sse_chunks(url, "/v1/chat/completions", chat)
    assert chunks[0]["prompt_token_ids"] == prompt_ids
    assert all("prompt_token_ids" not in c for c in chunks[1:])
    assert sum((c["choices"][0]["token_ids"] for c in chunks if c["choices"]), []) == want
    plain = httpx.post(url + "/v1/completions", json={**body, "return_token_ids": None},
                       timeout=120).json()  # fmt: skip
    assert "token_ids" not in plain["choices"][0]


def test_vllm_prompt_and_token_controls(server, reference):
    """vLLM's truncate_prompt_tokens (the prompt's last k tokens, echoed as such) and
    allowed_token_ids (only those sampled), bad_words (as the engine bans them); beam search and
    logits processors are refused with a 400 naming them, not ignored."""
    url = server[0].url

    def post(route, body, status=200):
        r = httpx.post(url + route, json={"model": "code", "max_tokens": 4, "temperature": 0,
                                          "ignore_eos": True, "return_token_ids": True, **body},
                       timeout=120)  # fmt: skip
        assert r.status_code == status, r.text
        return r.json()

    prompt = "def add(a, b):\n    return"
    ids = list(reference.tokenizer.encode(prompt))
    got = post("/v1/completions", {"prompt": prompt, "truncate_prompt_tokens": 3, "echo": True})
    tail = ids[-3:]
    assert got["choices"][0]["prompt_token_ids"] == tail
    assert got["choices"][0]["text"].startswith(reference.tokenizer.decode(tail))
    assert got["choices"][0]["token_ids"] == alone_output(reference, tail, "code", 4,
                                                          ignore_eos=True).token_ids  # fmt: skip
    assert got["usage"]["prompt_tokens"] == 3
    messages = [{"role": "user", "content": "Q: What is 12 + 30?"}]
    ids = chat_ids(reference, messages)
    got = post("/v1/chat/completions", {"messages": messages, "truncate_prompt_tokens": 5})
    assert got["prompt_token_ids"] == ids[-5:]
    allowed = [40, 41, 42]
    got = post("/v1/completions", {"prompt": prompt, "temperature": 1.0, "seed": 3,
                                   "max_tokens": 8, "allowed_token_ids": allowed})  # fmt: skip
    assert set(got["choices"][0]["token_ids"]) <= set(allowed)
    # bad_words: a word the greedy answer says (one token, spelled the same alone) is never
    # said, the answer the same until there — and the engine's own answer under that ban
    tok = reference.tokenizer
    free = post("/v1/completions", {"prompt": prompt, "max_tokens": 12})["choices"][0]
    free = free["token_ids"]
    t = next(t for t in free if tok.decode([t])[:1].isalnum()
             and tok.encode(tok.decode([t]), add_special_tokens=False) == [t])  # fmt: skip
    sp = {"prompt": prompt, "max_tokens": 12, "bad_words": [tok.decode([t])]}
    got = post("/v1/completions", sp)["choices"][0]["token_ids"]
    want = alone_output(reference, prompt, "code", 12, ignore_eos=True, bad_words=sp["bad_words"])
    at = free.index(t)
    assert got == want.token_ids and t not in got and got[:at] == free[:at], (got, free, t)
    err = post("/v1/completions", {"prompt": "x", "priority": 2}, 400)["error"]
    assert "priority 2 needs priority scheduling" in err["message"]
    err = post("/v1/completions", {"prompt": "x", "logits_processors": ["m.P"]}, 400)["error"]
    assert err["param"] == "logits_processors" and "not supported" in err["message"]
    err = post("/v1/completions", {"prompt": "x", "truncate_prompt_tokens": 0}, 400)["error"]
    assert "truncate_prompt_tokens must be a positive" in err["message"]
    err = post("/v1/completions", {"prompt": "x", "allowed_token_ids": [10**6]}, 400)["error"]
    assert "allowed_token_ids names token id 1000000, outside the vocabulary" in err["message"]


def test_priority_scheduling_and_cache_salt_over_http(family, reference):
    """--scheduling-policy priority: vLLM's `priority` field is taken (any integer; a
    non-integer is a 400), and requests of several priorities get their own answers; vLLM's
    `cache_salt` keeps prefix-cache hits to requests with the same salt."""
    from concurrent.futures import ThreadPoolExecutor

    base, archives, _ = family
    app, aengine = build_app(base, archives, device="cpu", dtype=torch.float32,
                             scheduling_policy="priority", max_num_seqs=2)  # fmt: skip
    prompts = ["def add(a, b):", "Q: What is 12 + 30?", "The while statement", "import os"]
    with ServerThread(app) as srv:

        def ask(k):
            body = {"model": "code", "prompt": prompts[k], "max_tokens": 6, "temperature": 0,
                    "priority": [3, -2, 0, 10**12][k]}  # fmt: skip
            return httpx.post(srv.url + "/v1/completions", json=body, timeout=120)

        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(ask, range(4)))
        for k, r in enumerate(got):
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == alone(reference, prompts[k], "code", 6)
        r = httpx.post(srv.url + "/v1/completions", json={"model": "code", "prompt": "x",
                                                          "priority": "high"})  # fmt: skip
        assert r.status_code == 400 and "priority" in r.text, r.text
        # vLLM's cache_salt: the same long prompt hits the prefix cache under its own salt
        # only (usage.prompt_tokens_details.cached_tokens)
        long = " ".join(prompts * 4)

        def cached(salt):
            body = {"model": "code", "prompt": long, "max_tokens": 1, "cache_salt": salt}
            r = httpx.post(srv.url + "/v1/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
            return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

        assert cached("a") == 0 and cached("a") > 0 and cached("b") == 0 and cached(None) == 0
        r = httpx.post(srv.url + "/v1/completions", json={"model": "code", "prompt": "x",
                                                          "cache_salt": ""})  # fmt: skip
        assert r.status_code == 400 and "cache_salt must be a non-empty string" in r.text
    aengine.close()
    from expertswitch.cli import build_parser

    args = build_parser().parse_args(["serve", "--scheduling-policy", "priority"])
    assert args.scheduling_policy == "priority"


def test_beam_search_over_http(client, server, reference):
    """vLLM's use_beam_search (n = the beam width, length_penalty): the engine's own
    beam_search, for completions (two prompts) and chat; what it does not apply is refused."""
    from expertswitch.engine import BeamSearchParams

    prompts = ["def add(a, b):", "The river"]
    got = client.completions.create(
        model="code",
        prompt=prompts,
        max_tokens=6,
        n=3,
        extra_body={"use_beam_search": True, "length_penalty": 0.7},
    )
    params = BeamSearchParams(beam_width=3, max_tokens=6, length_penalty=0.7)
    for i, p in enumerate(prompts):
        want = reference.beam_search(p, "code", params)
        mine = [c for c in got.choices if c.index // 3 == i]
        assert [c.text for c in mine] == [o.text for o in want]
        assert [c.finish_reason for c in mine] == [o.finish_reason for o in want]
    assert got.usage.completion_tokens == sum(
        len(o.token_ids) for p in prompts for o in reference.beam_search(p, "code", params)
    )
    msgs = [{"role": "user", "content": "hello"}]
    chat = client.chat.completions.create(model="math", messages=msgs, max_tokens=5, n=2,
                                          extra_body={"use_beam_search": True})  # fmt: skip
    want = reference.beam_search(chat_ids(reference, msgs), "math",
                                 BeamSearchParams(beam_width=2, max_tokens=5))  # fmt: skip
    assert [c.message.content for c in chat.choices] == [o.text for o in want]
    url = server[0].url + "/v1/completions"
    for extra, param in (({"stream": True}, "stream"), ({"stop": ["\n"]}, "stop"),
                         ({"logprobs": 1}, "logprobs"), ({"top_p": 0.5}, "top_p"),
                         ({"n": 11}, "n")):  # fmt: skip
        body = {"model": "code", "prompt": "x", "max_tokens": 4, "use_beam_search": True}
        r = httpx.post(url, json={**body, **extra}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    # what clients send as defaults is not refused; a seed makes a hot search repeatable
    defaults = {"top_p": 1, "top_k": -1, "presence_penalty": 0, "stop": [], "logprobs": None,
                "min_p": 0, "logit_bias": {}, "temperature": 1.0, "seed": 3}  # fmt: skip
    body = {"model": "code", "prompt": "x", "max_tokens": 4, "use_beam_search": True, "n": 2}
    texts = []
    for _ in range(2):
        r = httpx.post(url, json={**body, **defaults}, timeout=60)
        assert r.status_code == 200, r.text
        texts.append([c["text"] for c in r.json()["choices"]])
    assert len(texts[0]) == 2 and texts[0] == texts[1]


def test_add_special_tokens(family, tmp_path):
    """vLLM's add_special_tokens: completions add the tokenizer's BOS unless told not to; chat
    adds none unless told to (the template writes its own)."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    base, _, _ = family
    shutil.copytree(base, tmp_path / "base")
    tok = AutoTokenizer.from_pretrained(base)  # the fixture's, made to add a BOS
    tok._tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)]
    )
    tok.save_pretrained(tmp_path / "base")
    app, aengine = build_app(tmp_path / "base", {}, device="cpu", dtype=torch.float32)
    prompt = "def add(a, b):"
    bare = list(tok.encode(prompt, add_special_tokens=False))
    messages = [{"role": "user", "content": "hi"}]
    with ServerThread(app) as srv:

        def prompt_ids(route, body):
            body = {"model": "base", "max_tokens": 1, "return_token_ids": True, **body}
            r = httpx.post(srv.url + route, json=body, timeout=120).json()
            return r.get("prompt_token_ids") or r["choices"][0]["prompt_token_ids"]

        assert prompt_ids("/v1/completions", {"prompt": prompt}) == [tok.bos_token_id, *bare]
        assert prompt_ids("/v1/completions", {"prompt": prompt, "add_special_tokens": False}) \
            == bare  # fmt: skip
        plain = prompt_ids("/v1/chat/completions", {"messages": messages})
        added = prompt_ids("/v1/chat/completions", {"messages": messages,
                                                     "add_special_tokens": True})  # fmt: skip
        assert added == [tok.bos_token_id, *plain] and plain[0] != tok.bos_token_id
        # /tokenize counts as the endpoints do (vLLM's defaults: a prompt's BOS, none around
        # messages), and a request without a model is the base's
        counted = httpx.post(srv.url + "/tokenize", json={"prompt": prompt}).json()["tokens"]
        assert counted == [tok.bos_token_id, *bare]
        for flag in (None, True, False):
            body = {"prompt": prompt, "add_special_tokens": flag}
            got = httpx.post(srv.url + "/tokenize", json=body).json()["tokens"]
            assert got == (bare if flag is False else counted), flag
        chat = httpx.post(srv.url + "/tokenize", json={"messages": messages}).json()["tokens"]
        assert chat == plain
        r = httpx.post(srv.url + "/v1/completions", timeout=120, json={
            "prompt": prompt, "max_tokens": 1, "return_token_ids": True}).json()  # fmt: skip
        assert r["model"] == "base" and r["choices"][0]["prompt_token_ids"] == counted
    aengine.close()


def test_model_defaults_and_template_variables(family, reference, tmp_path):
    """vLLM's --generation-config auto: the base's generation_config.json sets the sampling
    fields a request leaves out (a request's own win; "vllm": OpenAI's neutral ones) and its
    max_new_tokens limits every answer, a request's own max_tokens too (finish "length");
    --chat-template renders in place of the tokenizer's; the template's variables are the
    server's --default-chat-template-kwargs under the request's chat_template_kwargs, with
    vLLM's reasoning_effort and documents; an earlier turn's reasoning reaches it under both
    names; a request's own chat_template is refused; /ping answers as /health."""
    from expertswitch.errors import ConfigError
    from expertswitch.server.protocol import generation_defaults

    base, archives, _ = family
    shutil.copytree(base, tmp_path / "base")
    model_says = {"temperature": 0.8, "top_k": 7, "top_p": 0.9, "min_p": 0.02,
                  "repetition_penalty": 1.3}  # fmt: skip
    gen = json.loads((tmp_path / "base" / "generation_config.json").read_text())
    (tmp_path / "base" / "generation_config.json").write_text(
        json.dumps({**gen, **model_says, "max_new_tokens": 6}))  # fmt: skip
    template = ("{{ effort | default('-') }}|{{ x }}|{{ y }}|{{ documents | default([]) | length }}"
                "{% for m in messages %}|{{ m.role }}:{{ m.content }}"
                "{% if m.reasoning %}[{{ m.reasoning }}/{{ m.reasoning_content }}]{% endif %}"
                "{% endfor %}|{{ reasoning_effort | default('-') }}")  # fmt: skip
    cfg = ServerConfig(chat_template=template, default_chat_template_kwargs={"x": 1, "y": 2})
    prompt = "def add(a, b):"
    for where, want in (("auto", model_says), ("vllm", {})):
        cfg.generation_config = where
        app, aengine = build_app(tmp_path / "base", archives, device="cpu",
                                 dtype=torch.float32, cfg=cfg)  # fmt: skip
        with ServerThread(app) as srv:
            url = srv.url
            ask = {"model": "code", "prompt": prompt, "max_tokens": 8, "seed": 5,
                   "ignore_eos": True}  # fmt: skip
            n = 6 if want else 8  # (the file's max_new_tokens, below the request's 8)
            got = httpx.post(url + "/v1/completions", json=ask, timeout=120).json()
            sampled = {"temperature": 1.0, **want, "seed": 5, "ignore_eos": True}
            assert got["choices"][0]["text"] == alone(reference, prompt, "code", n, **sampled)
            assert got["usage"]["completion_tokens"] == n
            assert got["choices"][0]["finish_reason"] == "length"
            own = {**ask, "temperature": 0, "top_k": 0, "repetition_penalty": 1.0}
            got = httpx.post(url + "/v1/completions", json=own, timeout=120).json()
            plain = {"top_p": want.get("top_p", 1.0), "min_p": want.get("min_p", 0.0),
                     "ignore_eos": True}  # fmt: skip
            assert got["choices"][0]["text"] == alone(reference, prompt, "code", n, **plain)
            chat = {"model": "code", "messages": [{"role": "user", "content": "hi"}],
                    "temperature": 0, "ignore_eos": True, "documents": []}  # fmt: skip
            got = httpx.post(url + "/v1/chat/completions", json=chat, timeout=120).json()
            if want:  # (vllm: the rest of the context)
                assert got["usage"]["completion_tokens"] == 6, got
            if where == "vllm":
                continue
            messages = [{"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "yo", "reasoning_content": "hmm"},
                        {"role": "user", "content": "again"}]  # fmt: skip
            body = {"messages": messages, "chat_template_kwargs": {"y": 3},
                    "reasoning_effort": "low", "documents": [{"text": "d"}]}  # fmt: skip
            r = httpx.post(url + "/tokenize", json=body).json()
            text = reference.tokenizer.decode(r["tokens"])
            assert text == "-|1|3|1|user:hi|assistant:yo[hmm/hmm]|user:again|low", text
            bad = {"model": "base", "messages": messages, "chat_template": "{{ 1 }}"}
            err = _error(httpx.post(url + "/v1/chat/completions", json=bad), 400)
            assert err["param"] == "chat_template"
            assert httpx.get(url + "/ping").status_code == 200
            assert httpx.post(url + "/ping").status_code == 200
        aengine.close()
    # a generation_config.json that is not JSON, or a default that is not a number: named
    for text, says in (("{", "not valid JSON"), ('{"temperature": "hot"}', "not a number"),
                       ("[1]", "not a JSON object"),
                       ('{"max_new_tokens": 0}', "max_new_tokens is 0, not a positive"),
                       ('{"max_new_tokens": 2.5}', "not a positive whole"),
                       ('{"max_new_tokens": Infinity}', "not a number"),
                       ('{"temperature": NaN}', "not a number")):  # fmt: skip
        (tmp_path / "base" / "generation_config.json").write_text(text)
        with pytest.raises(ConfigError, match=says) as e:
            generation_defaults(tmp_path / "base")
        assert "--generation-config vllm" in str(e.value)
    with pytest.raises(ConfigError, match="no such folder"):
        generation_defaults(tmp_path / "nowhere")
    (tmp_path / "base" / "generation_config.json").write_text('{"top_p": 5}')  # out of range
    with pytest.raises(ConfigError, match="generation_config.json: top_p") as e:
        build_app(tmp_path / "base", {}, device="cpu", dtype=torch.float32, cfg=ServerConfig())
    assert "--generation-config vllm" in str(e.value)
    (tmp_path / "base" / "generation_config.json").unlink()
    assert generation_defaults(tmp_path / "base") == {}


def test_cors_only_for_the_origins_given(family, server):
    """--allowed-origins (vLLM's CORS flags): a browser's preflight from a listed origin is
    answered and its calls carry the header; another origin, or a server without the flag,
    gets neither."""
    base, archives, _ = family
    preflight = {"Origin": "http://ui.test", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}  # fmt: skip
    cfg = ServerConfig(allowed_origins=("http://ui.test",))
    app, aengine = build_app(base, archives, device="cpu", dtype=torch.float32, cfg=cfg)
    with ServerThread(app) as srv:
        r = httpx.options(srv.url + "/v1/chat/completions", headers=preflight)
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "http://ui.test"
        r = httpx.get(srv.url + "/v1/models", headers={"Origin": "http://ui.test"})
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "http://ui.test"
        other = {**preflight, "Origin": "http://evil.test"}
        r = httpx.options(srv.url + "/v1/chat/completions", headers=other)
        assert "access-control-allow-origin" not in r.headers
    aengine.close()
    r = httpx.options(server[0].url + "/v1/chat/completions", headers=preflight)
    assert r.status_code == 405 and "access-control-allow-origin" not in r.headers


def test_stop_strings_streamed_and_not(client, reference):
    prompt = "The import statement"
    free = alone(reference, prompt, "prose", 30, ignore_eos=True)
    stop = free[len(free) // 2 : len(free) // 2 + 2]  # a string that does occur
    assert stop and stop in free
    want = alone(reference, prompt, "prose", 30, ignore_eos=True, stop=[stop])
    kw = dict(model="prose", prompt=prompt, max_tokens=30, temperature=0, stop=[stop],
              extra_body={"ignore_eos": True})  # fmt: skip
    r = client.completions.create(**kw)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    text = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True))
    assert text == want and stop not in text


def test_n_seed_and_several_prompts(client):
    kw = dict(model="code", max_tokens=8, temperature=1.0, seed=7, n=3)
    a = client.completions.create(prompt=["x = ", "def f("], **kw)
    b = client.completions.create(prompt=["x = ", "def f("], **kw)
    assert [c.index for c in a.choices] == list(range(6))
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: reproducible
    assert len({c.text for c in a.choices[:3]}) > 1  # choices differ from one another
    echo = client.completions.create(model="code", prompt="x = ", max_tokens=3, echo=True,
                                     temperature=0)  # fmt: skip
    assert echo.choices[0].text.startswith("x = ")


def test_penalties_bias_min_tokens_and_min_p_equal_the_engine(client, reference):
    """vLLM's sampling parameters through the official client (OpenAI's fields, and vLLM's
    through extra_body) give what the engine gives the same SamplingParams alone."""
    prompt = "def add(a, b):"
    kw = dict(presence_penalty=0.6, frequency_penalty=0.4, repetition_penalty=1.5,
              logit_bias={7: 3.0, 9: -100.0}, min_tokens=6)  # fmt: skip
    vllm_fields = {"repetition_penalty": 1.5, "min_tokens": 6}
    r = client.completions.create(model="code", prompt=prompt, max_tokens=10, temperature=0,
                                  presence_penalty=0.6, frequency_penalty=0.4,
                                  logit_bias={"7": 3.0, "9": -100.0},
                                  extra_body=vllm_fields)  # fmt: skip
    out = alone_output(reference, prompt, "code", 10, **kw)
    assert r.choices[0].text == out.text
    plain = alone_output(reference, prompt, "code", 10)
    assert out.token_ids != plain.token_ids  # the adjustments changed the answer
    assert 9 not in out.token_ids and len(out.token_ids) >= 6
    sampled = dict(model="code", prompt=prompt, max_tokens=8, temperature=1.0, seed=3)
    a = client.completions.create(**sampled, extra_body={"min_p": 0.3})
    b = alone_output(reference, prompt, "code", 8, temperature=1.0, seed=3, min_p=0.3)
    assert a.choices[0].text == b.text


def test_request_fields_map_to_sampling_params():
    """Every sampling field of a request reaches the engine's SamplingParams (one by one: a
    field the server dropped would show here even where it would not change an answer)."""
    from expertswitch.server.protocol import CompletionRequest, sampling_params

    req = CompletionRequest(model="m", prompt="x", temperature=0.7, top_p=0.9, top_k=5,
                            presence_penalty=0.6, frequency_penalty=-0.4,
                            repetition_penalty=1.3, logit_bias={"7": 3.0, "11": -100},
                            min_tokens=2, min_p=0.05, seed=4, stop=["\n"],
                            stop_token_ids=[9], ignore_eos=True,
                            include_stop_str_in_output=True,
                            skip_special_tokens=False)  # fmt: skip
    sp = sampling_params(req, 10, 1)
    assert (sp.temperature, sp.top_p, sp.top_k, sp.seed, sp.max_tokens) == (0.7, 0.9, 5, 5, 10)
    assert (sp.presence_penalty, sp.frequency_penalty, sp.repetition_penalty) == (0.6, -0.4, 1.3)
    assert sp.logit_bias == {7: 3.0, 11: -100} and sp.min_tokens == 2 and sp.min_p == 0.05
    assert sp.stop == ["\n"] and sp.stop_token_ids == [9] and sp.ignore_eos
    assert sp.include_stop_str_in_output and not sp.skip_special_tokens
    plain = sampling_params(CompletionRequest(model="m", prompt="x"), 10, 0)
    assert not plain.adjusts_logits and plain.min_p == 0 and plain.repetition_penalty == 1


def test_min_tokens_holds_back_stop_strings(reference):
    """As vLLM: no stop string ends the answer before min_tokens tokens, and one that already
    appeared earlier does not cut it back afterwards."""
    prompt = "def add(a, b):"
    plain = alone_output(reference, prompt, "code", 12)
    n = next(
        i
        for i in range(1, 12)
        if plain.text
        and reference.tokenizer.decode(plain.token_ids[:i], skip_special_tokens=True).strip()
    )
    stop = reference.tokenizer.decode(plain.token_ids[:n], skip_special_tokens=True).strip()
    early = alone_output(reference, prompt, "code", 12, stop=[stop])
    assert early.finish_reason == "stop" and len(early.token_ids) <= n
    held = alone_output(reference, prompt, "code", 12, stop=[stop], min_tokens=n + 3)
    assert len(held.token_ids) >= n + 3
    assert held.token_ids == plain.token_ids[: len(held.token_ids)]
    assert held.text.startswith(stop)  # the early occurrence stays in the text


def test_token_id_prompts(client, reference):
    ids = reference.tokenizer.encode("for i in range(")
    r = client.completions.create(model="code", prompt=ids, max_tokens=10, temperature=0)
    assert r.choices[0].text == alone(reference, ids, "code", 10)


def test_completion_logprobs_with_echo_equal_transformers(family, client, reference, tmp_path):
    """lm-eval's loglikelihood request (echo + logprobs): every prompt and generated token's
    logprob against transformers on the checkpoint rebuilt from the same archive."""
    from transformers import AutoModelForCausalLM

    from expertswitch.compress import reconstruct

    base, archives, _ = family
    prompt = "def total(values):\n    return"
    r = client.completions.create(model="math", prompt=prompt, max_tokens=4, temperature=0,
                                  echo=True, logprobs=3)  # fmt: skip
    lp = r.choices[0].logprobs
    ids = reference.tokenizer.encode(prompt)
    gen = alone_output(reference, prompt, "math", 4).token_ids
    full = ids + gen
    assert len(lp.tokens) == len(full) and lp.token_logprobs[0] is None
    assert lp.top_logprobs[0] is None
    assert "".join(lp.tokens) == r.choices[0].text  # token texts tile the echoed text
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(full))]
    rec = reconstruct(base, archives["math"], tmp_path / "math-rec", progress=False,
                      dtype=torch.float32)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(rec, dtype=torch.float32).eval()
    with torch.no_grad():
        want = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), -1)
    tok = reference.tokenizer
    checked = 0
    for i in range(1, len(full)):
        assert abs(lp.token_logprobs[i] - want[i - 1, full[i]].item()) < 2e-3, i
        top_ids = want[i - 1].topk(3).indices.tolist()
        texts = [tok.decode([t]) for t in top_ids]
        got = lp.top_logprobs[i]
        key = tok.decode([full[i]])  # another top id decoding alike may hold the key
        clash = any(t != full[i] and text == key for t, text in zip(top_ids, texts))
        assert len(got) <= 4 and (clash or got[key] == lp.token_logprobs[i]), i
        if len(set(texts)) == 3:  # (ids that decode alike share one key, as in vLLM)
            for t, text in zip(top_ids, texts):
                assert abs(got[text] - want[i - 1, t].item()) < 2e-3, (i, text)
            checked += 1
    # (every position's own logprob is compared above; the top-3 where the ids decode apart,
    # which the fixture's 384-token byte-level vocabulary makes about half of them)
    assert checked >= len(full) // 3
    # vLLM's prompt_logprobs (here 3, beside echo's 1: each shows its own k): per prompt token
    # its logprob and rank, and the 3 most likely, keyed by token id
    r = client.completions.create(model="math", prompt=prompt, max_tokens=1, temperature=0,
                                  echo=True, logprobs=1,
                                  extra_body={"prompt_logprobs": 3})  # fmt: skip
    assert all(len(t) <= 2 for t in r.choices[0].logprobs.top_logprobs[1:])
    plp = r.choices[0].model_extra["prompt_logprobs"]
    assert len(plp) == len(ids) and plp[0] is None
    for i in range(1, len(ids)):
        row = want[i - 1]
        mine = plp[i][str(ids[i])]
        assert abs(mine["logprob"] - row[ids[i]].item()) < 2e-3, i
        above = (row > row[ids[i]] + 1e-4).sum().item() + 1
        near = (row > row[ids[i]] - 1e-4).sum().item()  # (ties within rounding: either)
        assert above <= mine["rank"] <= near, (i, mine, above, near)
        assert mine["decoded_token"] == tok.decode([ids[i]])
        for rank, t in enumerate(row.topk(3).indices.tolist(), 1):
            if str(t) != str(ids[i]):
                assert plp[i][str(t)]["rank"] == rank or abs(
                    plp[i][str(t)]["logprob"] - row[t].item()) < 2e-3  # fmt: skip
        assert len(plp[i]) in (3, 4)
    chat = client.chat.completions.create(model="math", max_tokens=1, extra_body={
        "prompt_logprobs": 0}, messages=[{"role": "user", "content": "2 + 3?"}])  # fmt: skip
    cplp = chat.model_extra["prompt_logprobs"]
    ids = chat_ids(reference, [{"role": "user", "content": "2 + 3?"}])
    assert len(cplp) == len(ids) and cplp[0] is None
    assert all(list(e) == [str(t)] for e, t in zip(cplp[1:], ids[1:]))
    with pytest.raises(openai.BadRequestError, match="not available with stream"):
        client.completions.create(model="math", prompt=prompt, max_tokens=1, stream=True,
                                  extra_body={"prompt_logprobs": 1})  # fmt: skip
    with pytest.raises(openai.BadRequestError, match="prompt_logprobs must be"):
        client.completions.create(model="math", prompt=prompt, max_tokens=1,
                                  extra_body={"prompt_logprobs": -1})  # fmt: skip


def test_echo_with_zero_max_tokens_scores_the_prompt_alone(client):
    kw = dict(model="prose", prompt="The import statement", max_tokens=0, echo=True,
              logprobs=1, temperature=0)  # fmt: skip
    r = client.completions.create(**kw)
    c = r.choices[0]
    assert c.text == "The import statement" and r.usage.completion_tokens == 0
    assert "".join(c.logprobs.tokens) == c.text and c.logprobs.token_logprobs[0] is None
    assert all(v < 0 for v in c.logprobs.token_logprobs[1:])
    streamed = client.completions.create(**kw, stream=True)
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == c.text


def test_chat_logprobs_streamed_and_not(client):
    kw = dict(model="code", messages=[{"role": "user", "content": "def f(x):"}], max_tokens=6,
              temperature=0, logprobs=True, top_logprobs=2,
              extra_body={"ignore_eos": True})  # fmt: skip
    r = client.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    assert len(content) == 6 == r.usage.completion_tokens
    for e in content:  # greedy: the chosen token is the most likely one
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
        assert e.token == e.top_logprobs[0].token and e.logprob == e.top_logprobs[0].logprob
        assert e.logprob <= 0 and bytes(e.bytes).decode("utf-8") == e.token
    streamed = []
    for chunk in client.chat.completions.create(**kw, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.content
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]


def test_auto_routes_clear_queries_to_their_expert(client):
    queries = {"math": "Q: Sam has 14 apples and buys 23 more. How many apples does he have?",
               "code": "def parse(line):\n    fields = line.split(',')\n    return fields[0]",
               "prose": "The import statement combines two operations; it searches for the "
                        "named module, then it binds the results of that search to a name in "
                        "the local scope."}  # fmt: skip
    for domain, q in queries.items():
        r = client.chat.completions.create(model="auto", max_tokens=4, temperature=0,
                                           messages=[{"role": "user", "content": q}])  # fmt: skip
        assert r.model == domain, (domain, r.model_extra)
        routing = r.model_extra["routing"]
        assert routing["expert"] == domain and 0.5 < routing["confidence"] <= 1.0
        c = client.completions.create(model="auto", prompt=q, max_tokens=2, temperature=0)
        assert c.model == domain


def test_concurrent_streams_are_neither_lost_nor_mixed(server, reference):
    """40 streams at once over every expert, the base and auto: each stream's text equals the
    same request served alone; afterwards the engine holds nothing."""
    url = server[0].url
    prompts = ["def f(x):\n", "Q: What is 3 + 4?\nA:", "The import statement", "class A:\n",
               "x = [1, 2"]  # fmt: skip
    models = ["base", *DOMAINS]
    jobs = [(models[i % 4], prompts[i % 5], 6 + i % 7) for i in range(40)]

    async def one(http, model, prompt, n):
        body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0,
                "stream": True, "ignore_eos": True}  # fmt: skip
        text = ""
        async with http.stream("POST", url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    text += json.loads(line[6:])["choices"][0]["text"]
        return text

    async def all_of_them():
        async with httpx.AsyncClient(timeout=300) as http:
            return await asyncio.gather(*(one(http, *j) for j in jobs))

    texts = asyncio.run(all_of_them())
    for (model, prompt, n), text in zip(jobs, texts):
        want = alone(reference, prompt, None if model == "base" else model, n, ignore_eos=True)
        assert text == want, (model, prompt)
    assert metric(url, "expertswitch_kv_blocks_used") == 0
    assert metric(url, "expertswitch_num_requests_running") == 0
    assert metric(url, "expertswitch_requests_in_flight") == 0


def test_disconnect_mid_stream_frees_its_blocks(server):
    url = server[0].url
    body = {"model": "math", "prompt": "Q: 1 + 1?", "max_tokens": 200, "temperature": 0,
            "stream": True, "ignore_eos": True}  # fmt: skip
    aborted = "expertswitch_engine_aborts_total"  # the engine's own count
    before = metric(url, aborted)
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        assert metric(url, "expertswitch_kv_blocks_used") > 0
    # the connection is closed: the engine aborts the request before its next step
    deadline = time.monotonic() + 60  # a hang guard
    while metric(url, "expertswitch_kv_blocks_used") > 0:
        assert time.monotonic() < deadline, "the blocks of a closed stream were not freed"
        time.sleep(0.05)
    assert metric(url, "expertswitch_num_requests_running") == 0
    assert metric(url, aborted) == before + 1  # freed by the abort, not by finishing


def test_disconnect_while_waiting_for_a_whole_answer_aborts_it(server):
    """A non-streaming client that gives up (its timeout) has its requests aborted too."""
    url = server[0].url
    body = {"model": "code", "prompt": "x = 1", "max_tokens": 240, "n": 16, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    before = metric(url, "expertswitch_engine_aborts_total")
    with pytest.raises(httpx.TimeoutException):
        httpx.post(url + "/v1/completions", json=body, timeout=0.5)
    deadline = time.monotonic() + 60  # a hang guard
    while metric(url, "expertswitch_kv_blocks_used") > 0 or \
            metric(url, "expertswitch_engine_aborts_total") < before + 16:  # fmt: skip
        assert time.monotonic() < deadline, "a gone client's requests kept running"
        time.sleep(0.05)
    assert metric(url, "expertswitch_requests_in_flight") == 0


def test_collector_merges_what_a_slow_reader_has_not_read():
    """A client that stops reading holds one merged output per request, not one per step."""
    from expertswitch.engine.request import RequestOutput
    from expertswitch.server.async_engine import ClientGone, OutputCollector

    async def run():
        col = OutputCollector()
        for step in range(5):
            col.put(RequestOutput("a", [1], list(range(step + 1)), "t" * (step + 1), None,
                                  step == 4, "length" if step == 4 else None, [step]))  # fmt: skip
        col.put(RequestOutput("b", [1], [9], "b", None, False, None, [9]))
        outs = {o.request_id: o for o in await col.get()}
        assert outs["a"].new_token_ids == [0, 1, 2, 3, 4] and outs["a"].finished
        assert outs["a"].text == "ttttt" and outs["b"].new_token_ids == [9]
        col.close()
        with pytest.raises(ClientGone):
            await col.get()

    asyncio.run(run())


def test_metrics_and_health(server, client):
    url = server[0].url
    client.completions.create(model="code", prompt="a = ", max_tokens=3, temperature=0)
    assert httpx.get(url + "/health").status_code == 200
    text = httpx.get(url + "/metrics").text
    for name in ("expertswitch_time_to_first_token_seconds_count",
                 "expertswitch_inter_token_latency_seconds_bucket",
                 "expertswitch_request_success_total", "expertswitch_generation_tokens_total",
                 "expertswitch_num_requests_waiting", "expertswitch_kv_blocks_total",
                 'expertswitch_expert_residency{expert="code",tier="device"} 1.0',
                 "expertswitch_pool_disk_loads_total", "expertswitch_pool_switch_seconds_total",
                 'expertswitch_expert_bytes{expert="code"}'):  # fmt: skip
        assert name in text, name
    assert metric(url, 'expertswitch_time_to_first_token_seconds_count{model="code"}') >= 1


# errors ------------------------------------------------------------------------------------


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["message"]
    return err


@pytest.mark.parametrize("body, status, needle", [
    ({"model": "nope", "prompt": "x"}, 404, "does not exist"),
    ({"model": "math", "messages": []}, 400, "messages is empty"),
    ({"model": "math", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "math", "prompt": "x", "max_tokens": 10**6}, 400, "at most"),
    ({"model": "math", "prompt": "x " * 400}, 400, "context"),
    ({"model": "math", "prompt": [999999]}, 400, "outside the vocabulary"),
    ({"model": "math", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": "math", "prompt": "x", "presence_penalty": 2.5}, 400, "presence_penalty"),
    ({"model": "math", "prompt": "x", "logit_bias": {"abc": 1}}, 400, "not a token id"),
    ({"model": "math", "prompt": "x", "logit_bias": {"+7": 1}}, 400, "not a token id"),
    ({"model": "math", "prompt": "x", "logit_bias": {"7": 1, "07": 2}}, 400, "twice"),
    ({"model": "math", "prompt": "x", "logit_bias": {"999999": 1}}, 400, "outside the vocab"),
    ({"model": "math", "prompt": "x", "max_tokens": 4, "min_tokens": 5}, 400, "min_tokens"),
    ({"model": "math", "prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ({"model": "math", "messages": [{"role": "user", "content": "x"}],
      "response_format": {"type": "xml"}}, 400, "type 'xml' is not supported"),
    ({"model": "math", "messages": [{"role": "user", "content": "x"}],
      "response_format": {"type": "json_schema"}}, 400, "needs json_schema"),
    ({"model": "math", "prompt": "x", "guided_json": {"type": "string", "format": "iri"}},
     400, "format 'iri' is not supported"),
    ({"model": "math", "messages": [{"role": "user", "content": "x"}], "echo": True}, 400,
     "echo is not supported"),
    ({"model": "math", "prompt": "x", "logprobs": 1, "logprob_token_ids": [3]}, 400,
     "logprob_token_ids is not supported"),
    ({"model": "math", "prompt": "x", "thinking_token_budget": 8}, 400,
     "thinking_token_budget is not supported"),
    ({"model": "math", "prompt": "x", "guided_regex": "[0-9]+"}, 400, "regex is not supported"),
    ({"model": "math", "prompt": "x", "guided_choice": ["a"], "guided_json": {}}, 400,
     "give one"),
    ({"model": "math", "prompt": "x", "structured_outputs": {"jsn": {}}}, 400, "takes json"),
    ({"model": "math", "prompt": "x", "logprobs": 21}, 400, "logprobs must be"),
    ({"model": "math", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
     400, "needs logprobs"),
    ({"model": "math"}, 400, "prompt is required"),
    ({"model": "math", "prompt": "x", "n": 0}, 400, "n must be"),
    ({"model": "auto", "prompt": ["a", "b"]}, 400, "one prompt"),
    ({"model": "base", "prompt": [-1, 5]}, 400, "outside the vocabulary"),
    ({"model": "math", "prompt": [[5], [2**70]], "echo": True}, 400, "outside the vocabulary"),
    ({"model": "auto", "prompt": [-3]}, 400, "outside the vocabulary"),
    ({"model": "math", "prompt": [[5]] * 100, "n": 20}, 400, "at most 1024"),
    ({"model": "math", "prompt": "x", "max_tokens": 256}, 400, "context"),
    ({"model": "math", "messages": [{"role": "user", "content": "x"}],
      "max_completion_tokens": 0}, 400, "max_tokens"),
])  # fmt: skip
def test_bad_requests_get_openai_errors(server, body, status, needle):
    route = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    err = _error(httpx.post(server[0].url + route, json=body, timeout=60), status)
    assert needle in err["message"], err


def test_malformed_bodies_and_routes(server, client):
    url = server[0].url
    err = _error(httpx.post(url + "/v1/completions", content=b"{not json",
                            headers={"content-type": "application/json"}), 400)  # fmt: skip
    assert "JSON" in err["message"]
    _error(httpx.post(url + "/v1/completions", json=[1, 2]), 400)
    _error(httpx.post(url + "/v1/chat/completions", json={"model": "math", "messages": [
        {"role": "user", "content": [{"type": "image_url"}]}]}), 400)  # fmt: skip
    _error(httpx.get(url + "/v1/nothing-here"), 404)
    _error(httpx.post(url + "/v1/completions", content=b"x" * (5 * 2**20)), 413)

    def chunks():  # no Content-Length: the cap holds while the body streams in
        for _ in range(6):
            yield b" " * 2**20

    _error(httpx.post(url + "/v1/completions", content=chunks()), 413)
    r = httpx.post(url + "/v1/completions", json={"model": "code", "prompt": "a", "n": None,
                                                  "stream": None, "max_tokens": 2})  # fmt: skip
    assert r.status_code == 200 and len(r.json()["choices"]) == 1  # null means the default
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=[{"role": "user",
                                                                   "content": "hi"}])  # fmt: skip
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="math", prompt="x", max_tokens=-3)
    # admin routes are off unless enabled
    _error(httpx.post(url + "/v1/experts/load", json={"name": "x", "path": "/tmp"}), 404)


def test_an_expert_that_fails_to_load_is_503_while_others_work(family, tmp_path):
    base, archives, _ = family
    broken = tmp_path / "broken.delta"
    shutil.copytree(archives["math"], broken)
    data = next(p for p in broken.iterdir() if p.suffix == ".safetensors")
    raw = bytearray(data.read_bytes())
    raw[-64:] = bytes(64)  # the tensor bytes change: the checksum check at load fails
    data.write_bytes(bytes(raw))
    open_archive(broken, verify=False)  # it registers (checksums are read at load time)
    app, aengine = build_app(base, {"math": archives["math"], "bad": broken}, device="cpu",
                             dtype=torch.float32, cfg=ServerConfig())  # fmt: skip
    with ServerThread(app) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)
        for stream in (False, True):
            with pytest.raises(openai.APIStatusError) as e:
                r = c.completions.create(model="bad", prompt="x", max_tokens=3, stream=stream)
                list(r) if stream else None
            assert e.value.status_code == 503 and "bad" in str(e.value)
        ok = c.completions.create(model="math", prompt="x", max_tokens=3, temperature=0)
        assert ok.choices[0].finish_reason in ("stop", "length")
        assert httpx.get(srv.url + "/health").status_code == 200
    aengine.close()


def test_api_key_and_admin_routes(family, tmp_path):
    base, archives, _ = family
    cfg = ServerConfig(
        api_key="s3cret", enable_admin=True, base_name="tiny-base", base_aliases=("org/tiny",)
    )  # (vLLM's --served-model-name A B)
    app, aengine = build_app(base, {"code": archives["code"]}, device="cpu",
                             dtype=torch.float32, cfg=cfg)  # fmt: skip
    with ServerThread(app) as srv:
        url = srv.url
        c = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            c.models.list()
        _error(httpx.post(url + "/v1/completions", json={"model": "code", "prompt": "x"}), 401)
        _error(httpx.get(url + "/v1/models", headers={"Authorization": "Basic s3cret"}), 401)
        assert httpx.get(url + "/health").status_code == 200  # health is open, as in vLLM
        c = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0, timeout=120)
        assert [m.id for m in c.models.list().data] == ["tiny-base", "org/tiny", "code"]
        r = c.completions.create(model="org/tiny", prompt="1 +", max_tokens=2)
        assert r.model == "tiny-base"  # (an alias answers; replies say the first name)
        auth = {"Authorization": "Bearer s3cret"}

        def post(route, body, status=200):
            r = httpx.post(url + route, json=body, headers=auth, timeout=120)
            assert r.status_code == status, r.text
            return r.json() if r.headers.get("content-type", "").startswith("application/json") \
                else r.text  # fmt: skip

        st = post("/v1/experts/load", {"name": "math", "path": str(archives["math"]),
                                       "pin": True})  # fmt: skip
        assert st["pinned"] and st["residency"] == "device"
        assert "math" in [m.id for m in c.models.list().data]
        r = c.completions.create(model="math", prompt="1 + 1 =", max_tokens=3, temperature=0)
        assert r.model == "math"
        post("/v1/experts/load", {"name": "math", "path": str(archives["math"])}, 409)
        post("/v1/experts/load", {"name": "zzz", "path": str(tmp_path)}, 400)
        for name in ("tiny-base", "org/tiny", "base"):  # the base's names are not free
            post("/v1/experts/load", {"name": name, "path": str(archives["math"])}, 400)
        post("/v1/experts/load", {"name": "long", "path": "/x" * 3000}, 400)
        post("/v1/experts/unpin", {"name": "math"})
        post("/v1/experts/unload", {"name": "math"})
        post("/v1/experts/unload", {"name": "math"}, 404)
        with pytest.raises(openai.NotFoundError):
            c.completions.create(model="math", prompt="x", max_tokens=2)
        post("/v1/load_lora_adapter", {"lora_name": "prose", "lora_path": str(archives["prose"])})
        assert "prose" in [m.id for m in c.models.list().data]
        post("/v1/unload_lora_adapter", {"lora_name": "prose"})
    aengine.close()


def test_peft_lora_adapters_over_http(family, tmp_path, monkeypatch):
    """LoRA adapters the way vLLM serves them: one given at start (as --lora-modules does),
    one loaded over HTTP (/v1/load_lora_adapter), beside a compressed expert; each is a
    model of /v1/models and answers with PEFT's own greedy tokens. An adapter the engine
    cannot serve gets a 400 naming why. An adapter loaded over HTTP (this one saved its
    embedding whole: the check reads the base's against it) is checked once, on a worker
    thread, not the engine's, whose OpenMP pool is freed after; a name already taken is
    refused before anything is read."""
    pytest.importorskip("peft")
    import threading

    from transformers import AutoTokenizer

    from expertswitch.engine import registry
    from expertswitch.utils import threads

    released = []  # threads whose OpenMP pools were freed
    real_release = threads.release_openmp_threads
    monkeypatch.setattr(threads, "release_openmp_threads", lambda: (
        released.append(threading.current_thread().name) or real_release()))  # fmt: skip
    checks = []  # (adapter dir name, thread name) of each check
    real_open = registry.open_lora
    monkeypatch.setattr(registry, "open_lora", lambda path, base: (
        checks.append((Path(path).name, threading.current_thread().name))
        or real_open(path, base)))  # fmt: skip

    base, archives, _ = family
    sql = make_adapter(base, tmp_path / "sql", 1, ["q_proj", "v_proj", "down_proj"])
    chat = make_adapter(base, tmp_path / "chat", 2, ["o_proj", "up_proj", "embed_tokens"], r=2,
                        save={"save_embedding_layers": True})  # fmt: skip
    dora = make_adapter(base, tmp_path / "dora", 3, ["q_proj"], use_dora=True)
    tok = AutoTokenizer.from_pretrained(base)
    ids = tok("def add(a, b):")["input_ids"]
    app, aengine = build_app(base, {"sql": sql, "code": archives["code"]}, device="cpu",
                             dtype=torch.float32, cfg=ServerConfig(enable_admin=True))  # fmt: skip
    with ServerThread(app) as srv:
        checks.clear()
        r = httpx.post(srv.url + "/v1/load_lora_adapter",
                       json={"lora_name": "chat", "lora_path": str(chat)}, timeout=120)  # fmt: skip
        assert r.status_code == 200, r.text
        assert len(checks) == 1 and checks[0][0] == "chat", checks
        assert checks[0][1] != "expertswitch-engine" and checks[0][1] in released
        r = httpx.post(srv.url + "/v1/load_lora_adapter",
                       json={"lora_name": "sql", "lora_path": str(chat)}, timeout=120)  # fmt: skip
        assert r.status_code == 409 and "already registered" in r.text, r.text
        assert len(checks) == 1  # (refused before reading)
        r = httpx.post(srv.url + "/v1/load_lora_adapter",
                       json={"lora_name": "d", "lora_path": str(dora)}, timeout=120)  # fmt: skip
        assert r.status_code == 400 and "DoRA" in r.json()["error"]["message"], r.text
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)
        assert [m.id for m in c.models.list().data] == ["base", "sql", "code", "chat"]
        for name, path in (("sql", sql), ("chat", chat)):
            got = c.completions.create(model=name, prompt=ids, max_tokens=8, temperature=0)
            want = peft_greedy(base, path, ids, 8)
            assert got.choices[0].text == tok.decode(want, skip_special_tokens=True), name
        # unloaded, then the name loaded again with another adapter: that adapter's answer
        r = httpx.post(srv.url + "/v1/unload_lora_adapter", json={"lora_name": "chat"})
        assert r.status_code == 200, r.text
        assert "chat" not in [m.id for m in c.models.list().data]
        with pytest.raises(openai.NotFoundError):
            c.completions.create(model="chat", prompt=ids, max_tokens=2)
        r = httpx.post(srv.url + "/v1/load_lora_adapter",
                       json={"lora_name": "chat", "lora_path": str(sql)}, timeout=120)  # fmt: skip
        assert r.status_code == 200, r.text
        got = c.completions.create(model="chat", prompt=ids, max_tokens=8, temperature=0)
        want = peft_greedy(base, sql, ids, 8)
        assert got.choices[0].text == tok.decode(want, skip_special_tokens=True)
    aengine.close()


def test_a_checked_adapter_is_taken_unless_its_files_changed(family, tmp_path, monkeypatch):
    """registry.check's adapter (run off the engine's thread by the load routes) is what
    add registers when its files are as checked; changed since (an edited config), add
    checks it again — and a check of another path is never taken for this one."""
    pytest.importorskip("peft")
    import json as _json
    import os

    from expertswitch.engine import registry

    base, _, _ = family
    lora = make_adapter(base, tmp_path / "a", 1, ["q_proj"])
    other = make_adapter(base, tmp_path / "b", 2, ["v_proj"])
    eng = Engine(base, {}, dtype=torch.float32)
    calls = []
    real_open = registry.open_lora
    monkeypatch.setattr(registry, "open_lora", lambda path, b: (
        calls.append(Path(path).name) or real_open(path, b)))  # fmt: skip
    checked = eng.registry.check(lora)
    assert calls == ["a"] and eng.registry.check(eng.base_path) is None
    eng.add_expert("x", lora, checked)
    assert calls == ["a"] and eng.registry.get("x").lora is checked
    eng.add_expert("y", lora, eng.registry.check(other))  # another path's: checked anew
    assert calls == ["a", "b", "a"] and eng.registry.get("y").lora.linear.keys() == \
        checked.linear.keys()  # fmt: skip
    again = eng.registry.check(lora)
    cfg = lora / "adapter_config.json"
    edited = _json.loads(cfg.read_text())
    edited["lora_alpha"] = 16
    cfg.write_text(_json.dumps(edited))
    os.utime(cfg, (1, 1))  # (a changed stamp whatever the clock's resolution)
    calls.clear()
    eng.add_expert("z", lora, again)
    assert calls == ["a"]
    assert eng.registry.get("z").lora is not again
    z = eng.registry.get("z").lora
    assert {f.scale for f in z.linear.values()} == {16 / 4}  # (r = 4: the edited alpha)


def test_an_expert_is_not_unloaded_under_a_beam_search(family):
    """Between two steps of a server-side beam search no request of its expert runs: the
    unload route refuses the expert all the same until the search is over (its next step
    would have failed), then unloads it."""
    import threading

    base, archives, _ = family
    app, aengine = build_app(base, {"code": archives["code"]}, device="cpu",
                             dtype=torch.float32, cfg=ServerConfig(enable_admin=True))  # fmt: skip
    body = {"model": "code", "prompt": "def add(a, b):", "max_tokens": 60, "n": 3,
            "use_beam_search": True, "ignore_eos": True}  # fmt: skip
    with ServerThread(app) as srv:
        answers = []
        search = threading.Thread(target=lambda: answers.append(
            httpx.post(srv.url + "/v1/completions", json=body, timeout=300)))  # fmt: skip
        search.start()
        while not aengine.engine.beam_searches and search.is_alive():
            time.sleep(0.005)
        unload = {"name": "code"}
        refused = httpx.post(srv.url + "/v1/experts/unload", json=unload, timeout=60)
        search.join()
        assert answers[0].status_code == 200, answers[0].text
        assert len(answers[0].json()["choices"]) == 3
        assert refused.status_code == 409 and "beam search" in refused.text, refused.text
        r = httpx.post(srv.url + "/v1/experts/unload", json=unload, timeout=60)
        assert r.status_code == 200 and not aengine.engine.beam_searches, r.text
    aengine.close()


def test_lora_modules_flag():
    """vLLM's --lora-modules forms: NAME=PATH and JSON objects, several after one flag."""
    from expertswitch.cli import _lora_args, build_parser
    from expertswitch.errors import ConfigError

    args = build_parser().parse_args(["serve", "--enable-lora", "--lora-modules", "a=/x",
                                      '{"name": "b", "path": "/y", "base_model_name": "m"}',
                                      "--max-loras", "4", "--max-lora-rank", "64"])  # fmt: skip
    assert _lora_args(args.lora_modules) == {"a": "/x", "b": "/y"}
    assert (args.max_loras, args.max_lora_rank) == (4, 64)
    for bad, match in ((["a"], "write NAME=PATH"), (["{x"], "is not valid JSON"),
                       (['{"name": "a"}'], 'give \'{"name": NAME'),
                       (["a=/x", "a=/y"], "'a' is given twice")):  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            _lora_args(bad)


def test_size_argument_parsing():
    from expertswitch.cli import _size_arg
    from expertswitch.errors import ConfigError

    assert _size_arg("20GiB", "--x") == 20 * 2**30
    assert _size_arg("512MB", "--x") == 512 * 10**6
    assert _size_arg("1000", "--x") == 1000
    assert _size_arg(None, "--x") is None
    for bad in ("lots", "-5GiB", "0"):
        with pytest.raises(ConfigError, match="--x"):
            _size_arg(bad, "--x")


def test_serve_refuses_a_router_for_experts_not_served(family):
    base, archives, router = family
    from expertswitch.errors import ConfigError

    with pytest.raises(ConfigError, match="not load"):
        build_app(base, {"math": archives["math"]}, router, device="cpu", dtype=torch.float32)


def test_a_stopped_engine_answers_503(family):
    base, archives, _ = family
    app, aengine = build_app(base, {"code": archives["code"]}, device="cpu",
                             dtype=torch.float32)  # fmt: skip
    with ServerThread(app) as srv:
        aengine.close()
        calls = [("GET", "/health", None), ("GET", "/v1/models", None)]
        for model in ("code", "base"):
            calls.append(("POST", "/v1/completions", {"model": model, "prompt": "x"}))
        for method, route, body in calls:
            _error(httpx.request(method, srv.url + route, json=body), 503)


def test_serve_command_refuses_unsafe_admin_and_bad_sizes(family, capsys):
    from expertswitch.cli import _size_arg, main
    from expertswitch.errors import ConfigError

    base, _, _ = family
    assert main(["serve", "--base", str(base), "--enable-admin", "--host", "0.0.0.0"]) == 2
    assert "--api-key" in capsys.readouterr().err
    assert main(["serve", "--base", str(base), "--enable-auto-tool-choice"]) == 2
    assert "needs --tool-call-parser NAME" in capsys.readouterr().err
    assert main(["serve", "--base", str(base), "--tool-call-parser", "hermes2"]) == 2
    assert "choose one of hermes, llama3_json, mistral, pythonic" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="unknown tool-call parser"):
        ServerConfig(tool_call_parser="qwen")
    assert main(["serve", "--base", str(base), "--reasoning-parser", "r1"]) == 2
    assert "unknown reasoning parser 'r1': choose one of deepseek_r1, qwen3" \
        in capsys.readouterr().err  # fmt: skip
    assert main(["serve", "--base", str(base), "--lora-modules", "x=/nonexistent/ad"]) == 2
    assert "/nonexistent/ad" in capsys.readouterr().err
    assert main(["serve", "--base", str(base), "--responses-kept", "-1"]) == 2
    assert "responses_kept must be a count" in capsys.readouterr().err
    for given, says in (("{x", "--default-chat-template-kwargs is not JSON"),
                        ("[1]", "must be a JSON object")):  # fmt: skip
        assert main(["serve", "--base", str(base), "--default-chat-template-kwargs", given]) == 2
        assert says in capsys.readouterr().err
    for flag in ("--allowed-origins", "--allowed-headers"):
        assert main(["serve", "--base", str(base), flag, "http://x"]) == 2
        assert "takes a JSON list of strings" in capsys.readouterr().err
    assert main(["serve", "--base", str(base), "--generation-config", "/nonexistent/g"]) == 2
    assert "--generation-config /nonexistent/g: no such folder" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="too large"):
        _size_arg("1e400", "--gpu-budget")


def test_structured_outputs_over_http(server, client, reference):
    """OpenAI's response_format (json_schema through the official client, json_object) and
    vLLM's guided_choice / structured_outputs: answers follow them, and equal the same
    constraint served alone by the independent engine (greedy)."""
    from expertswitch.engine import StructuredOutputsParams

    schema = {"type": "object", "properties": {"answer": {"type": "integer"},
                                               "why": {"type": "string", "maxLength": 8}},
              "required": ["answer"]}  # fmt: skip
    messages = [{"role": "user", "content": "2 + 3 = ?"}]
    r = client.chat.completions.create(
        model="math",
        messages=messages,
        max_tokens=40,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    )
    text = r.choices[0].message.content
    want = alone(reference, chat_ids(reference, messages), "math", 40,
                 structured_outputs=StructuredOutputsParams(json=schema))  # fmt: skip
    assert text == want
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text)["answer"], int)
    r = client.completions.create(model="code", prompt="x =", max_tokens=8, temperature=0.9,
                                  seed=4, n=3,
                                  extra_body={"guided_choice": ["yes", "no"]})  # fmt: skip
    assert all(c.text in ("yes", "no") and c.finish_reason == "stop" for c in r.choices)
    body = {"model": "base", "prompt": "{", "max_tokens": 30, "temperature": 0,
            "structured_outputs": {"json_object": True}}  # fmt: skip
    got = httpx.post(server[0].url + "/v1/completions", json=body, timeout=60).json()
    want = alone(reference, "{", None, 30,
                 structured_outputs=StructuredOutputsParams(json_object=True))  # fmt: skip
    assert got["choices"][0]["text"] == want and want.lstrip().startswith("{")


def test_tokenize_and_detokenize_as_vllm(server, reference):
    """vLLM's /tokenize (a prompt, or chat messages through the template) and /detokenize."""
    url = server[0].url
    r = httpx.post(url + "/tokenize", json={"model": "math", "prompt": "x = 1"}).json()
    assert r["tokens"] == list(reference.tokenizer.encode("x = 1"))
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == reference.max_model_len
    messages = [{"role": "user", "content": "2 + 3 = ?"}]
    r = httpx.post(url + "/tokenize", json={"messages": messages, "return_token_strs": True})
    body = r.json()
    assert body["tokens"] == chat_ids(reference, messages)
    assert body["token_strs"] == reference.tokenizer.convert_ids_to_tokens(body["tokens"])
    r = httpx.post(url + "/detokenize", json={"model": "auto", "tokens": body["tokens"]}).json()
    assert r["prompt"] == reference.tokenizer.decode(body["tokens"])
    assert (
        "outside the vocabulary"
        in _error(httpx.post(url + "/detokenize", json={"tokens": [10**6]}), 400)["message"]
    )
    assert "either prompt" in _error(httpx.post(url + "/tokenize", json={}), 400)["message"]
    # lm-eval's remote tokenizer: /tokenizer_info, then its tokens through /tokenize
    info = httpx.get(url + "/tokenizer_info").json()
    tok = reference.tokenizer
    assert info["eos_token"] == tok.eos_token and info["bos_token"] == tok.bos_token
    assert info["chat_template"] == tok.chat_template
    assert info["model_max_length"] == reference.max_model_len
    body = {"prompt": info["eos_token"], "add_special_tokens": False}
    assert httpx.post(url + "/tokenize", json=body).json()["tokens"] == [tok.eos_token_id]
    _error(httpx.post(url + "/tokenize", json={"model": "nope", "prompt": "x"}), 404)


def test_continue_final_message_and_continuous_usage(server, client, reference):
    """vLLM's continue_final_message leaves the last message open for the answer to continue
    (with add_generation_prompt false, else a 400 says so), in /tokenize too; and
    stream_options.continuous_usage_stats (with include_usage) puts each choice's usage so
    far in every chunk."""
    url = server[0].url
    messages = [{"role": "user", "content": "2 + 3 = ?"},
                {"role": "assistant", "content": "It is"}]  # fmt: skip
    open_ids = list(reference.tokenizer.encode("<|user|>\n2 + 3 = ?</s>\n<|assistant|>\nIt is",
                                               add_special_tokens=False))  # fmt: skip
    r = httpx.post(url + "/tokenize", json={"messages": messages, "add_generation_prompt": False,
                                            "continue_final_message": True}).json()  # fmt: skip
    assert r["tokens"] == open_ids
    body = {"model": "math", "messages": messages, "max_tokens": 6, "temperature": 0,
            "add_generation_prompt": False, "continue_final_message": True}  # fmt: skip
    got = httpx.post(url + "/v1/chat/completions", json=body, timeout=120).json()
    assert got["choices"][0]["message"]["content"] == alone(reference, open_ids, "math", 6)
    bad = {**body, "add_generation_prompt": True}
    says = "add_generation_prompt to false"
    assert says in _error(httpx.post(url + "/v1/chat/completions", json=bad), 400)["message"]
    ask = dict(model="math", messages=messages[:1], max_tokens=5, temperature=0, stream=True)
    only = list(client.chat.completions.create(**ask, stream_options={
        "continuous_usage_stats": True}))  # fmt: skip
    assert all(c.usage is None for c in only)  # (vLLM's: with include_usage only)
    chunks = list(client.chat.completions.create(**ask, stream_options={
        "include_usage": True, "continuous_usage_stats": True}))  # fmt: skip
    usages = [c.usage for c in chunks]
    assert all(u is not None for u in usages)
    counts = [u.completion_tokens for u in usages[:-1]]
    assert counts == sorted(counts) and counts[-1] == usages[-1].completion_tokens == 5
    assert all(u.total_tokens == u.prompt_tokens + u.completion_tokens for u in usages)


def test_a_named_tool_call_holds_its_arguments_to_the_schema(server, client, reference):
    """tool_choice naming a function (or "required" with one tool): the answer is the call's
    arguments, held to the function's parameters (vLLM's named function calling), streamed
    as tool-call deltas too; "auto" and unknown names are refused with what to do."""
    from expertswitch.engine import StructuredOutputsParams

    params = {"type": "object", "properties": {"a": {"type": "integer"},
                                               "b": {"type": "integer"}},
              "required": ["a", "b"]}  # fmt: skip
    tools = [{"type": "function", "function": {"name": "add", "parameters": params}},
             {"type": "function", "function": {"name": "noop"}}]  # fmt: skip
    messages = [{"role": "user", "content": "2 + 3 = ?"}]
    ask = {
        "model": "math",
        "messages": messages,
        "max_tokens": 40,
        "temperature": 0,
        "tools": tools,
        "tool_choice": {"type": "function", "function": {"name": "add"}},
    }
    r = client.chat.completions.create(**ask)
    call = r.choices[0].message.tool_calls[0]
    want = alone(reference, chat_ids(reference, messages), "math", 40,
                 structured_outputs=StructuredOutputsParams(json=params))  # fmt: skip
    assert call.function.name == "add" and call.function.arguments == want and call.id
    if r.choices[0].finish_reason == "stop":
        assert set(json.loads(want)) == {"a", "b"}
    streamed, names = "", []
    for chunk in client.chat.completions.create(**ask, stream=True):
        for d in chunk.choices[0].delta.tool_calls or []:
            streamed += d.function.arguments or ""
            names += [d.function.name] if d.function.name else []
    assert streamed == want and names == ["add"]
    one = client.chat.completions.create(**{**ask, "tools": tools[:1], "tool_choice": "required"})
    assert one.choices[0].message.tool_calls[0].function.arguments == want
    # "required" over both tools: a JSON list of calls, each held to its own function (vLLM's
    # schema: a tagged union on "name"), sampled hot so that both shapes come up
    from expertswitch.server.protocol import ChatCompletionRequest, forced_tool

    every = {**ask, "tool_choice": "required", "temperature": 1.0, "max_tokens": 60}
    _, schema = forced_tool(ChatCompletionRequest(**every))
    seen = set()
    for seed in range(6):
        r = client.chat.completions.create(**every, seed=seed)
        want = alone_output(reference, chat_ids(reference, messages), "math", 60,
                            temperature=1.0, seed=seed,
                            structured_outputs=StructuredOutputsParams(json=schema))  # fmt: skip
        msg = r.choices[0].message
        if want.finish_reason != "stop":
            assert msg.content == want.text and not msg.tool_calls
            continue
        calls, closed = json.loads(want.text), seed
        assert [(t.function.name, json.loads(t.function.arguments)) for t in msg.tool_calls] \
            == [(c["name"], c["parameters"]) for c in calls]  # fmt: skip
        for c in calls:
            seen.add(c["name"])
            if c["name"] == "add":
                assert set(c["parameters"]) == {"a", "b"}
    assert seen, "no answer closed"
    # streamed: the calls come whole, in the chunk that finishes (an answer that closed)
    chunks = list(client.chat.completions.create(**every, seed=closed, stream=True))
    calls = [t for ch in chunks for t in (ch.choices[0].delta.tool_calls or [])]
    final = client.chat.completions.create(**every, seed=closed).choices[0]
    assert [(t.function.name, t.function.arguments) for t in calls] == [
        (t.function.name, t.function.arguments) for t in final.message.tool_calls
    ]
    assert len({t.id for t in calls}) == len(calls) >= 1 and all(t.id for t in calls)
    assert chunks[-1].choices[0].finish_reason == final.finish_reason == "tool_calls"
    assert r.choices[0].finish_reason in ("tool_calls", "length")  # "required": OpenAI's
    assert one.choices[0].finish_reason in ("tool_calls", "length")
    # a tool's $defs under "required" beside another tool; a tool without parameters takes
    # none (arguments "{}")
    point = {"type": "object", "properties": {"p": {"$ref": "#/$defs/P"}}, "required": ["p"],
             "$defs": {"P": {"type": "object", "properties": {"x": {"type": "integer"}},
                             "required": ["x"]}}}  # fmt: skip
    defs = [{"type": "function", "function": {"name": "at", "parameters": point}},
            {"type": "function", "function": {"name": "noop"}}]  # fmt: skip
    ok = {**every, "tools": defs}
    _, schema = forced_tool(ChatCompletionRequest(**ok))
    for seed in range(3):
        msg = client.chat.completions.create(**ok, seed=seed).choices[0].message
        for t in msg.tool_calls or []:
            args = json.loads(t.function.arguments)
            assert args == {} if t.function.name == "noop" else isinstance(args["p"]["x"], int)
    assert read_ok(schema, '[{"name": "at", "parameters": {"p": {"x": 1}}}, '
                           '{"name": "noop", "parameters": {}}]')  # fmt: skip
    url = server[0].url + "/v1/chat/completions"
    unset = {k: v for k, v in ask.items() if k != "tool_choice"}  # (vLLM's "auto" then)
    for body, needle in (({**ask, "tool_choice": "auto"}, "tool-call parser"),
                         (unset, '"auto" (the default with tools) needs a tool-call parser'),
                         ({**ask, "tool_choice": {"type": "function", "function": "add"}},
                          "not among"),
                         ({**ask, "tool_choice": {"type": "function",
                                                  "function": {"name": ["add"]}}}, "not among"),
                         ({**ask, "tools": tools + tools[:1]}, "must differ"),
                         ({**ask, "tool_choice": {"type": "function", "function": {"name": "mul"}}},
                          "not among")):  # fmt: skip
        assert needle in _error(httpx.post(url, json=body, timeout=60), 400)["message"]


SAID = {  # one answer that calls get_weather then get_time, in each format tested over HTTP
    "hermes": (
        'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": '
        '"Paris"}}\n</tool_call>\n<tool_call>{"name": "get_time", "arguments": {}}'
    ),
    "pythonic": '[get_weather(city="Paris"), get_time()]',
    "phi4_mini_json": 'functools[{"name": "get_weather", "arguments": {"city": "Paris"}}, '
    '{"name": "get_time", "arguments": {}}]',
    "qwen3_coder": (  # (days: typed by the tools' schema)
        "Let me look.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n"
        "</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>\n"
        "<tool_call>\n<function=get_time>\n</function>\n</tool_call>"
    ),
}


@pytest.mark.parametrize("parser", sorted(SAID))
def test_auto_tool_choice_reads_the_calls_the_model_writes(family, reference, parser,
                                                           monkeypatch):  # fmt: skip
    """With a tool-call parser (vLLM's --enable-auto-tool-choice --tool-call-parser NAME),
    tools with tool_choice "auto" or left out leave the model to call or not, and its answer
    is read: the calls it writes become tool_calls (finish_reason "tool_calls"), the text
    before them content, streamed as content deltas then each call whole. Here the model is
    made to write calls with a choice constraint; "none" or an explicit null leaves the same
    text as content; an answer max_tokens cuts keeps "length"."""
    base, archives, _ = family
    app, aengine = build_app(base, archives, None, device="cpu", dtype=torch.float32,
                             cfg=ServerConfig(tool_call_parser=parser))  # fmt: skip
    tools = [{"type": "function", "function": {"name": name, "parameters": {
        "type": "object", "properties": {"city": {"type": "string"},
                                         "days": {"type": "integer"}}}}}
             for name in ("get_weather", "get_time")]  # fmt: skip
    said = SAID[parser]
    before = "Let me look.\n" if parser in ("hermes", "qwen3_coder") else None
    ask = {"model": "code", "messages": [{"role": "user", "content": "weather?"}],
           "tools": tools, "max_tokens": 200, "temperature": 0,
           "extra_body": {"structured_outputs": {"choice": [said]}}}  # fmt: skip
    want = [("get_weather", {"city": "Paris"}), ("get_time", {})]
    if parser == "qwen3_coder":
        want[0] = ("get_weather", {"city": "Paris", "days": 3})
    try:
        with ServerThread(app) as srv:
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0,
                                   timeout=300)  # fmt: skip
            for choice in ({}, {"tool_choice": "auto"}):
                r = client.chat.completions.create(**ask, **choice, n=2)
                for c in r.choices:
                    assert c.finish_reason == "tool_calls"
                    assert c.message.content == before
                    calls = [(t.function.name, json.loads(t.function.arguments))
                             for t in c.message.tool_calls]  # fmt: skip
                    assert calls == want
                    assert len({t.id for t in c.message.tool_calls}) == 2
            content, deltas, chunks = "", [], []
            for chunk in client.chat.completions.create(**ask, stream=True):
                chunks.append(chunk)
                d = chunk.choices[0].delta
                content += d.content or ""
                deltas += d.tool_calls or []
            assert content == (before or "")
            assert [(t.index, t.function.name, json.loads(t.function.arguments))
                    for t in deltas] == [(k, *w) for k, w in enumerate(want)]  # fmt: skip
            assert all(t.id and t.type == "function" for t in deltas)
            assert chunks[-1].choices[0].finish_reason == "tool_calls"
            # an answer without calls is all content, streamed too (a held-back partial
            # marker included); "none" and an explicit null do not read calls
            plain = {**ask, "extra_body": {"structured_outputs": {"choice": ["No call: <tool"]}}}
            r = client.chat.completions.create(**plain)
            assert r.choices[0].message.content == "No call: <tool"
            assert not r.choices[0].message.tool_calls and r.choices[0].finish_reason == "stop"
            streamed = [ch.choices[0].delta for ch in
                        client.chat.completions.create(**plain, stream=True)]  # fmt: skip
            assert "".join(d.content or "" for d in streamed) == "No call: <tool"
            assert not any(d.tool_calls for d in streamed)
            off = client.chat.completions.create(**ask, tool_choice="none")
            assert off.choices[0].message.content == said and not off.choices[0].message.tool_calls
            body = {k: v for k, v in ask.items() if k != "extra_body"}
            null = httpx.post(srv.url + "/v1/chat/completions", timeout=300, json={
                **body, **ask["extra_body"], "tool_choice": None}).json()  # fmt: skip
            assert null["choices"][0]["message"]["content"] == said
            # cut short by max_tokens after the first call: "length", the call read
            if parser == "hermes":
                short = said[: said.index("</tool_call>") + 30]
                n = len(reference.tokenizer.encode(short, add_special_tokens=False))
                cut = client.chat.completions.create(**{**ask, "max_tokens": n, "extra_body": {
                    "structured_outputs": {"choice": [short + "x" * 40]}}})  # fmt: skip
                assert cut.choices[0].finish_reason == "length"
                # a lone surrogate's escape in the arguments: sent escaped, streamed too
                odd = '<tool_call>{"name": "get_time", "arguments": {"a": "\\ud800"}}</tool_call>'
                odd_ask = {**ask, "extra_body": {"structured_outputs": {"choice": [odd]}}}
                for stream in (False, True):
                    r = client.chat.completions.create(**odd_ask, stream=stream)
                    calls = [t for ch in r for t in ch.choices[0].delta.tool_calls or []] \
                        if stream else r.choices[0].message.tool_calls  # fmt: skip
                    assert json.loads(calls[0].function.arguments) == {"a": "\ud800"}
                assert [t.function.name for t in cut.choices[0].message.tool_calls] \
                    == ["get_weather"]  # fmt: skip
            if parser == "hermes":  # a stream quiet for KEEPALIVE_S sends SSE comments
                from expertswitch.server import serving  # (a call held until it is whole),

                monkeypatch.setattr(serving, "KEEPALIVE_S", -1.0)  # which clients ignore
                with httpx.stream(
                    "POST",
                    srv.url + "/v1/chat/completions",
                    timeout=300,
                    json={
                        **{k: v for k, v in ask.items() if k != "extra_body"},
                        **ask["extra_body"],
                        "stream": True,
                    },
                ) as r:
                    assert ": keep-alive" in list(r.iter_lines())
                got = [t.function.name for ch in client.chat.completions.create(**ask, stream=True)
                       for t in ch.choices[0].delta.tool_calls or []]  # fmt: skip
                assert got == ["get_weather", "get_time"]
                tools_r = [
                    {
                        "type": "function",
                        "name": t["function"]["name"],
                        "parameters": t["function"]["parameters"],
                    }
                    for t in tools
                ]
                with client.responses.stream(
                    model="code",
                    input="weather?",
                    tools=tools_r,
                    max_output_tokens=200,
                    temperature=0,
                    extra_body=ask["extra_body"],
                ) as sdk:
                    final = sdk.get_final_response()
                assert [o.type for o in final.output] == ["message", "function_call",
                                                          "function_call"]  # fmt: skip
                monkeypatch.undo()
                # text after a call: one message (its text joined), streamed or not; sent
                # back as input items, the same prompt as the stored turn
                call = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
                for before in ("Checking.", ""):  # (no text before: the stream's message
                    choice = {"choice": [before + call + " Done."]}  # comes after the call)
                    ask_a = dict(model="code", input="weather?", tools=tools_r, temperature=0,
                                 max_output_tokens=200,
                                 extra_body={"structured_outputs": choice})  # fmt: skip
                    whole = client.responses.create(**ask_a)
                    _, streamed = _events(client.responses.create(**ask_a, stream=True))
                    kinds = [("message", None), ("function_call", "get_time")]
                    assert [(o.type, getattr(o, "name", None)) for o in whole.output] == kinds
                    got = [(o.type, getattr(o, "name", None)) for o in streamed.output]
                    assert got == (kinds if before else kinds[::-1])
                    assert whole.output_text == streamed.output_text == before + " Done."
                    (fc,) = [o for o in streamed.output if o.type == "function_call"]
                    back = [{"type": "function_call_output", "call_id": fc.call_id,
                             "output": "noon"}]  # fmt: skip
                    more = dict(model="code", max_output_tokens=2, temperature=0,
                                tools=tools_r)  # fmt: skip
                    stored = client.responses.create(**more, previous_response_id=streamed.id,
                                                     input=back)  # fmt: skip
                    items = [o.model_dump(exclude_none=True) for o in streamed.output]
                    sent = client.responses.create(**more, input=[
                        {"role": "user", "content": "weather?"}, *items, *back])  # fmt: skip
                    assert sent.usage.input_tokens == stored.usage.input_tokens
            if parser == "qwen3_coder":  # tools are checked with tool_choice left out too
                for bad in ([{"type": "function", "function": "x"}],
                            [{"type": "function", "function": {"name": "f",
                                                               "parameters": "oops"}}],
                            [{"type": "function", "function": {"name": ["f"]}}]):  # fmt: skip
                    r = httpx.post(srv.url + "/v1/chat/completions", timeout=60, json={
                        "model": "code", "messages": ask["messages"], "tools": bad,
                        "max_tokens": 4})  # fmt: skip
                    assert r.status_code == 400 and "tool" in r.text, r.text
                assert metric(srv.url, "expertswitch_requests_in_flight") == 0
            # hermes and qwen3_coder read answers with special tokens kept (some models'
            # markers are special), as vLLM does; pythonic as the request asks (skipped)
            bos = reference.tokenizer.bos_token
            bias = {"logit_bias": {str(reference.tokenizer.bos_token_id): 100}}
            marked = client.chat.completions.create(**{**ask, "max_tokens": 3, "extra_body": bias})
            kept = parser in ("hermes", "qwen3_coder")
            assert marked.choices[0].message.content == (bos * 3 if kept else "")
    finally:
        aengine.close()


@pytest.fixture(scope="module")
def thinker(family, tmp_path_factory):
    """A random tiny Llama whose tokenizer (the family's) has <think>, </think>, <tool_call>
    and </tool_call> as tokens, as Qwen's and R1's have (added, not special)."""
    from tokenizers import AddedToken
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(family[0])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t in ("<think>", "</think>", "<tool_call>", "</tool_call>")])  # fmt: skip
    cfg = tiny_config("llama", len(tok))
    cfg.bos_token_id, cfg.eos_token_id = tok.bos_token_id, tok.eos_token_id
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("thinker") / "base"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path, tok.convert_tokens_to_ids("</think>")


def test_a_reasoning_parser_splits_the_thinking_from_the_answer(thinker):
    """--reasoning-parser deepseek_r1 (beside --tool-call-parser hermes): the answer thinks
    until </think> (here a random model made to close its thinking at once by a logit bias),
    the text before it is reasoning_content (and vLLM's newer `reasoning`), the rest
    content, where the calls are read; a constraint (guided_choice, a JSON schema) holds the
    answer from </think> on, as vLLM applies it; streamed alike; include_reasoning false
    drops the thinking; a prompt that closed the thinking holds the answer from its first
    token, all content."""
    base, end = thinker
    app, aengine = build_app(base, {}, None, device="cpu", dtype=torch.float32,
                             cfg=ServerConfig(tool_call_parser="hermes",
                                              reasoning_parser="deepseek_r1"))  # fmt: skip
    said = 'Checking.<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    tools = [{"type": "function", "function": {"name": "get_time"}}]
    ask = {"model": "base", "messages": [{"role": "user", "content": "time?"}],
           "max_tokens": 120, "temperature": 0,
           "extra_body": {"structured_outputs": {"choice": [said]},
                          "logit_bias": {str(end): 100}}}  # fmt: skip
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    as_json = {**ask, "max_tokens": 30, "extra_body": {
        **ask["extra_body"], "structured_outputs": {"json": schema}}}  # fmt: skip
    try:
        with ServerThread(app) as srv:
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0,
                                   timeout=300)  # fmt: skip
            first = client.chat.completions.create(**ask, tools=tools)
            msg = first.choices[0].message
            assert msg.reasoning_content == msg.reasoning == ""  # (closed at once)
            assert first.usage.completion_tokens_details.reasoning_tokens == 0
            assert msg.content == "Checking."
            assert [t.function.name for t in msg.tool_calls] == ["get_time"]
            thought, content, calls = None, "", []
            for chunk in client.chat.completions.create(**ask, tools=tools, stream=True):
                d = chunk.choices[0].delta
                if getattr(d, "reasoning_content", None) is not None:
                    thought = (thought or "") + d.reasoning_content
                content += d.content or ""
                calls += [t.function.name for t in d.tool_calls or []]
            assert (thought, content, calls) == (None, "Checking.", ["get_time"])
            plain = client.chat.completions.create(**ask).choices[0].message  # no tools
            assert plain.content == said and plain.reasoning_content == ""
            hidden = client.chat.completions.create(**{**ask, "extra_body": {
                **ask["extra_body"], "include_reasoning": False}}).choices[0].message  # fmt: skip
            assert hidden.content == said
            assert getattr(hidden, "reasoning_content", None) is None
            held = client.chat.completions.create(**as_json).choices[0].message
            assert "a" in json.loads(held.content) and held.reasoning_content == ""
            unheld = client.chat.completions.create(**{**as_json, "extra_body": {
                "structured_outputs": {"json": schema}}})  # fmt: skip
            free = unheld.choices[0].message
            assert free.reasoning_content and free.content is None  # never closed: thinking
            done = unheld.usage.completion_tokens  # (every token of it thinking)
            assert unheld.usage.completion_tokens_details.reasoning_tokens == done == 30
            # a thinking closed after some tokens (the first bias on </think> that closes it
            # mid-answer: the model is random): the tokens before </think>, the same streamed
            for bias in range(1, 30):
                late = {**ask, "max_tokens": 12, "extra_body": {
                    "logit_bias": {str(end): bias}, "return_token_ids": True}}  # fmt: skip
                mid = client.chat.completions.create(**late)
                ids = mid.choices[0].token_ids
                if end in ids[1:-1]:
                    break
            assert end in ids[1:-1], ids
            assert mid.usage.completion_tokens_details.reasoning_tokens == ids.index(end)
            last = None
            for chunk in client.chat.completions.create(
                **late, stream=True, stream_options={"include_usage": True}
            ):
                last = chunk.usage or last
            assert last.completion_tokens_details.reasoning_tokens == ids.index(end)
            # the Responses API: a reasoning item (streamed as reasoning_text deltas), the
            # message, the calls the parser reads
            ask_r = dict(model="base", input="time?", max_output_tokens=120, temperature=0,
                         tools=[{"type": "function", "name": "get_time"}],
                         extra_body=ask["extra_body"])  # fmt: skip
            r = client.responses.create(**ask_r)
            assert [i.type for i in r.output] == ["message", "function_call"]
            assert r.output_text == "Checking." and r.output[1].name == "get_time"
            # its call answered: from the stored conversation, from the whole history as
            # input items (its text and its call one assistant turn), and as chat: alike
            call = r.output[1]
            back = [{"type": "function_call_output", "call_id": call.call_id, "output": "noon"}]
            loose = dict(
                model="base", max_output_tokens=6, temperature=0, tools=ask_r["tools"]
            )  # (free: it thinks, prompt-dependent words)
            follow = client.responses.create(**loose, previous_response_id=r.id, input=back)
            whole = client.responses.create(**loose, input=[
                {"role": "user", "content": "time?"},
                {"type": "message", "role": "assistant", "status": "completed",
                 "content": [{"type": "output_text", "text": "Checking."}]},
                {"type": "function_call", "call_id": call.call_id, "name": "get_time",
                 "arguments": call.arguments}, *back])  # fmt: skip
            chat = client.chat.completions.create(
                model="base", max_tokens=6, temperature=0, tools=tools, messages=[
                    {"role": "user", "content": "time?"},
                    {"role": "assistant", "content": "Checking.", "tool_calls": [
                        {"id": call.call_id, "type": "function", "function": {
                            "name": "get_time", "arguments": call.arguments}}]},
                    {"role": "tool", "tool_call_id": call.call_id, "content": "noon"}])  # fmt: skip

            def said(resp) -> list[str]:
                return [i.content[0].text for i in resp.output if i.type == "reasoning"]

            reply = chat.choices[0].message
            assert said(follow) == said(whole) == [reply.reasoning_content] and said(follow)[0]
            thought = chat.usage.completion_tokens_details.reasoning_tokens
            assert follow.usage.output_tokens_details.reasoning_tokens == thought == 6
            assert follow.usage.input_tokens == whole.usage.input_tokens \
                == chat.usage.prompt_tokens  # (the same prompt)  # fmt: skip
            ask_r = {**ask_r, "max_output_tokens": 30, "tools": None,
                     "extra_body": {"structured_outputs": {"json": schema}}}  # fmt: skip
            r = client.responses.create(**ask_r)
            assert [i.type for i in r.output] == ["reasoning"] and r.status == "incomplete"
            assert r.output[0].content[0].text == free.reasoning_content
            events, final = _events(client.responses.create(**ask_r, stream=True))
            thought = "".join(e.delta for e in events if e.type.endswith("reasoning_text.delta"))
            assert thought == free.reasoning_content == final.output[0].content[0].text
            for turn in ("<think>ok</think>", "<think>ok</think>\n\nHere it is: "):
                closed = client.chat.completions.create(**{**as_json, "messages": [
                    {"role": "user", "content": "time?"},
                    {"role": "assistant", "content": turn}],
                    "extra_body": {**as_json["extra_body"], "add_generation_prompt": False,
                                   "continue_final_message": True}}).choices[0].message  # fmt: skip
                assert "a" in json.loads(closed.content), turn
                assert getattr(closed, "reasoning_content", None) is None
            # reasoning_end is the server's to set
            with pytest.raises(openai.BadRequestError, match="reasoning_end is the server's"):
                client.chat.completions.create(**{**as_json, "extra_body": {
                    "structured_outputs": {"json": schema, "reasoning_end": "x"}}})  # fmt: skip
    finally:
        aengine.close()


def test_the_token_that_stops_an_answer_is_not_its_text(server, client, reference):
    """As vLLM: the EOS or stop_token_ids entry that ends an answer is not part of its text
    (include_stop_str_in_output keeps it), and skip_special_tokens false keeps special
    tokens in the text."""
    tok = reference.tokenizer
    eos, bos, word = (
        tok.eos_token_id,
        tok.bos_token_id,
        tok.encode("x", add_special_tokens=False)[0],
    )

    def gen(max_tokens=6, **kw):
        return alone_output(reference, "x = 1", None, max_tokens, **kw)

    out = gen(min_tokens=2, logit_bias={eos: 100.0})
    assert len(out.token_ids) == 3 and out.token_ids[-1] == eos
    assert out.text == tok.decode(out.token_ids[:2], skip_special_tokens=True)
    kept = gen(min_tokens=2, logit_bias={eos: 100.0}, skip_special_tokens=False)
    assert kept.token_ids == out.token_ids
    assert kept.text == tok.decode(out.token_ids[:2], skip_special_tokens=False)
    both = gen(min_tokens=2, logit_bias={eos: 100.0}, skip_special_tokens=False,
               include_stop_str_in_output=True)  # fmt: skip
    assert both.text == tok.decode(out.token_ids, skip_special_tokens=False)
    assert both.text.endswith(tok.eos_token) and not kept.text.endswith(tok.eos_token)
    stopped = gen(logit_bias={word: 100.0}, stop_token_ids=[word])
    assert stopped.token_ids == [word] and stopped.text == "" and stopped.stop_reason == word
    shown = gen(logit_bias={word: 100.0}, stop_token_ids=[word], include_stop_str_in_output=True)
    assert shown.text == tok.decode([word])
    assert gen(logit_bias={bos: 100.0}, max_tokens=3).text == ""
    assert gen(logit_bias={bos: 100.0}, max_tokens=3, skip_special_tokens=False).text \
        == tok.bos_token * 3  # fmt: skip
    r = client.completions.create(model="base", prompt="x = 1", max_tokens=3, temperature=0,
                                  logit_bias={str(bos): 100},
                                  extra_body={"skip_special_tokens": False})  # fmt: skip
    assert r.choices[0].text == tok.bos_token * 3


def read_ok(schema, text) -> bool:
    from expertswitch.engine import StructuredOutputsParams

    g = StructuredOutputsParams(json=schema).grammar_
    state = g.read(g.initial(), text)
    return state is not None and g.accepts(state)


def test_earlier_tool_calls_reach_the_chat_template():
    """An assistant turn's tool_calls (arguments parsed, as vLLM gives templates) and a tool
    turn's tool_call_id and name are kept for the template."""
    from expertswitch.server.protocol import chat_messages

    msgs = chat_messages([
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "w", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "name": "w", "content": "sunny"},
    ])  # fmt: skip
    assert msgs[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
    assert msgs[2] == {"role": "tool", "content": "sunny", "name": "w", "tool_call_id": "c1"}


def final_type(response) -> str:
    return "response.incomplete" if response.status == "incomplete" else "response.completed"


def _events(stream) -> tuple[list, dict]:
    """A Responses stream's events, checked as a grammar: sequence numbers 0, 1, ...; created,
    in_progress first, completed (or incomplete) last; each item added once at the next
    output_index, every later event of it naming that index and coming before its one
    output_item.done; each .done text or arguments equal to its deltas joined; the final
    output the done items, in index order. Returns (events, the final response)."""
    events = list(stream)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
    final = events[-1].response
    assert events[-1].type == final_type(final)
    added, done, joined = {}, {}, {}
    for e in events[2:-1]:
        if e.type == "response.output_item.added":
            assert e.output_index == len(added) and e.item.id not in added
            added[e.item.id] = e.output_index
            continue
        item_id = e.item.id if e.type == "response.output_item.done" else e.item_id
        assert item_id in added and item_id not in done, e.type
        assert e.output_index == added[item_id], e.type
        if e.type == "response.output_item.done":
            done[item_id] = e.item
        elif e.type.endswith(".delta"):
            joined[item_id] = joined.get(item_id, "") + e.delta
        elif e.type in ("response.output_text.done", "response.reasoning_text.done"):
            assert e.text == joined.get(item_id, "")
        elif e.type == "response.function_call_arguments.done":
            assert e.arguments == joined.get(item_id, "")
    assert set(done) == set(added)
    assert [o.id for o in final.output] == sorted(added, key=added.get)
    assert [done[o.id].model_dump() for o in final.output] == [o.model_dump() for o in
                                                               final.output]  # fmt: skip
    return events, final


def test_responses_api_text_stream_and_store(server, client, reference):
    """OpenAI's Responses API through the official client: input and instructions are the
    chat messages they mean (the answer is the independent engine's greedy answer to that
    prompt); max_output_tokens cuts it ("incomplete"); streamed as the Responses events,
    whose text deltas add up to it; kept for GET unless store is false, and deleted."""
    messages = [{"role": "system", "content": "Complete the code."},
                {"role": "user", "content": "def add(a, b):"}]  # fmt: skip
    ask = dict(model="code", input="def add(a, b):", instructions="Complete the code.",
               max_output_tokens=12, temperature=0)  # fmt: skip
    want = alone_output(reference, chat_ids(reference, messages), "code", 12)
    r = client.responses.create(**ask)
    assert r.output_text == want.text and len(r.output) == 1
    cut = want.finish_reason == "length"
    assert r.status == ("incomplete" if cut else "completed")
    assert r.output[-1].status == r.status  # (the item max_output_tokens cut)
    assert (r.incomplete_details.reason if cut else r.incomplete_details) == (
        "max_output_tokens" if cut else None)  # fmt: skip
    prompt = len(chat_ids(reference, messages))
    assert (r.usage.input_tokens, r.usage.output_tokens) == (prompt, len(want.token_ids))
    assert r.instructions == "Complete the code." and r.model == "code"
    events, final = _events(client.responses.create(**ask, stream=True))
    kinds = [e.type for e in events]
    assert kinds[2:4] == ["response.output_item.added", "response.content_part.added"]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done",
                            "response.output_item.done"]  # fmt: skip
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == want.text == final.output_text
    assert final.status == r.status and final.usage.output_tokens == len(want.token_ids)
    done = [e.item.status for e in events if e.type == "response.output_item.done"]
    assert done == [final.output[0].status] == [r.status]
    with client.responses.stream(**ask) as sdk:  # (the SDK's accumulator checks the
        last = list(sdk)[-1]  # events' indexes and items as it builds the response)
    assert last.type == final_type(final) and last.response.output_text == want.text
    # a follow-up continues the stored conversation, without the first one's instructions
    later = [{"role": "user", "content": "def add(a, b):"},
             {"role": "assistant", "content": want.text},
             {"role": "user", "content": "and sub?"}]  # fmt: skip
    again = client.responses.create(model="code", input="and sub?", previous_response_id=r.id,
                                    max_output_tokens=6, temperature=0)  # fmt: skip
    assert again.output_text == alone(reference, chat_ids(reference, later), "code", 6)
    url = server[0].url + "/v1/responses/"
    kept = client.responses.retrieve(final.id)
    assert kept.output_text == want.text and kept.id == final.id
    client.responses.delete(final.id)
    assert httpx.get(url + final.id).status_code == 404
    gone = client.responses.create(**ask, store=False)
    assert httpx.get(url + gone.id).status_code == 404
    # an assistant message in progress is continued, and kept as one turn with its end
    start = [{"role": "user", "content": "def add(a, b):"},
             {"type": "message", "role": "assistant", "status": "incomplete",
              "content": [{"type": "output_text", "text": "return"}]}]  # fmt: skip
    cont = client.responses.create(model="code", input=start, max_output_tokens=4,
                                   temperature=0)  # fmt: skip
    ids = chat_ids(reference, [{"role": "user", "content": "def add(a, b):"}])
    ids += reference.tokenizer.encode("return", add_special_tokens=False)
    assert cont.output_text == alone(reference, ids, "code", 4)
    nxt = client.responses.create(model="code", input="and sub?", max_output_tokens=2,
                                  previous_response_id=cont.id, temperature=0)  # fmt: skip
    turns = [{"role": "user", "content": "def add(a, b):"},
             {"role": "assistant", "content": "return" + cont.output_text},
             {"role": "user", "content": "and sub?"}]  # fmt: skip
    assert nxt.usage.input_tokens == len(chat_ids(reference, turns))


def test_responses_api_tool_round_trip(server, client, reference):
    """A function tool through the Responses API: the named call is a function_call item
    (streamed as its argument deltas too); its output sent back with previous_response_id
    continues the stored conversation — the answer equals the chat completion of the same
    messages, and so does one sent with the whole history as input items."""
    params = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6}},
              "required": ["city"]}  # fmt: skip
    tools = [{"type": "function", "name": "get_weather", "parameters": params}]
    first = dict(
        model="math",
        input="weather in Paris?",
        tools=tools,
        max_output_tokens=40,
        tool_choice={"type": "function", "name": "get_weather"},
        temperature=0,
    )
    r1 = client.responses.create(**first)
    (call,) = r1.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert set(json.loads(call.arguments)) == {"city"}
    events, final = _events(client.responses.create(**first, stream=True))
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert args == call.arguments == final.output[0].arguments
    with client.responses.stream(**first) as sdk:
        for _ in sdk:
            pass
        assert sdk.get_final_response().output[0].arguments == call.arguments
    assert [e.arguments for e in events if e.type.endswith("arguments.done")] == [args]
    back = [{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}]
    r2 = client.responses.create(model="math", previous_response_id=r1.id, input=back,
                                 tools=tools, max_output_tokens=8, temperature=0)  # fmt: skip
    # (chat's tool_choice "none": without one, tools on a server without a tool-call parser
    # are a 400 there, vLLM's implied "auto"; the Responses API answers such a turn freely)
    chat = client.chat.completions.create(
        model="math", max_tokens=8, temperature=0, tool_choice="none",
        tools=[{"type": "function", "function": {"name": "get_weather", "parameters": params}}],
        messages=[{"role": "user", "content": "weather in Paris?"},
                  {"role": "assistant", "content": None, "tool_calls": [
                      {"id": call.call_id, "type": "function", "function": {
                          "name": "get_weather", "arguments": call.arguments}}]},
                  {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"}],
    )  # fmt: skip
    assert r2.output_text == chat.choices[0].message.content
    whole = [{"role": "user", "content": "weather in Paris?"},
             {"type": "function_call", "call_id": call.call_id, "name": "get_weather",
              "arguments": call.arguments}, *back]  # fmt: skip
    r3 = client.responses.create(model="math", input=whole, tools=tools, max_output_tokens=8,
                                 temperature=0)  # fmt: skip
    assert r3.output_text == r2.output_text


def test_responses_api_refusals(server):
    """What the engine cannot do is a 400 naming it; an unknown previous response a 404."""
    url = server[0].url + "/v1/responses"
    base = {"model": "code", "input": "hi", "max_output_tokens": 4}
    image = [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]
    for extra, needle in (({"input": image}, "input_image"),
                          ({"tools": [{"type": "web_search"}]}, "web_search"),
                          ({"background": True}, "background"),
                          ({"truncation": "auto"}, "truncation"),
                          ({"top_logprobs": 2}, "logprobs"),
                          ({"input": [{"type": "item_reference", "id": "x"}]}, "item_reference"),
                          ({"text": {"format": {"type": "xml"}}}, "text.format"),
                          ({"text": {"format": "json_object"}}, "text.format"),
                          ({"top_k": "x"}, "top_k"), ({"stop": 5}, "stop"),
                          ({"tools": [{"type": "function"}]}, "a function tool is"),
                          ({"tools": [{"type": "function", "name": "f", "parameters": "x"}]},
                           "a function tool is"),
                          ({"temperature": float("nan")}, "JSON cannot carry"),
                          ({"metadata": {str(i): "v" for i in range(17)}}, "16 pairs"),
                          ({"tool_choice": "sometimes"}, "tool_choice"),
                          ({"conversation": "conv_1"}, "conversation"),
                          ({"max_tool_calls": 2}, "max_tool_calls"),
                          ({"input": [{"role": "user", "content": [3]}]}, "'int'"),
                          ({"input": [{"type": "function_call", "name": "f"}]}, "call_id"),
                          ({"input": ["hi"]}, "must be an object"),
                          ({"input": 42}, "a string or a list of input items"),
                          ({"max_output_tokens": 0}, "max_output_tokens must be at least 1"),
                          ({"tools": ["f"]}, "tools of type None"),
                          ({"metadata": {"k": "\ud800"}}, "lone surrogate")):  # fmt: skip
        r = httpx.post(url, content=json.dumps({**base, **extra}), timeout=60,
                       headers={"content-type": "application/json"})  # fmt: skip
        assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
    r = httpx.post(url, json={**base, "previous_response_id": "resp_nope"}, timeout=60)
    assert r.status_code == 404 and "resp_nope" in r.text
    deep = [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "[" * 5000},
            {"type": "function_call_output", "call_id": "c", "output": "x"}]  # fmt: skip
    r = httpx.post(url, json={**base, "input": deep}, timeout=60)  # (arguments left as text)
    assert r.status_code == 200, r.text
    # a JSON schema holds the answer (passed on as the chat's response_format)
    fmt = {"format": {"type": "json_schema", "name": "yn",
                      "schema": {"type": "string", "enum": ["yes", "no"]}}}  # fmt: skip
    r = httpx.post(url, json={**base, "text": fmt, "max_output_tokens": 10}, timeout=60)
    text = r.json()["output"][0]["content"][0]["text"]
    assert json.loads(text) in ("yes", "no")


def test_responses_disconnect_aborts_and_store_bounds(server):
    """A client that leaves a streamed response has its request aborted (blocks freed);
    the store drops its oldest responses beyond its count or bytes."""
    from expertswitch.server.responses import ResponseStore

    url = server[0].url
    body = {"model": "math", "input": "Q: 1 + 1?", "max_output_tokens": 200, "temperature": 0,
            "stream": True, "ignore_eos": True}  # fmt: skip
    aborted = "expertswitch_engine_aborts_total"
    before = metric(url, aborted)
    with httpx.stream("POST", url + "/v1/responses", json=body, timeout=120) as r:
        lines = r.iter_lines()
        while "output_text.delta" not in next(lines):
            pass
        assert metric(url, "expertswitch_kv_blocks_used") > 0
    deadline = time.monotonic() + 60  # a hang guard
    while metric(url, "expertswitch_kv_blocks_used") > 0:
        assert time.monotonic() < deadline, "the blocks of a closed stream were not freed"
        time.sleep(0.05)
    assert metric(url, aborted) == before + 1
    store = ResponseStore(2, 10**6)
    for i in range(3):
        store.put({"id": f"r{i}"}, [])
    with pytest.raises(Exception, match="no response 'r0'"):
        store.get("r0")
    assert store.get("r2")[0] == {"id": "r2"}
    small = ResponseStore(10, 60)  # bytes: each about 40 here
    small.put({"id": "a", "x": "y" * 10}, [])
    small.put({"id": "b", "x": "y" * 10}, [])
    with pytest.raises(Exception, match="no response 'a'"):
        small.get("a")
    small.delete("b")
    assert small._bytes == 0
