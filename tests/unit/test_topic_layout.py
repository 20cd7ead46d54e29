"""Topic settings, size limits and credentials: decided in one place, refused when they cannot work."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiokafka.errors import MessageSizeTooLargeError
from pydantic import BaseModel, ValidationError

from schemas.topics import Topics
from services.common.kafka import (
    RECORD_OVERHEAD_BYTES,
    BrokerPublisher,
    KafkaBatchPublisher,
    Outgoing,
    RecordTooLarge,
)
from services.common.retry import is_transient
from services.common.settings import CommonSettings
from services.common.topic_layout import HOUR_MS, TopicLayout
from services.metrics.config import MetricsSettings
from services.router.config import ENVELOPE_BYTES, RouterSettings, host_instance_id
from services.router.replies import instance_of
from services.workers.config import WorkerSettings
from switchboard.topics_cmd import plan

MIB = 1024 * 1024


def test_each_kind_of_topic_gets_its_retention_and_every_topic_the_size_limit() -> None:
    settings = CommonSettings(
        topic_prefix="lay",
        replication_factor=3,
        min_insync_replicas=2,
        retention_hours=24,
        reply_retention_minutes=15,
        max_message_bytes=12 * MIB,
    )
    layout = settings.topic_layout
    t = settings.topics
    assert layout.replication_factor == 3
    tier = layout.configs(t.tier("fast"))
    assert tier == {
        "retention.ms": str(24 * HOUR_MS),
        "max.message.bytes": str(12 * MIB),
        "min.insync.replicas": "2",
    }
    assert layout.configs(t.replies("router-a"))["retention.ms"] == str(15 * 60_000)
    assert layout.configs(t.replies("router-a.s1"))["retention.ms"] == str(15 * 60_000)
    control = layout.configs(t.control)
    assert control["cleanup.policy"] == "compact" and "retention.ms" not in control
    assert layout.configs(t.config)["cleanup.policy"] == "compact"
    assert "prompts" in layout.holds(t.tier("fast")) and "prompts" in layout.holds(t.ingress)


def test_the_plan_manages_every_topic_the_services_use() -> None:
    """A topic added to schemas/topics.py and used by a service must be in `switchboard topics`:
    otherwise production creates it with the defaults of whichever service touches it first."""
    settings = CommonSettings(topic_prefix="plan", partitions=6)
    topics = settings.topics
    named: set[str] = set()
    for name in dir(Topics):  # the topic names are Topics' properties
        value = getattr(type(topics), name, None)
        if isinstance(value, property):
            got = getattr(topics, name)
            if isinstance(got, str) and got.endswith(".v1"):
                named.add(got)
    planned = {p.name: p.partitions for p in plan(settings, ["fast", "slow"])}
    assert named <= set(planned), named - set(planned)
    assert planned[topics.tier("fast")] == 6 and planned[topics.tier("slow")] == 6
    assert planned[topics.control] == planned[topics.config] == 1


def test_a_record_over_the_limit_is_refused_before_it_is_sent() -> None:
    class Body(BaseModel):
        text: str

    class NoBroker:
        async def publish(self, *args: Any, **kwargs: Any) -> None:
            raise AssertionError("an oversized record reached the broker")

    publisher = BrokerPublisher(NoBroker(), max_message_bytes=MIB)  # type: ignore[arg-type]
    with pytest.raises(RecordTooLarge) as refused:
        asyncio.run(publisher.publish("plan.tier.fast.v1", Body(text="x" * MIB)))
    assert refused.value.limit == MIB and "plan.tier.fast.v1" in str(refused.value)
    assert "SWITCHBOARD_MAX_MESSAGE_BYTES" in str(refused.value)
    # permanent: a consumer dead-letters the record rather than retry it
    assert not is_transient(refused.value)
    assert not is_transient(MessageSizeTooLargeError())


async def test_a_batch_with_one_oversized_record_is_refused_whole_before_sending() -> None:
    publisher = KafkaBatchPublisher("127.0.0.1:1", "never-started", max_message_bytes=MIB)
    fits = Outgoing("t", b"x" * (MIB - RECORD_OVERHEAD_BYTES - 10), b"key")
    over = Outgoing("t", b"x" * MIB)
    with pytest.raises(RecordTooLarge):
        await publisher.publish_all([fits, over])
    with pytest.raises(AssertionError, match="start"):  # it fits: on to the (unstarted) producer
        await publisher.publish_all([fits])


def test_the_router_body_limit_must_fit_in_a_record() -> None:
    RouterSettings(max_body_bytes=8 * MIB, max_message_bytes=10 * MIB)
    RouterSettings(max_body_bytes=MIB - ENVELOPE_BYTES, max_message_bytes=MIB)
    with pytest.raises(ValidationError, match="SWITCHBOARD_MAX_BODY_BYTES"):
        RouterSettings(max_body_bytes=8 * MIB, max_message_bytes=8 * MIB)


def test_replicas_a_write_waits_for_cannot_exceed_the_replicas() -> None:
    CommonSettings(replication_factor=3, min_insync_replicas=2)
    with pytest.raises(ValidationError, match="MIN_INSYNC_REPLICAS"):
        CommonSettings(replication_factor=1, min_insync_replicas=2)


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: CommonSettings(redis_url="redis://:s3cret-pw@redis:6379/0"), "REDIS_URL"),
        (
            lambda: WorkerSettings(outcome_redis_url="redis://default:s3cret-pw@r:6379/0"),
            "OUTCOME_REDIS_URL",
        ),
        (
            lambda: MetricsSettings(clickhouse_url="http://sb:s3cret-pw@clickhouse:8123"),
            "CLICKHOUSE_URL",
        ),
    ],
)
def test_a_password_inside_a_url_is_refused_without_repeating_it(make: Any, field: str) -> None:
    with pytest.raises(ValidationError) as refused:
        make()
    text = str(refused.value)
    assert f"SWITCHBOARD_{field}" in text and "s3cret-pw" not in text


def test_credentials_come_from_secret_files(tmp_path: Path) -> None:
    (tmp_path / "switchboard_clickhouse_password").write_text("from-a-file\n")
    (tmp_path / "switchboard_redis_password").write_text("redis-file")
    settings = MetricsSettings(
        _secrets_dir=tmp_path,  # type: ignore[call-arg]
        clickhouse_url="http://clickhouse:8123",
        clickhouse_user="switchboard",
    )
    assert settings.store_credentials == {"username": "switchboard", "password": "from-a-file"}
    assert settings.redis_password is not None
    assert settings.redis_password.get_secret_value() == "redis-file"
    assert "from-a-file" not in repr(settings)


def test_the_sql_endpoint_leaves_loopback_only_with_a_token() -> None:
    MetricsSettings(metrics_host="127.0.0.1")
    MetricsSettings(metrics_host="::1")
    MetricsSettings(metrics_host="0.0.0.0", metrics_port=0)  # off
    MetricsSettings(metrics_host="0.0.0.0", metrics_token="t" * 32)
    for host in ("0.0.0.0", "metrics", "10.0.0.5"):
        with pytest.raises(ValidationError, match="SWITCHBOARD_METRICS_TOKEN"):
            MetricsSettings(metrics_host=host)


def test_a_router_keeps_its_instance_id_across_restarts_on_one_host() -> None:
    assert host_instance_id(8080) == host_instance_id(8080)
    assert host_instance_id(8080) != host_instance_id(8081)
    assert host_instance_id(0) != host_instance_id(0)  # any free port: nothing to keep
    assert RouterSettings(port=8080).instance_id == host_instance_id(8080)
    assert RouterSettings(port=8080, instance_id="pod-7").instance_id == "pod-7"


def test_a_reply_topic_names_its_router() -> None:
    topics = Topics("sw")
    assert instance_of(topics, topics.replies("web-1-8080")) == "web-1-8080"
    assert instance_of(topics, topics.replies("web-1-8080") + ".s2") == "web-1-8080"
    assert instance_of(topics, topics.replies("a.sx")) == "a.sx"


def test_the_default_layout_matches_the_default_settings() -> None:
    assert TopicLayout() == CommonSettings().topic_layout
