"""batch: google.cloud.storage.object.v1.finalized of batch/<model>/<name>.csv ->
predictions/<model>/<name>.csv and bucketml.batch.completed.v1 | bucketml.batch.failed.v1.

Run: functions-framework --source functions/batch/main.py --target batch
"""

import functions_framework

from bucketml.contracts import events
from bucketml.steps.batch import handle_finalized
from bucketml.steps.cloudevent_http import configure_logging, handle

configure_logging()


@functions_framework.http
def batch(request):
    return handle(request, events.OBJECT_FINALIZED, handle_finalized)
