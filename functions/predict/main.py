"""predict: the HTTP inference function (onnxruntime only; no sklearn, no pickle).

Run: functions-framework --source functions/predict/main.py --target predict
"""

import functions_framework

from bucketml.function_adapter import configure_logging
from bucketml.predict_service import PredictService

configure_logging()
service = PredictService.from_environment()


@functions_framework.http
def predict(request):
    return service.handle(request)
