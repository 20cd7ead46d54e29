"""Errors the HTTP API returns, in OpenAI's shape so existing clients surface them.

::

    ApiError (status, type, code, param)
    ├── 400 invalid_request_error   bad field, unknown model, unsupported feature
    ├── 401 authentication_error    missing or wrong bearer key
    ├── 413 invalid_request_error   body over the size limit
    ├── 422 invalid_request_error   an Idempotency-Key sent again with a different request
    ├── 429 rate_limit_error        every model of the tier was rate limited
    ├── 502 upstream_error          every model of the tier failed
    ├── 500 server_error            an error nobody expected (logged with the request id)
    ├── 503 service_unavailable     broker unreachable; too many callers waiting (Retry-After)
    └── 504 timeout_error           no answer within the request's deadline
"""

from __future__ import annotations

from typing import Any

from schemas.v1 import ChatError


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        upstream: bool = False,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = (
            status,
            message,
            type,
            code,
            param,
        )
        self.headers = headers
        self.upstream = upstream  # the worker side's error (a ChatError), not the router's

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, type="invalid_request_error", code=code, param=param)


_BY_CODE = {
    "idempotency_key_reused": (422, "invalid_request_error"),
    "rate_limited": (429, "rate_limit_error"),
    "deadline_exceeded": (504, "timeout_error"),
    "bad_request": (400, "invalid_request_error"),
    "invalid_request": (400, "invalid_request_error"),
    "unsupported_capability": (400, "invalid_request_error"),
    "unsupported_parameter": (400, "invalid_request_error"),
    "model_not_found": (400, "invalid_request_error"),
}


def from_outcome(error: ChatError) -> ApiError:
    status, kind = _BY_CODE.get(error.code, (502, "upstream_error"))
    param = "Idempotency-Key" if error.code == "idempotency_key_reused" else error.param
    headers = {"x-switchboard-request-id": error.request_id}
    if error.tier:
        headers["x-switchboard-tier"] = error.tier
    return ApiError(
        status,
        error.message,
        type=kind,
        code=error.code,
        param=param,
        headers=headers,
        upstream=True,
    )


def key_reused() -> ApiError:
    return ApiError(
        422,
        "this Idempotency-Key was sent before with a different request; use a new key for a "
        "new request",
        type="invalid_request_error",
        code="idempotency_key_reused",
        param="Idempotency-Key",
    )


def param_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out
