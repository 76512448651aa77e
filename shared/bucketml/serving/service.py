"""What the predict function answers, route by route, over a `ModelManager` (docs/http-api.md).

Each endpoint takes the request (headers, path parameters) and its body, already read within
the limit, and returns a Response naming the version that computed it. Endpoints are plain
functions: `bucketml.serving.app` decides whether one runs on the event loop or on a worker
thread, and maps the domain errors they raise (`bucketml.serving.errors`) to statuses.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any, Callable

import orjson
import prometheus_client
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response

from bucketml import __version__
from bucketml import auth
from bucketml import settings
from bucketml.contracts import events
from bucketml.encoding import (
    columns_from_features,
    columns_from_records,
    number_matrix,
    rows_from_features,
    rows_from_records,
)
from bucketml.monitoring.aggregates import ReplicaFigures
from bucketml.registry.model_registry import Registry, RegistryError, check_model_name
from bucketml.serving import open_inference
from bucketml.serving.comparisons import Comparison, Comparisons
from bucketml.serving.errors import InvalidInput, InvalidRequest, ReloadFailed
from bucketml.serving.inference_log import InferenceLogger
from bucketml.serving.manager import ModelManager
from bucketml.serving.observe import ROUTED
from bucketml.serving.metrics import ROWS, SHADOW_AGREEING, SHADOW_FAILED, SHADOW_ROWS, labelled
from bucketml.serving.request_body import json_object
from bucketml.serving.runtime import OnnxModel
from bucketml.storage import open_storage

MAX_BODY_BYTES = settings.DEFAULT_MAX_REQUEST_BYTES  # BUCKETML_MAX_REQUEST_BYTES sets a service's own
# A datetime column is one client-facing input of ISO 8601 text; the model's part inputs are internal.
V2_TYPES = {"number": "FP32", "string": "BYTES", "boolean": "BYTES", "datetime": "BYTES"}


def json_response(body: Any, status: int = 200, loaded: OnnxModel | None = None) -> Response:
    """orjson: several times faster than json for the small bodies that dominate (NaN -> null)."""
    headers = {"Content-Type": "application/json"}
    if loaded is not None:
        headers["Bucketml-Model"] = loaded.model
        headers["Bucketml-Model-Version"] = str(loaded.version)
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), status, headers)


class PredictService:
    def __init__(self, manager: ModelManager, inference_log: InferenceLogger | None = None,
                 access: auth.Policy | None = None, max_body_bytes: int = MAX_BODY_BYTES,
                 figures: ReplicaFigures | None = None):
        self.manager = manager
        self.figures = figures  # None: nothing recorded for the monitor
        self.comparisons = Comparisons()  # shadows' and canaries' second opinions
        self.inference_log = inference_log
        self.access = access if access is not None and access.required else None  # None: no token checked
        self.max_body_bytes = max_body_bytes
        self._openapi: bytes | None = None  # the document as JSON, serialized on first request

    @classmethod
    def from_environment(cls) -> PredictService:
        """Raises settings.ConfigError when the settings do not allow starting (e.g. reachable
        beyond loopback with no token; the message says what to set)."""
        host, how = auth.function_listen_host()
        access = auth.server_policy(host, "the predict function", how)
        max_body_bytes = settings.max_request_bytes()
        storage = open_storage(settings.bucket_url())
        figures = ReplicaFigures(storage, settings.monitor_flush_seconds(), settings.monitor_window_seconds())
        return cls(ModelManager(Registry(storage), settings.pointer_poll_seconds()), InferenceLogger.from_environment(),
                   access, max_body_bytes, figures)

    def start(self) -> None:
        """Start the threads of this process: the pointer watcher and the figures' writer."""
        self.manager.start()
        if self.figures is not None:
            self.figures.start()

    def authenticated(self, request: Request) -> bool:
        return self.access is None or self.access.refusal(request.headers.get("authorization")) is None

    # --- helpers -----------------------------------------------------------------------
    def _model(self, model: Any, version: Any, routed: bool = False) -> OnnxModel:
        """The version to use; with `routed` (inference, not metadata or readiness), an unpinned
        request may go to the model's canary (ModelManager.routed)."""
        if model is not None and not isinstance(model, str):
            raise InvalidRequest("'model' must be a string")
        if version is not None:
            if isinstance(version, (bool, float)):
                raise InvalidRequest(f"'version' must be an integer, got {json.dumps(version)}")
            try:
                version = int(version)
            except (TypeError, ValueError):
                raise InvalidRequest(f"'version' must be an integer, got {version!r}") from None
        return self.manager.routed(model, version) if routed else self.manager.get(model, version)

    def _route(self, request: Request, model: Any, version: Any) -> OnnxModel:
        """The version an inference request goes to; an unpinned one is recorded for the monitor."""
        loaded = self._model(model, version, routed=True)
        if version is None and self.figures is not None:
            self.figures.start()  # once per process (a no-op after): the writer of the figures
            request.scope[ROUTED] = (loaded, self.manager.generation(loaded.model))
        return loaded

    def _observe(self, request: Request, loaded: OnnxModel, columns: Callable[[], dict[str, Any]],
                 predictions: list, rows: int) -> None:
        """Queue an unpinned request's inputs and predictions for the monitor's figures."""
        routed = request.scope.get(ROUTED)
        if self.figures is not None and routed is not None:
            self.figures.scored(loaded.model, loaded.version, routed[1], loaded.task, loaded.reference, columns,
                                predictions, rows)

    @staticmethod
    def _scored(loaded: OnnxModel, answer: dict, rows: int, body: dict | None = None) -> Response:
        labelled(ROWS, loaded.model, str(loaded.version)).inc(rows)
        return json_response(answer if body is None else body, loaded=loaded)

    # --- simple protocol ---------------------------------------------------------------
    def predict(self, request: Request, raw: bytes) -> Response:
        body = json_object(raw)
        loaded = self._route(request, body.get("model"), body.get("version"))
        answer, rows, columns = self._score(loaded, body, raw)
        self._observe(request, loaded, columns, answer["predictions"], rows)
        response = self._scored(loaded, answer, rows)
        if body.get("version") is None:
            # A second opinion on the same rows, queued once the answer is sent (an async
            # background task: no thread hand-off) and scored in batches (serving.comparisons).
            shadow = self.manager.shadow_for(loaded)
            stable = self.manager.stable_for(loaded) if shadow is None and self.figures is not None else None
            has_booleans = b"true" in raw or b"false" in raw
            answered = answer["predictions"]
            if shadow is not None:  # it scores the current version's answers only
                comparison = Comparison(shadow, body, has_booleans, answered,
                                        functools.partial(self._shadow_scored, shadow, answered))
            elif stable is not None:  # the canary answered: the stable version scores the same rows
                comparison = Comparison(stable, body, has_booleans, answered,
                                        functools.partial(self._canary_compared, request.scope[ROUTED], answered))
            else:
                return response
            response.background = BackgroundTask(self._queue_comparison, comparison)
        return response

    @staticmethod
    def _score(loaded: OnnxModel, body: dict, raw: bytes) -> tuple[dict, int, Callable[[], dict[str, Any]]]:
        """The answer of `loaded` to a /predict body, its number of rows, and a function giving
        the inputs as {column: values} (called later, off the request path, if at all)."""
        if "records" in body and "features" in body:
            raise InvalidRequest("send either 'records' or 'features', not both: one request is one batch of rows")
        if "records" in body:
            rows = rows_from_records(loaded.columns, body["records"], loaded.ignored)
        elif "features" in body:
            rows = rows_from_features(loaded.columns, body["features"])
        else:
            raise InvalidRequest("send {\"records\": [{column: value}]} or {\"features\": [[values in schema order]]}")
        # Columnar fast path: all-number model, no JSON true/false anywhere in the body.
        if loaded.numbers_only and b"true" not in raw and b"false" not in raw:
            matrix = number_matrix(rows, len(loaded.columns))
            if matrix is not None:
                return loaded.predict_matrix(matrix), len(rows), lambda: {
                    c["name"]: matrix[:, j] for j, c in enumerate(loaded.columns)}
        values = {c["name"]: [row[j] for row in rows] for j, c in enumerate(loaded.columns)}
        return loaded.predict(values, len(rows)), len(rows), lambda: values

    async def _queue_comparison(self, comparison: Comparison) -> None:
        self.comparisons.submit(comparison)

    @staticmethod
    def _shadow_scored(shadow: OnnxModel, answered: list, predictions: list | None) -> None:
        """Count the shadow's rows that agree with what was answered: the same label, or for
        regression a value within 0.1% (the parity gate's tolerance). A request the shadow could
        not score (its own columns or classes, say) is counted as failed."""
        version = str(shadow.version)
        if predictions is None:
            labelled(SHADOW_FAILED, shadow.model, version).inc()
            return
        labelled(SHADOW_ROWS, shadow.model, version).inc(len(answered))
        labelled(SHADOW_AGREEING, shadow.model, version).inc(sum(1 for a, b in zip(predictions, answered) if _agree(a, b)))

    def _canary_compared(self, routed: tuple[OnnxModel, int], answered: list, predictions: list | None) -> None:
        """The stable version's answer to rows a canary answered, for the monitor's agreement figure
        (a request the stable version cannot score is no comparison to make)."""
        canary, epoch = routed
        if predictions is not None:
            self.figures.compared(canary.model, canary.version, epoch, canary.task, canary.reference, answered,
                                  predictions)

    def reload(self, request: Request, raw: bytes) -> Response:
        """A model.published event (from a Trigger): load the new version now."""
        try:
            event = events.parse_request(request.headers, raw)
            if event["type"] != events.MODEL_PUBLISHED:
                raise events.MalformedEvent(f"/reload takes {events.MODEL_PUBLISHED} events, not {event['type']}")
            model = events.event_data(event).get("model")
        except events.MalformedEvent as exc:
            raise InvalidRequest(str(exc)) from None
        if not isinstance(model, str):
            raise InvalidRequest("the event's data names no 'model'")
        try:  # a malformed event, not a failed load: 400, so the broker does not retry it
            check_model_name(model)
        except RegistryError as exc:
            raise InvalidRequest(f"the event's data names no valid model: {exc}") from None
        self.manager.refresh(model)
        error = self.manager.errors().get(model)
        if error:  # the broker retries; meanwhile the previous version keeps serving
            raise ReloadFailed(f"could not load the new version of {model}: {error}")
        content, status = events.empty_response()
        return Response(content, status)

    # --- Open Inference Protocol (KServe V2) ------------------------------------------
    def v2_server(self, request: Request, raw: bytes) -> Response:
        return json_response({"name": "bucketml", "version": __version__, "extensions": ["binary_tensor_data"]})

    def v2_live(self, request: Request, raw: bytes) -> Response:
        return json_response({"live": True})

    def v2_ready(self, request: Request, raw: bytes) -> Response:
        ready = self.manager.ready()
        if not self.authenticated(request):  # open to probes; what is served only with the token
            return json_response({"ready": ready}, 200 if ready else 503)
        body = {"ready": ready, "models": {m: x.version for m, x in self.manager.loaded().items()}}
        canaries, shadows = self.manager.canaries(), self.manager.shadows()
        if canaries:
            body["canaries"] = canaries
        if shadows:
            body["shadows"] = shadows
        errors = self.manager.errors()
        if errors:  # a current version that failed to load: the previous one serves meanwhile
            body["errors"] = errors
        return json_response(body, 200 if ready else 503)

    def v2_model(self, request: Request, raw: bytes, model: str, version: int | None = None) -> Response:
        loaded = self._model(model, version)
        outputs = [{"name": "label", "datatype": "BYTES", "shape": [-1]}]
        if loaded.task == "classification":
            outputs.append({"name": "probabilities", "datatype": "FP32", "shape": [-1, len(loaded.classes)]})
        else:
            outputs = [{"name": "variable", "datatype": "FP32", "shape": [-1]}]
        return json_response(
            {
                "name": model,
                "versions": [str(loaded.version)],
                "platform": "onnxruntime_onnx",
                "inputs": [{"name": c["name"], "datatype": V2_TYPES[c["type"]], "shape": [-1, 1]} for c in loaded.columns],
                "outputs": outputs,
                "parameters": {"task": loaded.task, "classes": loaded.classes, "ignored_inputs": loaded.ignored_inputs},
            },
            loaded=loaded,
        )

    def v2_model_ready(self, request: Request, raw: bytes, model: str, version: int | None = None) -> Response:
        loaded = self._model(model, version)
        body = {"name": model, "version": str(loaded.version), "ready": True}
        error = self.manager.errors().get(model) if version is None else None
        if error:
            body["error"] = f"serving version {loaded.version}: the current version could not be loaded ({error})"
        return json_response(body, loaded=loaded)

    def v2_infer(self, request: Request, raw: bytes, model: str, version: int | None = None) -> Response:
        loaded = self._route(request, model, version)
        infer = open_inference.parse(raw, request.headers.get(open_inference.HEADER_LENGTH), loaded.columns,
                                     loaded.ignored)
        answer = loaded.predict(infer.values, infer.rows)
        self._observe(request, loaded, lambda: infer.values, answer["predictions"], infer.rows)
        tensors = open_inference.output_tensors(loaded.task, loaded.classes, answer, infer.rows)
        body, headers = open_inference.response(model, loaded.version, infer, tensors)
        labelled(ROWS, loaded.model, str(loaded.version)).inc(infer.rows)
        return Response(body, 200, headers | {"Bucketml-Model": loaded.model, "Bucketml-Model-Version": str(loaded.version)})

    # --- KServe V1 ---------------------------------------------------------------------
    def v1_predict(self, request: Request, raw: bytes, model: str) -> Response:
        body = json_object(raw)
        loaded = self._route(request, model, None)
        instances = body.get("instances")
        if not isinstance(instances, list) or not instances:
            raise InvalidInput("'instances' must be a non-empty list of records (objects) or rows (lists in schema order)")
        if all(isinstance(i, list) for i in instances):
            values = columns_from_features(loaded.columns, instances)
        else:
            values = columns_from_records(loaded.columns, instances, loaded.ignored)
        rows = len(next(iter(values.values())))
        answer = loaded.predict(values, rows)
        self._observe(request, loaded, lambda: values, answer["predictions"], rows)
        return self._scored(loaded, answer, rows, {"predictions": answer["predictions"], "model": model, "version": loaded.version})

    # --- operations --------------------------------------------------------------------
    def metrics(self, request: Request, raw: bytes) -> Response:
        """Prometheus text format."""
        return Response(prometheus_client.generate_latest(), 200, {"Content-Type": prometheus_client.CONTENT_TYPE_LATEST})

    def openapi(self, request: Request, raw: bytes) -> Response:
        """This function's OpenAPI 3.1 document (openapi.yaml beside this module), as JSON."""
        if self._openapi is None:
            import importlib.resources

            import yaml  # here, not at import: it is not on the cold-start path

            text = importlib.resources.files(__package__).joinpath("openapi.yaml").read_text(encoding="utf-8")
            self._openapi = orjson.dumps(yaml.safe_load(text))
        return Response(self._openapi, 200, {"Content-Type": "application/json"})


def _agree(mine: Any, theirs: Any) -> bool:
    if isinstance(mine, float) and isinstance(theirs, float):
        return math.isclose(mine, theirs, rel_tol=1e-3, abs_tol=1e-6)
    return mine == theirs
