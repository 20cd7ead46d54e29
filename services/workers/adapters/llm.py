"""The one module that imports litellm: model calls, TTFT, usage and cost.

Every call streams (``stream_options.include_usage``) so the time to first token is measured at
the source, then the chunks are rebuilt into one OpenAI ``chat.completion`` object. litellm's own
retries are off (``num_retries=0``): the tier's policy retries, so each attempt is seen and
recorded. Prices come from litellm's bundled price map (``LITELLM_LOCAL_MODEL_COST_MAP``), never
from the network.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from typing import Any, Protocol

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm

from schemas.v1 import ChatRequest, Usage
from services.common.routing_config import ModelSpec
from services.workers.errors import (
    AuthFailed,
    BadRequest,
    ModelCallError,
    ModelNotFound,
    ModelTimeout,
    ProviderUnavailable,
    RateLimited,
)

litellm.telemetry = False
litellm.suppress_debug_info = True
litellm.drop_params = True

# Key for OpenAI-compatible local servers (the simulator, vLLM, Ollama) that want none.
_NO_KEY = "not-needed"


@dataclass(frozen=True)
class Completion:
    body: dict[str, Any]
    usage: Usage
    ttft_ms: float | None
    latency_ms: float
    cost_usd: float

    @property
    def text(self) -> str:
        choices = self.body.get("choices") or [{}]
        return str((choices[0].get("message") or {}).get("content") or "")


class ModelClient(Protocol):
    async def complete(
        self, spec: ModelSpec, request: ChatRequest, timeout_s: float
    ) -> Completion: ...


def missing_keys(specs: list[ModelSpec]) -> list[str]:
    """Environment variables the given models need and that are not set."""
    return sorted(
        {s.api_key_env for s in specs if s.api_key_env and not os.environ.get(s.api_key_env)}
    )


def cost_usd(spec: ModelSpec, usage: Usage) -> float:
    if spec.input_cost_per_mtok is not None or spec.output_cost_per_mtok is not None:
        return (
            usage.prompt_tokens * (spec.input_cost_per_mtok or 0.0)
            + usage.completion_tokens * (spec.output_cost_per_mtok or 0.0)
        ) / 1_000_000
    try:
        prompt, completion = litellm.cost_per_token(
            model=spec.price_as or spec.model,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
        )
    except Exception:  # not in the price map: record 0 rather than fail the request
        return 0.0
    return float(prompt + completion)


def _call_args(spec: ModelSpec, request: ChatRequest, timeout_s: float) -> dict[str, Any]:
    args: dict[str, Any] = {
        "model": spec.model,
        "messages": [m.model_dump(exclude_none=True) for m in request.messages],
        "stream": True,
        "stream_options": {"include_usage": True},
        "timeout": timeout_s,
        "num_retries": 0,
    }
    if spec.api_base:
        args["api_base"] = spec.api_base
    if spec.api_key_env:
        key = os.environ.get(spec.api_key_env)
        if not key:
            raise AuthFailed(f"environment variable {spec.api_key_env} is not set")
        args["api_key"] = key
    elif spec.api_base:
        args["api_key"] = _NO_KEY
    for name in ("max_tokens", "temperature", "top_p", "stop"):
        value = getattr(request, name)
        if value is not None:
            args[name] = value
    return args


def _classify(exc: Exception) -> ModelCallError:
    status = getattr(exc, "status_code", None)
    message = f"{type(exc).__name__}: {str(exc)[:300]}"
    if isinstance(exc, litellm.RateLimitError):
        return RateLimited(message, status=status)
    if isinstance(exc, litellm.Timeout | asyncio.TimeoutError):
        return ModelTimeout(message, status=status)
    if isinstance(exc, litellm.AuthenticationError | litellm.PermissionDeniedError):
        return AuthFailed(message, status=status)
    if isinstance(exc, litellm.NotFoundError):
        return ModelNotFound(message, status=status)
    if isinstance(exc, litellm.BadRequestError | litellm.UnprocessableEntityError):
        return BadRequest(message, status=status)
    return ProviderUnavailable(message, status=status)


class LiteLLMClient:
    """``ModelClient`` over ``litellm.acompletion``."""

    async def complete(self, spec: ModelSpec, request: ChatRequest, timeout_s: float) -> Completion:
        args = _call_args(spec, request, timeout_s)
        started = time.perf_counter()
        ttft: float | None = None
        chunks: list[Any] = []
        try:
            async with asyncio.timeout(timeout_s):
                stream = await litellm.acompletion(**args)
                async for chunk in stream:
                    if ttft is None and _has_content(chunk):
                        ttft = (time.perf_counter() - started) * 1000
                    chunks.append(chunk)
        except ModelCallError:
            raise
        except Exception as exc:
            raise _classify(exc) from exc
        latency = (time.perf_counter() - started) * 1000
        if not chunks:
            raise ProviderUnavailable("the provider closed the stream without a chunk")
        built = litellm.stream_chunk_builder(chunks, messages=args["messages"])
        body = built.model_dump() if built is not None else {}
        raw_usage = body.get("usage") or {}
        usage = Usage(
            prompt_tokens=raw_usage.get("prompt_tokens") or 0,
            completion_tokens=raw_usage.get("completion_tokens") or 0,
            total_tokens=raw_usage.get("total_tokens") or 0,
        )
        return Completion(body, usage, ttft, latency, cost_usd(spec, usage))


def _has_content(chunk: Any) -> bool:
    choices = getattr(chunk, "choices", None) or []
    return bool(choices) and bool(getattr(choices[0].delta, "content", None))
