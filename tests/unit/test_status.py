"""One status vocabulary in the core, mapped once per transport."""

from __future__ import annotations

import grpc
import pytest

from salvo.domain.status import (
    Cancelled,
    DeadlineExceeded,
    InvalidRequest,
    ModelFailed,
    ModelNotFound,
    ModelUnavailable,
    Overloaded,
    PermissionDenied,
    SalvoError,
    Status,
    Unauthenticated,
    describe,
)
from salvo.frontends.grpc.status import CODES as GRPC_CODES
from salvo.frontends.grpc.status import grpc_status, trailing_metadata
from salvo.frontends.http.status import CODES as HTTP_CODES
from salvo.frontends.http.status import http_status

EVERY_ERROR = [
    (InvalidRequest("input 'x': bad"), grpc.StatusCode.INVALID_ARGUMENT, 400),
    (ModelNotFound("unknown model 'm'"), grpc.StatusCode.NOT_FOUND, 404),
    (ModelUnavailable("model 'm' is loading"), grpc.StatusCode.UNAVAILABLE, 503),
    (Overloaded("queue full", retry_after_ms=1500), grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    (DeadlineExceeded("timed out"), grpc.StatusCode.DEADLINE_EXCEEDED, 504),
    (Cancelled("the caller went away"), grpc.StatusCode.CANCELLED, 499),
    (Unauthenticated("invalid bearer token"), grpc.StatusCode.UNAUTHENTICATED, 401),
    (PermissionDenied("may not use model 'm'"), grpc.StatusCode.PERMISSION_DENIED, 403),
    (ModelFailed("model 'm' raised ValueError"), grpc.StatusCode.INTERNAL, 500),
]


def test_every_status_has_a_grpc_code_and_an_http_status():
    assert set(GRPC_CODES) == set(Status) == set(HTTP_CODES)
    assert {type(error).status for error, _, _ in EVERY_ERROR} == set(Status)


@pytest.mark.parametrize(("error", "code", "http"), EVERY_ERROR)
def test_each_error_maps_to_its_codes_with_its_message(error: SalvoError, code, http):
    assert grpc_status(error) == (code, error.message)
    status, message, _ = http_status(error)
    assert (status, message) == (http, error.message)


def test_an_overload_carries_its_push_back_on_both_transports():
    error = Overloaded("rate limit", retry_after_ms=1500)
    assert trailing_metadata(error) == (("grpc-retry-pushback-ms", "1500"),)
    assert http_status(error)[2] == {"Retry-After": "2"}  # whole seconds, rounded up
    assert http_status(Overloaded("full", retry_after_ms=1))[2] == {"Retry-After": "1"}
    assert (
        trailing_metadata(InvalidRequest("x")) == () and http_status(InvalidRequest("x"))[2] == {}
    )


def test_an_unexpected_exception_is_internal_and_keeps_its_internals_to_itself():
    bug = KeyError("secret internals")
    assert describe(bug) == (Status.INTERNAL, "internal error: KeyError")
    assert grpc_status(bug) == (grpc.StatusCode.INTERNAL, "internal error: KeyError")
    assert http_status(bug)[:2] == (500, "internal error: KeyError")
