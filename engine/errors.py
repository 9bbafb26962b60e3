"""One error tree, one error shape: {"error": code, "message": ..., "status": ...}."""

from __future__ import annotations

from typing import Any, ClassVar


class ApiError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    default_headers: ClassVar[dict[str, str]] = {}

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra
        self.headers: dict[str, str] = dict(self.default_headers)

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, "status": self.status, **self.extra}


class BadParameter(ApiError):
    status = 400
    code = "bad_parameter"


class NotFound(ApiError):
    status = 404
    code = "not_found"


class MethodNotAllowed(ApiError):
    status = 405
    code = "method_not_allowed"


class NotReady(ApiError):
    status = 503
    code = "not_ready"

    def __init__(self, message: str, retry_after: int = 1, **extra: Any) -> None:
        super().__init__(message, **extra)
        self.headers["Retry-After"] = str(retry_after)


class QueryTimeout(ApiError):
    status = 504
    code = "query_timeout"


class QueryFailed(ApiError):
    """DuckDB refused a query at run time. The answer names the error's class only; `detail`
    (DuckDB's message, which may quote data) goes to the log."""

    status = 500
    code = "query_failed"

    def __init__(self, error: str, detail: str = "", **extra: Any) -> None:
        super().__init__(f"query failed: {error}", **extra)
        self.error = error
        self.detail = detail or error


class Unauthorized(ApiError):
    status = 401
    code = "unauthorized"
    default_headers = {"WWW-Authenticate": 'Bearer realm="duckswap-admin"'}


class Conflict(ApiError):
    status = 409
    code = "conflict"


class SourceUnavailable(ApiError):
    status = 503
    code = "source_unavailable"
