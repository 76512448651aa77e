"""preprocess: google.cloud.storage.object.v1.finalized -> bucketml.dataset.prepared.v1 | rejected.

Run: functions-framework --source functions/preprocess/main.py --target preprocess
"""

import functions_framework

from bucketml.contracts import events
from bucketml.steps.cloudevent_http import configure_logging, handle
from bucketml.steps.preprocess import handle_finalized

configure_logging()


@functions_framework.http
def preprocess(request):
    return handle(request, events.OBJECT_FINALIZED, handle_finalized)
