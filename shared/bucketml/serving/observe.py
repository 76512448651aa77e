"""ASGI middleware of the predict app: the token check, and what every answer is recorded as
(Prometheus metrics, the optional inference log), read from what was received and sent."""

from __future__ import annotations

import time
from typing import Any, Sequence

import orjson
from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bucketml import auth
from bucketml.monitoring.aggregates import ReplicaFigures
from bucketml.serving.inference_log import InferenceLogger
from bucketml.serving.metrics import LATENCY, REQUESTS, labelled

# Set in the scope by the predict service on an unpinned inference request: (the version that
# answered, the pointer generation it was routed under). Its answer then counts in the figures
# the monitor reads (monitoring.aggregates).
ROUTED = "bucketml.routed"
# The request's path as the client sent it (the routes see it with its slashes settled).
REQUESTED_PATH = "bucketml.requested_path"
# Open whatever the token policy: Kubernetes probes (through Knative's queue-proxy) carry no
# credentials; /reload is where a Knative Trigger, which cannot add headers, delivers
# model.published (it only makes the replica re-read a pointer it polls anyway); the OpenAPI
# document is public. A request without a valid token gets only `ready` from /v2/health/ready.
OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready", "/reload", "/openapi.json"})
INFERENCE_ENDPOINTS = frozenset({"predict", "v2_infer", "v1_predict"})  # what the inference log records
UNKNOWN = "unknown"  # the endpoint label of a request no route answers (404, 405)


def endpoint_of(scope: Scope) -> str:
    """The route that answered (set in the scope by Starlette's router), or UNKNOWN."""
    route = scope.get("route")
    if isinstance(route, Route) and route.methods is not None and scope["method"] in route.methods:
        return route.name
    return UNKNOWN


class TokenRequired:
    """401 for a request without a valid token, before its body is read (OPEN_PATHS excepted)."""

    def __init__(self, app: ASGIApp, access: auth.Policy, routes: Sequence[BaseRoute]):
        self.app, self.access, self.routes = app, access, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self.access.refusal(Headers(scope=scope).get("authorization"))
        if refusal is None or scope[REQUESTED_PATH].rstrip("/") in OPEN_PATHS:
            return await self.app(scope, receive, send)
        matched = next((r for r in self.routes if r.matches(scope)[0] is Match.FULL), None)
        labelled(REQUESTS, matched.name if isinstance(matched, Route) else UNKNOWN, "401", "", "").inc()
        refused = Response(orjson.dumps({"error": refusal.message}), 401,
                           {"Content-Type": "application/json", "WWW-Authenticate": refusal.challenge})
        await refused(scope, receive, send)


class RecordAnswers:
    """Counts every answer by route, status and the version that computed it, times it, and
    hands inference calls (request and response bodies) to the inference log when one is set."""

    def __init__(self, app: ASGIApp, inference_log: InferenceLogger | None, figures: ReplicaFigures | None = None):
        self.app, self.inference_log, self.figures = app, inference_log, figures

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        answer = _Answer(keep_body=self.inference_log is not None)
        request = _RequestBody(receive) if self.inference_log is not None else None

        async def sending(message: Message) -> None:
            answer.take(message)
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                answer.sent = time.perf_counter()

        await self.app(scope, receive if request is None else request.receive, sending)
        endpoint = endpoint_of(scope)
        model, version = answer.model, answer.version
        if endpoint != "metrics":
            labelled(REQUESTS, endpoint, str(answer.status), model, version).inc()
            # Until the answer's last byte was sent: work done after it (a shadow's scoring) is not the client's wait.
            seconds = (answer.sent or time.perf_counter()) - started
            labelled(LATENCY, endpoint).observe(seconds)
            routed = scope.get(ROUTED)  # an unpinned inference request: its answer counts in the monitor's figures
            if routed is not None and self.figures is not None:
                loaded, epoch = routed
                self.figures.answered(loaded.model, loaded.version, epoch, loaded.task, loaded.reference, answer.status,
                                      seconds)
        if request is not None and endpoint in INFERENCE_ENDPOINTS:
            body = request.whole()
            self.inference_log.record(
                endpoint, model or _named_model(scope, body), version, body, Headers(scope=scope).get("content-type"),
                answer.status, b"".join(answer.body), answer.content_type,
            )


class _Answer:
    """The status, the version headers and (when kept) body of the response, as they are sent."""

    def __init__(self, keep_body: bool):
        self.status = 500
        self.model = self.version = ""
        self.content_type: str | None = None
        self.sent: float | None = None  # perf_counter() when the last body message went out
        self.body: list[bytes] = []
        self._keep_body = keep_body

    def take(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            for name, value in message["headers"]:  # a few raw pairs: cheaper than a Headers per answer
                name = name.lower()
                if name == b"bucketml-model":
                    self.model = value.decode("latin-1")
                elif name == b"bucketml-model-version":
                    self.version = value.decode("latin-1")
                elif name == b"content-type":
                    self.content_type = value.decode("latin-1")
        elif message["type"] == "http.response.body" and self._keep_body:
            self.body.append(message.get("body", b""))


class _RequestBody:
    """The request body, as the app reads it."""

    def __init__(self, receive: Receive):
        self._receive = receive
        self._chunks: list[bytes] = []
        self._complete = False

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request":
            self._chunks.append(message.get("body", b""))
            self._complete = not message.get("more_body", False)
        return message

    def whole(self) -> bytes:
        """The body, or b"" if it was not read to the end (refused for its size)."""
        return b"".join(self._chunks) if self._complete else b""


def _named_model(scope: Scope, body: bytes) -> str:
    """The model a request that failed named, for the inference log ('' if none)."""
    params: dict[str, Any] = scope.get("path_params") or {}
    if "model" in params:
        return str(params["model"])
    try:  # /predict names it in the body; only refused requests get here
        model = orjson.loads(body).get("model")
    except (ValueError, RecursionError, AttributeError):
        return ""
    return model if isinstance(model, str) else ""
