"""The shadow worker: each mirrored request is sent to its experiment's candidate, off every
client's path, and the answer compared with the one the tier gave.

A mirrored request is dropped, with a comparison row that says so (``outcome = dropped``), when
its experiment's ``max_in_flight`` candidate calls are all busy or when it waited longer than
``max_lag_s``: a slow or failing candidate costs comparisons, never the tier's answers, and a
backlog never grows without bound. The candidate's call is recorded like any model attempt
(variant ``shadow``), so its latency, tokens and cost are in llm_events too.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from datetime import UTC, datetime

from schemas.control import ShadowComparison, ShadowRequest
from schemas.topics import Topics
from schemas.v1 import AttemptEvent
from services.common.kafka import Publisher
from services.common.routing_config import Experiment, LoadedConfig
from services.shadow.domain import (
    JudgeUnreadable,
    judge_request,
    judge_score,
    lag_s,
    text_similarity,
)
from services.workers.adapters.llm import Completion, ModelClient
from services.workers.domain import policy
from services.workers.errors import ModelCallError

log = logging.getLogger("switchboard.shadow")


class ShadowService:
    def __init__(
        self, config: LoadedConfig, topics: Topics, publisher: Publisher, client: ModelClient
    ) -> None:
        self.config = config
        self.topics = topics
        self.publisher = publisher
        self.client = client
        self.in_flight: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()  # compared | candidate_failed | dropped

    async def handle(self, mirror: ShadowRequest) -> ShadowComparison:
        routed, baseline = mirror.routed, mirror.baseline
        tag = routed.experiment
        name = tag.name if tag is not None else ""
        experiment = self.config.experiments.get(name)
        base = {
            "experiment": name or "(none)",
            "tier": routed.tier,
            "request_id": routed.request_id,
            "share_pct": tag.share_pct if tag is not None else 0.0,
            "baseline_model": baseline.model,
            "candidate_model": experiment.candidate if experiment is not None else "",
            "baseline_latency_ms": baseline.latency_ms,
            "baseline_tokens_out": baseline.tokens_out,
            "baseline_cost_usd": baseline.cost_usd,
        }
        if experiment is None or experiment.spec.mode != "shadow":
            return await self._dropped(base, f"this config runs no shadow experiment {name!r}")
        waited = lag_s(baseline, datetime.now(UTC))
        if waited > experiment.spec.max_lag_s:
            reason = f"waited {waited:.1f} s for a shadow worker (max_lag_s {experiment.spec.max_lag_s:g})"
            return await self._dropped(base, reason)
        if self.in_flight[name] >= experiment.spec.max_in_flight:
            reason = f"all {experiment.spec.max_in_flight} candidate calls busy (max_in_flight)"
            return await self._dropped(base, reason)
        self.in_flight[name] += 1
        try:
            return await self._compare(mirror, experiment, base)
        finally:
            self.in_flight[name] -= 1

    async def _compare(
        self, mirror: ShadowRequest, experiment: Experiment, base: dict[str, object]
    ) -> ShadowComparison:
        routed, baseline = mirror.routed, mirror.baseline
        spec = experiment.spec.candidate
        tier = self.config.tier(experiment.spec.tier)
        request = routed.request.model_copy(update={"stream": False, "stream_options": None})
        started = time.perf_counter()
        try:
            completion = await self.client.complete(spec, request, spec.timeout_s or tier.timeout_s)
        except ModelCallError as exc:
            failed_ms = (time.perf_counter() - started) * 1000
            await self._event(mirror, experiment, None, exc, failed_ms)
            return await self._publish(
                ShadowComparison(
                    **base, outcome="candidate_failed", reason=f"{exc.code}: {exc}"[:1000],
                    candidate_latency_ms=failed_ms,
                )  # type: ignore[arg-type]
            )  # fmt: skip
        await self._event(mirror, experiment, completion, None)
        similarity, by = await self._similarity(
            experiment, routed.request, baseline.text, completion
        )
        return await self._publish(
            ShadowComparison(
                **base,  # type: ignore[arg-type]
                outcome="compared",
                candidate_latency_ms=completion.latency_ms,
                candidate_tokens_out=completion.usage.completion_tokens,
                candidate_cost_usd=completion.cost_usd,
                same_response=policy.sha256_text(completion.text) == baseline.response_sha256,
                similarity=similarity,
                similarity_by=by,
            )
        )

    async def _similarity(
        self, experiment: Experiment, request: object, baseline: str, completion: Completion
    ) -> tuple[float, str]:
        judge = experiment.spec.judge
        if judge is None:
            return text_similarity(baseline, completion.text), "text"
        tier = self.config.tier(experiment.spec.tier)
        asked = judge_request(request, baseline, completion.text)  # type: ignore[arg-type]
        try:
            answer = await self.client.complete(judge, asked, judge.timeout_s or tier.timeout_s)
            return judge_score(answer.text), judge.label
        except (ModelCallError, JudgeUnreadable) as exc:
            log.warning("%s: the judge %s failed (%s); text similarity instead", experiment.name,
                        judge.label, exc)  # fmt: skip
            return text_similarity(baseline, completion.text), f"text (judge failed: {exc})"[:200]

    async def _dropped(self, base: dict[str, object], reason: str) -> ShadowComparison:
        return await self._publish(ShadowComparison(**base, outcome="dropped", reason=reason))  # type: ignore[arg-type]

    async def _publish(self, comparison: ShadowComparison) -> ShadowComparison:
        await self.publisher.publish(
            self.topics.shadow_comparisons, comparison, key=comparison.request_id
        )
        self.outcomes[comparison.outcome] += 1
        return comparison

    async def _event(
        self,
        mirror: ShadowRequest,
        experiment: Experiment,
        completion: Completion | None,
        error: ModelCallError | None,
        failed_ms: float = 0.0,
    ) -> None:
        routed, spec = mirror.routed, experiment.spec.candidate
        usage = completion.usage if completion else None
        event = AttemptEvent(
            request_id=routed.request_id,
            tier=routed.tier,
            model=spec.label,
            provider=spec.provider,
            rule=routed.rule,
            config_hash=routed.config_hash,
            attempt=0,
            status="ok" if error is None else policy.status_of(error),
            error_code=error.code if error else "",
            tokens_in=usage.prompt_tokens if usage else 0,
            tokens_out=usage.completion_tokens if usage else 0,
            latency_ms=completion.latency_ms if completion else failed_ms,
            ttft_ms=completion.ttft_ms if completion else None,
            cost_usd=completion.cost_usd if completion else 0.0,
            response_sha256=policy.sha256_text(completion.text) if completion else "",
            tenant_hash=policy.tenant_hash(routed.request.metadata.tenant),
            experiment=experiment.name,
            variant="shadow",
            share_pct=routed.experiment.share_pct if routed.experiment else 0.0,
        )
        await self.publisher.publish(self.topics.events, event, key=routed.request_id)
