"""The shadow worker: each mirrored request is sent to its experiment's candidate, off every
client's path, and the answer compared with the one the tier gave.

A mirrored request is dropped, with a comparison row that says so (``outcome = dropped``), when
its experiment's ``max_in_flight`` candidate calls are all busy or when it waited longer than
``max_lag_s``: a slow or failing candidate costs comparisons, never the tier's answers, and a
backlog never grows without bound. The candidate's call is recorded like any model attempt
(variant ``shadow``), so its latency, tokens and cost are in llm_events too.

A replay (``switchboard replay``) comes the same way, with a ``Replay`` that names its run and
what it is replayed against: a model, a tier (its first model) or a config file (the model that
config would route the request to). Its comparisons are the experiment ``replay-<run>``. A
replay is never dropped for lag or a busy candidate: the replay's ``--rate`` paces it, and this
worker's concurrency bounds it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime

from schemas.control import Replay, ShadowComparison, ShadowRequest
from schemas.topics import Topics
from schemas.v1 import AUTO_MODEL, AttemptEvent, RoutedRequest
from services.common.kafka import Publisher
from services.common.routing_config import (
    ConfigError,
    LoadedConfig,
    ModelSpec,
    load_config_text,
)
from services.router.domain.classify import UnknownModel, classify
from services.shadow.domain import (
    JudgeUnreadable,
    judge_request,
    judge_score,
    lag_s,
    slices_of,
    text_similarity,
)
from services.workers.adapters.llm import Completion, ModelClient
from services.workers.domain import policy
from services.workers.errors import ModelCallError

log = logging.getLogger("switchboard.shadow")
REPLAY_TIMEOUT_S = 60.0  # a replayed call whose tier this config does not have, nor a timeout
KEPT_CONFIGS = 4  # replays' config files, parsed once each


@dataclass(frozen=True)
class Target:
    """Who a mirrored request goes to, and how its comparison is labelled."""

    experiment: str
    candidate: ModelSpec
    timeout_s: float
    judge: ModelSpec | None = None


class Unresolved(ValueError):
    """A replay's ``against`` is not in the config this worker serves."""


class ShadowService:
    def __init__(
        self, config: LoadedConfig, topics: Topics, publisher: Publisher, client: ModelClient
    ) -> None:
        self.config = config
        self.topics = topics
        self.publisher = publisher
        self.client = client
        self.in_flight: Counter[str] = Counter()
        self._configs: dict[str, LoadedConfig] = {}  # replays' config files, by their text's hash
        self.outcomes: Counter[str] = Counter()  # compared | candidate_failed | dropped

    async def handle(self, mirror: ShadowRequest) -> ShadowComparison:
        routed, baseline = mirror.routed, mirror.baseline
        tag = routed.experiment
        base = {
            "experiment": tag.name if tag is not None else "(none)",
            "tier": routed.tier,
            "request_id": routed.request_id,
            "share_pct": tag.share_pct if tag is not None else 0.0,
            "baseline_model": baseline.model,
            "candidate_model": "",
            "baseline_latency_ms": baseline.latency_ms,
            "baseline_tokens_in": baseline.tokens_in,
            "baseline_tokens_out": baseline.tokens_out,
            "baseline_cost_usd": baseline.cost_usd,
            "baseline_status": baseline.status,
            "slices": slices_of(routed.request, baseline.tokens_out),
        }
        if mirror.replay is not None:
            base.update(experiment=mirror.replay.experiment, share_pct=0.0)
            try:
                target = self._replay_target(routed, mirror.replay)
            except Unresolved as exc:
                return await self._dropped(base, str(exc))
            base["candidate_model"] = target.candidate.label
            return await self._compare(mirror, target, base)
        name = tag.name if tag is not None else ""
        experiment = self.config.experiments.get(name)
        if experiment is not None:
            base["candidate_model"] = experiment.candidate
        if experiment is None or experiment.spec.mode != "shadow":
            return await self._dropped(base, f"this config runs no shadow experiment {name!r}")
        waited = lag_s(baseline, datetime.now(UTC))
        if waited > experiment.spec.max_lag_s:
            reason = f"waited {waited:.1f} s for a shadow worker (max_lag_s {experiment.spec.max_lag_s:g})"
            return await self._dropped(base, reason)
        if self.in_flight[name] >= experiment.spec.max_in_flight:
            reason = f"all {experiment.spec.max_in_flight} candidate calls busy (max_in_flight)"
            return await self._dropped(base, reason)
        spec = experiment.spec.candidate
        tier = self.config.tier(experiment.spec.tier)
        target = Target(name, spec, spec.timeout_s or tier.timeout_s, experiment.spec.judge)
        self.in_flight[name] += 1
        try:
            return await self._compare(mirror, target, base)
        finally:
            self.in_flight[name] -= 1

    def _replay_target(self, routed: RoutedRequest, replay: Replay) -> Target:
        config = self.config
        if replay.kind == "config":
            config = self._replay_config(replay)
            try:
                decision = classify(routed.request, config)
            except UnknownModel:  # named a tier or model that config lacks: go by its rules
                auto = routed.request.model_copy(update={"model": AUTO_MODEL})
                decision = classify(auto, config)
            tier_name, pinned = decision.tier, decision.pinned
            tier = config.tier(tier_name)
            spec = config.model_named(pinned) if pinned else None
            spec = spec or tier.models[0]
            return Target(replay.experiment, spec, spec.timeout_s or tier.timeout_s)
        if replay.kind == "tier":
            if replay.against not in config.spec.tiers:
                raise Unresolved(
                    f"no tier {replay.against!r} in the config this shadow worker serves "
                    f"(it has: {', '.join(config.tier_names)})"
                )
            tier = config.tier(replay.against)
            spec = tier.models[0]
            return Target(replay.experiment, spec, spec.timeout_s or tier.timeout_s)
        spec = config.model_named(replay.against)
        if spec is None:
            raise Unresolved(
                f"no model {replay.against!r} in the config this shadow worker serves "
                f"(it has: {', '.join(config.model_names)})"
            )
        timeout = spec.timeout_s
        if timeout is None and routed.tier in config.spec.tiers:
            timeout = config.tier(routed.tier).timeout_s
        return Target(replay.experiment, spec, timeout or REPLAY_TIMEOUT_S)

    def _replay_config(self, replay: Replay) -> LoadedConfig:
        text = replay.config_text or ""
        key = hashlib.sha256(text.encode()).hexdigest()
        config = self._configs.get(key)
        if config is None:
            try:
                config = load_config_text(text, replay.against)
            except ConfigError as exc:
                raise Unresolved(f"the replay's config {replay.against}: {exc}") from exc
            if len(self._configs) >= KEPT_CONFIGS:
                self._configs.pop(next(iter(self._configs)))
            self._configs[key] = config
        return config

    async def _compare(
        self, mirror: ShadowRequest, target: Target, base: dict[str, object]
    ) -> ShadowComparison:
        routed, baseline = mirror.routed, mirror.baseline
        spec = target.candidate
        request = routed.request.model_copy(update={"stream": False, "stream_options": None})
        started = time.perf_counter()
        try:
            completion = await self.client.complete(spec, request, target.timeout_s)
        except ModelCallError as exc:
            failed_ms = (time.perf_counter() - started) * 1000
            await self._event(mirror, target, None, exc, failed_ms)
            return await self._publish(
                ShadowComparison(
                    **base, outcome="candidate_failed", reason=f"{exc.code}: {exc}"[:1000],
                    candidate_latency_ms=failed_ms,
                )  # type: ignore[arg-type]
            )  # fmt: skip
        await self._event(mirror, target, completion, None)
        similarity: float | None = None
        by = ""
        if mirror.replay is None or baseline.text:  # a replay's answer may not have been kept
            similarity, by = await self._similarity(
                target, routed.request, baseline.text, completion
            )
        return await self._publish(
            ShadowComparison(
                **base,  # type: ignore[arg-type]
                outcome="compared",
                candidate_latency_ms=completion.latency_ms,
                candidate_tokens_in=completion.usage.prompt_tokens,
                candidate_tokens_out=completion.usage.completion_tokens,
                candidate_cost_usd=completion.cost_usd,
                same_response=(
                    policy.sha256_text(completion.text) == baseline.response_sha256
                    if baseline.response_sha256
                    else None
                ),
                similarity=similarity,
                similarity_by=by,
            )
        )

    async def _similarity(
        self, target: Target, request: object, baseline: str, completion: Completion
    ) -> tuple[float, str]:
        judge = target.judge
        if judge is None:
            return text_similarity(baseline, completion.text), "text"
        asked = judge_request(request, baseline, completion.text)  # type: ignore[arg-type]
        try:
            answer = await self.client.complete(judge, asked, judge.timeout_s or target.timeout_s)
            return judge_score(answer.text), judge.label
        except (ModelCallError, JudgeUnreadable) as exc:
            log.warning("%s: the judge %s failed (%s); text similarity instead", target.experiment,
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
        target: Target,
        completion: Completion | None,
        error: ModelCallError | None,
        failed_ms: float = 0.0,
    ) -> None:
        routed, spec = mirror.routed, target.candidate
        usage = completion.usage if completion else None
        tenant = policy.tenant_hash(routed.request.metadata.tenant)
        if mirror.replay is not None:  # a captured input keeps its tenant as the hash only
            tenant = mirror.replay.tenant_hash or tenant
        event = AttemptEvent(
            request_id=routed.request_id,
            tier=routed.tier,
            model=spec.label,
            provider=spec.provider,
            rule=routed.rule,
            route_score=routed.route_score,
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
            tenant_hash=tenant,
            experiment=target.experiment,
            variant="shadow",
            share_pct=routed.experiment.share_pct
            if routed.experiment and not mirror.replay
            else 0.0,
        )
        await self.publisher.publish(self.topics.events, event, key=routed.request_id)
