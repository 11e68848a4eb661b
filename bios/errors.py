"""The one error hierarchy of Bios.

Every failure a user can see is a `BiosError` with a stable `code`, an HTTP-like `status` and,
where one request field is to blame, that `field` (a dotted path such as
`sampling_params.top_p`). Messages name the field, the value and what would be valid.

This module is part of the contract layer: it imports only the standard library.
"""

from __future__ import annotations


class BiosError(Exception):
    """Base of every Bios error.

    Attributes:
        message: what went wrong and how to fix it.
        field: dotted path of the offending request field, or None.
        code: stable machine-readable name of the error class.
        status: the HTTP status a server answers with.
        retryable: whether repeating the same request may succeed.
    """

    code = "bios_error"
    status = 500
    retryable = False

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict[str, str | int | float | bool | None]:
        """The wire form: `{"code", "message", "field", "status", "retryable"}`."""
        return {
            "code": self.code,
            "message": self.message,
            "field": self.field,
            "status": self.status,
            "retryable": self.retryable,
        }

    @staticmethod
    def from_dict(payload: dict) -> BiosError:
        """Rebuild the error class named by `payload["code"]` (unknown codes give `BiosError`)."""
        cls = _BY_CODE.get(str(payload.get("code")), BiosError)
        if cls is RateLimitError:
            return RateLimitError(
                str(payload.get("message", "")),
                field=payload.get("field"),
                retry_after=float(payload.get("retry_after") or 1.0),
            )
        return cls(str(payload.get("message", "")), field=payload.get("field"))


class InvalidRequestError(BiosError, ValueError):
    """The request is malformed or out of range (400). Nothing was changed."""

    code = "invalid_request"
    status = 400


class AuthenticationError(BiosError):
    """The API key is missing or unknown (401)."""

    code = "authentication"
    status = 401


class NotFoundError(BiosError, LookupError):
    """The model, session, checkpoint or request does not exist, or is not yours (404)."""

    code = "not_found"
    status = 404


class ConflictError(BiosError):
    """The request conflicts with the current state, e.g. a reused name or sequence id (409)."""

    code = "conflict"
    status = 409


class BackendError(BiosError):
    """The compute backend failed while running a valid request (500)."""

    code = "backend"
    status = 500


class UnsupportedError(InvalidRequestError):
    """The request asks for something this deployment does not implement (400)."""

    code = "unsupported"


class RequestTooLargeError(InvalidRequestError):
    """The request body exceeds the server's size limit (413); send it in smaller parts."""

    code = "request_too_large"
    status = 413


class APIConnectionError(BiosError):
    """The service could not be reached. Retryable."""

    code = "connection"
    status = 503
    retryable = True


class APITimeoutError(BiosError, TimeoutError):
    """The request or the wait for its result timed out. Retryable: a retry of a training
    request at the same sequence number gets the original answer if it did run."""

    code = "timeout"
    status = 408
    retryable = True


class ServiceUnavailableError(BiosError):
    """The service failed transiently while running the request, which changed nothing (503). Retryable."""

    code = "unavailable"
    status = 503
    retryable = True


class SessionExpiredError(BiosError):
    """The session missed its heartbeats and was evicted; the request changed nothing (503).
    Retryable: the next request restores the session from its last acknowledged state."""

    code = "session_expired"
    status = 503
    retryable = True


class RateLimitError(BiosError):
    """Too many requests (429); nothing was changed. Retry after `retry_after` seconds."""

    code = "rate_limited"
    status = 429
    retryable = True

    def __init__(self, message: str, *, field: str | None = None, retry_after: float = 1.0) -> None:
        super().__init__(message, field=field)
        self.retry_after = float(retry_after)

    def to_dict(self) -> dict[str, str | int | float | bool | None]:
        return {**super().to_dict(), "retry_after": self.retry_after}


_BY_CODE: dict[str, type[BiosError]] = {
    cls.code: cls
    for cls in (
        BiosError,
        InvalidRequestError,
        AuthenticationError,
        NotFoundError,
        ConflictError,
        BackendError,
        UnsupportedError,
        RequestTooLargeError,
        APIConnectionError,
        APITimeoutError,
        ServiceUnavailableError,
        SessionExpiredError,
        RateLimitError,
    )
}


class BlockingCallError(BiosError, RuntimeError):
    """A blocking call that could never return: made on the thread of the event loop that would
    have to answer it. Await the call's `*_async` twin there instead."""

    code = "blocking_call"
    status = 400


_BY_CODE[BlockingCallError.code] = BlockingCallError
