"""What can go wrong with a request to the predict function, as domain errors.

None of these knows an HTTP status: `bucketml.serving.app` maps each class to one, in its
exception-handler table, so the status of every error answer is decided in one place. A
value the model's columns cannot take is `bucketml.encoding.InvalidInput` (re-exported here),
as training reads values with the same code.
"""

from __future__ import annotations

from bucketml.encoding import InvalidInput, TooManyRows

__all__ = [
    "BucketUnavailable", "InvalidInput", "InvalidRequest", "NoModelServed", "PayloadTooLarge",
    "ReloadFailed", "TooManyRows", "UnknownModel", "VersionNotLoadable",
]


class InvalidRequest(ValueError):
    """The request itself is malformed: not JSON, a wrong field, a bad event, conflicting fields."""


class PayloadTooLarge(ValueError):
    """The body is over this function's limit (BUCKETML_MAX_REQUEST_BYTES); it was not read whole."""


class UnknownModel(LookupError):
    """No such model is served, or it has no such version."""


class VersionNotLoadable(RuntimeError):
    """The version is stored but cannot be served (refused or corrupt): asking again will not help."""


class NoModelServed(RuntimeError):
    """Nothing is loaded yet on this replica: a passing state, unlike UnknownModel."""


class BucketUnavailable(RuntimeError):
    """The bucket cannot be read now (an outage): asking again later may work."""


class ReloadFailed(RuntimeError):
    """A model.published event named a version that did not load; the previous one serves on."""
