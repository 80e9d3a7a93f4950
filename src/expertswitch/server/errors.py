"""Errors in OpenAI's JSON shape — {"error": {"message", "type", "param", "code"}} — for every
failure the server returns, including malformed JSON, unknown routes and oversized bodies; never a
stack trace."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("expertswitch.server")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 405: "invalid_request_error", 409: "conflict_error",
          413: "invalid_request_error", 500: "server_error",
          503: "service_unavailable_error"}  # fmt: skip


class HTTPError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class BodyTooLarge(StarletteHTTPException):
    """Raised while the body streams in: an HTTPException, so FastAPI's body parsing passes it
    through instead of turning it into a 400."""

    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than the server's limit of {limit} "
                         "bytes")  # fmt: skip


def error_body(status: int, message: str, param: str | None = None,
               code: str | int | None = None) -> dict:  # fmt: skip
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"),
                      "param": param, "code": code if code is not None else status}}  # fmt: skip


def error_response(status: int, message: str, param: str | None = None,
                   code: str | int | None = None, headers: dict | None = None):  # fmt: skip
    return JSONResponse(error_body(status, message, param, code), status_code=status,
                        headers=headers)  # fmt: skip


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPError)
    async def _http_error(_: Request, e: HTTPError):
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return error_response(e.status, e.message, e.param, e.code, headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError):
        return error_response(400, _validation_message(e))

    @app.exception_handler(StarletteHTTPException)
    async def _starlette(_: Request, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception):
        log.exception("unhandled error")
        return error_response(500, f"internal server error: {type(e).__name__}")


def _validation_message(e: RequestValidationError) -> str:
    errs = e.errors()
    if not errs:
        return "the request body is invalid"
    first = errs[0]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON"
    loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    if first.get("type") == "missing":
        return f"{loc} is required"
    if not loc:
        return f"the request body must be a JSON object: {first.get('msg')}"
    return f"{loc}: {first.get('msg')}"


class BodyLimit:
    """ASGI middleware: refuse a body over `limit` bytes (by its Content-Length at once, or while
    it streams in) before anything parses it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for k, v in scope.get("headers", ()):
            if k == b"content-length" and v.isdigit() and int(v) > self.limit:
                resp = error_response(413, f"the request body is larger than the server's "
                                      f"limit of {self.limit} bytes")  # fmt: skip
                return await resp(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.limit)
            return msg

        await self.app(scope, limited, send)
