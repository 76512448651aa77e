"""Runs PredictService under functions-framework's ASGI mode (uvicorn with uvloop and httptools).

Measured on one core (docs/benchmarks.md), this function answers about twice as many
single-row requests under uvicorn as the same service under gunicorn's threaded WSGI worker,
with a p99 2.5 to 6 times lower: the predict function is ASGI. Scoring is CPU work that holds the GIL either way, so while few
requests are in flight they are answered inline on the event loop (no thread hand-off: the
lowest latency). Under many concurrent requests, inline work starves some connections (a p99
of hundreds of ms at 64 connections, measured), so requests then queue for a worker thread,
first come first served; a large body or a /reload (which loads a model) always does.

When a token is required, a request without it is answered 401 before its body is read: one
header lookup and one constant-time comparison on the fast path.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Mapping

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from bucketml.serving.app import MAX_BODY_BYTES, OPEN_PATHS, PredictService

INLINE_BODY_BYTES = 64 * 1024
INLINE_MAX_IN_FLIGHT = 8


@dataclass
class Call:
    """One HTTP request, whatever server read it (the interface PredictService uses)."""

    method: str
    path: str
    headers: Mapping[str, str]  # case-insensitive
    body: bytes | None  # None: over the size limit, not read
    authenticated: bool = True  # False: no valid token on an open route (see OPEN_PATHS)

    def get_data(self) -> bytes:
        return self.body or b""

    @property
    def content_type(self) -> str | None:
        return self.headers.get("content-type")

    @property
    def content_length(self) -> int:
        return TOO_LARGE if self.body is None else len(self.body)


TOO_LARGE = 1 << 62  # the content_length of a body that was not read for being over the limit


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes | None:
    """The body, or None as soon as it is known to exceed `limit` (never held whole)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


_in_flight = 0  # requests of this worker between arrival and answer (one event loop: no lock)


async def respond(service: PredictService, request: Request) -> Response:
    global _in_flight
    path = request.url.path
    refusal = service.access.refusal(request.headers.get("authorization")) if service.access is not None else None
    if refusal is not None and path.rstrip("/") not in OPEN_PATHS:
        return Response(*service.unauthorized(request.method, path, refusal))
    _in_flight += 1
    try:
        body = await read_body(request, service.max_body_bytes)
        call = Call(request.method, path, request.headers, body, refusal is None)
        small = call.body is not None and len(call.body) <= INLINE_BODY_BYTES
        if small and _in_flight <= INLINE_MAX_IN_FLIGHT and call.path.rstrip("/") != "/reload":
            await asyncio.sleep(0)  # let the loop take in what has arrived before this CPU work
            answer = service.handle(call)
        else:
            answer = await run_in_threadpool(service.handle, call)
    finally:
        _in_flight -= 1
    content, status, headers = answer if len(answer) == 3 else (*answer, {})  # (body, status[, headers])
    return Response(content, status, headers)
