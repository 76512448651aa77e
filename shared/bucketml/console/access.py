"""Who may see and steer the console (docs/architecture.md#the-console).

The same policy as predict and the broker (bucketml.auth): open on loopback with no token set,
else the bearer token. A browser enters the token once in the login form; the console then sets
a session cookie (HttpOnly, SameSite=Strict) holding an expiry and a CSRF token, signed with
HMAC-SHA256 under a key derived from the bearer token, so every replica accepts it and changing
the token ends every session. Scripts may send `Authorization: Bearer <token>` instead.

Every action is a POST whose form carries the session's CSRF token (checked in constant time).
With no token required, the console still issues an anonymous session, signed with a key made
at start-up, so that a page of another site cannot make this machine's browser post an action
(SameSite=Strict keeps the cookie from such a post; the CSRF token is the second lock).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

from bucketml.auth import Policy

COOKIE = "bucketml_console"
SESSION_SECONDS = 12 * 3600
CSRF_FIELD = "csrf"


@dataclass(frozen=True)
class Session:
    csrf: str
    expires: int
    logged_in: bool  # False: an anonymous session (no token required)


class Sessions:
    def __init__(self, policy: Policy, token: str | None):
        self.policy = policy
        # Derived from the token (not the token itself): a cookie reveals nothing of it.
        self._key = (hmac.new(token.encode(), b"bucketml-console-session-v1", hashlib.sha256).digest()
                     if token else secrets.token_bytes(32))

    @property
    def required(self) -> bool:
        return self.policy.required

    def token_accepted(self, token: str) -> bool:
        return self.policy.refusal(f"Bearer {token.strip()}") is None if token.strip() else False

    def bearer_accepted(self, authorization: str | None) -> bool:
        """A scripted request with the right `Authorization: Bearer` header."""
        return bool(authorization) and self.policy.refusal(authorization) is None

    def new(self, logged_in: bool) -> tuple[Session, str]:
        session = Session(secrets.token_urlsafe(24), int(time.time()) + SESSION_SECONDS, logged_in)
        payload = base64.urlsafe_b64encode(json.dumps(
            {"csrf": session.csrf, "exp": session.expires, "in": logged_in}, separators=(",", ":")).encode()).decode().rstrip("=")  # no quoting in Set-Cookie
        return session, f"{payload}.{self._sign(payload)}"

    def read(self, cookie: str | None) -> Session | None:
        """The session a cookie holds, or None when it is missing, forged, expired or made
        before a token was required (an anonymous one)."""
        if not cookie or "." not in cookie:
            return None
        payload, _, signature = cookie.rpartition(".")
        if not hmac.compare_digest(signature, self._sign(payload)):
            return None
        try:
            data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            session = Session(str(data["csrf"]), int(data["exp"]), bool(data["in"]))
        except (ValueError, KeyError, TypeError):
            return None
        if session.expires < time.time() or (self.required and not session.logged_in):
            return None
        return session

    def _sign(self, payload: str) -> str:
        return hmac.new(self._key, payload.encode(), hashlib.sha256).hexdigest()


def csrf_matches(session: Session | None, sent: str | None) -> bool:
    return session is not None and bool(sent) and hmac.compare_digest(session.csrf.encode(), str(sent).encode())
