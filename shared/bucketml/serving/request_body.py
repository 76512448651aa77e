"""Reading a request's body: never more than the function's limit, and JSON objects parsed fast."""

from __future__ import annotations

import json
from typing import Any

import orjson
from starlette.requests import Request

from bucketml.serving.errors import InvalidRequest, PayloadTooLarge


def too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"request body over {limit} bytes, this function's limit "
                           "(BUCKETML_MAX_REQUEST_BYTES); send fewer rows per request")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, streamed; PayloadTooLarge as soon as it is known to exceed `limit` (a declared
    Content-Length over it is refused before a byte is read), so it is never held whole."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def json_object(raw: bytes) -> dict[str, Any]:
    """A request body's JSON object. orjson first (fast); Python's json as the fallback,
    because clients built on it (tritonclient's JSON mode among them) send NaN for a missing
    number, which strict JSON has no spelling for."""
    try:
        body = orjson.loads(raw)
    except (ValueError, RecursionError) as exc:  # orjson refuses nesting deeper than 1024
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    return body
