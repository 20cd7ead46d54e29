"""The shadow worker's comparison (services/shadow): similarity, the judge, and when a mirrored
request is dropped; with the model client and the publisher swapped for fakes."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from schemas.control import BaselineAnswer, ShadowRequest
from schemas.topics import Topics
from schemas.v1 import ChatRequest, ExperimentTag, RoutedRequest, Usage
from services.common.routing_config import ModelSpec, load_config
from services.shadow import domain
from services.shadow.service import ShadowService
from services.workers.adapters.llm import Completion
from services.workers.errors import ModelCallError, ProviderUnavailable

CONFIG = """
tiers:
  fast:
    models: [{model: openai/sim-light, name: sim-light}]
default: fast
experiments:
  mirror:
    tier: fast
    mode: shadow
    share: 50
    max_in_flight: 1
    max_lag_s: 30
    candidate: {model: openai/sim-balanced-next, name: next}
"""


@pytest.mark.parametrize(
    ("a", "b", "low", "high"),
    [
        ("the parcel left the depot", "the parcel left the depot", 1.0, 1.0),
        ("the parcel left the depot", "the parcel left the warehouse", 0.6, 0.95),
        ("the parcel left the depot", "xyzzy 42", 0.0, 0.3),
        ("", "", 1.0, 1.0),
    ],
)
def test_text_similarity(a: str, b: str, low: float, high: float) -> None:
    assert low <= domain.text_similarity(a, b) <= high
    assert domain.text_similarity(a, b) == domain.text_similarity(b, a)


@pytest.mark.parametrize(
    ("text", "score"),
    [('{"score": 0.75}', 0.75), ('{"score": 1}', 1.0), ('{"score": 0}', 0.0)],
)
def test_judge_score(text: str, score: float) -> None:
    assert domain.judge_score(text) == score


@pytest.mark.parametrize(
    "text", ["0.7", '{"score": 1.5}', '{"score": true}', '{"points": 1}', '{"score": "high"}']
)
def test_unreadable_judge_answers(text: str) -> None:
    with pytest.raises(domain.JudgeUnreadable):
        domain.judge_score(text)


def test_the_judge_sees_the_request_and_both_answers() -> None:
    request = ChatRequest(messages=[{"role": "user", "content": "Where is my parcel?"}])
    asked = domain.judge_request(request, "It left.", "It is on its way.")
    prompt = asked.messages[-1].text()
    assert "Where is my parcel?" in prompt and "It left." in prompt and "on its way" in prompt
    assert asked.response_format is not None and asked.response_format.type == "json_schema"


class FakeClient:
    def __init__(self, answers: dict[str, str | Exception]) -> None:
        self.answers = answers
        self.calls: list[str] = []

    async def complete(self, spec: ModelSpec, request: ChatRequest, timeout_s: float) -> Completion:
        self.calls.append(spec.label)
        answer = self.answers[spec.label]
        if isinstance(answer, Exception):
            raise answer
        body = {"choices": [{"message": {"role": "assistant", "content": answer}}]}
        usage = Usage(prompt_tokens=10, completion_tokens=5, total_tokens=15)
        return Completion(body, usage, None, 12.5, 0.0001)


class FakePublisher:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    async def publish(
        self, topic: str, message: BaseModel, key: str | None = None, headers: Any = None
    ) -> None:
        self.sent.append((topic, json.loads(message.model_dump_json())))


def mirror(answered_at: datetime | None = None, name: str = "mirror") -> ShadowRequest:
    request = ChatRequest(messages=[{"role": "user", "content": "Where is my parcel?"}])
    routed = RoutedRequest(
        request=request,
        tier="fast",
        rule="default",
        config_hash="h",
        reply_to="switchboard.results.v1",
        experiment=ExperimentTag(name=name, variant="baseline", share_pct=50.0),
    )
    baseline = BaselineAnswer(
        model="sim-light",
        latency_ms=20.0,
        tokens_in=10,
        tokens_out=6,
        cost_usd=0.00005,
        response_sha256=domain.__name__,  # any hash the candidate's text will not have
        text="The parcel left the depot this morning.",
        answered_at=answered_at or datetime.now(UTC),
    )
    return ShadowRequest(routed=routed, baseline=baseline)


def service(tmp_path: Path, config: str, client: FakeClient) -> tuple[ShadowService, FakePublisher]:
    path = tmp_path / "routing.yaml"
    path.write_text(config)
    publisher = FakePublisher()
    return ShadowService(load_config(path), Topics("t"), publisher, client), publisher


async def test_a_mirrored_request_is_compared_and_recorded(tmp_path: Path) -> None:
    client = FakeClient({"next": "The parcel left the depot today."})
    shadow, published = service(tmp_path, CONFIG, client)
    comparison = await shadow.handle(mirror())
    assert comparison.outcome == "compared" and comparison.similarity_by == "text"
    assert comparison.same_response is False and 0.5 < (comparison.similarity or 0) < 1
    assert (comparison.candidate_latency_ms, comparison.candidate_tokens_out) == (12.5, 5)
    topics = [t for t, _ in published.sent]
    assert topics == ["t.events.v1", "t.shadow-comparisons.v1"]
    event = published.sent[0][1]
    assert (event["variant"], event["model"], event["experiment"]) == ("shadow", "next", "mirror")


async def test_a_failing_candidate_is_recorded_not_raised(tmp_path: Path) -> None:
    shadow, published = service(tmp_path, CONFIG, FakeClient({"next": ProviderUnavailable("503")}))
    comparison = await shadow.handle(mirror())
    assert comparison.outcome == "candidate_failed" and "provider_error" in comparison.reason
    assert published.sent[0][1]["status"] == "error"


async def test_late_and_unknown_mirrors_are_dropped(tmp_path: Path) -> None:
    client = FakeClient({"next": "x"})
    shadow, _ = service(tmp_path, CONFIG, client)
    late = await shadow.handle(mirror(datetime.now(UTC) - timedelta(seconds=31)))
    assert late.outcome == "dropped" and "max_lag_s 30" in late.reason
    gone = await shadow.handle(mirror(name="other"))
    assert gone.outcome == "dropped" and "no shadow experiment 'other'" in gone.reason
    assert client.calls == [] and shadow.outcomes["dropped"] == 2


async def test_a_judge_scores_and_its_failure_falls_back_to_text(tmp_path: Path) -> None:
    judged = CONFIG + "    judge: {model: openai/sim-light, name: judge}\n"
    client = FakeClient({"next": "Left the depot.", "judge": '{"score": 0.8}'})
    shadow, _ = service(tmp_path, judged, client)
    comparison = await shadow.handle(mirror())
    assert (comparison.similarity, comparison.similarity_by) == (0.8, "judge")
    client.answers["judge"] = "I think they are alike"
    comparison = await shadow.handle(mirror())
    assert comparison.similarity_by.startswith("text (judge failed")
    client.answers["judge"] = ModelCallError("boom")
    comparison = await shadow.handle(mirror())
    assert comparison.similarity_by.startswith("text (judge failed")
