"""The predict function behind functions-framework's WSGI (Flask + gunicorn) adapter instead of
its ASGI one: the same PredictService, so bench/predict_peers.py can measure the choice.

Run: functions-framework --source bench/wsgi_predict.py --target predict  (WORKERS, THREADS)
"""

import functions_framework

from bucketml.logs import configure
from bucketml.serving.app import PredictService

configure()
service = PredictService.from_environment()


@functions_framework.http
def predict(request):
    return service.handle(request)  # a Flask request has the method, path, headers and body it reads
