"""The core's statuses as HTTP statuses: the one place they are mapped for HTTP.

A cancelled request has no response to carry a status (the connection is gone); 499 is
what access logs record for it, as nginx does.
"""

from __future__ import annotations

import math

from salvo.domain.status import Overloaded, Status, describe

CODES: dict[Status, int] = {
    Status.INVALID_ARGUMENT: 400,
    Status.UNAUTHENTICATED: 401,
    Status.PERMISSION_DENIED: 403,
    Status.NOT_FOUND: 404,
    Status.RESOURCE_EXHAUSTED: 429,
    Status.CANCELLED: 499,
    Status.INTERNAL: 500,
    Status.UNAVAILABLE: 503,
    Status.DEADLINE_EXCEEDED: 504,
}


def http_status(exc: BaseException) -> tuple[int, str, dict[str, str]]:
    """The HTTP status, message and headers a caller gets for `exc`: an overload carries
    `Retry-After` in whole seconds, rounded up, never 0."""
    status, message = describe(exc)
    headers: dict[str, str] = {}
    if isinstance(exc, Overloaded):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_ms / 1000)))
    return CODES[status], message, headers
