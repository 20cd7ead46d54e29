"""Topic names, consumer groups and ClickHouse table names: defined here and nowhere else.

Every name derives from a prefix (``SWITCHBOARD_TOPIC_PREFIX``, default ``switchboard``) so tests
and side-by-side deployments get their own namespace on one broker.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_PREFIX = "switchboard"
EVENTS_TABLE = "llm_events"
DECISIONS_TABLE = "decisions"
SHADOW_TABLE = "llm_shadow"
FEEDBACK_TABLE = "llm_feedback"
PAYLOADS_TABLE = "llm_payloads"
# llm_events by minute, tier, model, variant and config (a materialized view feeds it)
EVENTS_1M_TABLE = "llm_events_1m"
# the ClickHouse schema migrations applied (services/metrics/adapters/migrations.py)
MIGRATIONS_TABLE = "schema_migrations"
# what a query of llm_payloads carries to the metrics query endpoint (`switchboard sql --payloads`)
PAYLOADS_HEADER = "x-switchboard-payloads"
DEFAULT_DATABASE = "switchboard"

_TIER_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")


def valid_tier_name(name: str) -> bool:
    return bool(_TIER_NAME.match(name))


@dataclass(frozen=True)
class Topics:
    """All topic and group names for one prefix."""

    prefix: str = DEFAULT_PREFIX

    @property
    def ingress(self) -> str:
        """Requests from producers that do not speak HTTP (ChatRequest)."""
        return f"{self.prefix}.ingress.v1"

    @property
    def results(self) -> str:
        """Answers to ingress requests (ChatResult | ChatError)."""
        return f"{self.prefix}.results.v1"

    @property
    def events(self) -> str:
        """One AttemptEvent per model call."""
        return f"{self.prefix}.events.v1"

    @property
    def dead_letter(self) -> str:
        """Messages a consumer could not process (DeadLetter)."""
        return f"{self.prefix}.dlq.v1"

    @property
    def cancel(self) -> str:
        """Streamed requests whose client left (CancelRequest); every worker reads it."""
        return f"{self.prefix}.cancel.v1"

    @property
    def control(self) -> str:
        """The newest ExperimentState of each experiment (keyed by name; compacted on Kafka)."""
        return f"{self.prefix}.control.v1"

    @property
    def decisions(self) -> str:
        """Every ControlDecision of the controller and of operators."""
        return f"{self.prefix}.decisions.v1"

    @property
    def shadow(self) -> str:
        """Answered requests to mirror to a shadow candidate (ShadowRequest)."""
        return f"{self.prefix}.shadow.v1"

    @property
    def shadow_comparisons(self) -> str:
        """Each mirrored request's comparison (ShadowComparison)."""
        return f"{self.prefix}.shadow-comparisons.v1"

    @property
    def shadow_group(self) -> str:
        """The shadow workers: their own group, so a slow candidate never holds a tier's."""
        return f"{self.prefix}-shadow"

    @property
    def config(self) -> str:
        """The routing config applied to the fleet (ConfigUpdate; one partition, compacted)."""
        return f"{self.prefix}.config.v1"

    @property
    def payloads(self) -> str:
        """Captured requests and answers, redacted (CapturedPayload)."""
        return f"{self.prefix}.payloads.v1"

    @property
    def feedback(self) -> str:
        """Scores and labels of answered requests (Feedback), from the router or any producer."""
        return f"{self.prefix}.feedback.v1"

    def tier(self, name: str) -> str:
        """Routed requests for one tier (RoutedRequest)."""
        return f"{self.prefix}.tier.{name}.v1"

    @property
    def reply_prefix(self) -> str:
        return f"{self.prefix}.replies."

    def replies(self, instance: str) -> str:
        """Answers for the HTTP callers of one router instance."""
        return f"{self.reply_prefix}{instance}"

    def is_reply_topic(self, topic: str) -> bool:
        return topic == self.results or self.is_router_reply_topic(topic)

    def is_router_reply_topic(self, topic: str) -> bool:
        """One HTTP router's own reply topic (it lives as long as that router)."""
        return topic.startswith(self.reply_prefix) and len(topic) > len(self.reply_prefix)

    @property
    def router_group(self) -> str:
        return f"{self.prefix}-router"

    def worker_group(self, tier: str) -> str:
        return f"{self.prefix}-worker-{tier}"

    @property
    def metrics_group(self) -> str:
        return f"{self.prefix}-metrics"

    @property
    def records_group(self) -> str:
        """The metrics service's writer of the low-volume topics (decisions, comparisons, ...)."""
        return f"{self.prefix}-metrics-records"

    @property
    def controller_leader(self) -> str:
        """One partition, never written: the controller-group member holding it is active."""
        return f"{self.prefix}.controller-leader.v1"

    @property
    def controller_group(self) -> str:
        return f"{self.prefix}-controller"
