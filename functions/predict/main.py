"""predict: the HTTP inference function (onnxruntime only; no sklearn, no pickle).

Run: functions-framework --asgi --source functions/predict/main.py --target predict
(ASGI by measurement: bucketml/asgi_adapter.py says why.)
"""

import logging
import os

import functions_framework.aio

from bucketml.serving.asgi_adapter import respond
from bucketml.settings import ConfigError
from bucketml.logs import configure
from bucketml.serving.app import PredictService

configure()
try:
    service = PredictService.from_environment()
except ConfigError as exc:  # e.g. reachable beyond loopback with no token: say what to set, do not serve
    logging.getLogger("bucketml.predict").error("cannot start: %s", exc)
    raise SystemExit(1) from None
# gunicorn imports this module, then forks the worker: load the models in the worker at once.
os.register_at_fork(after_in_child=service.manager.start)


@functions_framework.aio.http
async def predict(request):
    return await respond(service, request)
