"""monitor: dev.knative.sources.ping -> canary decisions and drift events (bucketml.steps.monitor).

Run: functions-framework --source functions/monitor/main.py --target monitor
"""

import functions_framework

from bucketml.steps.cloudevent_http import configure_logging, handle_any
from bucketml.steps.monitor import handle_ping

configure_logging()


@functions_framework.http
def monitor(request):
    return handle_any(request, handle_ping, quiet=True)
