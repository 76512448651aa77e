"""The predict function's HTTP surface on Starlette (docs/http-api.md, openapi.yaml).

Here, and only here: the route table, the status every domain error is answered with (the
exception handlers), who needs a token, and where each request is scored.

Scoring is CPU work that holds the GIL whichever thread does it, so while few requests are in
flight they are answered inline on the event loop (no thread hand-off: the lowest latency).
Under many concurrent requests inline work starves some connections (a p99 of hundreds of ms
at 64 connections, measured: docs/benchmarks.md), so requests then queue for a worker thread,
first come first served; a large body or a /reload (which loads a model) always does.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any, Awaitable, Callable

import anyio
import anyio.to_thread
from starlette.convertors import Convertor, register_url_convertor
from starlette.exceptions import HTTPException
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, Router
from starlette.types import ASGIApp, Receive, Scope, Send

from bucketml.serving.errors import (
    BucketUnavailable,
    InvalidInput,
    InvalidRequest,
    NoModelServed,
    PayloadTooLarge,
    ReloadFailed,
    TooManyRows,
    UnknownModel,
    VersionNotLoadable,
)
from bucketml.serving.observe import REQUESTED_PATH, RecordAnswers, TokenRequired
from bucketml.serving.request_body import read_body
from bucketml.serving.service import PredictService, json_response

INLINE_BODY_BYTES = 64 * 1024
INLINE_MAX_IN_FLIGHT = 8
WORKER_THREADS = 40  # the most requests scored on threads at once (anyio's default limit)


class VersionNumber(Convertor[int]):
    """A version in a path: decimal digits, as int() reads them (so /versions/03 is version 3)."""

    regex = r"\d+"

    def convert(self, value: str) -> int:
        return int(value)

    def to_string(self, value: int) -> str:
        return str(value)


register_url_convertor("version", VersionNumber())

# (path, method, endpoint): the endpoint names the PredictService method that answers, and the
# route in metrics and in the inference log. HEAD is answered wherever GET is.
ROUTE_TABLE: list[tuple[str, str, str]] = [
    ("/predict", "POST", "predict"),
    ("/reload", "POST", "reload"),
    ("/v2", "GET", "v2_server"),
    ("/v2/health/live", "GET", "v2_live"),
    ("/v2/health/ready", "GET", "v2_ready"),
    ("/v2/models/{model}", "GET", "v2_model"),
    ("/v2/models/{model}/versions/{version:version}", "GET", "v2_model"),
    ("/v2/models/{model}/ready", "GET", "v2_model_ready"),
    ("/v2/models/{model}/versions/{version:version}/ready", "GET", "v2_model_ready"),
    ("/v2/models/{model}/infer", "POST", "v2_infer"),
    ("/v2/models/{model}/versions/{version:version}/infer", "POST", "v2_infer"),
    ("/v1/models/{model}:predict", "POST", "v1_predict"),
    ("/metrics", "GET", "metrics"),
    ("/openapi.json", "GET", "openapi"),
]
NEVER_INLINE = frozenset({"reload"})  # loads a model: seconds of work that would stall every connection

# The status of each domain error; a subclass not listed takes its base class's.
STATUS_OF: dict[type[Exception], int] = {
    InvalidRequest: 400,
    UnknownModel: 404,
    VersionNotLoadable: 409,
    PayloadTooLarge: 413,
    TooManyRows: 413,
    InvalidInput: 422,
    NoModelServed: 503,
    BucketUnavailable: 503,
    ReloadFailed: 503,
}
# What werkzeug, which routed predict before, said for these; clients may have matched on them.
ROUTING_ERRORS = {
    404: "The requested URL was not found on the server. If you entered the URL manually please check your spelling and try again.",
    405: "The method is not allowed for the requested URL.",
}
# The keys of an ASGI HTTP scope (the ASGI spec); what functions-framework's router added is dropped.
ASGI_SCOPE_KEYS = ("type", "asgi", "http_version", "method", "scheme", "path", "raw_path", "query_string",
                   "root_path", "headers", "client", "server", "state", "extensions")


# Handlers are coroutines: Starlette runs a plain function handler on a worker thread.
ErrorHandler = Callable[[Request, Exception], Awaitable[Response]]


def _answered_with(status: int) -> ErrorHandler:
    async def answer(request: Request, exc: Exception) -> Response:
        return json_response({"error": str(exc)}, status)

    return answer


async def _routing_error(request: Request, exc: Exception) -> Response:
    """404 (no such path) or 405 (not with this method), as JSON naming the request."""
    assert isinstance(exc, HTTPException)
    described = ROUTING_ERRORS.get(exc.status_code, exc.detail)
    return json_response({"error": f"{request.method} {request.scope[REQUESTED_PATH]}: {described}"}, exc.status_code)


def exception_handlers() -> dict[Any, ErrorHandler]:
    handlers: dict[Any, ErrorHandler] = {
        error: _answered_with(status) for error, status in STATUS_OF.items()
    }
    handlers[HTTPException] = _routing_error
    return handlers


def routed_path(path: str) -> str:
    """The path the routes are matched against: leading slashes as one, one trailing slash
    dropped (so /v2/health/live/ is /v2/health/live, as it always was; /predict// is no route)."""
    path = "/" + path.lstrip("/")
    return path[:-1] if len(path) > 1 and path.endswith("/") else path


class PredictApp:
    """The predict function's ASGI app over one PredictService, from Starlette's parts: the
    route table in a Router, the exception handlers in the ExceptionMiddleware around it, and
    the token check and the recording of answers outside those.

    Not a `Starlette` application object: its ServerErrorMiddleware would answer a crash itself
    and re-raise it to functions-framework, which answers it again. A crash propagates instead,
    and functions-framework logs it and answers 500 as for any function.

    functions/predict/main.py hands it each request's scope and receive channel, so the body
    is read here, in chunks, and refused once over the limit (never held whole).
    """

    def __init__(self, service: PredictService):
        self.service = service
        self.routes = [Route(path, self._endpoint(name), methods=[method], name=name)
                       for path, method, name in ROUTE_TABLE]
        router = Router(self.routes, redirect_slashes=False)  # routed_path has already settled slashes
        app: ASGIApp = RecordAnswers(ExceptionMiddleware(router, handlers=exception_handlers()), service.inference_log,
                                     service.figures)
        if service.access is not None:  # checked before a body is read: one header, one constant-time comparison
            app = TokenRequired(app, service.access, self.routes)
        self._app = app
        self._in_flight = 0  # requests between arrival and answer (one event loop: no lock)
        self._threads: anyio.CapacityLimiter | None = None  # made on the event loop, at first use

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan: nothing to start or stop (test clients send it)
            return await self._app(scope, receive, send)
        path = scope["path"]
        own = {key: scope[key] for key in ASGI_SCOPE_KEYS if key in scope}
        # "app": Starlette's router then raises 404/405 as HTTPException, for _routing_error.
        own["path"], own[REQUESTED_PATH], own["app"] = routed_path(path), path, self
        await self._app(own, receive, send)

    def _endpoint(self, name: str) -> Callable[[Request], Any]:
        answer = getattr(self.service, name)
        may_run_inline = name not in NEVER_INLINE

        async def endpoint(request: Request) -> Response:
            self._in_flight += 1
            try:
                body = await read_body(request, self.service.max_body_bytes)
                scored = functools.partial(self._answer, answer, request, body)
                if may_run_inline and len(body) <= INLINE_BODY_BYTES and self._in_flight <= INLINE_MAX_IN_FLIGHT:
                    await asyncio.sleep(0)  # let the loop take in what has arrived before this CPU work
                    return scored()
                return await anyio.to_thread.run_sync(scored, limiter=self._worker_threads())
            finally:
                self._in_flight -= 1

        endpoint.__name__ = name
        return endpoint

    def _answer(self, answer: Callable[..., Response], request: Request, body: bytes) -> Response:
        self.service.manager.ensure_watching()  # the first request waits for the first look at the pointers
        return answer(request, body, **request.path_params)

    def _worker_threads(self) -> anyio.CapacityLimiter:
        if self._threads is None:
            self._threads = anyio.CapacityLimiter(WORKER_THREADS)
        return self._threads
