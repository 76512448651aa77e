"""console: the web console, to see and steer every model from a browser (docs/architecture.md#the-console).

Run: functions-framework --asgi --source functions/console/main.py --target console

Like predict, an ASGI function that returns its Starlette app: functions-framework answers with
what an async function returns by calling it with the request's scope and receive channel.
"""

import logging

import functions_framework.aio

from bucketml.console.app import Console
from bucketml.logs import configure
from bucketml.settings import ConfigError

configure()
try:
    app = Console.from_environment()
except ConfigError as exc:  # e.g. reachable beyond loopback with no token: say what to set, do not serve
    logging.getLogger("bucketml.console").error("cannot start: %s", exc)
    raise SystemExit(1) from None


@functions_framework.aio.http
async def console(request) -> Console:
    return app
