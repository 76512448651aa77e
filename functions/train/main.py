"""train: bucketml.dataset.prepared.v1 -> bucketml.model.trained.v1 [+ model.published.v1] | training.failed.

Run: functions-framework --source functions/train/main.py --target train
"""

import functions_framework

from bucketml.contracts import events
from bucketml.steps.cloudevent_http import configure_logging, handle
from bucketml.steps.train import handle_prepared

configure_logging()


@functions_framework.http
def train(request):
    return handle(request, events.DATASET_PREPARED, handle_prepared)
