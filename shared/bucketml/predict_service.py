"""The HTTP surface of the predict function (design.md §5), over `serving.ModelManager`.

Routes are declared with werkzeug's router; every answer names the version that computed it;
every client mistake is a 4xx JSON `{"error": ...}` naming what is wrong.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import orjson
import prometheus_client
from werkzeug.exceptions import HTTPException
from werkzeug.routing import Map, Rule

from . import __version__, config, events
from .registry import Registry
from .serving import (
    MAX_ROWS,
    InputError,
    LoadedModel,
    ModelManager,
    columns_from_features,
    columns_from_records,
)
from .storage import open_storage

log = logging.getLogger("bucketml.predict")

MAX_BODY_BYTES = 20 * 1024 * 1024
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
    ],
    strict_slashes=False,
)


REQUESTS = prometheus_client.Counter(
    "bucketml_predict_requests", "Requests by route, HTTP status and the model version that answered.",
    ["endpoint", "code", "model", "version"],
)
LATENCY = prometheus_client.Histogram(
    "bucketml_predict_request_seconds", "Time from request to response inside the function, by route.",
    ["endpoint"], buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
ROWS = prometheus_client.Counter("bucketml_predict_rows", "Rows scored, by model version.", ["model", "version"])


def _json(body: Any, status: int = 200, loaded: LoadedModel | None = None):
    """orjson: several times faster than json for the small bodies that dominate (NaN -> null)."""
    headers = {"Content-Type": "application/json"}
    if loaded is not None:
        headers["Bucketml-Model"] = loaded.model
        headers["Bucketml-Model-Version"] = str(loaded.version)
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), status, headers


class PredictService:
    def __init__(self, manager: ModelManager):
        self.manager = manager

    @classmethod
    def from_environment(cls) -> "PredictService":
        registry = Registry(open_storage(config.bucket_url()))
        return cls(ModelManager(registry, config.pointer_poll_seconds()))

    def handle(self, request):
        started = time.perf_counter()
        self.manager.ensure_watching()
        endpoint = "unknown"
        try:
            endpoint, args = ROUTES.bind_to_environ(request.environ).match()
            if request.content_length and request.content_length > MAX_BODY_BYTES:
                raise InputError(f"request body over {MAX_BODY_BYTES} bytes; send fewer rows per request", 413)
            response = getattr(self, endpoint)(request, **args)
        except InputError as exc:
            response = _json({"error": str(exc)}, exc.status)
        except HTTPException as exc:  # no such route / method
            response = _json({"error": f"{request.method} {request.path}: {exc.description}"}, exc.code or 400)
        if endpoint != "metrics":
            headers = response[2] if len(response) > 2 else {}
            REQUESTS.labels(endpoint, str(response[1]), headers.get("Bucketml-Model", ""),
                            headers.get("Bucketml-Model-Version", "")).inc()
            LATENCY.labels(endpoint).observe(time.perf_counter() - started)
        return response

    def _scored(self, loaded: LoadedModel, answer: dict, rows: int, body: dict | None = None):
        ROWS.labels(loaded.model, str(loaded.version)).inc(rows)
        return _json(answer if body is None else body, loaded=loaded)

    def metrics(self, request):
        """Prometheus text format."""
        return prometheus_client.generate_latest(), 200, {"Content-Type": prometheus_client.CONTENT_TYPE_LATEST}

    # --- helpers -----------------------------------------------------------------------
    @staticmethod
    def _body(request) -> dict[str, Any]:
        try:
            body = orjson.loads(request.get_data())
        except (ValueError, RecursionError) as exc:  # orjson refuses nesting deeper than 1024
            raise InputError(f"request body is not valid JSON: {exc}", 400) from None
        if not isinstance(body, dict):
            raise InputError("request body must be a JSON object", 400)
        return body

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
        body = self._body(request)
        loaded = self._model(body.get("model"), body.get("version"))
        if "records" in body:
            values = columns_from_records(loaded.columns, body["records"])
        elif "features" in body:
            values = columns_from_features(loaded.columns, body["features"])
        else:
            raise InputError("send {\"records\": [{column: value}]} or {\"features\": [[values in schema order]]}", 400)
        rows = len(next(iter(values.values())))
        return self._scored(loaded, loaded.predict(values, rows), rows)

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
        self.manager.refresh(model)
        error = self.manager.errors().get(model)
        if error:  # 503: the broker retries; meanwhile the previous version keeps serving
            return _json({"error": f"could not load the new version of {model}: {error}"}, 503)
        return events.empty_response()

    # --- Open Inference Protocol (KServe V2) ------------------------------------------
    def v2_server(self, request):
        return _json({"name": "bucketml", "version": __version__, "extensions": []})

    def v2_live(self, request):
        return _json({"live": True})

    def v2_ready(self, request):
        ready = self.manager.ready()
        return _json({"ready": ready, "models": {m: x.version for m, x in self.manager.loaded().items()}}, 200 if ready else 503)

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
        return _json({"name": model, "version": str(loaded.version), "ready": True}, loaded=loaded)

    def v2_infer(self, request, model: str, version: int | None = None):
        body = self._body(request)
        loaded = self._model(model, version)
        inputs = body.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            raise InputError("'inputs' must be a non-empty list of tensors, one per column", 400)
        by_name = {}
        for i, tensor in enumerate(inputs):
            if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
                raise InputError(f"inputs[{i}] must be an object with a 'name'")
            data = tensor.get("data")
            if not isinstance(data, list):
                raise InputError(f"inputs[{i}] ('{tensor['name']}') needs 'data' as a list")
            by_name[tensor["name"]] = [v[0] if isinstance(v, list) and len(v) == 1 else v for v in data]
        names = [c["name"] for c in loaded.columns]
        missing = [n for n in names if n not in by_name]
        unknown = [n for n in by_name if n not in names]
        if missing or unknown:
            raise InputError(
                f"inputs must be exactly the model's columns; missing: {', '.join(missing) or 'none'}; "
                f"unknown: {', '.join(unknown) or 'none'}"
            )
        lengths = {len(by_name[n]) for n in names}
        if len(lengths) != 1:
            raise InputError("every input tensor must have the same number of rows")
        rows = lengths.pop()
        if rows == 0:
            raise InputError("input tensors are empty")
        if rows > MAX_ROWS:
            raise InputError(f"at most {MAX_ROWS} rows per request, got {rows}", 413)
        answer = loaded.predict({n: by_name[n] for n in names}, rows)
        if loaded.task == "classification":
            outputs = [
                {"name": "label", "datatype": "BYTES", "shape": [rows], "data": answer["predictions"]},
                {
                    "name": "probabilities",
                    "datatype": "FP32",
                    "shape": [rows, len(loaded.classes)],
                    "data": [p for row in answer["probabilities"] for p in row],
                },
            ]
        else:
            outputs = [{"name": "variable", "datatype": "FP32", "shape": [rows], "data": answer["predictions"]}]
        reply = {"model_name": model, "model_version": str(loaded.version), "outputs": outputs}
        if "id" in body:
            reply["id"] = body["id"]
        return self._scored(loaded, answer, rows, reply)

    # --- KServe V1 ---------------------------------------------------------------------
    def v1_predict(self, request, model: str):
        body = self._body(request)
        loaded = self._model(model, None)
        instances = body.get("instances")
        if isinstance(instances, list) and instances and all(isinstance(i, list) for i in instances):
            values = columns_from_features(loaded.columns, instances)
        else:
            values = columns_from_records(loaded.columns, instances)
        rows = len(next(iter(values.values())))
        answer = loaded.predict(values, rows)
        return self._scored(loaded, answer, rows, {"predictions": answer["predictions"], "model": model, "version": loaded.version})
