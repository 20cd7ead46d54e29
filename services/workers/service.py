"""What a tier worker does with one routed request.

1. This very record's answer already sent, or being sent by a worker that is alive (a redelivery
   after a crash, or a record the group gave it while its last owner still works on it)? Nothing
   to do.
2. Answered before with a final outcome (a redelivery, or a resend with the same idempotency key)?
   Publish the stored outcome again; no model call. Stored for a different request under the same
   key? Refuse it (``KeyReused``: a dead letter and an ``idempotency_key_reused`` error).
3. Try the tier's models in order, with retries on transient errors, inside the deadline;
   publish an ``AttemptEvent`` per call.
4. Every model failed transiently and a fallback tier exists? Re-route there once.
5. Otherwise store the outcome if it is final (an answer, or an error a retry would repeat),
   then publish it to the request's reply topic. A retryable error is not stored: a resend gets
   a fresh try.

The caller (the consumer) commits the offset only after this returns, so a crash anywhere
above means redelivery, never loss. Every publish of an answer carries the record it answers
(``delivery``) in a header and is noted in Redis first, with the worker that sends it; step 1
reads that note (``adapters/outcomes.py`` has the protocol), so a crash between publishing and
committing, or two owners of one record, do not answer the client twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiokafka.errors import KafkaTimeoutError, UnknownTopicOrPartitionError
from pydantic import TypeAdapter

from schemas.control import SHADOW_TEXT_CHARS, BaselineAnswer, ShadowRequest
from schemas.topics import Topics
from schemas.v1 import (
    AttemptEvent,
    AttemptStatus,
    CascadeStep,
    ChatError,
    ChatRequest,
    ChatResult,
    Outcome,
    RoutedRequest,
    StreamChunk,
    StreamMark,
    Usage,
)
from services.common import capabilities, telemetry
from services.common.capture import output_record
from services.common.config_watch import Refused as ConfigRefused
from services.common.deadletter import dead_letter
from services.common.kafka import Publisher
from services.common.routing_config import (
    CascadeSpec,
    JudgeSpec,
    LoadedConfig,
    ModelSpec,
    TierSpec,
)
from services.common.telemetry import WorkerStatus
from services.workers.adapters.llm import (
    Completion,
    DeltaListener,
    ModelClient,
    supported_parameters,
)
from services.workers.adapters.outcomes import OutcomeStore, Sending, Stored
from services.workers.adapters.sent import DELIVERY_HEADER, SentCheck
from services.workers.cancels import Cancels
from services.workers.domain import noise, policy, verifier
from services.workers.domain.verifier import Verdict
from services.workers.errors import ModelCallError, RateLimited
from services.workers.stream import ChunkStream

log = logging.getLogger(__name__)

_OUTCOME = TypeAdapter(Outcome)
# While the owner of a delivery's note is alive: how often to ask Redis whether it still is (or
# whether the delivery was marked sent), and how often to look for its answer on the topic.
WAIT_POLL_S = 0.2
SEARCH_EVERY_S = 1.0
_WAIT_WARN_S = 60.0


@dataclass(frozen=True)
class Gap:
    """Something a model lacks for a request, and the request field that asks for it."""

    what: str  # "tools", "context_window", "parameter 'logit_bias'"
    param: str


class ClientLeft(Exception):
    """The client of a streamed request left (a cancel arrived): its call was stopped."""


class Refused(ValueError):
    """No model of the tier can take the request (the dead letter's error type)."""


class KeyReused(ValueError):
    """A stored outcome answers another request than the one sent under its key."""

    code = "idempotency_key_reused"


def is_final(outcome: Outcome) -> bool:
    """Would a resend get the same outcome? An answer, or an error that is not retryable."""
    return isinstance(outcome, ChatResult) or not outcome.retryable


# error codes whose request is not counted as a plain error (switchboard_worker_requests_total)
_ERROR_STATUS: dict[str, WorkerStatus] = {
    "deadline_exceeded": "timeout",
    "cancelled": "cancelled",
    "model_not_found": "rejected",
    "unsupported_parameter": "rejected",
    "unsupported_capability": "rejected",
}


def finished(outcome: Outcome) -> WorkerStatus:
    """The status a request answered with ``outcome`` is counted under."""
    if isinstance(outcome, ChatResult):
        return "ok"
    return _ERROR_STATUS.get(outcome.code, "error")


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
        topic_exists: Callable[[str], Awaitable[bool]] | None = None,
        cancels: Cancels | None = None,
        chunk_publisher: Publisher | None = None,
    ) -> None:
        self.tier = tier
        self._setup = _Setup.of(config, tier)
        self.topics = topics
        self.publisher = publisher
        self.metrics = telemetry.TierMetrics(tier)
        self.client = _InFlight(client, self.metrics.in_flight)
        self.outcomes = outcomes
        self.sent = sent
        self.topic_exists = topic_exists
        self.cancels = cancels
        # a stream's chunks, each sent at once (the answers go by ``publisher``, after them)
        self.chunk_publisher = chunk_publisher or publisher
        self.cancelled = 0  # streamed calls stopped (or not begun) because the client left
        self.orphaned = 0  # answers dropped: the router's reply topic no longer exists
        self.replayed = 0  # answered again from the stored outcome
        self.already_sent = 0  # deliveries whose answer another send had put out already
        self.waited = 0  # deliveries that waited for a living owner to send their answer
        self.taken_over = 0  # deliveries whose note was taken from an owner that was gone
        self.refused = 0  # requests no model of the tier can take (a capability, a parameter)
        self.mirrored = 0  # answered requests handed to a shadow experiment's candidate
        self._exclusive: dict[str, tuple[asyncio.Lock, int]] = {}

    @property
    def config(self) -> LoadedConfig:
        return self._setup.config

    @property
    def spec(self) -> TierSpec:
        return self._setup.spec

    def apply_config(self, config: LoadedConfig) -> None:
        """Serve the next requests on ``config`` (those in flight finish on the one they began
        with). Raises ``Refused`` for a config without this worker's tier."""
        if self.tier not in config.spec.tiers:
            raise ConfigRefused(f"it has no tier {self.tier!r}, which this worker serves")
        self._setup = _Setup.of(config, self.tier)

    async def process(self, routed: RoutedRequest, delivery: str) -> WorkerStatus:
        """Answer ``routed``, which arrived as ``delivery`` (``topic:partition:offset``); what
        became of it (switchboard_worker_requests_total's status)."""
        request_id = routed.request_id
        key = routed.outcome_key or request_id
        async with self._one_sender(delivery):
            stored, note = await self.outcomes.lookup(key, request_id, delivery)
            if note is not None and await self._answered(request_id, delivery, note):
                return "duplicate"
            if stored is not None and stored.fingerprint and routed.fingerprint:
                if stored.fingerprint != routed.fingerprint:
                    raise KeyReused(
                        f"request id {request_id} was answered before for a different request "
                        "(same idempotency key, other content); use a new key for a new request"
                    )
            previous = _OUTCOME.validate_json(stored.payload) if stored is not None else None
            if previous is not None and is_final(previous):
                self.replayed += 1
                # a note read above is this worker's now (its own, or taken over)
                await self._send_once(routed, previous, delivery, noted=note is not None)
                return "replayed"
        # The successful attempt's event is published, then the outcome stored, then the answer
        # sent. A redelivery after a crash finds the outcome stored (and then answers from it)
        # only if the event is already on the events topic, so a crash cannot lose the event.
        events: list[asyncio.Task[None]] = []
        # publishes that must be stored before the delivery is committed, but not before the
        # caller is answered (a mirror to the shadow candidate)
        after: list[asyncio.Task[None]] = []
        try:
            outcome = await self._answer(routed, events, delivery, after)
            if outcome is None:
                return "rerouted"  # to the fallback tier, which answers
            payload = outcome.model_dump_json().encode()
            await asyncio.gather(*events)
            async with self._one_sender(delivery):
                if is_final(outcome):
                    kept = Stored(payload, routed.fingerprint)
                    earlier = await self.outcomes.put(
                        key, kept, request_id, delivery, routed.reply_to
                    )
                else:
                    earlier = await self.outcomes.sending(request_id, delivery, routed.reply_to)
                if earlier is not None and await self._answered(request_id, delivery, earlier):
                    return "duplicate"
                await self._publish(routed.reply_to, outcome, request_id, delivery)
                return finished(outcome)
        finally:
            if events or after:
                await asyncio.gather(*events, *after)

    @contextlib.asynccontextmanager
    async def _one_sender(self, delivery: str) -> AsyncIterator[None]:
        """Within this process, one task at a time notes and sends a delivery's answer (the
        group can hand a partition back to the worker still finishing it): a note of this worker
        that is not being sent right now is one whose send failed."""
        lock, users = self._exclusive.get(delivery) or (asyncio.Lock(), 0)
        self._exclusive[delivery] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._exclusive[delivery]
            if users == 1:
                del self._exclusive[delivery]
            else:
                self._exclusive[delivery] = (lock, users - 1)

    async def _send_once(
        self, routed: RoutedRequest, outcome: Outcome, delivery: str, *, noted: bool
    ) -> None:
        """Publish the answer, noting it first unless this worker holds the note already."""
        if not noted:
            earlier = await self.outcomes.sending(routed.request_id, delivery, routed.reply_to)
            if earlier is not None and await self._answered(routed.request_id, delivery, earlier):
                return
        await self._publish(routed.reply_to, outcome, routed.request_id, delivery)

    async def _publish(
        self,
        topic: str,
        message: Outcome | RoutedRequest | StreamChunk,
        key: str,
        delivery: str | None,
        publisher: Publisher | None = None,
    ) -> None:
        """Publish to ``topic``; ``delivery`` (the answered record) goes in a header, for the
        search of a redelivery. Stream chunks carry none: they are not the answer. Every chunk
        is stored before the answer is sent, so the answer follows them on its partition."""
        # (not marked sent here: one more Redis round trip on every answer, for what a search finds
        # anyway; docs/reliability.md has what it cost)
        headers = {DELIVERY_HEADER: delivery} if delivery is not None else None
        try:
            await (publisher or self.publisher).publish(topic, message, key, headers)
        except (KafkaTimeoutError, UnknownTopicOrPartitionError):
            if not await self._reply_topic_gone(topic):
                raise  # Kafka is away, or slow: the consumer retries
            self.orphaned += 1
            telemetry.answer_dropped(self.tier)
            log.warning(
                "request %s: answer dropped; the reply topic %s of the router that took the "
                "request no longer exists (that router stopped, its caller with it)",
                key,
                topic,
            )

    async def _reply_topic_gone(self, topic: str) -> bool:
        """Is ``topic`` an HTTP router's reply topic that no longer exists? Never the results
        topic of the Kafka ingress: those answers wait for Kafka, however long it takes."""
        if self.topic_exists is None or not self.topics.is_router_reply_topic(topic):
            return False
        try:
            return not await self.topic_exists(topic)
        except Exception:  # the broker does not answer either: keep retrying
            return False

    async def _answered(self, request_id: str, delivery: str, note: Sending) -> bool:
        """``note`` says a send of this delivery's answer began. True: the answer is out (this
        worker sends nothing); False: this worker holds the note now and sends it.

        Marked sent (a search found the answer before): out. This worker's own note (here one
        task at a time sends a delivery, so its earlier send failed): look on the topic. Another
        worker's: while that worker is alive it is still sending, so wait, looking on the topic
        every ``SEARCH_EVERY_S``; once it is gone, what it sent is on the topic, so look there,
        and if it is not, take the note over (one taker wins) and send.
        """
        loop = asyncio.get_running_loop()
        began = warned = loop.time()
        searched = began - SEARCH_EVERY_S
        waiting = False
        while True:
            if note.done:
                self.already_sent += 1
                return True
            mine = note.owner == self.outcomes.owner
            alive = not mine and await self.outcomes.alive(note.owner)
            if not alive or loop.time() - searched >= SEARCH_EVERY_S:
                searched = loop.time()
                if await self._found(request_id, delivery, note):
                    return True
            if mine:
                return False
            if not alive:
                if await self.outcomes.take_over(request_id, delivery, note):
                    self.taken_over += 1
                    log.info(
                        "request %s: %s was being answered by %s, which is gone and whose "
                        "answer is not on %s; answering it",
                        request_id,
                        delivery,
                        note.owner,
                        note.topic,
                    )
                    return False
            else:
                if not waiting:
                    waiting = True
                    self.waited += 1
                    log.info(
                        "request %s: %s is being answered by %s, which is alive; waiting for it",
                        request_id,
                        delivery,
                        note.owner,
                    )
                if loop.time() - warned >= _WAIT_WARN_S:
                    warned = loop.time()
                    log.warning(
                        "request %s: %s has been waiting %.0f s for %s (alive) to send its answer",
                        request_id,
                        delivery,
                        warned - began,
                        note.owner,
                    )
                await asyncio.sleep(WAIT_POLL_S)
            current = await self.outcomes.note(request_id, delivery)
            if current is None:  # Redis lost it (or is away: fail open)
                return False
            note = current

    async def _found(self, request_id: str, delivery: str, sending: Sending) -> bool:
        if await self.sent.was_sent(sending.topic, request_id, delivery, sending.at_ms):
            self.already_sent += 1
            await self.outcomes.sent(request_id, delivery)  # later redeliveries need not look
            return True
        return False

    async def _answer(
        self,
        routed: RoutedRequest,
        events: list[asyncio.Task[None]],
        delivery: str,
        after: list[asyncio.Task[None]] | None = None,
    ) -> Outcome | None:
        setup = self._setup  # the config this request is answered on, whatever comes in meanwhile
        request = routed.request
        errors: list[ModelCallError] = []
        wanted = capabilities.needs(request)
        asked = request.model_parameters()
        unable: dict[str, list[Gap]] = {}  # model → what it lacks, for models skipped
        models = policy.pinned_models(setup.spec, routed.pinned)
        candidate = self._candidate(routed, setup)
        if candidate is not None:  # the tier's models remain its fallback
            models = [candidate, *(m for m in models if m.label != candidate.label)]
        if not models:  # pinned by a router whose config had the model in this tier
            return self._error(
                routed,
                "model_not_found",
                f"tier {self.tier!r} has no model {routed.pinned!r} (the config changed since "
                "the request was routed); GET /v1/models lists the models",
                0,
                param="model",
            )
        first = 0  # calls made before the tier's models (a cascade's draft and judge)
        step: CascadeStep = ""
        cascade = setup.spec.cascade if routed.pinned is None and candidate is None else None
        if cascade is not None:
            drafted = await self._draft(routed, cascade, setup, events, delivery, after)
            if isinstance(drafted, ChatResult):
                return drafted
            first, step = drafted, "escalation"
        for attempt in policy.attempts(setup.spec, models):
            attempt = policy.Attempt(attempt.index + first, attempt.spec, attempt.retry)
            lacks = self._lacks(attempt.spec, wanted, asked, setup)
            if lacks:  # in-tier fallback goes only to models that can take the request
                unable[attempt.spec.label] = lacks
                continue
            left = policy.remaining_s(routed.deadline_at, datetime.now(UTC))
            if left is not None and left <= 0:
                return self._error(
                    routed,
                    "deadline_exceeded",
                    "the request's deadline passed",
                    len(errors),
                    retryable=True,
                )
            if attempt.retry and errors and not errors[-1].transient:
                continue  # a permanent error: this model will not change its mind
            if errors and not attempt.retry:
                self.metrics.fallbacks.inc()  # the next model of the tier, after a failure
            if attempt.retry:
                await asyncio.sleep(policy.backoff_s(setup.spec, attempt.retry))
            timeout = policy.attempt_timeout(setup.spec, attempt.spec, left)
            stream = self._chunks(routed, attempt, delivery) if request.stream else None
            started = time.perf_counter()
            try:
                if stream is None:
                    completion = await self.client.complete(attempt.spec, request, timeout)
                else:
                    completion = await self._streamed(routed, attempt, stream, timeout)
                    await stream.close()
            except ClientLeft:
                assert stream is not None
                await stream.abort()
                self.cancelled += 1
                left_ms = (time.perf_counter() - started) * 1000
                await self._event(
                    routed,
                    attempt,
                    None,
                    None,
                    left_ms,
                    status="cancelled",
                    setup=setup,
                    cascade_step=step,
                )
                return self._error(
                    routed,
                    "cancelled",
                    "the client left before the answer was complete; the model call was stopped",
                    attempt.index + 1,
                    retryable=True,
                    stream=stream.mark,
                )
            except ModelCallError as exc:
                errors.append(exc)
                failed_ms = (time.perf_counter() - started) * 1000
                if stream is not None and stream.started:
                    return await self._cut_off(routed, attempt, stream, exc, failed_ms, setup)
                await self._event(
                    routed, attempt, None, exc, failed_ms, setup=setup, cascade_step=step
                )
                continue
            except BaseException:
                if stream is not None:
                    await stream.abort()
                raise
            events.append(
                asyncio.create_task(
                    self._event(routed, attempt, completion, None, setup=setup, cascade_step=step)
                )
            )
            if after is not None and self._mirrored(routed, setup):
                after.append(asyncio.create_task(self._mirror(routed, attempt, completion)))
            if after is not None and routed.capture:
                after.append(asyncio.create_task(self._keep(routed, attempt, completion)))
            return self._result(
                routed,
                attempt.spec,
                attempt.index + 1,
                {**completion.body, "model": attempt.spec.label},
                completion.usage,
                completion.cost_usd,
                stream.mark if stream is not None else None,
            )
        if not errors and unable:
            return await self._refuse(routed, unable, delivery)
        fallback = setup.config.spec.fallback
        if (
            fallback
            and fallback != self.tier
            and routed.attempt == 0
            and all(e.transient for e in errors)
            and (routed.pinned is None or models[0].pinned_fallback)
        ):
            rerouted = routed.model_copy(
                update={
                    "tier": fallback,
                    "rule": f"fallback:{self.tier}",
                    "attempt": 1,
                    "pinned": None,  # a pinned model that allows fallback let any model answer
                    "experiment": None,  # this tier's experiment is not the fallback tier's
                }
            )
            topic = self.topics.tier(fallback)
            self.metrics.fallbacks.inc()
            async with self._one_sender(delivery):
                earlier = await self.outcomes.sending(routed.request_id, delivery, topic)
                if earlier is None or not await self._answered(
                    routed.request_id, delivery, earlier
                ):
                    await self._publish(topic, rerouted, routed.request_id, delivery)
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

    async def _draft(
        self,
        routed: RoutedRequest,
        cascade: CascadeSpec,
        setup: _Setup,
        events: list[asyncio.Task[None]],
        delivery: str,
        after: list[asyncio.Task[None]] | None,
    ) -> ChatResult | int:
        """A cascade's first step: the draft model answers (whole, even for a streamed request:
        the stream starts after the verdict), the verifier (and the judge, for a draft the other
        checks passed) decides. The accepted draft is the answer; otherwise the number of calls
        made, and the tier's models answer (the escalation)."""
        request, spec, checks = routed.request, cascade.draft, cascade.verify
        wanted, asked = capabilities.needs(request), request.model_parameters()
        left = policy.remaining_s(routed.deadline_at, datetime.now(UTC))
        if self._lacks(spec, wanted, asked, setup) or (left is not None and left <= 0):
            return 0  # the draft model cannot take it: straight to the escalation
        extra: dict[str, Any] = {"stream": False, "stream_options": None}
        added_logprobs = checks.min_mean_logprob is not None and not request.logprobs
        if added_logprobs:
            extra["logprobs"] = True
        attempt = policy.Attempt(0, spec, 0)
        started = time.perf_counter()
        try:
            completion = await self.client.complete(
                spec,
                request.model_copy(update=extra),
                policy.attempt_timeout(setup.spec, spec, left),
            )
        except ModelCallError as exc:
            failed_ms = (time.perf_counter() - started) * 1000
            verdict = Verdict(False, f"the draft failed: {exc.code}")
            await self._event(
                routed,
                attempt,
                None,
                exc,
                failed_ms,
                setup=setup,
                cascade_step="draft",
                verdict=verdict,
            )
            return 1
        verdict, calls, cost = (
            verifier.verify(checks, request, completion.body),
            1,
            completion.cost_usd,
        )
        if verdict.accepted and checks.judge is not None:
            calls = 2
            verdict, judged = await self._judge(routed, checks.judge, completion, setup)
            cost += judged
        events.append(
            asyncio.create_task(
                self._event(
                    routed,
                    attempt,
                    completion,
                    None,
                    setup=setup,
                    cascade_step="draft",
                    verdict=verdict,
                )
            )
        )
        if not verdict.accepted:
            return calls
        body = {**completion.body, "model": spec.label}
        if added_logprobs:  # asked for the verifier, not by the caller
            body["choices"] = [{**c, "logprobs": None} for c in body.get("choices") or []]
        mark = None
        if request.stream:
            stream = self._chunks(routed, attempt, delivery)
            for choice in body.get("choices") or []:
                stream.add(int(choice.get("index", 0)), _as_delta(choice))
            await stream.close()
            mark = stream.mark
        if after is not None and routed.capture:
            after.append(asyncio.create_task(self._keep(routed, attempt, completion)))
        return self._result(routed, spec, calls, body, completion.usage, cost, mark)

    def _result(
        self,
        routed: RoutedRequest,
        spec: ModelSpec,
        attempts: int,
        body: dict[str, Any],
        usage: Usage,
        cost_usd: float,
        mark: StreamMark | None,
    ) -> ChatResult:
        return ChatResult(
            request_id=routed.request_id,
            tenant=routed.request.metadata.tenant,
            tier=self.tier,
            model=spec.label,
            provider=spec.provider,
            rule=routed.rule,
            config_hash=routed.config_hash,
            attempts=attempts,
            latency_ms=(datetime.now(UTC) - routed.routed_at).total_seconds() * 1000,
            completion=body,
            usage=usage,
            cost_usd=cost_usd,
            stream=mark,
        )

    async def _judge(
        self, routed: RoutedRequest, judge: JudgeSpec, draft: Completion, setup: _Setup
    ) -> tuple[Verdict, float]:
        """The judge's verdict on ``draft`` (its own row, step ``judge``), and what it cost."""
        attempt = policy.Attempt(1, judge.model, 0)
        left = policy.remaining_s(routed.deadline_at, datetime.now(UTC))
        asked = verifier.judge_request(judge, routed.request, draft.text)
        started = time.perf_counter()
        try:
            graded = await self.client.complete(
                judge.model, asked, policy.attempt_timeout(setup.spec, judge.model, left)
            )
        except ModelCallError as exc:
            failed_ms = (time.perf_counter() - started) * 1000
            await self._event(
                routed, attempt, None, exc, failed_ms, setup=setup, cascade_step="judge"
            )
            return Verdict(False, f"the judge failed: {exc.code}"), 0.0
        await self._event(routed, attempt, graded, None, setup=setup, cascade_step="judge")
        return verifier.judge_verdict(judge, graded.body), graded.cost_usd

    async def _streamed(
        self, routed: RoutedRequest, attempt: policy.Attempt, stream: ChunkStream, timeout_s: float
    ) -> Completion:
        """The model call of a streamed request, stopped if its client leaves (``ClientLeft``)."""
        call = self.client.complete(attempt.spec, routed.request, timeout_s, stream.add)
        if self.cancels is None:
            return await call
        with self.cancels.watch(routed.request_id) as gone:
            if gone.is_set():
                call.close()  # never begun
                raise ClientLeft
            task = asyncio.ensure_future(call)
            waiter = asyncio.ensure_future(gone.wait())
            try:
                await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            except BaseException:  # this worker stops: the call goes with it
                await _stop(task, waiter)
                raise
            if task.done():
                waiter.cancel()
                return task.result()
            await _stop(task, waiter)
            raise ClientLeft

    def _chunks(self, routed: RoutedRequest, attempt: policy.Attempt, delivery: str) -> ChunkStream:
        """The stream one attempt's deltas go out on; its id is unique to this delivery, this
        worker and this attempt, so a redelivery (or a second owner) streams under another."""

        async def publish(chunk: StreamChunk) -> None:
            await self._publish(
                routed.reply_to, chunk, routed.request_id, None, self.chunk_publisher
            )

        return ChunkStream(
            publish,
            request_id=routed.request_id,
            stream_id=f"{delivery}/{self.outcomes.owner}/{attempt.index}",
            model=attempt.spec.label,
        )

    async def _cut_off(
        self,
        routed: RoutedRequest,
        attempt: policy.Attempt,
        stream: ChunkStream,
        exc: ModelCallError,
        failed_ms: float,
        setup: _Setup,
    ) -> ChatError:
        """A streamed answer broke after chunks went out: the client has part of one model's
        answer, so no other model may take over. What the model sent before it broke goes out,
        then an error that says the answer was cut off (retryable: a resend is tried afresh)."""
        await stream.close()
        await self._event(routed, attempt, None, exc, failed_ms, status="cut_off", setup=setup)
        return self._error(
            routed,
            "stream_cut_off",
            f"{attempt.spec.label}'s answer broke off after {stream.mark.chunks} chunk(s) went "
            f"out ({exc.code}: {exc}); resend it for a whole answer",
            attempt.index + 1,
            retryable=True,
            stream=stream.mark,
        )

    def _candidate(self, routed: RoutedRequest, setup: _Setup) -> ModelSpec | None:
        """The experiment's candidate, for a request assigned to it (none: the worker's config
        has no such experiment in this tier, and the tier's models answer)."""
        tag = routed.experiment
        if tag is None or tag.variant != "candidate":
            return None
        experiment = setup.config.experiments.get(tag.name)
        if experiment is None or experiment.spec.tier != self.tier:
            return None
        return experiment.spec.candidate if experiment.spec.mode == "canary" else None

    def _mirrored(self, routed: RoutedRequest, setup: _Setup) -> bool:
        """Is the request one of the share a shadow experiment of this tier mirrors?"""
        tag = routed.experiment
        if tag is None or tag.variant != "baseline":
            return False
        experiment = setup.config.experiments.get(tag.name)
        return experiment is not None and experiment.spec.mode == "shadow"

    async def _mirror(
        self, routed: RoutedRequest, attempt: policy.Attempt, completion: Completion
    ) -> None:
        """Hand the answered request to the shadow workers, with what the tier answered."""
        usage = completion.usage
        baseline = BaselineAnswer(
            model=attempt.spec.label,
            latency_ms=completion.latency_ms,
            tokens_in=usage.prompt_tokens,
            tokens_out=usage.completion_tokens,
            cost_usd=completion.cost_usd,
            response_sha256=policy.sha256_text(completion.text),
            text=completion.text[:SHADOW_TEXT_CHARS],
        )
        mirror = ShadowRequest(routed=routed, baseline=baseline)
        await self.publisher.publish(self.topics.shadow, mirror, key=routed.request_id)
        self.mirrored += 1

    async def _keep(
        self, routed: RoutedRequest, attempt: policy.Attempt, completion: Completion
    ) -> None:
        """The captured request's answer, redacted here, beside its input (llm_payloads)."""
        try:
            kept = output_record(
                routed.request, self.tier, routed.rule, routed.config_hash,
                attempt.spec.label, completion.text,
            )  # fmt: skip
        except Exception:
            log.exception("capture of the answer to %s failed", routed.request_id)
            return
        await self.publisher.publish(self.topics.payloads, kept, key=routed.request_id)

    def _lacks(
        self, spec: ModelSpec, wanted: capabilities.Needs, asked: dict[str, object], setup: _Setup
    ) -> list[Gap]:
        able, takes = setup.abilities[spec]
        gaps = [Gap(c, capabilities.ASKED_BY.get(c, "messages")) for c in able.lacks(wanted)]
        gaps += [Gap(f"parameter {name!r}", name) for name in asked if name not in takes]
        return gaps

    async def _refuse(
        self, routed: RoutedRequest, unable: dict[str, list[Gap]], delivery: str
    ) -> ChatError:
        """No model of the tier can take the request: a parameter or capability none has (the
        router checks capabilities first; parameters, which litellm knows, only here). A request
        from the Kafka ingress is also dead-lettered with the reason."""
        self.refused += 1
        closest = min(unable.values(), key=len)[0]  # what the closest model lacks first
        kind = "parameter" if closest.what.startswith("parameter") else "capability"
        missing = "; ".join(
            f"{m} lacks {', '.join(g.what for g in gs)}" for m, gs in unable.items()
        )
        hint = (
            "omit it, send it to a tier whose models take it, or list it in the model's "
            "`capabilities.params` if litellm does not know the model takes it"
            if kind == "parameter"
            else "send it to a tier with a model that has it"
        )
        error = self._error(
            routed,
            f"unsupported_{kind}",
            f"no model of tier {self.tier!r} takes {closest.what} ({missing}): {hint}",
            0,
            param=closest.param,
        )
        if not self.topics.is_router_reply_topic(routed.reply_to):
            topic, partition, offset = delivery.rsplit(":", 2)
            letter = dead_letter(
                payload=routed.model_dump_json().encode(),
                topic=topic,
                partition=int(partition),
                offset=int(offset),
                consumer=f"worker-{self.tier}",
                exc=Refused(error.message),
            )
            await self.publisher.publish(self.topics.dead_letter, letter, key=routed.request_id)
            telemetry.dead_lettered("worker", topic)
        return error

    def _error(
        self,
        routed: RoutedRequest,
        code: str,
        message: str,
        attempts: int,
        retryable: bool = False,
        param: str | None = None,
        stream: StreamMark | None = None,
    ) -> ChatError:
        return ChatError(
            request_id=routed.request_id,
            tenant=routed.request.metadata.tenant,
            tier=self.tier,
            rule=routed.rule,
            config_hash=routed.config_hash,
            code=code,
            message=message,
            param=param,
            retryable=retryable,
            attempts=attempts,
            stream=stream,
        )

    async def _event(
        self,
        routed: RoutedRequest,
        attempt: policy.Attempt,
        completion: Completion | None,
        error: ModelCallError | None,
        failed_ms: float = 0.0,
        status: AttemptStatus | None = None,
        setup: _Setup | None = None,
        cascade_step: CascadeStep = "",
        verdict: Verdict | None = None,
    ) -> None:
        """Publish the attempt's row; ``status`` overrides the one its outcome implies.
        ``setup``: the config the attempt was made on (default: the one in force); in a cascade,
        the step and (on the draft's row) the verifier's verdict."""
        usage = completion.usage if completion else None
        setup = setup or self._setup
        able = setup.abilities.get(attempt.spec)
        event = AttemptEvent(
            request_id=routed.request_id,
            tier=self.tier,
            model=attempt.spec.label,
            provider=attempt.spec.provider,
            rule=routed.rule,
            route_score=routed.route_score,
            config_hash=routed.config_hash,
            attempt=attempt.index,
            status=status or ("ok" if error is None else policy.status_of(error)),
            error_code="client_left" if status == "cancelled" else (error.code if error else ""),
            tokens_in=usage.prompt_tokens if usage else 0,
            tokens_out=usage.completion_tokens if usage else 0,
            latency_ms=completion.latency_ms if completion else failed_ms,
            ttft_ms=completion.ttft_ms if completion else None,
            cost_usd=completion.cost_usd if completion else 0.0,
            response_sha256=policy.sha256_text(completion.text) if completion else "",
            tenant_hash=policy.tenant_hash(routed.request.metadata.tenant),
            worker_config_hash=setup.config.hash,
            cascade_step=cascade_step,
            verdict="" if verdict is None else ("accepted" if verdict.accepted else "rejected"),
            verdict_reason="" if verdict is None else verdict.reason[:500],
            retry=attempt.retry,
            input_noise=noise.input_noise(routed.request),
            context_window=(able[0].context_window or 0) if able else 0,
            **_experiment_columns(routed),
        )
        self.metrics.call(
            event.model,
            event.status,
            event.latency_ms / 1000,
            ttft_s=None if event.ttft_ms is None else event.ttft_ms / 1000,
            tokens_in=event.tokens_in,
            tokens_out=event.tokens_out,
            cost_usd=event.cost_usd,
            retry=attempt.retry > 0,
        )
        await self.publisher.publish(self.topics.events, event, key=routed.request_id)


class _InFlight:
    """A ``ModelClient`` whose calls in flight are counted on ``gauge``."""

    def __init__(self, client: ModelClient, gauge: Any) -> None:
        self._client, self._gauge = client, gauge

    async def complete(
        self,
        spec: ModelSpec,
        request: ChatRequest,
        timeout_s: float,
        on_delta: DeltaListener | None = None,
    ) -> Completion:
        self._gauge.inc()
        try:
            return await self._client.complete(spec, request, timeout_s, on_delta)
        finally:
            self._gauge.dec()


@dataclass(frozen=True)
class _Setup:
    """What a worker answers with: the config, its tier, and what each model can do and takes
    (worked out once per config)."""

    config: LoadedConfig
    spec: TierSpec
    abilities: dict[ModelSpec, tuple[capabilities.Capabilities, frozenset[str]]]

    @classmethod
    def of(cls, config: LoadedConfig, tier: str) -> _Setup:
        spec = config.tier(tier)
        candidates = [e.spec.candidate for e in config.experiments.values() if e.spec.tier == tier]
        if spec.cascade is not None:  # the draft, and the judge if there is one
            judge = spec.cascade.verify.judge
            candidates += [spec.cascade.draft, *([judge.model] if judge else [])]
        abilities = {
            model: (capabilities.of(model), supported_parameters(model))
            for model in [*spec.models, *candidates]
        }
        return cls(config, spec, abilities)


def _as_delta(choice: dict[str, Any]) -> dict[str, Any]:
    """A whole answer's choice as one stream delta (an accepted draft, streamed after its
    verdict)."""
    message = choice.get("message") or {}
    delta: dict[str, Any] = {"finish_reason": choice.get("finish_reason") or "stop"}
    if message.get("content"):
        delta["content"] = message["content"]
    if message.get("tool_calls"):
        delta["tool_calls"] = [{**call, "index": i} for i, call in enumerate(message["tool_calls"])]
    if choice.get("logprobs"):
        delta["logprobs"] = (choice["logprobs"] or {}).get("content") or []
    return delta


def _experiment_columns(routed: RoutedRequest) -> dict[str, Any]:
    tag = routed.experiment
    if tag is None:
        return {}
    return {"experiment": tag.name, "variant": tag.variant, "share_pct": tag.share_pct}


async def _stop(*tasks: asyncio.Future[Any]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
