"""What a tier worker does with one routed request.

1. This very record handled before, its answer already on the reply topic (a redelivery after a
   crash)? Nothing to do.
2. Answered before (a redelivery, or a repeat with the same idempotency key)? Publish the stored
   outcome again; no model call.
3. Try the tier's models in order, with retries on transient errors, inside the deadline;
   publish an ``AttemptEvent`` per call.
4. Every model failed transiently and a fallback tier exists? Re-route there once.
5. Otherwise store the outcome, then publish it to the request's reply topic.

The caller (the consumer) commits the offset only after this returns, so a crash anywhere
above means redelivery, never loss. Every publish of an answer carries the record it answers
(``delivery``) in a header and is noted in Redis first, which is what step 1 checks: a crash
between publishing and committing does not answer the client twice.
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
from services.workers.adapters.outcomes import OutcomeStore, Sending
from services.workers.adapters.sent import DELIVERY_HEADER, SentCheck
from services.workers.domain import policy
from services.workers.errors import ModelCallError, RateLimited

log = logging.getLogger(__name__)

_OUTCOME = TypeAdapter(Outcome)
_STATUS: dict[str, AttemptStatus] = {"timeout": "timeout", "rate_limited": "rate_limited"}
# How long a publish may still be under way after its note was written (it is a single acked
# send, normally milliseconds): a redelivery that does not find the answer searches again once
# the note is this old, so it does not miss an answer another owner of the record (one the group
# gave up on, still working) is sending right now.
SETTLE_S = 5.0


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
        sent: SentCheck,
    ) -> None:
        self.tier = tier
        self.spec = config.tier(tier)
        self.config = config
        self.topics = topics
        self.publisher = publisher
        self.client = client
        self.outcomes = outcomes
        self.sent = sent
        self.replayed = 0  # answered again from the stored outcome
        self.already_sent = 0  # redeliveries whose answer was found on the reply topic

    async def process(self, routed: RoutedRequest, delivery: str) -> None:
        """Answer ``routed``, which arrived as ``delivery`` (``topic:partition:offset``)."""
        request_id = routed.request_id
        cached, sending = await self.outcomes.lookup(request_id, delivery)
        if sending is not None and await self._sent_before(request_id, delivery, sending):
            return
        if cached is not None:
            self.replayed += 1
            # (a note found above was searched for already: the answer is not out)
            earlier = None
            if sending is None:
                earlier = await self.outcomes.sending(request_id, delivery, routed.reply_to)
            await self._send_once(routed, _OUTCOME.validate_json(cached), delivery, earlier)
            return
        # The successful attempt's event is published, then the outcome stored, then the answer
        # sent. A redelivery after a crash finds the outcome stored (and then answers from it)
        # only if the event is already on the events topic, so a crash cannot lose the event.
        events: list[asyncio.Task[None]] = []
        try:
            outcome = await self._answer(routed, events, delivery)
            if outcome is None:
                return  # re-routed to the fallback tier, which answers
            payload = outcome.model_dump_json().encode()
            await asyncio.gather(*events)
            earlier = await self.outcomes.put(request_id, payload, delivery, routed.reply_to)
            await self._send_once(routed, outcome, delivery, earlier)
        finally:
            if events:
                await asyncio.gather(*events)

    async def _send_once(
        self, routed: RoutedRequest, outcome: Outcome, delivery: str, earlier: Sending | None
    ) -> None:
        """Publish the answer, unless another owner of this record noted and sent it first (a
        worker the group gave up on while it was still working: both had the record at once)."""
        if earlier is not None and await self._sent_before(routed.request_id, delivery, earlier):
            return
        headers = {DELIVERY_HEADER: delivery}
        await self.publisher.publish(routed.reply_to, outcome, routed.request_id, headers)

    async def _sent_before(self, request_id: str, delivery: str, sending: Sending) -> bool:
        """Is the answer that ``sending`` announced on its topic? Not found while the note is
        younger than ``SETTLE_S``: it may belong to a publish still under way, so the search is
        made again when the note is that old."""
        if await self._found(request_id, delivery, sending):
            return True
        wait_s = SETTLE_S - (time.time() - sending.at_ms / 1000)
        if wait_s <= 0:
            return False
        await asyncio.sleep(wait_s)
        return await self._found(request_id, delivery, sending)

    async def _found(self, request_id: str, delivery: str, sending: Sending) -> bool:
        if await self.sent.was_sent(sending.topic, request_id, delivery, sending.at_ms):
            self.already_sent += 1
            return True
        return False

    async def _answer(
        self, routed: RoutedRequest, events: list[asyncio.Task[None]], delivery: str
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
            topic = self.topics.tier(fallback)
            earlier = await self.outcomes.sending(routed.request_id, delivery, topic)
            if earlier is None or not await self._sent_before(routed.request_id, delivery, earlier):
                await self.publisher.publish(
                    topic, rerouted, routed.request_id, {DELIVERY_HEADER: delivery}
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
