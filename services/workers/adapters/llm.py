"""The one module that imports litellm: model calls, TTFT, usage and cost.

Every call streams (``stream_options.include_usage``) so the time to first token is measured at
the source, then the chunks are rebuilt into one OpenAI ``chat.completion`` object. litellm's own
retries are off (``num_retries=0``): the tier's policy retries, so each attempt is seen and
recorded. Prices come from litellm's bundled price map (``LITELLM_LOCAL_MODEL_COST_MAP``), never
from the network.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import aiohttp
import litellm
from litellm.llms.openai.chat.gpt_transformation import OpenAIGPTConfig
from litellm.types.utils import LlmProviders
from litellm.utils import ProviderConfigManager
from pydantic import BaseModel

from schemas.v1 import PASSED_PARAMETERS, ChatRequest, Usage
from services.common.routing_config import ModelSpec
from services.workers.errors import (
    AdapterError,
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


# What one streamed choice added: ``content``, ``reasoning_content``, ``tool_calls`` (OpenAI's
# delta pieces), ``logprobs`` (token entries), ``finish_reason``; only the keys it set.
Delta = dict[str, Any]
DeltaListener = Callable[[int, Delta], None]


class ModelClient(Protocol):
    async def complete(
        self,
        spec: ModelSpec,
        request: ChatRequest,
        timeout_s: float,
        on_delta: DeltaListener | None = None,
    ) -> Completion: ...


def missing_keys(specs: list[ModelSpec]) -> list[str]:
    """Environment variables the given models need and that are not set."""
    return sorted(
        {s.api_key_env for s in specs if s.api_key_env and not os.environ.get(s.api_key_env)}
    )


@functools.lru_cache(maxsize=256)
def _linear_rates(price_model: str) -> tuple[float, float] | None:
    """Per-token input/output prices of a price-map entry whose price does not depend on size.

    ``None`` when the entry is unknown or tiered (``*_above_<n>k_tokens`` prices): those go
    through ``litellm.cost_per_token`` on every call, which applies the tiers.
    """
    try:
        info = litellm.get_model_info(price_model)
    except Exception:
        return None
    tiered = any("_above_" in key and info.get(key) for key in info)
    inp, out = info.get("input_cost_per_token"), info.get("output_cost_per_token")
    if tiered or inp is None or out is None:
        return None
    return float(inp), float(out)


def cost_usd(spec: ModelSpec, usage: Usage) -> float:
    if spec.input_cost_per_mtok is not None or spec.output_cost_per_mtok is not None:
        return (
            usage.prompt_tokens * (spec.input_cost_per_mtok or 0.0)
            + usage.completion_tokens * (spec.output_cost_per_mtok or 0.0)
        ) / 1_000_000
    price_model = spec.price_as or spec.model
    rates = _linear_rates(price_model)
    if rates is not None:
        return usage.prompt_tokens * rates[0] + usage.completion_tokens * rates[1]
    try:
        prompt, completion = litellm.cost_per_token(
            model=price_model,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
        )
    except Exception:  # not in the price map: record 0 rather than fail the request
        return 0.0
    return float(prompt + completion)


def _call_args(spec: ModelSpec, request: ChatRequest, timeout_s: float) -> dict[str, Any]:
    """litellm's arguments for one call. The request's own parameters (``model_parameters``)
    are all ones the model takes (``supported_parameters``; the worker skips a model that does
    not): litellm's own go as arguments, the config's ``capabilities.params`` ones as extra body
    fields, sent as they are."""
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
    params = request.model_parameters()
    if params:
        known = litellm_parameters(spec.model, spec.api_base)
        extra = {name: _plain(v) for name, v in params.items() if name not in known}
        args.update((name, _plain(v)) for name, v in params.items() if name in known)
        if extra:
            args["extra_body"] = extra
        # litellm drops what a provider does not take (drop_params): a parameter the client set
        # fails the attempt instead, so nothing the client asked for is silently left out
        args["drop_params"] = False
    return args


@functools.lru_cache(maxsize=256)
def litellm_parameters(model: str, api_base: str | None) -> frozenset[str]:
    """The OpenAI parameters litellm passes to ``model`` (its provider's list, which may depend
    on the model: o-series models take no ``top_p``)."""
    try:
        provider_model, provider, _key, _base = litellm.get_llm_provider(
            model=model, api_base=api_base
        )
        found = litellm.get_supported_openai_params(
            model=provider_model, custom_llm_provider=provider
        )
    except Exception:
        return frozenset()
    return frozenset(found or ())


def supported_parameters(spec: ModelSpec) -> frozenset[str]:
    """What ``spec`` takes: litellm's list, plus the config's ``capabilities.params``."""
    declared = spec.capabilities.params if spec.capabilities is not None else ()
    return litellm_parameters(spec.model, spec.api_base) | frozenset(declared)


def _plain(value: Any) -> Any:
    """A contract value as the JSON the provider is sent."""
    if isinstance(value, BaseModel):
        return value.model_dump(exclude_none=True)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


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


# Providers whose litellm chat config speaks the OpenAI wire format with bearer auth, so the
# direct transport can send what the config builds and parse the stream with its iterator.
DIRECT_PROVIDERS = frozenset({"openai", "hosted_vllm"})


@dataclass(frozen=True)
class _Route:
    """litellm's provider config for one model endpoint, resolved once per (model, api_base)."""

    config: Any
    provider: str
    model: str
    api_base: str | None
    url: str
    proxy: str | None


@functools.lru_cache(maxsize=256)
def _direct_route(model: str, api_base: str | None) -> _Route | None:
    try:
        provider_model, provider, _key, resolved_base = litellm.get_llm_provider(
            model=model, api_base=api_base
        )
    except Exception:
        return None
    if provider not in DIRECT_PROVIDERS:
        return None
    config = ProviderConfigManager.get_provider_chat_config(provider_model, LlmProviders(provider))
    if not isinstance(config, OpenAIGPTConfig):
        return None
    base = api_base or resolved_base or config.get_api_base()
    url = config.get_complete_url(base, None, provider_model, {}, {}, stream=True)
    return _Route(config, provider, provider_model, base, url, _env_proxy(url))


def _env_proxy(url: str) -> str | None:
    """The HTTP(S)_PROXY that applies to ``url`` (NO_PROXY honoured), read once per endpoint.

    aiohttp's ``trust_env`` would look the environment and ~/.netrc up again on every request,
    in a thread; at hundreds of calls per second that was a tenth of the worker's CPU.
    """
    parts = urllib.parse.urlsplit(url)
    if urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return urllib.request.getproxies_environment().get(parts.scheme)


class LiteLLMClient:
    """``ModelClient`` with litellm as the provider layer, on one of two transports.

    * **direct** (OpenAI-compatible endpoints, ``transport: auto``): litellm's provider config
      maps the parameters, builds the URL, headers and body, and parses every stream chunk
      (``get_model_response_iterator``); the HTTP call runs on this client's own aiohttp pool.
      This skips ``acompletion``'s per-call wrapper (logging objects, three cost calculations,
      the stream wrapper and chunk rebuilder), most of a streamed call's CPU
      (docs/hot-path.md).
    * **litellm** (every other provider, or ``transport: litellm``): ``litellm.acompletion``.
    """

    # An idle pooled connection is closed after this long. aiohttp keeps one 15 s by default,
    # and uvicorn (the simulator, many self-hosted endpoints) closes its side after 5 s: a
    # request sent on a connection in between failed with "Can not write request body" (217 of
    # 12,000 shadow calls in one `make bench` run after pauses between bursts). Below the
    # server's timeout, the client closes first and the next request opens a fresh one.
    KEEPALIVE_S = 4.0

    def __init__(self, max_connections: int = 0) -> None:
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=self._max_connections, keepalive_timeout=self.KEEPALIVE_S
                ),
                timeout=aiohttp.ClientTimeout(total=None),
                json_serialize=json.dumps,
            )
        return self._session

    async def complete(
        self,
        spec: ModelSpec,
        request: ChatRequest,
        timeout_s: float,
        on_delta: DeltaListener | None = None,
    ) -> Completion:
        """One call of ``spec``; ``on_delta`` is handed each choice's delta as it arrives."""
        try:
            route = _direct_route(spec.model, spec.api_base) if spec.transport == "auto" else None
            if route is not None:
                return await self._complete_direct(route, spec, request, timeout_s, on_delta)
            return await self._complete_litellm(spec, request, timeout_s, on_delta)
        except ModelCallError:
            raise
        except Exception as exc:
            # mapping the parameters or folding the stream failed: asking this model again
            # (another paid call) would fail the same way
            raise AdapterError(f"{type(exc).__name__}: {str(exc)[:300]}") from exc

    async def _complete_direct(
        self,
        route: _Route,
        spec: ModelSpec,
        request: ChatRequest,
        timeout_s: float,
        on_delta: DeltaListener | None,
    ) -> Completion:
        args = _call_args(spec, request, timeout_s)
        messages = args["messages"]
        params = {k: args[k] for k in PASSED_PARAMETERS if k in args}
        params.update(stream=True, stream_options={"include_usage": True})
        config = route.config
        try:
            optional = config.map_openai_params(
                non_default_params=params,
                optional_params={},
                model=route.model,
                drop_params=args.get("drop_params", True),
            )
        except litellm.UnsupportedParamsError as exc:
            raise BadRequest(f"{type(exc).__name__}: {str(exc)[:300]}") from exc
        dropped = [k for k in _KEPT_AS_NAMED if k in params and k not in optional]
        if dropped:
            raise BadRequest(f"litellm does not pass {dropped} to {spec.model}")
        litellm_params = {"custom_llm_provider": route.provider, "api_base": route.api_base}
        headers = config.validate_environment(
            {}, route.model, messages, optional, litellm_params, args.get("api_key"), route.api_base
        )
        body = config.transform_request(route.model, messages, optional, litellm_params, headers)
        body.update(args.get("extra_body") or {})
        started = time.perf_counter()
        ttft: float | None = None
        stream = _StreamState(on_delta)
        try:
            async with (
                asyncio.timeout(timeout_s),
                self._http().post(
                    route.url, json=body, headers=headers, proxy=route.proxy
                ) as response,
            ):
                if response.status != 200:
                    text = await response.text()
                    raise _status_error(response.status, text)
                lines = _lines(response.content)
                chunks = config.get_model_response_iterator(
                    streaming_response=lines, sync_stream=False, json_mode=False
                )
                async for chunk in chunks:
                    if _fold(stream, chunk) and ttft is None:
                        ttft = (time.perf_counter() - started) * 1000
        except ModelCallError:
            raise
        except TimeoutError as exc:
            raise ModelTimeout(f"no complete answer within {timeout_s:g}s") from exc
        except aiohttp.ClientError as exc:
            raise ProviderUnavailable(f"{type(exc).__name__}: {str(exc)[:300]}") from exc
        except Exception as exc:
            raise _classify(exc) from exc
        latency = (time.perf_counter() - started) * 1000
        if not stream.finished:
            raise ProviderUnavailable("the provider's stream ended before a finish_reason")
        usage = stream.usage()
        return Completion(stream.body(route.model), usage, ttft, latency, cost_usd(spec, usage))

    async def _complete_litellm(
        self,
        spec: ModelSpec,
        request: ChatRequest,
        timeout_s: float,
        on_delta: DeltaListener | None,
    ) -> Completion:
        args = _call_args(spec, request, timeout_s)
        started = time.perf_counter()
        ttft: float | None = None
        state = _StreamState(on_delta)
        try:
            async with asyncio.timeout(timeout_s):
                stream = await litellm.acompletion(**args)
                async for chunk in stream:
                    if _fold(state, chunk) and ttft is None:
                        ttft = (time.perf_counter() - started) * 1000
        except ModelCallError:
            raise
        except Exception as exc:
            raise _classify(exc) from exc
        latency = (time.perf_counter() - started) * 1000
        if not state.choices:
            raise ProviderUnavailable("the provider closed the stream without a chunk")
        first = state.choices.get(0)
        if first is None or first.finish_reason is None:
            raise ProviderUnavailable("the provider's stream ended before a finish_reason")
        # litellm's stream wrapper passes on only the first choice's finish chunk when n > 1:
        # the others ended with the stream, as the first did
        for choice in state.choices.values():
            choice.finish_reason = choice.finish_reason or first.finish_reason
        # folded here rather than by litellm.stream_chunk_builder, which keeps only choice 0
        usage = state.usage()
        body = state.body(spec.model.split("/", 1)[-1])
        return Completion(body, usage, ttft, latency, cost_usd(spec, usage))


# parameters an OpenAI-format provider is sent under the same name; the others may be renamed
# (``max_tokens`` becomes ``max_completion_tokens`` for o-series models)
_KEPT_AS_NAMED = ("tools", "tool_choice", "parallel_tool_calls", "response_format", "n", "logprobs")


async def _lines(content: aiohttp.StreamReader) -> AsyncIterator[str]:
    """The response body as text lines, for litellm's stream iterator (which strips ``data:``)."""
    async for raw in content:
        line = raw.decode("utf-8").strip()
        if line:
            yield line


def _status_error(status: int, text: str) -> ModelCallError:
    message = f"HTTP {status}: {text[:300]}"
    if status == 429:
        return RateLimited(message, status=status)
    if status in (401, 403):
        return AuthFailed(message, status=status)
    if status == 404:
        return ModelNotFound(message, status=status)
    if status in (400, 413, 422):
        return BadRequest(message, status=status)
    if status == 408:
        return ModelTimeout(message, status=status)
    return ProviderUnavailable(message, status=status)


class _ChoiceState:
    """One choice (``n`` > 1 streams several, by index) as its deltas arrive."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.finish_reason: str | None = None
        self.tool_calls: dict[int, dict[str, Any]] = {}  # by the deltas' index
        self.logprobs: list[Any] | None = None  # the token entries, when the client asked

    def add(self, choice: Any, out: Delta | None = None) -> bool:
        """Fold one streamed choice; with ``out``, also put what it added there, plain."""
        delta = choice.delta
        content = False
        if delta.content:
            self.text.append(delta.content)
            content = True
            if out is not None:
                out["content"] = delta.content
        reasoning = getattr(delta, "reasoning_content", None)
        if reasoning:
            self.reasoning.append(reasoning)
            content = True
            if out is not None:
                out["reasoning_content"] = reasoning
        for call in getattr(delta, "tool_calls", None) or []:
            piece = self._add_tool_call(call)
            content = True
            if out is not None:
                out.setdefault("tool_calls", []).append(piece)
        logprobs = getattr(choice, "logprobs", None)
        if logprobs is not None:
            entries = [_plain_dict(e) for e in _get(logprobs, "content") or ()]
            self.logprobs = (self.logprobs or []) + entries
            if out is not None and entries:
                out["logprobs"] = entries
        if choice.finish_reason:
            self.finish_reason = choice.finish_reason
            if out is not None:
                out["finish_reason"] = choice.finish_reason
        return content

    def _add_tool_call(self, call: Any) -> dict[str, Any]:
        """A tool call arrives as deltas of one index: its id and name once, then the
        arguments' JSON text in pieces. Returns the delta's own part, plain."""
        index = getattr(call, "index", None) or 0
        slot = self.tool_calls.setdefault(
            index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
        )
        piece: dict[str, Any] = {"index": index}
        if getattr(call, "id", None):
            slot["id"] = piece["id"] = call.id
            piece["type"] = "function"
        function = getattr(call, "function", None)
        if function is not None:
            name = getattr(function, "name", None)
            if name and not slot["function"]["name"]:
                slot["function"]["name"] = name
            arguments = getattr(function, "arguments", None) or ""
            slot["function"]["arguments"] += arguments
            piece["function"] = {"arguments": arguments, **({"name": name} if name else {})}
        return piece

    def body(self, index: int) -> dict[str, Any]:
        text = "".join(self.text)
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        if self.tool_calls:
            message["tool_calls"] = [self.tool_calls[i] for i in sorted(self.tool_calls)]
            message["content"] = text or None  # as OpenAI answers a call without text
        logprobs = None if self.logprobs is None else {"content": self.logprobs}
        return {
            "index": index,
            "message": message,
            "logprobs": logprobs,
            "finish_reason": self.finish_reason,
        }


def _get(value: Any, name: str) -> Any:
    return value.get(name) if isinstance(value, dict) else getattr(value, name, None)


def _plain_dict(value: Any) -> Any:
    return value.model_dump(exclude_none=True) if isinstance(value, BaseModel) else value


class _StreamState:
    """Folds parsed stream chunks into one OpenAI ``chat.completion``; with a ``listener``, also
    hands it each choice's delta as it comes (index, plain delta: ``Delta``)."""

    def __init__(self, listener: DeltaListener | None = None) -> None:
        self.id: str | None = None
        self.created: int | None = None
        self.raw_usage: Any = None
        self.choices: dict[int, _ChoiceState] = {}
        self.listener = listener

    def add(self, chunk: Any) -> bool:
        """Take one chunk; True when it carried content (the first one sets TTFT)."""
        if isinstance(chunk, dict):  # GenericStreamingChunk: the iterator's end-of-stream marker
            return False
        self.id = self.id or getattr(chunk, "id", None)
        self.created = self.created or getattr(chunk, "created", None)
        usage = getattr(chunk, "usage", None)
        if usage is not None:
            self.raw_usage = usage
        content = False
        for choice in getattr(chunk, "choices", None) or []:
            state = self.choices.get(choice.index)
            if state is None:
                state = self.choices[choice.index] = _ChoiceState()
            if self.listener is None:
                content = state.add(choice) or content
                continue
            out: Delta = {}
            content = state.add(choice, out) or content
            if out:
                self.listener(choice.index, out)
        return content

    @property
    def finished(self) -> bool:
        """Every choice that began has a finish_reason (a cut stream has not)."""
        return bool(self.choices) and all(c.finish_reason for c in self.choices.values())

    def usage(self) -> Usage:
        u = self.raw_usage
        prompt = int(getattr(u, "prompt_tokens", 0) or 0)
        completion = int(getattr(u, "completion_tokens", 0) or 0)
        total = int(getattr(u, "total_tokens", 0) or 0) or prompt + completion
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=total)

    def body(self, model: str) -> dict[str, Any]:
        usage = self.usage()
        return {
            "id": self.id or "",
            "object": "chat.completion",
            "created": self.created or int(time.time()),
            "model": model,
            "choices": [self.choices[i].body(i) for i in sorted(self.choices)],
            "usage": usage.model_dump(),
        }


def _fold(state: _StreamState, chunk: Any) -> bool:
    """``state.add(chunk)``; a chunk it cannot fold is our failure, not the provider's: asking
    the model again (another paid call) would fail the same way."""
    try:
        return state.add(chunk)
    except Exception as exc:
        raise AdapterError(f"folding a stream chunk: {type(exc).__name__}: {exc}") from exc
