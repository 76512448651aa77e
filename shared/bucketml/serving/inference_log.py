"""Optional request/response logging as CloudEvents, in the shape of KServe's inference logger.

With BUCKETML_INFERENCE_LOG_URL set (a broker ingress or any CloudEvents sink), every
inference request and its response are sent as two CloudEvents,
`org.kubeflow.serving.inference.request` and `org.kubeflow.serving.inference.response`, that
share one id, with the body as data and the extensions `inferenceservicename` (the model),
`endpoint`, `component` and `bucketmlversion` (the version that answered).
BUCKETML_INFERENCE_LOG_MODE picks `all` (default), `request` or `response`.

Sending happens on a background thread through a bounded queue: logging never slows or fails
a prediction. When the sink lags, events are dropped and counted
(`bucketml_inference_log_dropped_total`), never queued without limit.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import uuid

import prometheus_client
from cloudevents.conversion import to_binary
from cloudevents.http import CloudEvent

from bucketml import settings
from bucketml.contracts.events import now_rfc3339

log = logging.getLogger("bucketml.inference_log")

REQUEST_TYPE = "org.kubeflow.serving.inference.request"
RESPONSE_TYPE = "org.kubeflow.serving.inference.response"
MODES = {"all": (True, True), "request": (True, False), "response": (False, True)}
QUEUE_SIZE = 1000

SENT = prometheus_client.Counter("bucketml_inference_log_sent", "Inference log events the sink accepted.")
DROPPED = prometheus_client.Counter(
    "bucketml_inference_log_dropped", "Inference log events not delivered, by reason.", ["reason"]
)


class InferenceLogger:
    def __init__(self, url: str, mode: str = "all"):
        if mode not in MODES:
            raise ValueError(f"BUCKETML_INFERENCE_LOG_MODE must be one of {', '.join(MODES)}, got {mode!r}")
        self.url = url
        self.requests, self.responses = MODES[mode]
        self._queue: queue.Queue[CloudEvent] = queue.Queue(QUEUE_SIZE)
        self._sender_pid: int | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_environment(cls) -> InferenceLogger | None:
        configured = settings.InferenceLog.from_env()
        return cls(configured.url, configured.mode) if configured else None

    def record(self, endpoint: str, model: str, version: str, request_body: bytes, request_type: str | None,
               status: int, response_body: bytes, response_type: str | None) -> None:
        """Queue the pair of events for one inference call (returns at once)."""
        self._ensure_sender()
        event_id = str(uuid.uuid4())
        extensions = {"inferenceservicename": model, "endpoint": endpoint, "component": "predictor",
                      "bucketmlversion": version, "bucketmlstatus": str(status)}
        if self.requests:
            self._put(self._event(REQUEST_TYPE, event_id, extensions, request_body, request_type))
        if self.responses:
            self._put(self._event(RESPONSE_TYPE, event_id, extensions, response_body, response_type))

    @staticmethod
    def _event(type_: str, id_: str, extensions: dict, body: bytes, content_type: str | None) -> CloudEvent:
        attributes = {"type": type_, "source": "/bucketml/predict", "id": id_, "time": now_rfc3339(),
                      "datacontenttype": content_type or "application/octet-stream", **extensions}
        return CloudEvent(attributes, body)

    def _put(self, event: CloudEvent) -> None:
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            DROPPED.labels("queue_full").inc()

    def _ensure_sender(self) -> None:
        # Threads do not survive gunicorn's fork: start the sender in the serving process.
        if self._sender_pid == os.getpid():
            return
        with self._lock:
            if self._sender_pid != os.getpid():
                self._sender_pid = os.getpid()
                threading.Thread(target=self._send_forever, name="bucketml-inference-log", daemon=True).start()

    def _send_forever(self) -> None:
        import requests  # here: predict's cold start should not pay for an HTTP client it may never use

        from bucketml.auth import ConfigError, client_headers

        with requests.Session() as session:
            try:  # a token-protected broker as the sink needs the platform's token
                session.headers.update(client_headers())
            except ConfigError as exc:
                log.warning("the inference log is sent without a token: %s", exc)
            while True:
                event = self._queue.get()
                headers, body = to_binary(event)
                try:
                    response = session.post(self.url, data=body, headers=headers, timeout=5)
                    ok = response.status_code < 300
                except requests.RequestException as exc:
                    ok, response = False, exc
                if ok:
                    SENT.inc()
                else:
                    DROPPED.labels("sink_error").inc()
                    log.warning("the inference log sink %s did not take an event: %s", self.url, response)
