"""train: bucketml.dataset.prepared.v1 -> bucketml.model.trained.v1 [+ model.published.v1] | training.failed.

Run: functions-framework --source functions/train/main.py --target train
"""

import functions_framework

from bucketml import events
from bucketml.function_adapter import configure_logging, handle
from bucketml.trainer import handle_prepared

configure_logging()


@functions_framework.http
def train(request):
    return handle(request, events.DATASET_PREPARED, handle_prepared)
