"""Every topic's settings, decided in one place: partitions, replicas, retention, sizes.

The services create the topics they use on start, and ``switchboard topics`` creates or updates
all of them at once (a deployment runs it before the services). Both ask ``TopicLayout`` what a
topic should be, so a topic is the same whoever creates it first:

* the tier, ingress, results, dead-letter, events, cancel, feedback, payload, shadow and decision
  topics keep records ``retention_hours`` (``SWITCHBOARD_RETENTION_HOURS``, 7 days by default).
  **They hold raw prompts and answers** for that long; set it to what your data policy allows;
* a router's reply topic keeps answers ``reply_retention_minutes`` (an hour): they are read
  within seconds of arriving;
* the control and config topics are compacted (the newest record per key is kept for ever) and
  have one partition;
* every topic takes records up to ``max_message_bytes`` and, with producers' acks=all, a write is
  acknowledged once ``min_insync_replicas`` replicas have it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from schemas.topics import DEFAULT_PREFIX, Topics

MIB = 1024 * 1024
DEFAULT_MAX_MESSAGE_BYTES = 10 * MIB
HOUR_MS = 3_600_000


class _LayoutSettings(Protocol):
    @property
    def topic_prefix(self) -> str: ...
    @property
    def replication_factor(self) -> int: ...
    @property
    def min_insync_replicas(self) -> int: ...
    @property
    def retention_hours(self) -> int: ...
    @property
    def reply_retention_minutes(self) -> int: ...
    @property
    def max_message_bytes(self) -> int: ...


@dataclass(frozen=True)
class TopicLayout:
    """What a topic of this deployment should look like, by its name."""

    topics: Topics = field(default_factory=lambda: Topics(DEFAULT_PREFIX))
    replication_factor: int = 1
    min_insync_replicas: int = 1
    retention_ms: int = 168 * HOUR_MS
    reply_retention_ms: int = HOUR_MS
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES

    @classmethod
    def of(cls, settings: _LayoutSettings) -> TopicLayout:
        return cls(
            topics=Topics(settings.topic_prefix),
            replication_factor=settings.replication_factor,
            min_insync_replicas=settings.min_insync_replicas,
            retention_ms=settings.retention_hours * HOUR_MS,
            reply_retention_ms=settings.reply_retention_minutes * 60_000,
            max_message_bytes=settings.max_message_bytes,
        )

    def compacted(self, name: str) -> bool:
        """Topics that keep the newest record of each key: the experiments' states, the config."""
        return name in (self.topics.control, self.topics.config)

    def configs(self, name: str) -> dict[str, str]:
        """The topic-level configs of ``name`` (the broker's defaults apply to the rest)."""
        out = {
            "max.message.bytes": str(self.max_message_bytes),
            "min.insync.replicas": str(self.min_insync_replicas),
        }
        if self.compacted(name):
            out["cleanup.policy"] = "compact"
        elif self.topics.is_router_reply_topic(name):
            out["retention.ms"] = str(self.reply_retention_ms)
        else:
            out["retention.ms"] = str(self.retention_ms)
        return out

    def holds(self, name: str) -> str:
        """What ``name`` holds, for people (``switchboard topics``)."""
        t = self.topics
        if self.topics.is_router_reply_topic(name):
            return "answers for one router's HTTP callers"
        known = {
            t.ingress: "requests from Kafka producers: raw prompts",
            t.results: "answers to ingress requests: raw answers",
            t.events: "one event per model attempt: no prompt text",
            t.dead_letter: "messages no consumer could take, with the reason: may hold prompts",
            t.cancel: "streamed requests whose caller left",
            t.control: "each experiment's newest state",
            t.config: "the routing config applied to the fleet",
            t.decisions: "the canary controller's and operators' decisions",
            t.shadow: "answered requests mirrored to a shadow candidate: prompts and answers",
            t.shadow_comparisons: "shadow comparisons: scores, no prompt text",
            t.payloads: "captured prompts and answers, redacted (opt in)",
            t.feedback: "scores and labels of answered requests",
            t.controller_leader: "nothing: its one partition elects the active controller",
        }
        if name in known:
            return known[name]
        if name.startswith(f"{t.prefix}.tier."):
            return "routed requests of one tier: raw prompts"
        return "not a Switchboard topic"
