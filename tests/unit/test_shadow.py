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


# --- slices --------------------------------------------------------------------------------------


def _request(*texts: str, max_tokens: int | None = None, image: bool = False) -> ChatRequest:
    messages: list[dict[str, Any]] = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(texts)
    ]
    if image:
        messages[-1]["content"] = [
            {"type": "text", "text": texts[-1]},
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
        ]
    return ChatRequest(messages=messages, max_tokens=max_tokens)


@pytest.mark.parametrize(
    ("request_", "tokens_out", "slices"),
    [
        (_request("Where is my parcel?"), 10, ["short"]),
        (_request("ok then " * 70), 10, []),  # neither short nor long
        (_request("a long report. " * 600), 10, ["long"]),
        (_request(*["turn"] * 8), 10, ["short", "long conversation"]),
        (_request("what is in it?", image=True), 10, ["short", "multimodal"]),
        (_request("HELP!!!!!!!!! my order"), 10, ["short", "noisy or truncated"]),
        (_request("Ã©Ã¨Ã  â€™ order Ã§a"), 10, ["short", "noisy or truncated"]),
        (_request("Summarise the thread", max_tokens=50), 50, ["short", "noisy or truncated"]),
        (_request("Summarise the thread", max_tokens=50), 49, ["short"]),
    ],
)
def test_slices(request_: ChatRequest, tokens_out: int, slices: list[str]) -> None:
    assert domain.slices_of(request_, tokens_out) == slices


def test_a_captured_image_counts_as_multimodal() -> None:
    from services.common.capture import redacted_request

    body, _ = redacted_request(_request("what is in it?", image=True))
    captured = ChatRequest.model_validate(body)
    assert captured.messages[0].image_count() == 0
    assert "multimodal" in domain.slices_of(captured, 1)


# --- replays -------------------------------------------------------------------------------------

REPLAY_CONFIG = """
tiers:
  fast:
    timeout_s: 7
    models: [{model: openai/sim-light, name: sim-light}, {model: openai/sim-balanced, name: sb}]
  deep:
    models: [{model: openai/sim-reasoning, name: deep-one}]
rules:
  - {name: long, when: "prompt_chars > 100", tier: deep}
default: fast
"""


def replayed(
    kind: str, against: str, config_text: str | None = None, prompt: str = "", text: str = "x"
) -> ShadowRequest:
    from schemas.control import Replay

    base = mirror()
    request = base.routed.request
    if prompt:
        request = ChatRequest(messages=[{"role": "user", "content": prompt}])
    routed = base.routed.model_copy(update={"experiment": None, "request": request})
    baseline = base.baseline.model_copy(update={"text": text})
    replay = Replay(run="r1", kind=kind, against=against, config_text=config_text,  # type: ignore[arg-type]
                    tenant_hash="abc", source="captured")  # fmt: skip
    return ShadowRequest(routed=routed, baseline=baseline, replay=replay)


@pytest.mark.parametrize(
    ("kind", "against", "called"),
    [("model", "sb", "sb"), ("model", "next", "next"), ("tier", "fast", "sim-light")],
)
async def test_a_replay_calls_what_it_is_against(
    tmp_path: Path, kind: str, against: str, called: str
) -> None:
    client = FakeClient({"sb": "a", "next": "b", "sim-light": "c"})
    shadow, published = service(
        tmp_path,
        CONFIG.replace(
            "[{model: openai/sim-light, name: sim-light}]",
            "[{model: openai/sim-light, name: sim-light}, {model: openai/sim-balanced, name: sb}]",
        ),
        client,
    )
    comparison = await shadow.handle(replayed(kind, against))
    assert client.calls == [called]
    assert (comparison.experiment, comparison.candidate_model) == ("replay-r1", called)
    assert comparison.outcome == "compared" and comparison.slices == ["short"]
    assert comparison.candidate_tokens_in == 10 and comparison.baseline_tokens_in == 10
    event = published.sent[0][1]
    assert (event["experiment"], event["variant"], event["tenant_hash"]) == (
        "replay-r1",
        "shadow",
        "abc",
    )


async def test_a_replay_against_a_config_goes_where_that_config_routes(tmp_path: Path) -> None:
    client = FakeClient({"sim-light": "a", "deep-one": "b"})
    shadow, _ = service(tmp_path, CONFIG, client)
    short = await shadow.handle(replayed("config", "new.yaml", REPLAY_CONFIG))
    deep = await shadow.handle(replayed("config", "new.yaml", REPLAY_CONFIG, "parcel " * 40))
    assert client.calls == ["sim-light", "deep-one"]
    assert (short.candidate_model, deep.candidate_model) == ("sim-light", "deep-one")


async def test_a_replay_of_an_unknown_model_or_a_bad_config_is_dropped_with_the_reason(
    tmp_path: Path,
) -> None:
    client = FakeClient({})
    shadow, _ = service(tmp_path, CONFIG, client)
    gone = await shadow.handle(replayed("model", "nosuch"))
    assert gone.outcome == "dropped" and "no model 'nosuch'" in gone.reason
    assert "sim-light" in gone.reason and "next" in gone.reason  # what it has
    bad = await shadow.handle(replayed("config", "bad.yaml", "tiers: {}\ndefault: x\n"))
    assert bad.outcome == "dropped" and "bad.yaml" in bad.reason
    assert client.calls == []


async def test_a_replay_without_the_original_text_has_no_similarity(tmp_path: Path) -> None:
    client = FakeClient({"next": "The parcel left the depot this morning."})
    shadow, _ = service(tmp_path, CONFIG, client)
    comparison = await shadow.handle(replayed("model", "next", text=""))
    assert comparison.outcome == "compared" and comparison.similarity is None
    assert comparison.same_response is False  # the hash is still compared
