"""Generated input through each Kafka handler: every record ends routed, answered or
dead-lettered; no exception escapes to stall its partition (hypothesis).

The inputs are near-misses of the real contracts (ChatRequest, RoutedRequest, ChatResult and
ChatError) with any field replaced by boundary or out-of-range numbers, unicode, nulls, wrong
types or deep nesting, and arbitrary JSON and bytes besides.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiokafka import ConsumerRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from schemas.topics import Topics
from schemas.v1 import ChatRequest, RoutedRequest
from services.common.kafka import Outgoing
from services.common.routing_config import load_config
from services.router.handlers import IngressHandler, ReplyHandler
from services.router.service import PendingReplies, Router
from services.workers.handlers import RecordHandler

ROOT = Path(__file__).resolve().parents[2]
TOPICS = Topics("prop")
CONFIG = load_config(ROOT / "config" / "simulated.yaml")
# derandomize: the same examples on every run, so CI and a laptop agree on what passes
RUNS = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)

BOUNDARY_INTS = [0, 1, -1, 9, 10, 2**15, 2**16 - 1, 2**16, 2**31, 2**32 - 1, 2**32, 2**53 + 1]
BOUNDARY_INTS += [2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**15, 10**30, 604_800_001]
scalars = (
    st.none()
    | st.booleans()
    | st.sampled_from(BOUNDARY_INTS)
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([1e308, -1e308, 5e-324, 0.5, 1.0])
    | st.text(max_size=20)
    | st.sampled_from(["", "\x00", "\u202e\ud7ff", "🦀" * 50, "a" * 300, "2026-13-40T25:61:61Z"])
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


def _chat(**fields: Any) -> dict[str, Any]:
    return {
        "request_id": "prop-1",
        "model": "switchboard/auto",
        "messages": [{"role": "user", "content": "hello"}],
        "metadata": {"tenant": "t", "deadline_ms": 1000, "priority": 1, "tags": {"a": "b"}},
        **fields,
    }


def _routed(**fields: Any) -> dict[str, Any]:
    return {
        "request": _chat(model="fast"),
        "tier": "fast",
        "rule": "forced",
        "config_hash": "h",
        "routed_at": "2026-12-01T00:00:00Z",
        "reply_to": TOPICS.results,
        **fields,
    }


def _result(**fields: Any) -> dict[str, Any]:
    return {
        "kind": "result",
        "request_id": "prop-1",
        "tier": "fast",
        "model": "m",
        "provider": "p",
        "rule": "r",
        "config_hash": "h",
        "attempts": 1,
        "latency_ms": 1.0,
        "completion": {},
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        **fields,
    }


def _error(**fields: Any) -> dict[str, Any]:
    return {"kind": "error", "request_id": "prop-1", "code": "x", "message": "m", **fields}


def mutated(base: dict[str, Any], nested: tuple[str, ...] = ()) -> st.SearchStrategy[bytes]:
    """``base`` with one to three fields (top level, or inside ``nested`` objects) replaced by
    generated values or removed, as JSON; and arbitrary JSON and bytes."""
    paths = [(k,) for k in base] + [(n, k) for n in nested for k in base.get(n) or {}]
    paths += [("unknown_field",), ("tools",), ("stream",)]

    def apply(changes: list[tuple[tuple[str, ...], Any]]) -> bytes:
        doc = json.loads(json.dumps(base))
        for path, value in changes:
            target = doc
            for part in path[:-1]:
                target = target.setdefault(part, {}) if isinstance(target, dict) else {}
            if isinstance(target, dict):
                if value is _REMOVE:
                    target.pop(path[-1], None)
                else:
                    target[path[-1]] = value
        return json.dumps(doc).encode()

    change = st.tuples(st.sampled_from(paths), json_values | st.just(_REMOVE))
    return (
        st.lists(change, min_size=1, max_size=3).map(apply)
        | json_values.map(lambda v: json.dumps(v).encode())
        | st.binary(max_size=200)
        | st.sampled_from([b"[" * 5000 + b"]" * 5000, b'{"a":' * 3000 + b"1" + b"}" * 3000])
    )


_REMOVE = object()


def record(topic: str, value: bytes) -> ConsumerRecord:
    return ConsumerRecord(topic, 0, 7, 0, 0, b"k", value, None, 0, len(value), ())


class Recorder:
    """Both publisher protocols, keeping what is sent."""

    def __init__(self) -> None:
        self.batch: list[Outgoing] = []
        self.single: list[tuple[str, BaseModel]] = []

    async def publish_all(self, messages: Sequence[Outgoing]) -> None:
        self.batch.extend(messages)

    async def publish(
        self,
        topic: str,
        message: BaseModel,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.single.append((topic, message))


@RUNS
@given(mutated(_chat(), nested=("metadata",)))
async def test_every_ingress_record_is_routed_or_dead_lettered(payload: bytes) -> None:
    out = Recorder()
    handler = IngressHandler(Router(CONFIG, TOPICS, out), out, "prop", max_bytes=1 << 20)
    await handler([record(TOPICS.ingress, payload)])
    routed = [m for m in out.batch if m.topic.startswith(f"{TOPICS.prefix}.tier.")]
    letters = [m for m in out.batch if m.topic == TOPICS.dead_letter]
    assert len(routed) + len(letters) == 1
    if routed:  # what was routed reads back, within its bounds, as the worker reads it
        RoutedRequest.model_validate_json(routed[0].value)


class FakeService:
    tier = "fast"

    def __init__(self) -> None:
        self.processed: list[RoutedRequest] = []

    async def process(self, routed: RoutedRequest, delivery: str) -> str:
        self.processed.append(routed)
        return "ok"


@RUNS
@given(mutated(_routed(), nested=("request",)))
async def test_every_tier_record_is_processed_or_dead_lettered(payload: bytes) -> None:
    out, service = Recorder(), FakeService()
    handler = RecordHandler(service, out, TOPICS, "prop")  # type: ignore[arg-type]
    await handler(record(TOPICS.tier("fast"), payload))
    letters = [m for t, m in out.single if t == TOPICS.dead_letter]
    assert len(service.processed) + len(letters) == 1


@RUNS
@given(mutated(_result(), nested=("usage",)) | mutated(_error()))
async def test_every_reply_is_delivered_or_dead_lettered(payload: bytes) -> None:
    out, replies = Recorder(), PendingReplies()
    future, _ = replies.expect("prop-1")
    handler = ReplyHandler(replies, out, TOPICS.dead_letter, "prop")
    await handler(record(TOPICS.results, payload))
    letters = [m for t, m in out.single if t == TOPICS.dead_letter]
    delivered = replies.answered_at > 0  # read as an outcome (its caller may be gone)
    assert delivered + len(letters) == 1
    assert future.done() <= delivered


@pytest.mark.parametrize("deadline_ms", [10**15, 604_800_001, 0, -1])
def test_deadlines_past_the_bounds_never_reach_routing(deadline_ms: int) -> None:
    with pytest.raises(ValueError, match="deadline_ms"):
        ChatRequest.model_validate(_chat(metadata={"deadline_ms": deadline_ms}))
