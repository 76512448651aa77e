"""Bearer-token access to the broker ingress and the predict function (docs/http-api.md#authentication).

One shared secret, `BUCKETML_TOKEN` or a file named by `BUCKETML_TOKEN_FILE` (a mounted
Kubernetes Secret). Servers require `Authorization: Bearer <token>` when `BUCKETML_AUTH` says so:
`auto` (the default) requires it when the server listens beyond loopback, and then refuses to
start without a token, or whenever a token is set; `token` always; `none` never (a gateway in
front authenticates). Clients (the CLI, the watcher, the GCS source, functions posting events)
send the token whenever one is set.
"""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass

from bucketml import settings
from bucketml.settings import ConfigError

__all__ = ["ConfigError", "Policy", "Refusal", "client_headers", "function_listen_host", "is_loopback", "server_policy"]

CHALLENGE = 'Bearer realm="bucketml"'


@dataclass(frozen=True)
class Refusal:
    """Why a request is answered 401: `message` for the JSON error, `challenge` for WWW-Authenticate."""

    message: str
    challenge: str


class Policy:
    """What a server requires of each request: nothing (`token` None) or this bearer token."""

    def __init__(self, token: str | None, server: str = "this server"):
        self._token = token.encode("ascii") if token else None
        self.server = server

    @property
    def required(self) -> bool:
        return self._token is not None

    def refusal(self, authorization: str | None) -> Refusal | None:
        """None when the Authorization header value lets the request in."""
        if self._token is None:
            return None
        if not authorization:
            return Refusal(
                f"{self.server} requires a bearer token: send 'Authorization: Bearer <token>' with the token set "
                "where it runs (BUCKETML_TOKEN or BUCKETML_TOKEN_FILE)",
                CHALLENGE,
            )
        scheme, _, credentials = authorization.strip().partition(" ")
        credentials = credentials.strip()
        if scheme.lower() != "bearer" or not credentials:
            return Refusal(
                f"the Authorization header is not 'Bearer <token>' ({self.server} takes only bearer tokens)",
                CHALLENGE + ', error="invalid_request"',
            )
        # Constant time: how long the comparison takes says nothing about how much of the token matched.
        if not hmac.compare_digest(credentials.encode("latin-1", "replace"), self._token):
            return Refusal(
                f"the bearer token is wrong: it is not the token {self.server} was given (BUCKETML_TOKEN or BUCKETML_TOKEN_FILE)",
                CHALLENGE + ', error="invalid_token"',
            )
        return None


def is_loopback(host: str) -> bool:
    """Whether listening on `host` keeps a server reachable from this machine only.
    Anything that is not a loopback address or `localhost` counts as reachable (0.0.0.0, ::,
    an interface address, a host name)."""
    host = host.strip().strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_policy(listen_host: str, server: str, how: str | None = None) -> Policy:
    """The policy of a server listening on `listen_host` (`how`: why it is reachable there, for
    the message); ConfigError (with what to set) when it must not start as configured."""
    access = settings.Access.from_env()  # the token is read even when unused: a broken setting is reported, not skipped
    mode, token = access.mode, access.token
    if mode == "none":
        return Policy(None, server)
    if token is None and mode == "token":
        raise ConfigError("BUCKETML_AUTH=token but no token is set: set BUCKETML_TOKEN, or BUCKETML_TOKEN_FILE to a file holding it")
    if token is None and not is_loopback(listen_host):
        raise ConfigError(
            f"{server} would be reachable beyond this machine ({how or f'it listens on {listen_host}'}) with no token to require: "
            "set BUCKETML_TOKEN (or BUCKETML_TOKEN_FILE, a file holding it) so that requests need "
            "'Authorization: Bearer <token>', or set BUCKETML_AUTH=none if a gateway in front of it authenticates requests"
        )
    return Policy(token, server)


def function_listen_host() -> tuple[str, str]:
    """Where this function process is reachable from, for `server_policy`: (host, how it was told).

    Under Knative (or Cloud Run), which set K_SERVICE, a function is reached through the
    platform's network whatever it binds to (the queue-proxy beside it connects over loopback),
    so it counts as not loopback. Otherwise it is the --host functions-framework was started
    with (its HOST variable, default 0.0.0.0), read from functions-framework's own command-line
    context, which is current while it imports the function's module."""
    platform = settings.platform()
    if platform.knative_service:
        return "0.0.0.0", "K_SERVICE is set: it runs as a Knative or Cloud Run service"
    import click

    context = click.get_current_context(silent=True)
    while context is not None:
        if getattr(context.command.callback, "__module__", "").startswith("functions_framework"):
            host = context.params.get("host")
            if host:
                return str(host), f"functions-framework listens on {host}"
        context = context.parent
    host = platform.functions_framework_host or "0.0.0.0"  # functions-framework's default: every interface
    return host, f"it listens on {host}, functions-framework's HOST or default"


def client_headers() -> dict[str, str]:
    """The Authorization header for requests to the broker or predict, when a token is set."""
    token = settings.token()
    return {"Authorization": f"Bearer {token}"} if token else {}
