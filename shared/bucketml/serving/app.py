"""The HTTP surface of the predict function (design.md §5), over `serving.ModelManager`.

Routes are declared with werkzeug's router; every answer names the version that computed it;
every client mistake is a 4xx JSON `{"error": ...}` naming what is wrong.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from typing import Any

import orjson
import prometheus_client
from werkzeug.exceptions import HTTPException
from werkzeug.routing import Map, Rule

from bucketml import __version__
from bucketml import auth
from bucketml import settings as config
from bucketml.contracts import events
from bucketml.serving import open_inference
from bucketml.serving.inference_log import InferenceLogger
from bucketml.registry.model_registry import Registry, RegistryError, check_model_name
from bucketml.serving.runtime import (
    InputError,
    LoadedModel,
    ModelManager,
    columns_from_features,
    columns_from_records,
    json_object,
    number_matrix,
    rows_from_features,
    rows_from_records,
)
from bucketml.storage import open_storage

log = logging.getLogger("bucketml.predict")

MAX_BODY_BYTES = config.DEFAULT_MAX_REQUEST_BYTES  # BUCKETML_MAX_REQUEST_BYTES sets a service's own
# The token (self.access) is checked by asgi_adapter.respond before a body is read.
# Open whatever the token policy: Kubernetes probes (through Knative's queue-proxy) carry no
# credentials; /reload is where a Knative Trigger, which cannot add headers, delivers
# model.published (it only makes the replica re-read a pointer it polls anyway); the OpenAPI
# document is public. A request without a valid token gets only `ready` from /v2/health/ready.
OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready", "/reload", "/openapi.json"})
# A datetime column is one client-facing input of ISO 8601 text; the model's part inputs are internal.
V2_TYPES = {"number": "FP32", "string": "BYTES", "boolean": "BYTES", "datetime": "BYTES"}

ROUTES = Map(
    [
        Rule("/predict", methods=["POST"], endpoint="predict"),
        Rule("/reload", methods=["POST"], endpoint="reload"),
        Rule("/v2", methods=["GET"], endpoint="v2_server"),
        Rule("/v2/health/live", methods=["GET"], endpoint="v2_live"),
        Rule("/v2/health/ready", methods=["GET"], endpoint="v2_ready"),
        Rule("/v2/models/<model>", methods=["GET"], endpoint="v2_model"),
        Rule("/v2/models/<model>/versions/<int:version>", methods=["GET"], endpoint="v2_model"),
        Rule("/v2/models/<model>/ready", methods=["GET"], endpoint="v2_model_ready"),
        Rule("/v2/models/<model>/versions/<int:version>/ready", methods=["GET"], endpoint="v2_model_ready"),
        Rule("/v2/models/<model>/infer", methods=["POST"], endpoint="v2_infer"),
        Rule("/v2/models/<model>/versions/<int:version>/infer", methods=["POST"], endpoint="v2_infer"),
        Rule("/v1/models/<model>:predict", methods=["POST"], endpoint="v1_predict"),
        Rule("/metrics", methods=["GET"], endpoint="metrics"),
        Rule("/openapi.json", methods=["GET"], endpoint="openapi"),
    ],
    strict_slashes=False,
    merge_slashes=False,  # '//v2' is no route: a 404, not a redirect without a Location
)
# Bound once: the routes do not depend on the host, and binding per request costs more than matching.
ROUTER = ROUTES.bind("bucketml")


INFERENCE_ENDPOINTS = ("predict", "v2_infer", "v1_predict")  # what the inference log records

REQUESTS = prometheus_client.Counter(
    "bucketml_predict_requests", "Requests by route, HTTP status and the model version that answered.",
    ["endpoint", "code", "model", "version"],
)
LATENCY = prometheus_client.Histogram(
    "bucketml_predict_request_seconds", "Time from request to response inside the function, by route.",
    ["endpoint"], buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
ROWS = prometheus_client.Counter("bucketml_predict_rows", "Rows scored, by model version.", ["model", "version"])


@functools.lru_cache(maxsize=4096)
def _metric(family, *labels: str):
    """The labelled child of a metric family: looked up once, not on every request."""
    return family.labels(*labels)


def _json(body: Any, status: int = 200, loaded: LoadedModel | None = None):
    """orjson: several times faster than json for the small bodies that dominate (NaN -> null)."""
    headers = {"Content-Type": "application/json"}
    if loaded is not None:
        headers["Bucketml-Model"] = loaded.model
        headers["Bucketml-Model-Version"] = str(loaded.version)
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), status, headers


def _named_model(request, args: dict) -> str:
    """The model a request that failed named, for the inference log ('' if none)."""
    if "model" in args:
        return str(args["model"])
    try:  # /predict names it in the body; only refused requests get here
        model = orjson.loads(request.get_data()).get("model")
    except (ValueError, RecursionError, AttributeError):
        return ""
    return model if isinstance(model, str) else ""


class PredictService:
    def __init__(self, manager: ModelManager, inference_log: InferenceLogger | None = None,
                 access: auth.Policy | None = None, max_body_bytes: int = MAX_BODY_BYTES):
        self.manager = manager
        self.inference_log = inference_log
        self.access = access if access is not None and access.required else None  # None: no token checked
        self.max_body_bytes = max_body_bytes

    @classmethod
    def from_environment(cls) -> "PredictService":
        """Raises config.ConfigError when the settings do not allow starting (e.g. reachable
        beyond loopback with no token; the message says what to set)."""
        host, how = auth.function_listen_host()
        access = auth.server_policy(host, "the predict function", how)
        max_body_bytes = config.max_request_bytes()
        registry = Registry(open_storage(config.bucket_url()))
        return cls(ModelManager(registry, config.pointer_poll_seconds()), InferenceLogger.from_environment(), access,
                   max_body_bytes)

    def unauthorized(self, method: str, path: str, refusal: auth.Refusal):
        """The 401 for a request without a valid token (its body is never read)."""
        try:
            endpoint = ROUTER.match(path, method)[0]
        except HTTPException:
            endpoint = "unknown"
        _metric(REQUESTS, endpoint, "401", "", "").inc()
        return orjson.dumps({"error": refusal.message}), 401, {
            "Content-Type": "application/json", "WWW-Authenticate": refusal.challenge}

    def handle(self, request):
        started = time.perf_counter()
        self.manager.ensure_watching()
        endpoint, args = "unknown", {}
        try:
            endpoint, args = ROUTER.match(request.path, request.method)
            if request.content_length and request.content_length > self.max_body_bytes:
                raise InputError(f"request body over {self.max_body_bytes} bytes, this function's limit "
                                 "(BUCKETML_MAX_REQUEST_BYTES); send fewer rows per request", 413)
            response = getattr(self, endpoint)(request, **args)
        except InputError as exc:
            response = _json({"error": str(exc)}, exc.status)
        except HTTPException as exc:  # no such route / method
            response = _json({"error": f"{request.method} {request.path}: {exc.description}"}, exc.code or 400)
        if endpoint != "metrics":
            headers = response[2] if len(response) > 2 else {}
            _metric(REQUESTS, endpoint, str(response[1]), headers.get("Bucketml-Model", ""),
                    headers.get("Bucketml-Model-Version", "")).inc()
            _metric(LATENCY, endpoint).observe(time.perf_counter() - started)
        if self.inference_log is not None and endpoint in INFERENCE_ENDPOINTS:
            headers = response[2] if len(response) > 2 else {}
            body = response[0] if isinstance(response[0], bytes) else str(response[0]).encode()
            self.inference_log.record(
                endpoint, headers.get("Bucketml-Model") or _named_model(request, args), headers.get("Bucketml-Model-Version", ""),
                request.get_data(), request.content_type, response[1], body, headers.get("Content-Type"),
            )
        return response

    def _scored(self, loaded: LoadedModel, answer: dict, rows: int, body: dict | None = None):
        _metric(ROWS, loaded.model, str(loaded.version)).inc(rows)
        return _json(answer if body is None else body, loaded=loaded)

    def metrics(self, request):
        """Prometheus text format."""
        return prometheus_client.generate_latest(), 200, {"Content-Type": prometheus_client.CONTENT_TYPE_LATEST}

    _openapi_bytes: bytes | None = None  # the document as JSON, serialized on first request

    def openapi(self, request):
        """This function's OpenAPI 3.1 document (openapi.yaml beside this module), as JSON."""
        if PredictService._openapi_bytes is None:
            import importlib.resources

            import yaml  # here, not at import: it is not on the cold-start path

            text = importlib.resources.files(__package__).joinpath("openapi.yaml").read_text(encoding="utf-8")
            PredictService._openapi_bytes = orjson.dumps(yaml.safe_load(text))
        return PredictService._openapi_bytes, 200, {"Content-Type": "application/json"}

    # --- helpers -----------------------------------------------------------------------
    @staticmethod
    def _body(request) -> dict[str, Any]:
        return json_object(request.get_data())

    def _model(self, model: str | None, version: Any) -> LoadedModel:
        if model is not None and not isinstance(model, str):
            raise InputError("'model' must be a string", 400)
        if version is not None:
            if isinstance(version, (bool, float)):
                raise InputError(f"'version' must be an integer, got {json.dumps(version)}", 400)
            try:
                version = int(version)
            except (TypeError, ValueError):
                raise InputError(f"'version' must be an integer, got {version!r}", 400) from None
        return self.manager.get(model, version)

    # --- simple protocol ---------------------------------------------------------------
    def predict(self, request):
        raw = request.get_data()
        body = self._body(request)
        loaded = self._model(body.get("model"), body.get("version"))
        if "records" in body and "features" in body:
            raise InputError("send either 'records' or 'features', not both: one request is one batch of rows", 400)
        if "records" in body:
            rows = rows_from_records(loaded.columns, body["records"])
        elif "features" in body:
            rows = rows_from_features(loaded.columns, body["features"])
        else:
            raise InputError("send {\"records\": [{column: value}]} or {\"features\": [[values in schema order]]}", 400)
        # Columnar fast path: all-number model, no JSON true/false anywhere in the body.
        if loaded.numbers_only and b"true" not in raw and b"false" not in raw:
            matrix = number_matrix(rows, len(loaded.columns))
            if matrix is not None:
                return self._scored(loaded, loaded.predict_matrix(matrix), len(rows))
        values = {c["name"]: [row[j] for row in rows] for j, c in enumerate(loaded.columns)}
        return self._scored(loaded, loaded.predict(values, len(rows)), len(rows))

    def reload(self, request):
        """A model.published event (from a Trigger): load the new version now."""
        try:
            event = events.parse_request(request.headers, request.get_data())
            if event["type"] != events.MODEL_PUBLISHED:
                raise events.MalformedEvent(f"/reload takes {events.MODEL_PUBLISHED} events, not {event['type']}")
            model = events.event_data(event).get("model")
        except events.MalformedEvent as exc:
            raise InputError(str(exc), 400) from None
        if not isinstance(model, str):
            raise InputError("the event's data names no 'model'", 400)
        try:  # a malformed event, not a failed load: 400, so the broker does not retry it
            check_model_name(model)
        except RegistryError as exc:
            raise InputError(f"the event's data names no valid model: {exc}", 400) from None
        self.manager.refresh(model)
        error = self.manager.errors().get(model)
        if error:  # 503: the broker retries; meanwhile the previous version keeps serving
            return _json({"error": f"could not load the new version of {model}: {error}"}, 503)
        return events.empty_response()

    # --- Open Inference Protocol (KServe V2) ------------------------------------------
    def v2_server(self, request):
        return _json({"name": "bucketml", "version": __version__, "extensions": ["binary_tensor_data"]})

    def v2_live(self, request):
        return _json({"live": True})

    def v2_ready(self, request):
        ready = self.manager.ready()
        if not getattr(request, "authenticated", True):  # open to probes; what is served only with the token
            return _json({"ready": ready}, 200 if ready else 503)
        body = {"ready": ready, "models": {m: x.version for m, x in self.manager.loaded().items()}}
        errors = self.manager.errors()
        if errors:  # a current version that failed to load: the previous one serves meanwhile
            body["errors"] = errors
        return _json(body, 200 if ready else 503)

    def v2_model(self, request, model: str, version: int | None = None):
        loaded = self._model(model, version)
        outputs = [{"name": "label", "datatype": "BYTES", "shape": [-1]}]
        if loaded.task == "classification":
            outputs.append({"name": "probabilities", "datatype": "FP32", "shape": [-1, len(loaded.classes)]})
        else:
            outputs = [{"name": "variable", "datatype": "FP32", "shape": [-1]}]
        return _json(
            {
                "name": model,
                "versions": [str(loaded.version)],
                "platform": "onnxruntime_onnx",
                "inputs": [{"name": c["name"], "datatype": V2_TYPES[c["type"]], "shape": [-1, 1]} for c in loaded.columns],
                "outputs": outputs,
                "parameters": {"task": loaded.task, "classes": loaded.classes},
            },
            loaded=loaded,
        )

    def v2_model_ready(self, request, model: str, version: int | None = None):
        loaded = self._model(model, version)
        body = {"name": model, "version": str(loaded.version), "ready": True}
        error = self.manager.errors().get(model) if version is None else None
        if error:
            body["error"] = f"serving version {loaded.version}: the current version could not be loaded ({error})"
        return _json(body, loaded=loaded)

    def v2_infer(self, request, model: str, version: int | None = None):
        loaded = self._model(model, version)
        infer = open_inference.parse(request.get_data(), request.headers.get(open_inference.HEADER_LENGTH), loaded.columns)
        answer = loaded.predict(infer.values, infer.rows)
        tensors = open_inference.output_tensors(loaded.task, loaded.classes, answer, infer.rows)
        body, headers = open_inference.response(model, loaded.version, infer, tensors)
        _metric(ROWS, loaded.model, str(loaded.version)).inc(infer.rows)
        return body, 200, headers | {"Bucketml-Model": loaded.model, "Bucketml-Model-Version": str(loaded.version)}

    # --- KServe V1 ---------------------------------------------------------------------
    def v1_predict(self, request, model: str):
        body = self._body(request)
        loaded = self._model(model, None)
        instances = body.get("instances")
        if not isinstance(instances, list) or not instances:
            raise InputError("'instances' must be a non-empty list of records (objects) or rows (lists in schema order)")
        if all(isinstance(i, list) for i in instances):
            values = columns_from_features(loaded.columns, instances)
        else:
            values = columns_from_records(loaded.columns, instances)
        rows = len(next(iter(values.values())))
        answer = loaded.predict(values, rows)
        return self._scored(loaded, answer, rows, {"predictions": answer["predictions"], "model": model, "version": loaded.version})
