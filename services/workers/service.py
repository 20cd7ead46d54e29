"""What a tier worker does with one routed request.

1. Answered before (a redelivery)? Publish the stored outcome again; no model call.
2. Try the tier's models in order, with retries on transient errors, inside the deadline;
   publish an ``AttemptEvent`` per call.
3. Every model failed transiently and a fallback tier exists? Re-route there once.
4. Otherwise store the outcome, then publish it to the request's reply topic.

The caller (the consumer) commits the offset only after this returns, so a crash anywhere
above means redelivery, never loss.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime

from pydantic import TypeAdapter

from schemas.topics import Topics
from schemas.v1 import AttemptEvent, AttemptStatus, ChatError, ChatResult, Outcome, RoutedRequest
from services.common.kafka import Publisher
from services.common.routing_config import LoadedConfig
from services.workers.adapters.llm import Completion, ModelClient
from services.workers.adapters.outcomes import OutcomeStore
from services.workers.domain import policy
from services.workers.errors import ModelCallError, RateLimited

log = logging.getLogger(__name__)

_OUTCOME = TypeAdapter(Outcome)
_STATUS: dict[str, AttemptStatus] = {"timeout": "timeout", "rate_limited": "rate_limited"}


class TierService:
    def __init__(
        self,
        *,
        tier: str,
        config: LoadedConfig,
        topics: Topics,
        publisher: Publisher,
        client: ModelClient,
        outcomes: OutcomeStore,
    ) -> None:
        self.tier = tier
        self.spec = config.tier(tier)
        self.config = config
        self.topics = topics
        self.publisher = publisher
        self.client = client
        self.outcomes = outcomes
        self.replayed = 0

    async def process(self, routed: RoutedRequest) -> None:
        cached = await self.outcomes.get(routed.request_id)
        if cached is not None:
            self.replayed += 1
            await self.publisher.publish(
                routed.reply_to, _OUTCOME.validate_json(cached), key=routed.request_id
            )
            return
        # The successful attempt's event is published while the outcome is stored and sent:
        # the caller is not kept waiting on the metrics topic, and the offset is still
        # committed only once the event is stored too (the ``finally``).
        events: list[asyncio.Task[None]] = []
        try:
            outcome = await self._answer(routed, events)
            if outcome is None:
                return  # re-routed to the fallback tier, which answers
            await self.outcomes.put(routed.request_id, outcome.model_dump_json().encode())
            await self.publisher.publish(routed.reply_to, outcome, key=routed.request_id)
        finally:
            if events:
                await asyncio.gather(*events)

    async def _answer(
        self, routed: RoutedRequest, events: list[asyncio.Task[None]]
    ) -> Outcome | None:
        request = routed.request
        errors: list[ModelCallError] = []
        for attempt in policy.attempts(self.spec):
            left = policy.remaining_s(routed.deadline_at, datetime.now(UTC))
            if left is not None and left <= 0:
                return self._error(
                    routed, "deadline_exceeded", "the request's deadline passed", len(errors)
                )
            if attempt.retry and errors and not errors[-1].transient:
                continue  # a permanent error: this model will not change its mind
            if attempt.retry:
                await asyncio.sleep(policy.backoff_s(self.spec, attempt.retry))
            timeout = policy.attempt_timeout(self.spec, attempt.spec, left)
            started = time.perf_counter()
            try:
                completion = await self.client.complete(attempt.spec, request, timeout)
            except ModelCallError as exc:
                errors.append(exc)
                failed_ms = (time.perf_counter() - started) * 1000
                await self._event(routed, attempt, None, exc, failed_ms)
                continue
            events.append(asyncio.create_task(self._event(routed, attempt, completion, None)))
            return ChatResult(
                request_id=routed.request_id,
                tenant=request.metadata.tenant,
                tier=self.tier,
                model=attempt.spec.label,
                provider=attempt.spec.provider,
                rule=routed.rule,
                config_hash=routed.config_hash,
                attempts=attempt.index + 1,
                latency_ms=(datetime.now(UTC) - routed.routed_at).total_seconds() * 1000,
                completion={**completion.body, "model": attempt.spec.label},
                usage=completion.usage,
                cost_usd=completion.cost_usd,
            )
        fallback = self.config.spec.fallback
        if (
            fallback
            and fallback != self.tier
            and routed.attempt == 0
            and all(e.transient for e in errors)
        ):
            rerouted = routed.model_copy(
                update={"tier": fallback, "rule": f"fallback:{self.tier}", "attempt": 1}
            )
            await self.publisher.publish(
                self.topics.tier(fallback), rerouted, key=routed.request_id
            )
            return None
        last = errors[-1] if errors else None
        code = "rate_limited" if last and isinstance(last, RateLimited) else "all_models_failed"
        detail = "; ".join(f"{e.code}: {e}" for e in errors[-3:])
        return self._error(
            routed,
            code,
            f"every model of tier {self.tier!r} failed ({detail})",
            len(errors),
            retryable=bool(last and last.transient),
        )

    def _error(
        self, routed: RoutedRequest, code: str, message: str, attempts: int, retryable: bool = False
    ) -> ChatError:
        return ChatError(
            request_id=routed.request_id,
            tenant=routed.request.metadata.tenant,
            tier=self.tier,
            rule=routed.rule,
            config_hash=routed.config_hash,
            code=code,
            message=message,
            retryable=retryable,
            attempts=attempts,
        )

    async def _event(
        self,
        routed: RoutedRequest,
        attempt: policy.Attempt,
        completion: Completion | None,
        error: ModelCallError | None,
        failed_ms: float = 0.0,
    ) -> None:
        usage = completion.usage if completion else None
        event = AttemptEvent(
            request_id=routed.request_id,
            tier=self.tier,
            model=attempt.spec.label,
            provider=attempt.spec.provider,
            rule=routed.rule,
            config_hash=routed.config_hash,
            attempt=attempt.index,
            status="ok" if error is None else _STATUS.get(error.code, "error"),
            error_code="" if error is None else error.code,
            tokens_in=usage.prompt_tokens if usage else 0,
            tokens_out=usage.completion_tokens if usage else 0,
            latency_ms=completion.latency_ms if completion else failed_ms,
            ttft_ms=completion.ttft_ms if completion else None,
            cost_usd=completion.cost_usd if completion else 0.0,
            response_sha256=policy.sha256_text(completion.text) if completion else "",
            tenant_hash=policy.tenant_hash(routed.request.metadata.tenant),
        )
        await self.publisher.publish(self.topics.events, event, key=routed.request_id)
