"""One exception hierarchy for domain errors, mapped once to the contract's error envelope."""

from __future__ import annotations

from typing import Any, ClassVar


class ThreadlineError(Exception):
    """A failure a client may see. ``code`` is the contract's snake_case code."""

    code: ClassVar[str] = "internal"
    status: ClassVar[int] = 500

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details or {}

    def envelope(self, request_id: str | None) -> dict[str, Any]:
        """The contract's error object for this failure."""
        return error_envelope(self.code, self.message, request_id, self.details)


def error_envelope(
    code: str, message: str, request_id: str | None, details: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Build ``{"error": {...}}`` exactly as the contract spells it."""
    return {
        "error": {
            "code": code,
            "message": message,
            "request_id": request_id,
            "details": details or {},
        }
    }


class BadRequest(ThreadlineError):
    code = "bad_request"
    status = 400


class ValidationFailed(ThreadlineError):
    code = "validation_failed"
    status = 422


class Unauthorized(ThreadlineError):
    code = "unauthorized"
    status = 401


class Forbidden(ThreadlineError):
    code = "forbidden"
    status = 403


class CsrfFailed(ThreadlineError):
    code = "csrf_failed"
    status = 403


class NotFound(ThreadlineError):
    code = "not_found"
    status = 404


class Conflict(ThreadlineError):
    code = "conflict"
    status = 409


class VersionConflict(ThreadlineError):
    code = "version_conflict"
    status = 409


class IdempotencyConflict(ThreadlineError):
    code = "idempotency_conflict"
    status = 409


class PayloadTooLarge(ThreadlineError):
    code = "payload_too_large"
    status = 413


class RateLimited(ThreadlineError):
    code = "rate_limited"
    status = 429

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(
            "Too many requests; slow down.", details={"retry_after_s": round(retry_after_s, 3)}
        )
        self.retry_after_s = retry_after_s


class BudgetExceeded(ThreadlineError):
    code = "budget_exceeded"
    status = 402


class Unavailable(ThreadlineError):
    code = "unavailable"
    status = 503


class InternalError(ThreadlineError):
    code = "internal"
    status = 500
