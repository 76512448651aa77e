"""predict: the HTTP inference function (onnxruntime only; no sklearn, no pickle).

Run: functions-framework --asgi --source functions/predict/main.py --target predict

ASGI by measurement (docs/benchmarks.md). The function returns the predict app itself:
functions-framework answers with what an async function returns by calling it with the
request's ASGI scope and receive channel, which is how a Starlette Response is sent, so the
app routes the request and streams its body within the limit (bucketml.serving.app).
"""

import logging
import os

import functions_framework.aio

from bucketml.logs import configure
from bucketml.serving.app import PredictApp
from bucketml.serving.service import PredictService
from bucketml.settings import ConfigError

configure()
try:
    service = PredictService.from_environment()
except ConfigError as exc:  # e.g. reachable beyond loopback with no token: say what to set, do not serve
    logging.getLogger("bucketml.predict").error("cannot start: %s", exc)
    raise SystemExit(1) from None
app = PredictApp(service)
# gunicorn imports this module, then forks the worker: load the models (and start writing the
# monitor's figures) in the worker at once.
os.register_at_fork(after_in_child=service.start)


@functions_framework.aio.http
async def predict(request) -> PredictApp:
    return app
