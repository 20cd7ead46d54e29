"""The router's ingress handler on a batch: routed, dead-lettered and published in one call."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from aiokafka import ConsumerRecord

from schemas.topics import Topics
from schemas.v1 import ChatRequest, RoutedRequest
from services.common.kafka import Outgoing
from services.common.routing_config import load_config
from services.router.handlers import IngressHandler
from services.router.service import Router

ROOT = Path(__file__).resolve().parents[2]
TOPICS = Topics("ingress-test")


class RecordingPublisher:
    """A ``BatchPublisher`` that keeps each call, or fails the next ``fail`` calls."""

    def __init__(self, fail: int = 0) -> None:
        self.calls: list[list[Outgoing]] = []
        self.fail = fail

    async def publish_all(self, messages: Sequence[Outgoing]) -> None:
        if self.fail:
            self.fail -= 1
            raise ConnectionError("broker unreachable")
        self.calls.append(list(messages))


def record(offset: int, value: bytes | None) -> ConsumerRecord:
    return ConsumerRecord(
        TOPICS.ingress, 1, offset, 0, 0, None, value, None, 0, len(value or b""), ()
    )


def request(request_id: str | None, **fields: object) -> bytes:
    body: dict[str, object] = {"messages": [{"role": "user", "content": "hi"}], **fields}
    if request_id is not None:
        body["request_id"] = request_id
    return json.dumps(body).encode()


@pytest.fixture
def router() -> Router:
    config = load_config(ROOT / "config" / "simulated.yaml")
    return Router(config, TOPICS, publisher=None)  # type: ignore[arg-type]


async def test_a_poison_message_amid_a_batch_is_dead_lettered_and_the_rest_routed(
    router: Router,
) -> None:
    publisher = RecordingPublisher()
    handler = IngressHandler(router, publisher, "router-test")
    batch = [
        record(10, request("in-1", metadata={"requires_reasoning": True})),
        record(11, b"\xff\xfe not json"),
        record(12, request("in-2", model="nope")),
        record(13, None),
        record(14, request("in-3", model="fast")),
        record(15, request(None)),  # no id: the router gives it one
    ]
    await handler(batch)

    assert len(publisher.calls) == 1  # one publish for the whole batch, then the commit
    out = publisher.calls[0]
    routed = [(m, RoutedRequest.model_validate_json(m.value)) for m in out if ".tier." in m.topic]
    assert [r.request_id for _, r in routed][:2] == ["in-1", "in-3"]
    assert len(routed) == 3 and routed[2][1].request_id.startswith("sbr-")
    for message, r in routed:
        assert message.topic == TOPICS.tier(r.tier) and message.key == r.request_id.encode()
        assert r.reply_to == TOPICS.results and r.config_hash == router.config.hash
    assert [r.tier for _, r in routed] == ["reasoning", "fast", "fast"]
    letters = [json.loads(m.value) for m in out if m.topic == TOPICS.dead_letter]
    assert [(d["offset"], d["source_topic"]) for d in letters] == [
        (11, TOPICS.ingress),
        (12, TOPICS.ingress),
        (13, TOPICS.ingress),
    ]
    assert "unknown model 'nope'" in letters[1]["reason"]
    errors = [json.loads(m.value) for m in out if m.topic == TOPICS.results]
    assert [(e["request_id"], e["code"]) for e in errors] == [("in-2", "invalid_request")]
    assert (handler.routed, handler.dead_letters) == (3, 3)


async def test_a_queued_job_has_no_deadline_unless_it_names_one(router: Router) -> None:
    """A backlog must not expire ingress jobs; an HTTP caller, who waits, gets the tier's budget."""
    publisher = RecordingPublisher()
    handler = IngressHandler(router, publisher, "router-test")
    await handler(
        [record(0, request("job-1")), record(1, request("job-2", metadata={"deadline_ms": 90_000}))]
    )
    routed = {
        r.request_id: r
        for r in (RoutedRequest.model_validate_json(m.value) for m in publisher.calls[0])
    }
    assert routed["job-1"].deadline_at is None
    job2 = routed["job-2"]
    assert job2.deadline_at is not None
    assert (job2.deadline_at - job2.routed_at).total_seconds() == 90
    waited = router.route(ChatRequest.model_validate_json(request("http-1")), "replies")
    tier = router.config.tier(waited.tier)
    assert waited.deadline_at is not None
    assert (waited.deadline_at - waited.routed_at).total_seconds() == tier.request_timeout_s


async def test_a_failed_publish_raises_and_counts_nothing(router: Router) -> None:
    """The consumer retries a batch whose publish failed and commits only after it succeeds."""
    publisher = RecordingPublisher(fail=1)
    handler = IngressHandler(router, publisher, "router-test")
    batch = [record(0, request("r-1"))]
    with pytest.raises(ConnectionError):
        await handler(batch)
    assert (handler.routed, publisher.calls) == (0, [])
    await handler(batch)
    assert handler.routed == 1 and len(publisher.calls) == 1


@pytest.mark.parametrize(
    "body",
    [
        {"request_id": "p-1", "messages": [{"role": "user", "content": "hi"}]},
        {
            "request_id": "p-2",
            "model": "vision",
            "messages": [
                {"role": "system", "content": "be brief"},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this?"},
                        {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
                    ],
                },
            ],
            "max_tokens": 1.0,  # coerced to 1 by the model, as a worker will do again
            "temperature": 0,
            "metadata": {"tenant": "t", "deadline_ms": 5000, "tags": {"a": "b"}},
            "unknown_field": {"kept": "as the producer sent it"},
        },
        {"request_id": "p-3", "messages": [{"role": "user", "content": "é \u2603 \\n"}]},
    ],
)
def test_the_producers_json_inside_a_routed_message_reads_as_the_canonical_form(
    router: Router, body: dict[str, object]
) -> None:
    raw = json.dumps(body, indent=1).encode()
    routed = router.route(ChatRequest.model_validate_json(raw), TOPICS.results)
    spliced = router.encode(routed, raw)
    canonical = router.encode(routed)
    assert spliced.topic == canonical.topic and spliced.key == canonical.key
    assert RoutedRequest.model_validate_json(spliced.value) == routed
    assert RoutedRequest.model_validate_json(canonical.value) == routed


def test_a_request_without_its_own_id_is_serialised_in_full(router: Router) -> None:
    raw = request(None)
    routed = router.route(ChatRequest.model_validate_json(raw), TOPICS.results)
    message = router.encode(routed, raw)
    assert RoutedRequest.model_validate_json(message.value).request_id == routed.request_id


async def test_a_request_over_the_size_limit_is_a_dead_letter_naming_the_limit(
    router: Router,
) -> None:
    publisher = RecordingPublisher()
    handler = IngressHandler(router, publisher, "router-test", max_bytes=2048)
    big = request("big-1", messages=[{"role": "user", "content": "x" * 4096}])
    await handler([record(0, big), record(1, request("small-1"))])
    out = publisher.calls[0]
    letters = [json.loads(m.value) for m in out if m.topic == TOPICS.dead_letter]
    assert len(letters) == 1 and "over 2048" in letters[0]["reason"]
    assert letters[0]["truncated"] is False and letters[0]["payload_bytes"] == len(big)
    errors = [json.loads(m.value) for m in out if m.topic == TOPICS.results]
    assert [(e["request_id"], e["code"]) for e in errors] == [("big-1", "invalid_request")]
    assert handler.routed == 1


async def test_an_image_over_the_limit_is_a_dead_letter_naming_the_part() -> None:
    config = load_config(ROOT / "config" / "simulated.yaml")
    router = Router(config, TOPICS, publisher=None, max_image_bytes=1024)  # type: ignore[arg-type]
    publisher = RecordingPublisher()
    handler = IngressHandler(router, publisher, "router-test")
    url = "data:image/jpeg;base64," + base64.b64encode(bytes(1025)).decode()
    parts = [{"type": "image_url", "image_url": {"url": url}}]
    await handler([record(0, request("img-1", messages=[{"role": "user", "content": parts}]))])

    out = publisher.calls[0]
    [letter] = [json.loads(m.value) for m in out if m.topic == TOPICS.dead_letter]
    assert letter["reason"].startswith("messages[0].content[0].image_url.url: inline image of 1025")
    [error] = [json.loads(m.value) for m in out if m.topic == TOPICS.results]
    assert (error["request_id"], error["code"]) == ("img-1", "invalid_request")
    assert (handler.routed, handler.dead_letters) == (0, 1)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"metadata": {"deadline_ms": 10**15}}, "metadata.deadline_ms"),
        ({"max_tokens": 2**63}, "max_tokens"),
        ({"metadata": {"priority": -1}}, "metadata.priority"),
        ({"tools": [{"type": "function"}]}, "tools.0.function"),
        ({"tool_choice": "required"}, "'tool_choice' requires a tool"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"functions": [{"name": "f"}]}, "'functions'"),
        ({"stream": True}, "'stream': true is served over HTTP"),
        ({"top_logprobs": 2}, "'top_logprobs' needs 'logprobs'"),
        ({"n": 200}, "n"),
        ({"metadata": {"order": 17}}, "metadata"),
        ({"verbosity": "low"}, "'verbosity'"),
    ],
)
async def test_out_of_bounds_or_unsupported_fields_are_refused_and_the_next_routed(
    router: Router, fields: dict[str, object], named: str
) -> None:
    # nothing over Kafka is dropped silently: what HTTP refuses with a 400 is a dead letter and
    # a ChatError here, and the request behind it on the partition is routed
    publisher = RecordingPublisher()
    handler = IngressHandler(router, publisher, "router-test")
    await handler([record(20, request("bad-1", **fields)), record(21, request("good-1"))])
    out = publisher.calls[0]
    routed = [RoutedRequest.model_validate_json(m.value) for m in out if ".tier." in m.topic]
    assert [r.request_id for r in routed] == ["good-1"]
    (letter,) = [json.loads(m.value) for m in out if m.topic == TOPICS.dead_letter]
    assert named in letter["reason"] and letter["offset"] == 20
    (error,) = [json.loads(m.value) for m in out if m.topic == TOPICS.results]
    assert (error["request_id"], error["code"]) == ("bad-1", "invalid_request")


async def test_an_unexpected_routing_failure_is_a_dead_letter_not_a_stalled_batch(
    router: Router, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = router.route

    def route(request: ChatRequest, *args: object, **kwargs: object) -> RoutedRequest:
        if request.request_id == "boom":
            raise OverflowError("date value out of range")
        return real(request, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(router, "route", route)
    publisher = RecordingPublisher()
    handler = IngressHandler(router, publisher, "router-test")
    await handler([record(30, request("boom")), record(31, request("fine"))])
    out = publisher.calls[0]
    assert [m.topic for m in out].count(TOPICS.tier("fast")) == 1
    (letter,) = [json.loads(m.value) for m in out if m.topic == TOPICS.dead_letter]
    assert letter["error_type"] == "OverflowError" and "out of range" in letter["reason"]
    (error,) = [json.loads(m.value) for m in out if m.topic == TOPICS.results]
    assert error["code"] == "internal_error"


SEMANTIC = """
tiers:
  fast: {models: [{model: openai/sim-light}]}
  balanced: {models: [{model: openai/sim-balanced}]}
  reasoning: {models: [{model: openai/sim-reasoning}]}
rules:
  - {name: declared, when: requires_reasoning, tier: reasoning}
semantic:
  threshold: 0.45
  top_k: 1
  routes:
    maths:
      tier: reasoning
      utterances: ["Solve 4x - 3 = 9 for x", "What is the integral of x squared?",
                   "Compute the probability of two heads in three coin flips"]
    support:
      tier: fast
      utterances: ["I forgot my password and cannot log in", "Where is my order?",
                   "Please refund the duplicate charge on my card"]
default: balanced
"""


async def test_the_semantic_stage_routes_an_ingress_batch_and_stamps_its_score(
    tmp_path: Path,
) -> None:
    from services.router.stage import SemanticStage

    path = tmp_path / "routing.yaml"
    path.write_text(SEMANTIC)
    config = load_config(path)
    stage = SemanticStage.for_config(config)
    assert stage is not None
    router = Router(config, TOPICS, publisher=None, semantic=stage)  # type: ignore[arg-type]
    publisher = RecordingPublisher()
    handler = IngressHandler(router, publisher, "router-test")

    def ask(request_id: str, text: str, **fields: object) -> bytes:
        return request(request_id, messages=[{"role": "user", "content": text}], **fields)

    try:
        await handler(
            [
                record(1, ask("s-1", "Find x if 3x + 7 = 22 and explain each step")),
                record(2, ask("s-2", "I can't sign in, my password reset email never came")),
                record(3, b"not json"),
                record(4, ask("s-3", "hello", metadata={"requires_reasoning": True})),
                record(5, ask("s-4", "Write a haiku about autumn leaves")),
            ]
        )
    finally:
        stage.close()
    out = publisher.calls[0]
    routed = {
        r.request_id: r
        for r in (RoutedRequest.model_validate_json(m.value) for m in out if ".tier." in m.topic)
    }
    assert (routed["s-1"].tier, routed["s-1"].rule) == ("reasoning", "semantic:maths")
    assert (routed["s-2"].tier, routed["s-2"].rule) == ("fast", "semantic:support")
    for r in (routed["s-1"], routed["s-2"]):
        assert r.route_score is not None and 0.45 <= r.route_score <= 1
    # a rule before the stage: the stage never ran
    assert (routed["s-3"].rule, routed["s-3"].route_score) == ("declared", None)
    # nothing near enough: the default, with the best score kept for tuning the threshold
    s4 = routed["s-4"]
    assert (s4.tier, s4.rule) == ("balanced", "default")
    assert s4.route_score is not None and s4.route_score < 0.45
    assert sum(m.topic == TOPICS.dead_letter for m in out) == 1
    assert handler.routed == 4 and handler.dead_letters == 1
