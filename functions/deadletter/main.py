"""deadletter: any event no subscriber could take -> kept in the bucket under deadletters/.

The Broker's delivery.deadLetterSink names this function (infra/knative/broker.yaml), in Knative
and in the local broker alike; `bucketml events dead` lists what it kept.
Run: functions-framework --source functions/deadletter/main.py --target deadletter
"""

import functions_framework

from bucketml.steps.deadletter import keep
from bucketml.steps.cloudevent_http import configure_logging, handle_any

configure_logging()


@functions_framework.http
def deadletter(request):
    return handle_any(request, keep)
