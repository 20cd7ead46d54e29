"""``switchboard topics``: create every topic of the deployment, or update it, as the settings say.

The services create the topics they use when they start, with the same settings
(services/common/topic_layout.py); a deployment runs this first, once, so that every topic exists
with its partitions, replicas, retention and size limit before any service touches it, and so
that a change of retention or size reaches topics that exist already. It warns, naming the topic,
when a topic has fewer partitions than configured: Kafka never lowers a partition count, and
raising one is an operator's decision (keys move to other partitions).

``--check`` changes nothing and exits 1 when a topic is missing or differs.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from services.common.control import ensure_control_topic
from services.common.kafka import TopicState, ensure_topics
from services.common.routing_config import load_config
from services.common.settings import CommonSettings
from services.common.topic_layout import TopicLayout
from switchboard.analyst import format_table
from switchboard.progress import print_table

log = logging.getLogger("switchboard.topics")
TIMEOUT_S = 60.0  # how long the broker may take to come up (compose starts this with Kafka)


@dataclass(frozen=True)
class Planned:
    name: str
    partitions: int


def plan(settings: CommonSettings, tiers: list[str]) -> list[Planned]:
    """Every topic a deployment of ``tiers`` uses, with its partitions (reply topics aside:
    each router creates its own)."""
    t = settings.topics
    n = settings.partitions
    shared = [
        *(t.tier(tier) for tier in tiers),
        t.ingress,
        t.results,
        t.events,
        t.dead_letter,
        t.cancel,
        t.feedback,
        t.payloads,
        t.decisions,
        t.shadow,
        t.shadow_comparisons,
    ]
    return [
        *(Planned(name, n) for name in shared),
        Planned(t.control, 1),
        Planned(t.config, 1),
        Planned(t.controller_leader, 1),
    ]


@dataclass(frozen=True)
class Found:
    name: str
    partitions: int
    replicas: int
    configs: dict[str, str]


async def describe(bootstrap: str, names: list[str]) -> dict[str, Found]:
    """The topics of ``names`` that exist, with their partitions, replicas and configs."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    try:
        await admin.start()
        existing = set(await admin.list_topics())
        present = [n for n in names if n in existing]
        if not present:
            return {}
        shapes = {
            d["topic"]: (
                len(d["partitions"]),
                max((len(p["replicas"]) for p in d["partitions"]), default=0),
            )
            for d in await admin.describe_topics(present)
            if d["error_code"] == 0
        }
        configs = await _configs(admin, present)
        return {
            name: Found(name, *shapes[name], configs.get(name, {}))
            for name in present
            if name in shapes
        }
    finally:
        await admin.close()


async def _configs(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, dict[str, str]]:
    """Each topic's configs as the broker reports them (empty where it reports none)."""
    resources = [ConfigResource(ConfigResourceType.TOPIC, n) for n in names]
    out: dict[str, dict[str, str]] = {}
    try:
        responses = await admin.describe_configs(resources)
    except Exception as exc:  # a broker without DescribeConfigs: nothing to compare
        log.warning("the broker did not describe topic configs (%s)", exc)
        return out
    for response in responses:
        for resource in response.to_object()["resources"]:
            entries = resource.get("config_entries") or []
            out[resource["resource_name"]] = {
                e["config_names"]: e["config_value"]
                for e in entries
                if e.get("config_value") is not None
            }
    return out


def differences(layout: TopicLayout, found: Found) -> dict[str, tuple[str | None, str]]:
    """The configs of ``found`` that are not what ``layout`` wants: name → (has, wants)."""
    if not found.configs:
        return {}  # the broker reports no configs (the embedded broker): nothing to compare
    wanted = layout.configs(found.name)
    if layout.compacted(found.name):
        wanted.pop("retention.ms", None)
    return {k: (found.configs.get(k), v) for k, v in wanted.items() if found.configs.get(k) != v}


async def align(bootstrap: str, layout: TopicLayout, found: Found) -> None:
    """Set the configs ``layout`` wants on an existing topic, keeping its other configs.

    AlterConfigs replaces a topic's whole set, so the configs the broker reports are sent back
    with ours in place (defaults included: they stay what they were).
    """
    merged = {**found.configs, **{k: v for k, (_, v) in differences(layout, found).items()}}
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    try:
        await admin.start()
        responses = await admin.alter_configs(
            [ConfigResource(ConfigResourceType.TOPIC, found.name, configs=merged)]
        )
        for response in responses:
            for resource in response.to_object()["resources"]:
                if resource["error_code"]:
                    raise RuntimeError(
                        f"{found.name}: {resource['error_message'] or resource['error_code']}"
                    )
    finally:
        await admin.close()


async def run(settings: CommonSettings, check: bool) -> int:
    config = load_config(settings.config)
    planned = plan(settings, list(config.tier_names))
    layout = settings.topic_layout
    bootstrap = settings.kafka_bootstrap
    problems = 0
    before = await asyncio.wait_for(describe(bootstrap, [p.name for p in planned]), TIMEOUT_S)
    states: dict[str, TopicState] = {}
    if not check:
        t = settings.topics
        for name in (t.control, t.config):
            await ensure_control_topic(bootstrap, name, layout)
        rest = [p for p in planned if p.name not in (t.control, t.config)]
        for partitions in sorted({p.partitions for p in rest}):
            names = [p.name for p in rest if p.partitions == partitions]
            for state in await ensure_topics(bootstrap, names, partitions, TIMEOUT_S, layout):
                states[state.name] = state
    rows = []
    for p in planned:
        found = before.get(p.name)
        if found is None:
            status = "missing" if check else "created"
            problems += check
            rows.append([p.name, f"{p.partitions}", status, layout.holds(p.name)])
            continue
        notes = []
        if found.partitions < p.partitions:
            notes.append(f"only {found.partitions} of {p.partitions} partitions")
            if check:  # (otherwise ensure_topics has logged it)
                print(
                    f"warning: topic {p.name} has {found.partitions} partitions, fewer than the "
                    f"{p.partitions} configured: at most {found.partitions} members of its consumer "
                    f"group work. kafka-topics.sh --alter --topic {p.name} --partitions "
                    f"{p.partitions} raises it (keys move to other partitions).",
                    file=sys.stderr,
                )
            problems += check
        if found.replicas < layout.replication_factor:
            notes.append(f"{found.replicas} replicas, {layout.replication_factor} configured")
            problems += check
        diff = differences(layout, found)
        if diff and check:
            notes.extend(f"{k}={has} (wants {wants})" for k, (has, wants) in diff.items())
            problems += 1
        elif diff:
            try:
                await align(bootstrap, layout, found)
                notes.append("updated " + ", ".join(f"{k}={w}" for k, (_, w) in diff.items()))
            except Exception as exc:
                notes.append(f"could not update configs: {exc}")
                print(f"warning: topic {p.name}: configs not updated: {exc}", file=sys.stderr)
        rows.append([p.name, f"{found.partitions}", "; ".join(notes) or "ok", layout.holds(p.name)])
    print_table(["topic", "partitions", "state", "holds"], rows, format_table)
    print(
        f"replication factor {layout.replication_factor}, min.insync.replicas "
        f"{layout.min_insync_replicas}, retention {layout.retention_ms // 3_600_000} h "
        f"(reply topics {layout.reply_retention_ms // 60_000} min), max.message.bytes "
        f"{layout.max_message_bytes}"
    )
    return 1 if check and problems else 0


def main(check: bool = False) -> int:
    settings = CommonSettings()
    try:
        return asyncio.run(run(settings, check))
    except TimeoutError:
        print(f"topics: Kafka at {settings.kafka_bootstrap} did not answer", file=sys.stderr)
        return 1
