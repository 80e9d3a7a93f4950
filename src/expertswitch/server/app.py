"""The FastAPI application: OpenAI routes, health, metrics and the (opt-in) admin routes.

    app = create_app(AsyncEngine(engine), router=None, cfg=ServerConfig())

`/v1/*` routes need `Authorization: Bearer KEY` when `cfg.api_key` is set (`/health` and
`/metrics` do not, as in vLLM); admin routes exist only with `cfg.enable_admin`.
"""

from __future__ import annotations

import asyncio
import secrets
import time

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from expertswitch.errors import ArchiveError, CheckpointError, CompatibilityError, ConfigError
from expertswitch.server.async_engine import AsyncEngine, EngineDead
from expertswitch.server.errors import BodyLimit, HTTPError, error_response, install_handlers
from expertswitch.server.metrics import Metrics
from expertswitch.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ExpertLoad,
    ExpertName,
    TokenizeRequest,
)
from expertswitch.server.responses import Responses, ResponsesRequest
from expertswitch.server.serving import AUTO, Disconnected, OpenAIServing, ServerConfig
from expertswitch.utils.threads import as_side_work

__all__ = ["ServerConfig", "create_app"]


def create_app(aengine: AsyncEngine, router=None, cfg: ServerConfig | None = None) -> FastAPI:
    cfg = cfg or ServerConfig()
    engine = aengine.engine
    if engine.tokenizer is None:
        raise ConfigError(f"{engine.base_path} has no tokenizer files; the server needs one "
                          "(copy tokenizer.json / tokenizer_config.json into it)")  # fmt: skip
    taken = [n for n in cfg.base_names() if n in engine.experts or n == AUTO]
    if taken:
        raise ConfigError(f"the base's name {taken[0]!r} is taken by an expert or by "
                          "'auto': choose another --served-model-name")  # fmt: skip
    if router is not None:
        missing = sorted(set(router.experts) - set(engine.experts))
        if missing:
            raise ConfigError(f"the router routes to {missing}, which this server does not "
                              "load: pass them with --expert NAME=ARCHIVE, or retrain the "
                              "router for the experts served")  # fmt: skip
    metrics = Metrics()
    serving = OpenAIServing(aengine, router, cfg, metrics)
    app = FastAPI(title="expertswitch", docs_url=None, redoc_url=None, openapi_url=None)
    install_handlers(app)
    app.add_middleware(BodyLimit, limit=cfg.max_request_bytes)
    app.state.serving, app.state.metrics, app.state.aengine = serving, metrics, aengine
    started = int(time.time())

    app.add_middleware(CountErrors, metrics=metrics)
    if cfg.allowed_origins:  # (outermost: a browser's preflight is answered before routing)
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.allowed_origins),
                           allow_methods=list(cfg.allowed_methods),
                           allow_headers=list(cfg.allowed_headers),
                           allow_credentials=cfg.allow_credentials)  # fmt: skip

    @app.exception_handler(Disconnected)
    async def _gone(_: Request, e: Disconnected):
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    @app.exception_handler(EngineDead)
    async def _dead(_: Request, e: EngineDead):
        return error_response(503, str(e), code="engine_unavailable")

    def auth(request: Request) -> None:
        if cfg.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        good = secrets.compare_digest(token.strip().encode(), cfg.api_key.encode())
        if scheme.lower() != "bearer" or not good:
            raise HTTPError(401, "invalid or missing API key: send 'Authorization: Bearer KEY'",
                            code="invalid_api_key")  # fmt: skip

    def admin() -> None:
        if not cfg.enable_admin:
            raise HTTPError(404, "admin routes are off: start the server with --enable-admin")

    guarded = [Depends(auth)]

    @app.get("/health")
    @app.get("/ping")  # (vLLM's alias: SageMaker's and some load balancers' health check)
    @app.post("/ping")
    async def health():
        if not aengine.alive:
            raise HTTPError(503, aengine.error or "the engine is shut down")
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        from expertswitch import __version__

        return {"version": __version__}

    @app.get("/metrics")
    async def prometheus():
        try:
            snap = await aengine.call(_snapshot, aengine)
        except EngineDead:
            snap = {}
        return Response(metrics.render(snap), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=guarded)
    async def models():
        experts = await aengine.call(lambda: {n: str(engine.registry.get(n).path)
                                              for n in engine.experts})  # fmt: skip
        card = {"object": "model", "created": started, "owned_by": "expertswitch",
                "max_model_len": engine.max_model_len}  # fmt: skip
        data = [
            {**card, "id": n, "root": str(engine.base_path), "parent": None}
            for n in (cfg.base_name, *cfg.base_aliases)
        ]  # (vLLM lists every name)
        data += [{**card, "id": n, "root": p, "parent": cfg.base_name} for n, p in experts.items()]
        if router is not None:
            data.append({**card, "id": AUTO, "root": "router", "parent": cfg.base_name,
                         "experts": list(router.experts)})  # fmt: skip
        return {"object": "list", "data": data}

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(body: CompletionRequest, request: Request):
        return await serving.completions(body, request)

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat(body: ChatCompletionRequest, request: Request):
        return await serving.chat(body, request)

    @app.post("/invocations", dependencies=guarded)
    async def invocations(request: Request):
        """SageMaker's one route (vLLM's): a body with `messages` is a chat completion, one
        with `prompt` a completion."""
        try:
            body = await request.json()
        except ValueError:
            raise HTTPError(400, "the request body is not valid JSON") from None
        if isinstance(body, dict) and "messages" in body:
            kind, answer = ChatCompletionRequest, serving.chat
        elif isinstance(body, dict) and "prompt" in body:
            kind, answer = CompletionRequest, serving.completions
        else:
            raise HTTPError(400, "/invocations takes a chat completion (a JSON object with "
                            "messages) or a completion (with prompt)")  # fmt: skip
        try:
            req = kind.model_validate(body)
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from None
        return await answer(req, request)

    responses = Responses(serving, cfg.responses_kept, cfg.responses_kept_bytes)

    @app.post("/v1/responses", dependencies=guarded)
    async def create_response(body: ResponsesRequest, request: Request):
        return await responses.create(body, request)

    @app.get("/v1/responses/{response_id}", dependencies=guarded)
    async def get_response(response_id: str):
        return responses.store.get(response_id)[0]

    @app.delete("/v1/responses/{response_id}", dependencies=guarded)
    async def delete_response(response_id: str):
        responses.store.delete(response_id)
        return {"id": response_id, "object": "response", "deleted": True}

    @app.post("/tokenize", dependencies=guarded)  # vLLM's
    async def tokenize(body: TokenizeRequest):
        return await serving.tokenize(body)

    @app.post("/detokenize", dependencies=guarded)
    async def detokenize(body: DetokenizeRequest):
        return await serving.detokenize(body)

    @app.get("/tokenizer_info", dependencies=guarded)  # vLLM's (lm-eval's remote tokenizer)
    async def tokenizer_info():
        return await serving.tokenizer_info()

    @app.get("/v1/experts", dependencies=guarded)
    async def experts():
        def status():
            return [vars(engine.pool.status(n)) for n in engine.experts]

        return {"object": "list", "data": await aengine.call(status)}

    _admin_routes(app, aengine, [*guarded, Depends(admin)], cfg.base_names())
    return app


def _admin_routes(app: FastAPI, aengine: AsyncEngine, deps, base_names: tuple) -> None:
    engine = aengine.engine

    async def run(fn, *args, on_engine: bool = True):
        """fn(*args) on the engine's thread (between steps), or with on_engine=False on a
        worker thread (what only reads files: the steps go on meanwhile); its errors as HTTP
        errors."""
        try:
            if not on_engine:  # (its OpenMP pool freed after: utils/threads.py)
                return await asyncio.to_thread(as_side_work, fn, *args)
            return await aengine.call(fn, *args)
        except ConfigError as e:
            msg = str(e)
            status = 404 if msg.startswith("unknown expert") else 409 if (
                "already registered" in msg or "still serves" in msg) else 400  # fmt: skip
            raise HTTPError(status, msg) from None
        except (ArchiveError, CompatibilityError, CheckpointError) as e:
            raise HTTPError(400, str(e)) from None
        except OSError as e:
            raise HTTPError(400, f"cannot read {e.filename or 'the archive'}: "
                            f"{e.strerror or e}") from None  # fmt: skip
        except EngineDead as e:
            raise HTTPError(503, str(e)) from None

    def load(name: str, path: str, pin: bool, checked=None) -> dict:
        if name in base_names:
            raise ConfigError(f"{name!r} is the base model's name here: choose another name")
        engine.add_expert(name, path, checked)
        if pin:
            try:
                engine.pin_expert(name)
            except Exception as e:  # registered but not resident: say so, keep it registered
                raise ConfigError(f"expert {name!r} is registered but could not be pinned: "
                                  f"{e}") from e  # fmt: skip
        return vars(engine.pool.status(name))

    def pin(name: str, on: bool) -> dict:
        engine.registry.get(name)
        try:
            engine.pin_expert(name, on)
        except Exception as e:
            raise ConfigError(f"expert {name!r} could not be pinned: {e}") from e
        return vars(engine.pool.status(name))

    def unload(name: str) -> dict:
        engine.remove_expert(name)
        return {"name": name, "unloaded": True}

    checking = asyncio.Semaphore(1)  # adapter checks one at a time (each may read whole
    # base tensors: concurrent loads would read them side by side)

    async def checked_load(name: str, path: str, pin: bool) -> dict:
        """A LoRA adapter's check (its whole tensors against the base's) on a worker thread,
        then the registration on the engine's: running requests do not wait for the reads.
        A name that cannot be taken is refused before anything is read (and again, for
        certain, when registering)."""
        await run(free_name, name)
        async with checking:
            checked = await run(engine.registry.check, path, on_engine=False)
        return await run(load, name, path, pin, checked)

    def free_name(name: str) -> None:
        if name in base_names:
            raise ConfigError(f"{name!r} is the base model's name here: choose another name")
        engine.registry.check_name(name)

    @app.post("/v1/experts/load", dependencies=deps)
    async def load_expert(body: ExpertLoad):
        return await checked_load(body.name, body.path, body.pin)

    @app.post("/v1/experts/unload", dependencies=deps)
    async def unload_expert(body: ExpertName):
        return await run(unload, body.name)

    @app.post("/v1/experts/pin", dependencies=deps)
    async def pin_expert(body: ExpertName):
        return await run(pin, body.name, True)

    @app.post("/v1/experts/unpin", dependencies=deps)
    async def unpin_expert(body: ExpertName):
        return await run(pin, body.name, False)

    # vLLM's names for the same thing (LoRA adapters), for tools written against vLLM
    @app.post("/v1/load_lora_adapter", dependencies=deps)
    async def load_lora(body: dict):
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not isinstance(path, str):
            raise HTTPError(400, "give lora_name and lora_path (strings)")
        await checked_load(name, path, False)
        return Response(f"Success: expert {name} added successfully.")

    @app.post("/v1/unload_lora_adapter", dependencies=deps)
    async def unload_lora(body: dict):
        name = body.get("lora_name")
        if not isinstance(name, str):
            raise HTTPError(400, "give lora_name (a string)")
        await run(unload, name)
        return Response(f"Success: expert {name} removed successfully.")


def _snapshot(aengine: AsyncEngine) -> dict:
    engine = aengine.engine
    snap = engine.stats()
    snap["in_flight"] = aengine.in_flight
    sizes = {n: engine.pool.status(n).nbytes for n in engine.experts}
    snap["expert_bytes"] = {n: b for n, b in sizes.items() if b}
    return snap


class CountErrors:
    """ASGI middleware counting responses ≥ 400 by status (500s from exceptions included). A
    plain ASGI wrapper, not Starlette's BaseHTTPMiddleware: that one swallows the client's
    disconnect message, and a handler could then never notice its client left."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting(msg):
            if msg["type"] == "http.response.start" and msg["status"] >= 400:
                self.metrics.http_errors.labels(str(msg["status"])).inc()
            await send(msg)

        try:
            await self.app(scope, receive, counting)
        except Exception:  # answered by the outermost handler as a 500
            self.metrics.http_errors.labels("500").inc()
            raise
