"""Answer quality through the simulator's HTTP app: poor answers are detectable by exactly what a
cascade's verifier checks (hedges, length, a "final answer" line, JSON Schema validity, mean
token logprob), good ones pass, and headers and statistics say which was which.

Verdicts are fixed by a hash of (model, prompt, choice), so a test either uses a prompt whose
built-in verdicts are known (and says so) or sets the class's rate to 0 or 1.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from statistics import mean
from typing import Any

import httpx
import jsonschema
import pytest

from services.simulator.quality import FINAL_ANSWER, HEDGES, POOR_OPENERS
from tests.component.test_simulator import _sse_events, running_simulator

# With the built-in rates (sim-light maths 0.2, sim-reasoning 0.97) the hash makes this prompt's
# first choice poor on sim-light and good on sim-reasoning.
MATHS = "Find x if 3x + 7 = 22 and explain each step."
FINAL_LINE = re.compile(rf"(?m)^{re.escape(FINAL_ANSWER)}$")
ORDER_SCHEMA = {
    "type": "object",
    "properties": {
        "order_id": {"type": "string"},
        "amount": {"type": "number"},
        "refund": {"type": "boolean"},
    },
    "required": ["order_id", "amount", "refund"],
    "additionalProperties": False,
}


@pytest.fixture
def simulator() -> Iterator[str]:
    with running_simulator() as (base, _):
        yield base


@pytest.fixture
async def http(simulator: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=simulator, timeout=10.0) as client:
        yield client


def _chat(model: str, prompt: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], **extra}


async def _ask(http: httpx.AsyncClient, body: dict[str, Any], **headers: str) -> httpx.Response:
    response = await http.post("/v1/chat/completions", json=body, headers=headers)
    assert response.status_code == 200, response.text
    return response


async def _set_quality(http: httpx.AsyncClient, model: str, **rates: float) -> None:
    response = await http.patch(f"/simulator/profiles/{model}", json={"quality": rates})
    response.raise_for_status()


def _content(response: httpx.Response, index: int = 0) -> str:
    content: str = response.json()["choices"][index]["message"]["content"]
    return content


async def test_sim_light_fails_a_maths_prompt_that_sim_reasoning_answers(
    http: httpx.AsyncClient,
) -> None:
    light = await _ask(http, _chat("sim-light", MATHS))
    reasoning = await _ask(http, _chat("sim-reasoning", MATHS))
    assert light.headers["x-simulator-class"] == reasoning.headers["x-simulator-class"] == "maths"
    assert (light.headers["x-simulator-quality"], reasoning.headers["x-simulator-quality"]) == (
        "poor",
        "good",
    )

    poor, good = _content(light), _content(reasoning)
    assert any(poor.startswith(opener) for opener in POOR_OPENERS)
    assert HEDGES.search(poor) and not HEDGES.search(good)
    assert not FINAL_LINE.search(poor) and FINAL_LINE.search(good)
    assert good.endswith("\nFinal answer: 42")
    # a third of sim-light's 66 tokens, finished by choice rather than cut
    assert light.json()["usage"]["completion_tokens"] == len(poor.split()) == 22
    assert light.json()["choices"][0]["finish_reason"] == "stop"
    assert reasoning.json()["usage"]["completion_tokens"] == len(good.split()) == 90

    again = await _ask(http, _chat("sim-light", MATHS))
    assert _content(again) == poor  # the same request, the same verdict and words


async def test_the_rate_decides_and_a_patch_changes_it(http: httpx.AsyncClient) -> None:
    await _set_quality(http, "sim-light", maths=1.0)
    good = await _ask(http, _chat("sim-light", MATHS))
    assert good.headers["x-simulator-quality"] == "good" and FINAL_LINE.search(_content(good))
    await _set_quality(http, "sim-reasoning", maths=0.0)
    poor = await _ask(http, _chat("sim-reasoning", MATHS))
    assert poor.headers["x-simulator-quality"] == "poor" and HEDGES.search(_content(poor))
    profiles = (await http.get("/simulator/profiles")).json()["profiles"]
    assert profiles["sim-reasoning"]["quality"]["maths"] == 0.0
    assert profiles["sim-reasoning"]["quality"]["coding"] == 0.95  # merged class by class


async def test_a_capped_good_answer_has_no_final_line(http: httpx.AsyncClient) -> None:
    capped = await _ask(http, _chat("sim-reasoning", MATHS, max_tokens=20))
    assert capped.json()["choices"][0]["finish_reason"] == "length"
    assert capped.headers["x-simulator-quality"] == "good"
    assert not FINAL_LINE.search(_content(capped)) and not HEDGES.search(_content(capped))


async def test_a_poor_stream_is_the_poor_answer_with_its_headers(http: httpx.AsyncClient) -> None:
    plain = await _ask(http, _chat("sim-light", MATHS))
    request = _chat("sim-light", MATHS, stream=True, stream_options={"include_usage": True})
    streamed = await _ask(http, request)
    assert streamed.headers["x-simulator-quality"] == "poor"
    assert streamed.headers["x-simulator-class"] == "maths"
    chunks = [e for e in _sse_events(streamed.text) if e != "[DONE]"]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == _content(plain)
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] == len(text.split()) == 22


async def test_n_choices_are_graded_one_by_one(http: httpx.AsyncClient) -> None:
    await _set_quality(http, "sim-balanced", maths=0.5)
    for attempt in range(20):  # distinct prompts until the hash gives one good, one poor
        prompt = f"{MATHS} Attempt {attempt}."
        response = await _ask(http, _chat("sim-balanced", prompt, n=2))
        if response.headers["x-simulator-quality"] in ("good, poor", "poor, good"):
            break
    else:
        pytest.fail("no prompt got a good and a poor choice")
    grades = response.headers["x-simulator-quality"].split(", ")
    body = response.json()
    lengths = [len(_content(response, i).split()) for i in (0, 1)]
    assert lengths[grades.index("good")] == 88 and lengths[grades.index("poor")] == 30
    assert body["usage"]["completion_tokens"] == 88 + 30
    streamed = await _ask(http, _chat("sim-balanced", prompt, n=2, stream=True))
    chunks = [e for e in _sse_events(streamed.text) if e != "[DONE]"]
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert "".join(c["delta"].get("content") or "" for c in mine) == _content(response, index)


async def test_a_poor_json_schema_answer_fails_validation(http: httpx.AsyncClient) -> None:
    prompt = 'Extract the order number and amount from: "Order 77 was refunded 12.50"'
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "order", "schema": ORDER_SCHEMA, "strict": True},
    }
    await _set_quality(http, "sim-light", extraction=0.0)
    poor = await _ask(http, _chat("sim-light", prompt, response_format=response_format))
    assert poor.headers["x-simulator-class"] == "extraction"
    assert poor.headers["x-simulator-quality"] == "poor"
    with pytest.raises(jsonschema.ValidationError, match="is a required property"):
        jsonschema.validate(json.loads(_content(poor)), ORDER_SCHEMA)

    await _set_quality(http, "sim-light", extraction=1.0)
    good = await _ask(http, _chat("sim-light", prompt, response_format=response_format))
    assert good.headers["x-simulator-quality"] == "good"
    jsonschema.validate(json.loads(_content(good)), ORDER_SCHEMA)


async def test_a_poor_json_object_answer_is_not_json(http: httpx.AsyncClient) -> None:
    await _set_quality(http, "sim-light", maths=0.0)
    request = _chat("sim-light", MATHS, response_format={"type": "json_object"})
    poor = await _ask(http, request)
    with pytest.raises(ValueError):
        json.loads(_content(poor))
    good = await _ask(http, _chat("sim-reasoning", MATHS, response_format={"type": "json_object"}))
    assert set(json.loads(_content(good))) == {"answer"}


async def test_poor_answers_have_low_logprobs_and_good_ones_high(http: httpx.AsyncClient) -> None:
    asked = {"logprobs": True, "top_logprobs": 3}
    poor = await _ask(http, _chat("sim-light", MATHS, **asked))
    good = await _ask(http, _chat("sim-reasoning", MATHS, **asked))

    def logprobs(response: httpx.Response) -> list[float]:
        return [e["logprob"] for e in response.json()["choices"][0]["logprobs"]["content"]]

    assert mean(logprobs(poor)) <= -1.5
    assert mean(logprobs(good)) >= -0.15
    assert max(logprobs(poor)) < min(logprobs(good))
    assert logprobs(await _ask(http, _chat("sim-light", MATHS, **asked))) == logprobs(poor)
    for entry in poor.json()["choices"][0]["logprobs"]["content"]:
        alternatives = [t["logprob"] for t in entry["top_logprobs"]]
        assert alternatives == sorted(alternatives, reverse=True)


async def test_the_class_header_overrides_the_classifier(http: httpx.AsyncClient) -> None:
    hello = _chat("sim-light", "hello there")
    assert (await _ask(http, hello)).headers["x-simulator-class"] == "chit_chat"
    await _set_quality(http, "sim-light", coding=0.0)
    forced = await _ask(http, hello, **{"x-simulator-class": "Coding"})
    assert forced.headers["x-simulator-class"] == "coding"
    assert forced.headers["x-simulator-quality"] == "poor"
    bogus = await http.post(
        "/v1/chat/completions", json=hello, headers={"x-simulator-class": "poetry"}
    )
    assert (bogus.status_code, bogus.json()["error"]["param"]) == (400, "x-simulator-class")
    assert "maths" in bogus.json()["error"]["message"]


async def test_tool_calls_are_not_graded(http: httpx.AsyncClient) -> None:
    await _set_quality(http, "sim-light", maths=0.0)
    tools = [{"type": "function", "function": {"name": "calc", "parameters": {"type": "object"}}}]
    response = await _ask(http, _chat("sim-light", MATHS, tools=tools))
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert response.headers["x-simulator-quality"] == "good"


async def test_stats_count_answers_and_poor_answers_per_class(http: httpx.AsyncClient) -> None:
    await _ask(http, _chat("sim-light", MATHS))  # poor
    await _ask(http, _chat("sim-light", MATHS, stream=True))  # poor, counted once streamed
    await _ask(http, _chat("sim-light", "How do I reset my password?"))  # support: always good
    await _ask(http, _chat("sim-reasoning", MATHS))  # good
    models = (await http.get("/simulator/stats")).json()["models"]
    light, reasoning = models["sim-light"]["quality"], models["sim-reasoning"]["quality"]
    assert light["maths"] == {"served": 2, "poor": 2}
    assert light["support"] == {"served": 1, "poor": 0}
    assert reasoning["maths"] == {"served": 1, "poor": 0}
    assert models["sim-light"]["completed"] == 3


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"quality": {"mathz": 0.5}}, "quality.mathz", "Unrecognized parameter: 'quality.mathz'"),
        ({"quality": {"maths": 1.5}}, "quality.maths", "less than or equal to 1"),
        ({"quality": 0.5}, "quality", "'quality'"),
    ],
)
async def test_bad_quality_patches_are_400s_that_change_nothing(
    http: httpx.AsyncClient, body: Any, param: str, message: str
) -> None:
    before = (await http.get("/simulator/profiles")).json()
    response = await http.patch("/simulator/profiles/sim-light", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param
    assert message in error["message"]
    assert (await http.get("/simulator/profiles")).json() == before


async def test_quality_from_a_profiles_file(tmp_path: Path) -> None:
    path = tmp_path / "profiles.yaml"
    path.write_text("profiles:\n  sim-reasoning: {quality: {maths: 0.0}}\n")
    with running_simulator(profiles_file=path) as (base, _):
        async with httpx.AsyncClient(base_url=base, timeout=10.0) as client:
            response = await _ask(client, _chat("sim-reasoning", MATHS))
            assert response.headers["x-simulator-quality"] == "poor"
            await _set_quality(client, "sim-reasoning", maths=1.0)
            assert (await _ask(client, _chat("sim-reasoning", MATHS))).headers[
                "x-simulator-quality"
            ] == "good"
            reset = await client.post("/simulator/profiles/sim-reasoning/reset")
            assert reset.json()["profile"]["quality"]["maths"] == 0.0  # the file's, restored
