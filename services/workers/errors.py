"""Why a model call failed, as the retry policy needs to know it.

::

    ModelCallError                 code             transient
    ├── TransientError                               yes: retry, then the next model
    │   ├── RateLimited            rate_limited
    │   ├── ProviderUnavailable    provider_error
    │   └── ModelTimeout           timeout
    └── PermanentError                               no: go straight to the next model
        ├── BadRequest             bad_request
        ├── AuthFailed             auth_failed
        ├── ModelNotFound          model_not_found
        └── AdapterError           adapter_error    (our side: mapping parameters, reading the
                                                     stream; the same call would fail again)

The policy reads ``transient`` and never parses messages. Only the litellm adapter maps provider
exceptions onto this tree.
"""

from __future__ import annotations

from typing import ClassVar


class ModelCallError(Exception):
    code: ClassVar[str] = "provider_error"
    transient: ClassVar[bool] = True

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class TransientError(ModelCallError):
    transient = True


class RateLimited(TransientError):
    code = "rate_limited"


class ProviderUnavailable(TransientError):
    code = "provider_error"


class ModelTimeout(TransientError):
    code = "timeout"


class PermanentError(ModelCallError):
    transient = False


class BadRequest(PermanentError):
    code = "bad_request"


class AuthFailed(PermanentError):
    code = "auth_failed"


class ModelNotFound(PermanentError):
    code = "model_not_found"


class AdapterError(PermanentError):
    code = "adapter_error"
