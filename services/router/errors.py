"""Errors the HTTP API returns, in OpenAI's shape so existing clients surface them.

::

    ApiError (status, type, code, param)
    ├── 400 invalid_request_error   bad field, unknown model, unsupported feature
    ├── 401 authentication_error    missing or wrong bearer key
    ├── 413 invalid_request_error   body over the size limit
    ├── 429 rate_limit_error        every model of the tier was rate limited
    ├── 502 upstream_error          every model of the tier failed
    ├── 503 service_unavailable     broker unreachable
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
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = (
            status,
            message,
            type,
            code,
            param,
        )

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
    "rate_limited": (429, "rate_limit_error"),
    "deadline_exceeded": (504, "timeout_error"),
    "bad_request": (400, "invalid_request_error"),
    "invalid_request": (400, "invalid_request_error"),
}


def from_outcome(error: ChatError) -> ApiError:
    status, kind = _BY_CODE.get(error.code, (502, "upstream_error"))
    return ApiError(status, error.message, type=kind, code=error.code)


def param_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out
